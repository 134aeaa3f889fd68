"""Warm start through the shared statistics (issue 11's benchmark): does what node A learned speed up node B?

    .venv/bin/python -m specstore.bench.warm_start --index IDX [--n-per-half 2] [--max-new-tokens 128]
        [--threads 2] [--verify-profile GPU_PROFILE.json --max-budget 48] [--json OUT]

Spec-Bench prompts are split per category: node A decodes the first ``--n-a`` of each category, node B
the next ``--n-per-half`` (a related but different workload). Two real ``datastore-serve`` processes serve the same
index with ``--stats-dir``:

  warm  the service node A decoded through (A pushed its statistics while decoding); node B's recycling
        table starts from the service's rows (PullStats) and its lookups get the statistics fused in;
  cold  a service with empty statistics; node B starts with an empty recycling table.

Both B nodes have the same drafters (datastore, context, recycling) and both push while they decode (each
to its own service), so they differ only in what node A left behind. With ``--share-outputs`` every node
also pushes its finished generations (the service's recent outputs, matched next to the corpus). B's prompts run cold and warm
interleaved, alternating which goes first. Reported per side: MAT (new tokens per target forward, i.e. per
decode step), tokens/s, medians over prompts, and whether warm and cold outputs are identical (both are
lossless, so they must be). The model is loaded once; the servers are separate processes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .push_crash import Server
from .spec_bench import CATEGORIES, DEFAULT_QUESTIONS, load_questions, select_prompts


def split_prompts(questions, n: int, n_a: Optional[int] = None) -> tuple[list, list]:
    """(A, B): per category, the first ``n_a`` (default n) prompts for A, the next n for B."""
    n_a = n if n_a is None else n_a
    chosen, _ = select_prompts(questions, CATEGORIES, n_a + n)
    a, b = [], []
    for cat in CATEGORIES:
        ps = [p for p in chosen if p.category == cat]
        a.extend(ps[:n_a])
        b.extend(ps[n_a:n_a + n])
    return a, b


class Node:
    """One decoder (the model shared) with datastore, context and recycling drafters, and a StatsSharer that
    pushes to the service it looks up in (``share_to="same"``), to another one (an address), or nowhere (None)."""

    def __init__(self, model, tok, address: str, max_budget: int, *, warm: bool = False,
                 share_to: Optional[str] = "same", share_outputs: bool = False, profile=None):
        from ..client.budget import cached_cost_profile
        from ..client.datastore_client import DatastoreClient
        from ..client.datastore_drafter import make_datastore_drafter
        from ..client.decoder import SpeculativeDecoder
        from ..client.drafters import ContextDrafter, RecyclingDrafter
        from ..client.shared_stats import StatsSharer
        from ..datastore.model_files import resolve_model

        self.ds = make_datastore_drafter(address=address, tokenizer=tok, timeout_s=0.05)
        self.recycling = RecyclingDrafter(int(model.config.vocab_size))
        drafters = [self.ds, ContextDrafter(), self.recycling]
        self.sharer, self._sink = None, None
        if share_to is not None:
            if share_to != "same":
                self._sink = DatastoreClient(share_to)
            self.sharer = StatsSharer(self._sink or self.ds.backend.client, recycling=self.recycling,
                                      share_outputs=share_outputs)
            drafters.append(self.sharer)
        self.warm_rows = self.sharer.warm_start() if warm and self.sharer is not None else 0
        if profile is None:
            profile = cached_cost_profile(model, resolve_model(None).name)    # spec-generate's cached profile
        self.dec = SpeculativeDecoder(model, tok, drafters, profile=profile, max_budget=max_budget)

    def run(self, prompt, max_new_tokens: int) -> dict:
        ids = self.dec.encode_prompt(prompt.text)
        t0 = time.perf_counter()
        res = self.dec.generate(ids, max_new_tokens=max_new_tokens, prompt_text=prompt.text)
        secs = time.perf_counter() - t0
        steps = max(1, len(res.drafted_per_step))
        return {"tokens": res.new_tokens, "steps": steps, "mat": len(res.new_tokens) / steps,
                "tokens_per_second": len(res.new_tokens) / max(secs, 1e-9), "seconds": secs}

    def close(self) -> None:
        if self.sharer is not None:
            self.sharer.close()
        if self._sink is not None:
            self._sink.close()
        self.ds.close()


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.warm_start", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True, help="the index both services serve")
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--n-per-half", type=int, default=2, help="prompts per category for B (and for A)")
    ap.add_argument("--n-a", type=int, default=None, help="prompts per category for A (default: --n-per-half)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-budget", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--share-outputs", action="store_true",
                    help="every node also pushes its finished generations to the service's recent outputs, which "
                         "its lookups match next to the corpus (shared outputs are opt-in in the product)")
    ap.add_argument("--verify-profile", type=Path, default=None,
                    help="size trees by this verify-cost profile instead of this machine's: a CostProfile JSON, or "
                         "a bench/gpu_profile.py report (e.g. bench/results/gpu_profile_smollm2-135m.json, an H100: "
                         "MAT as trees sized for a GPU would get; tokens/s are still this machine's)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    from ..client.models import load_model

    torch.set_num_threads(a.threads)
    prompts_a, prompts_b = split_prompts(load_questions(a.questions), a.n_per_half, a.n_a)
    model, tok = load_model(dtype="float32")   # the precision of the figures in BENCHMARKS.md §6
    from ..client.budget import CostProfile

    profile = CostProfile.load(a.verify_profile) if a.verify_profile else None
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        tmp = Path(tmp)
        warm_srv = Server(a.index, tmp / "stats-warm", tmp / "warm.log", args=[])
        cold_srv = Server(a.index, tmp / "stats-cold", tmp / "cold.log", args=[])
        try:
            warm_srv.wait_ready(); cold_srv.wait_ready()
            node_a = Node(model, tok, warm_srv.address, a.max_budget, share_outputs=a.share_outputs, profile=profile)
            a_runs = []
            for i, p in enumerate(prompts_a):
                a_runs.append(node_a.run(p, a.max_new_tokens))
                print(f"A {i + 1}/{len(prompts_a)} {p.category}: MAT {a_runs[-1]['mat']:.2f}", file=sys.stderr)
            node_a.close()
            cold = Node(model, tok, cold_srv.address, a.max_budget, share_outputs=a.share_outputs, profile=profile)
            warm = Node(model, tok, warm_srv.address, a.max_budget, warm=True, share_outputs=a.share_outputs,
                        profile=profile)
            rows = []
            for i, p in enumerate(prompts_b):
                order = [("cold", cold), ("warm", warm)][:: 1 if i % 2 == 0 else -1]
                r = {name: node.run(p, a.max_new_tokens) for name, node in order}
                rows.append({"category": p.category, "question_id": p.question_id,
                             "identical": r["cold"]["tokens"] == r["warm"]["tokens"],
                             **{f"{k}_{m}": round(r[k][m], 4) for k in ("cold", "warm")
                                for m in ("mat", "tokens_per_second", "steps")}})
                print(f"B {i + 1}/{len(prompts_b)} {p.category}: MAT cold {rows[-1]['cold_mat']:.2f} warm "
                      f"{rows[-1]['warm_mat']:.2f}", file=sys.stderr)
            warm_rows = warm.warm_rows
            cold.close(); warm.close()
        finally:
            warm_srv.stop(); cold_srv.stop()

    def agg(side: str) -> dict:
        steps = sum(r[f"{side}_steps"] for r in rows)
        mats = [r[f"{side}_mat"] for r in rows]
        return {"median_mat": round(statistics.median(mats), 3),
                "pooled_mat": round(sum(m * r[f"{side}_steps"] for m, r in zip(mats, rows)) / steps, 3),
                "median_tokens_per_second": round(statistics.median(r[f"{side}_tokens_per_second"] for r in rows), 2)}

    summary = {"prompts_a": len(prompts_a), "prompts_b": len(prompts_b), "max_new_tokens": a.max_new_tokens,
               "share_outputs": a.share_outputs, "max_budget": a.max_budget,
               "verify_profile": str(a.verify_profile) if a.verify_profile else None,
               "warm_rows_loaded": warm_rows, "a_median_mat": round(statistics.median(r["mat"] for r in a_runs), 3),
               "cold": agg("cold"), "warm": agg("warm"),
               "identical": sum(r["identical"] for r in rows)}
    summary["mat_gain_pooled"] = round(summary["warm"]["pooled_mat"] / summary["cold"]["pooled_mat"] - 1, 4)
    summary["mat_gain_median"] = round(summary["warm"]["median_mat"] / summary["cold"]["median_mat"] - 1, 4)
    print(json.dumps(summary, indent=2))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "b_prompts": rows}, indent=2))
    return 0 if summary["identical"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
