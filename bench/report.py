"""Spec-Bench report: per-category and overall aggregates, a Markdown table and a PNG bar chart.

Aggregates per (category, method):
- MAT: total new tokens / total target forwards that produced them (plain = 1.0; n/a when unknown);
- tokens/s: total new tokens / total seconds (prefill included);
- speedup (median): median over prompts of (method tokens/s / plain tokens/s on the same prompt);
- speedup (total): method tokens/s / plain tokens/s over the whole category.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .spec_bench import CATEGORIES, PLAIN, BenchResult, median

OVERALL = "overall"


def summarize(result: BenchResult) -> dict:
    """{category or 'overall': {method: {prompts, new_tokens, seconds, mat, tokens_per_second,
    speedup_median, speedup_total, mismatches}}}; categories in Spec-Bench order, 'overall' last."""
    cats = [c for c in CATEGORIES if any(r.category == c for r in result.records)]
    cats += sorted({r.category for r in result.records} - set(cats))
    out: dict = {}
    for cat in cats + [OVERALL]:
        recs = [r for r in result.records if cat == OVERALL or r.category == cat]
        plain = [r for r in recs if r.method == PLAIN]
        plain_tps = _rate(plain)
        row = {}
        for m in result.methods:
            rs = [r for r in recs if r.method == m]
            if not rs:
                continue
            tps = _rate(rs)
            fw = [r.forwards for r in rs]
            mat = (sum(r.new_tokens for r in rs) / sum(fw)) if all(f for f in fw) else None
            row[m] = {
                "prompts": len(rs),
                "new_tokens": sum(r.new_tokens for r in rs),
                "seconds": sum(r.seconds for r in rs),
                "mat": mat,
                "tokens_per_second": tps,
                "speedup_median": median([r.speedup for r in rs]),
                "speedup_total": (tps / plain_tps) if plain_tps else None,
                "mismatches": sum(1 for r in rs if r.identical is False),
            }
        out[cat] = row
    return out


def _rate(rs) -> Optional[float]:
    secs = sum(r.seconds for r in rs)
    return sum(r.new_tokens for r in rs) / secs if secs > 0 else None


def _f(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def render_markdown(result: BenchResult, summary: Optional[dict] = None, plot_path: Optional[str | Path] = None,
                    report_path: Optional[str | Path] = None) -> str:
    summary = summary or summarize(result)
    meta = result.meta
    lines = ["# Spec-Bench: lossless speculative decoding", ""]
    lines.append("Greedy decoding, every method on the same prompts, interleaved in one process (method order "
                 "rotated per prompt). Speedup = tokens/s over plain `model.generate` greedy: median of per-prompt "
                 "ratios, and the ratio of totals in brackets. MAT = new tokens per target forward.")
    lines.append("")
    keys = [("model", "model"), ("device", "device"), ("dtype", "dtype"), ("cpu_model", "CPU"),
            ("torch_threads", "torch threads"), ("torch", "torch"), ("transformers", "transformers"),
            ("date", "date"), ("max_new_tokens", "max new tokens"), ("n_per_category", "prompts per category"),
            ("max_budget", "max draft nodes per step")]
    for k, label in keys:
        if k in meta:
            lines.append(f"- {label}: {meta[k]}")
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    lines.append("")

    methods = [m for m in result.methods]
    others = [m for m in methods if m != PLAIN]
    lines.append("## Speedup vs plain (median per prompt, [total])")
    lines.append("")
    lines.append("| category | " + " | ".join(others) + " |")
    lines.append("|---|" + "---:|" * len(others))
    for cat, row in summary.items():
        cells = []
        for m in others:
            s = row.get(m)
            if s is None:
                cells.append("")
                continue
            cell = f"{_f(s['speedup_median'], '.2f')}x [{_f(s['speedup_total'], '.2f')}x]"
            cells.append(f"**{cell}**" if cat == OVERALL else cell)
        name = f"**{cat}**" if cat == OVERALL else cat
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")

    lines.append("## MAT and tokens/s")
    lines.append("")
    lines.append("| category | " + " | ".join(f"{m} MAT | {m} tok/s" for m in methods) + " |")
    lines.append("|---|" + "---:|---:|" * len(methods))
    for cat, row in summary.items():
        cells = []
        for m in methods:
            s = row.get(m)
            cells += ["", ""] if s is None else [_f(s["mat"], ".2f"), _f(s["tokens_per_second"], ".1f")]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines.append("")

    overall = summary.get(OVERALL, {})
    n_prompts = overall.get(PLAIN, {}).get("prompts", 0)
    lines.append("## Losslessness")
    lines.append("")
    bad = result.mismatches()
    if not bad:
        ours = [m for m in methods if m.startswith("ours")]
        lines.append(f"All {len(ours)} of our configurations produced exactly plain greedy's tokens on all "
                     f"{n_prompts} prompts.")
    else:
        lines.append(f"**{len(bad)} output(s) of ours differ from plain greedy** (first differing new-token position):")
        lines.append("")
        for r in bad:
            lines.append(f"- {r.method}, prompt {r.prompt_index} ({r.category}/{r.question_id}): position {r.first_diff}")
    pld_bad = [r for r in result.records if r.method != PLAIN and not r.method.startswith("ours")
               and r.identical is False]
    if pld_bad:
        lines.append("")
        lines.append(f"(transformers' own methods differed from plain greedy on {len(pld_bad)} prompt(s): "
                     + ", ".join(f"{r.method}@{r.prompt_index}:{r.first_diff}" for r in pld_bad) + ")")
    lines.append("")

    ours = [m for m in methods if m.startswith("ours:")]
    if ours:
        lines.append("## Checks")
        lines.append("")
        for m in ours:
            worst = min(((row[m]["speedup_median"], c) for c, row in summary.items()
                         if c != OVERALL and m in row and row[m]["speedup_median"] is not None), default=None)
            if worst is not None:
                lines.append(f"- {m}: lowest category median speedup {worst[0]:.2f}x ({worst[1]}) -> "
                             + ("never below 1.0x" if worst[0] >= 1.0 else "**below 1.0x**"))
            o, p = overall.get(m, {}).get("speedup_median"), overall.get("pld", {}).get("speedup_median")
            if o is not None and p is not None:
                lines.append(f"- {m}: overall {o:.2f}x vs prompt lookup {p:.2f}x -> "
                             + ("above" if o > p else "**not above**"))
        lines.append("")

    counters = result.meta.get("drafter_counters")
    if counters:
        lines.append("## Drafter counters (whole run, warm-up included)")
        lines.append("")
        for m, by_drafter in counters.items():
            for drafter, c in by_drafter.items():
                lines.append(f"- {m} / {drafter}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        lines.append("")

    if plot_path is not None:
        rel = Path(plot_path)
        if report_path is not None:
            try:
                rel = Path(plot_path).resolve().relative_to(Path(report_path).resolve().parent)
            except ValueError:
                pass
        lines.append(f"![speedup per category]({rel.as_posix()})")
        lines.append("")
    return "\n".join(lines)


def plot_speedup(summary: dict, methods: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Grouped bar chart: speedup (median per prompt) per category for each non-plain method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    others = [m for m in methods if m != PLAIN]
    cats = list(summary.keys())
    x = np.arange(len(cats))
    width = 0.8 / max(len(others), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(cats) + 2), 4.2))
    for i, m in enumerate(others):
        vals = [summary[c].get(m, {}).get("speedup_median") or 0.0 for c in cats]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=m)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 1), textcoords="offset points")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x)
    ax.set_xticklabels(cats, rotation=15)
    ax.set_ylabel("speedup vs plain greedy (median per prompt)")
    ax.set_title(title or "Spec-Bench speedup per category")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(result: BenchResult, report: Optional[str | Path], plot: Optional[str | Path],
                  json_out: Optional[str | Path]) -> dict:
    """Write whichever of the Markdown report, PNG chart and raw JSON are asked for; returns the summary."""
    summary = summarize(result)
    if json_out:
        p = Path(json_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({**result.to_json(), "summary": summary}))
    if plot:
        where = ", ".join(str(result.meta[k]) for k in ("model", "device") if result.meta.get(k))
        title = "Spec-Bench speedup" + (f" ({where})" if where else "")
        plot_speedup(summary, result.methods, plot, title=title)
    if report:
        p = Path(report)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(render_markdown(result, summary, plot_path=plot, report_path=p))
    return summary
