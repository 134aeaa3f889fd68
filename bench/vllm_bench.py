"""One vLLM engine, one method, the same prompts: tokens/s, mean accepted length, output token ids.

Runs in the vLLM environment (``.venv-vllm``, made by scripts/setup.sh), one configuration per process
so that no cache or compiled state carries over between methods:

    .venv-vllm/bin/python -m specstore.bench.vllm_bench --method plain --json-out plain.json
    .venv-vllm/bin/python -m specstore.bench.vllm_bench --method specstore --index DIR --json-out ours.json
    .venv-vllm/bin/python -m specstore.bench.vllm_bench --method specstore --datastore 127.0.0.1:50051 ...
    .venv-vllm/bin/python -m specstore.bench.vllm_bench --method ngram | suffix | null ...

``--batch 1`` sends the prompts one at a time (each ``generate`` call holds one request); ``--batch 8``
sends them eight at a time. A warm-up prompt outside the measured set runs first (unmeasured). Prints one
``done I`` line per finished prompt at batch 1 (tests use it to act mid-run) and writes a JSON report:
per-prompt token ids and seconds, tokens/s over the measured calls, vLLM's spec-decode counters.
``bench/vllm_bench_all.sh`` runs every method at batch 1 and 8; ``--summarize DIR`` tabulates its reports;
``--phases DIR`` splits each batch-1 run into prompt and decode time (ms per output token: what drafting changes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

PROPOSER = "specstore.client.vllm_proposer.SpecstoreProposer"
NULL_PROPOSER = "specstore.bench.vllm_bench.NullProposer"
WARMUP_PROMPT = "List three colours of the rainbow."


def speculative_config(args) -> dict | None:
    k = args.num_speculative_tokens
    if args.method == "plain":
        return None
    if args.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    if args.method == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    if args.method == "specstore":
        return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": k}
    if args.method == "null":
        return {"method": "custom_class", "model": NULL_PROPOSER, "num_speculative_tokens": k}
    raise ValueError(f"unknown method {args.method}")


class NullProposer:
    """A ``custom_class`` proposer that never drafts (method ``null``): the engine in speculative mode with
    nothing to verify, so that plain against null shows what vLLM's speculation machinery costs by itself,
    a cost no proposer can decline."""

    def __init__(self, vllm_config, *_, **__):
        pass

    def load_model(self, *args, **kwargs) -> None:
        pass

    def propose(self, sampled_token_ids, *_, **__) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


def _spec_counters(llm) -> dict:
    out = {}
    try:
        for m in llm.get_metrics():
            if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value"):
                out[m.name.split(":", 1)[1]] = out.get(m.name.split(":", 1)[1], 0) + int(m.value)
    except Exception as e:  # noqa: BLE001 - counters are informative only
        out["error"] = str(e)
    return out


def load_prompts(args) -> tuple[list[str], str]:
    """(measured prompts, the unmeasured warm-up prompt): Spec-Bench's selection, or the --prompt texts."""
    if args.prompts_file:
        from .spec_bench import load_questions, parse_categories, select_prompts

        qs, warm = select_prompts(load_questions(args.prompts_file), parse_categories(args.categories),
                                  args.n_per_category)
        return [q.text for q in qs], (warm.text if warm is not None else WARMUP_PROMPT)
    return list(args.prompt), WARMUP_PROMPT


def summarize(folder: Path) -> str:
    """A Markdown table over the reports in ``folder`` (``CFG_bB_rR.json``): tokens/s (median over rounds, and
    each round's in round order), mean accepted length, outputs identical to ``plain`` at the same batch size;
    then the runs whose proposer stats (``stats/*.json``) show more than 1% of datastore lookups failed."""
    import statistics

    reports: dict[tuple[str, int], list[dict]] = {}
    for f in sorted(folder.glob("*_b*_r*.json")):
        cfg, b, _ = f.stem.rsplit("_", 2)
        reports.setdefault((cfg, int(b[1:])), []).append(json.loads(f.read_text()))
    lines = ["| configuration | batch | tokens/s (median) | each round | mean accepted length | vs vLLM plain | identical to plain |",
             "|---|---:|---:|---|---:|---:|---|"]
    for b in sorted({b for _, b in reports}):
        plain = reports.get(("plain", b), [])
        ref = [sorted(r["runs"], key=lambda x: x["index"]) for r in plain]
        base = statistics.median(r["tokens_per_second"] for r in plain) if plain else None
        for (cfg, bb), rs in sorted(reports.items(), key=lambda kv: (kv[0][1], kv[0][0] != "plain", kv[0][0])):
            if bb != b:
                continue
            tps = statistics.median(r["tokens_per_second"] for r in rs)
            mal = [r["mean_accepted_length"] for r in rs if r["mean_accepted_length"]]
            same = sum(1 for r in rs for x in r["runs"]
                       if ref and x["token_ids"] == ref[0][x["index"]]["token_ids"])
            total = sum(len(r["runs"]) for r in rs)
            mal_text = f"{statistics.median(mal):.2f}" if mal else "-"
            rounds = " / ".join(f"{r['tokens_per_second']:.1f}" for r in rs)
            lines.append(f"| {cfg} | {b} | {tps:.1f} | {rounds} | {mal_text} | {tps / base:.2f}x | {same}/{total} |")
    failed = []   # runs whose datastore mostly did not answer: their figures are not the configuration's
    for f in sorted((folder / "stats").glob("*.json")):
        ds = json.loads(f.read_text()).get("extra", {}).get("datastore") or {}
        bad = ds.get("failures", 0) + ds.get("skipped_breaker_open", 0)
        if bad > 0.01 * ds.get("requests", 0):   # a missed deadline now and then is the design working
            failed.append(f"{f.stem} ({bad} of {ds.get('requests', 0)} lookups failed or skipped)")
    if failed:
        lines += ["", "**Datastore lookups failed in:** " + ", ".join(failed)]
    return "\n".join(lines)


def phases(folder: Path, prompt_lens: Optional[list[int]] = None) -> str:
    """Prompt against decode time, per batch-1 configuration of ``folder``: each report's per-prompt seconds
    fitted as ``c0 + p * prompt tokens + d * output tokens`` (least squares over its prompts). ``d`` (ms per
    output token) is the decode speed that drafting changes; ``p`` (ms per prompt token) is mostly the
    prefill, which every method pays alike, so the part of the run it takes caps any ratio of tokens/s.
    Prompt lengths come from the runs (``prompt_tokens``) or ``prompt_lens`` (by index)."""
    import statistics

    import numpy as np

    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for f in sorted(folder.glob("*_b1_r*.json")):
        cfg = f.stem.rsplit("_", 2)[0]
        runs = sorted(json.loads(f.read_text())["runs"], key=lambda r: r["index"])
        lens = [r.get("prompt_tokens") or (prompt_lens[r["index"]] if prompt_lens else 0) for r in runs]
        if not all(lens) or len(runs) < 4:
            continue
        x = np.array([[1.0, n, len(r["token_ids"])] for n, r in zip(lens, runs)])
        secs = np.array([r["seconds"] for r in runs])
        c0, cp, cd = np.linalg.lstsq(x, secs, rcond=None)[0]
        rows.setdefault(cfg, []).append((cp * 1e3, cd * 1e3, float((c0 + cp * x[:, 1]).sum()), float(secs.sum())))
    lines = ["| configuration (batch 1) | decode ms per output token | vs plain | prompt ms per prompt token | "
             "prompt part of the run (s) | run (s) |", "|---|---:|---:|---:|---:|---:|"]
    med = {cfg: [statistics.median(v[i] for v in vs) for i in range(4)] for cfg, vs in rows.items()}
    base = med.get("plain", [None, None])[1]
    for cfg in sorted(med, key=lambda c: (c != "plain", c)):
        cp, cd, pre, tot = med[cfg]
        ratio = f"{base / cd:.2f}x" if base else "-"
        lines.append(f"| {cfg} | {cd:.1f} | {ratio} | {cp:.2f} | {pre:.1f} | {tot:.1f} |")
    return "\n".join(lines)


def _spec_bench_prompt_lens(folder: Path) -> Optional[list[int]]:
    """The chat-templated lengths of the Spec-Bench prompts a report of ``folder`` ran (reports written
    before they kept ``prompt_tokens``)."""
    from ..datastore.model_files import load_tokenizer, resolve_model
    from .proposer_replay import report_prompts
    from .spec_bench import DEFAULT_QUESTIONS

    report = next((json.loads(f.read_text()) for f in sorted(folder.glob("plain_b1_r*.json"))), None)
    if report is None or not report.get("n_per_category"):
        return None
    tok = load_tokenizer(str(resolve_model(None).cache_dir / "hf"))
    return [len(p) for p in report_prompts(report, tok, os.environ.get("QUESTIONS", DEFAULT_QUESTIONS))]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        print(summarize(Path(sys.argv[2])))
        return 0
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--phases":
        folder = Path(sys.argv[2])
        print(phases(folder, _spec_bench_prompt_lens(folder)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=None, help="HF folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--method", choices=("plain", "ngram", "suffix", "specstore", "null"), default="plain",
                    help="null: speculative mode with a proposer that never drafts (vLLM's own overhead)")
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--index", help="specstore: embedded index (sets SPECSTORE_INDEX)")
    ap.add_argument("--datastore", help="specstore: datastore HOST:PORT (sets SPECSTORE_DATASTORE)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", help="Spec-Bench questions JSONL")
    ap.add_argument("--categories", default=None)
    ap.add_argument("--n-per-category", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="requests per generate call")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile (fast start; tests)")
    ap.add_argument("--kv-cache-gib", default="2")
    ap.add_argument("--json-out", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    if args.index:
        os.environ["SPECSTORE_INDEX"] = args.index
    if args.datastore:
        os.environ["SPECSTORE_DATASTORE"] = args.datastore
    prompts, warmup = load_prompts(args)
    if not prompts:
        ap.error("give --prompt or --prompts-file")
    model = args.model
    if model is None:
        from ..datastore.model_files import resolve_model

        files = resolve_model(None)
        model = str(files.cache_dir / "hf")
        if not (Path(model) / "config.json").exists():
            ap.error(f"{model} does not exist: convert the model once with the main environment "
                     "(spec-generate --max-new-tokens 1 --prompt hi), or give --model HF_FOLDER")

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=args.enforce_eager,
              speculative_config=speculative_config(args), disable_log_stats=False, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    chat = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat([[{"role": "user", "content": warmup}]], sp, use_tqdm=False)
    before = _spec_counters(llm)
    runs, total_tokens, total_s = [], 0, 0.0
    for start in range(0, len(chat), args.batch):
        part = chat[start:start + args.batch]
        t0 = time.perf_counter()
        outs = llm.chat(part, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        total_s += dt
        for j, o in enumerate(outs):
            ids = list(o.outputs[0].token_ids)
            total_tokens += len(ids)
            runs.append({"index": start + j, "token_ids": ids, "text": o.outputs[0].text, "seconds": dt,
                         "prompt_tokens": len(o.prompt_token_ids or [])})
            print(f"done {start + j}", flush=True)
    after = _spec_counters(llm)
    spec = {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "error"}
    drafts = spec.get("spec_decode_num_drafts", 0)
    report = {
        "method": args.method, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "datastore": args.datastore, "index": args.index, "prompts": len(prompts),
        "categories": args.categories, "n_per_category": args.n_per_category if args.prompts_file else None,
        "tokens": total_tokens, "seconds": total_s, "tokens_per_second": total_tokens / max(total_s, 1e-9),
        "mean_accepted_length": (1 + spec.get("spec_decode_num_accepted_tokens", 0) / drafts) if drafts else None,
        "spec_decode": spec, "runs": runs,
    }
    args.json_out.write_text(json.dumps(report))
    print(f"{args.method} batch={args.batch}: {report['tokens_per_second']:.1f} tok/s, "
          f"MAL {report['mean_accepted_length']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
