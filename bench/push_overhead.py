"""What sharing costs the decoder (issue 11's push-path benchmark): the same decoder with and without a
StatsSharer (client/shared_stats.py), interleaved per prompt in one process. Both look up in one real
``datastore-serve`` without statistics; the sharing one pushes to a second one (``--stats-dir``), so that
what it pushes cannot draft for either: only the cost of sharing is measured (its gain: bench/warm_start.py).

    .venv/bin/python -m specstore.bench.push_overhead --index IDX [--n-per-category 1] [--max-new-tokens 128]

Both variants draft from the datastore, context and recycling drafters (so the target's top-k is computed
either way); the sharing one also pushes (top-k rows of every verified node, accepted-token runs) from its
background thread. The order alternates per prompt. Reported: median tokens/s of each and their ratio (the
decode slowdown), pushes and rows per second of decoding, and whether outputs are identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .push_crash import Server
from .spec_bench import CATEGORIES, DEFAULT_QUESTIONS, load_questions, select_prompts
from .warm_start import Node


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.push_overhead", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--n-per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    from ..client.models import load_model

    torch.set_num_threads(a.threads)
    prompts, warm = select_prompts(load_questions(a.questions), CATEGORIES, a.n_per_category)
    model, tok = load_model(dtype="float32")   # the precision of the figures in BENCHMARKS.md §6
    with tempfile.TemporaryDirectory(prefix="push-overhead-") as tmp:
        # lookups go to a server without statistics, pushes to another one: what one variant pushes must not
        # draft for the other (that is the feature's gain, bench/warm_start.py), only its cost is measured here
        srv = Server(a.index, None, Path(tmp) / "serve.log", args=[])
        sink = Server(a.index, Path(tmp) / "stats", Path(tmp) / "sink.log", args=[])
        try:
            srv.wait_ready()
            sink.wait_ready()
            nodes = {"plain_sharing_off": Node(model, tok, srv.address, 16, share_to=None),
                     "sharing": Node(model, tok, srv.address, 16, share_to=sink.address)}
            if warm is not None:
                for node in nodes.values():
                    node.run(warm, 16)
            tps = {k: [] for k in nodes}
            secs = {k: 0.0 for k in nodes}
            identical = 0
            sharer = nodes["sharing"].sharer
            pushed0 = sharer.pusher.stats["pushed"]
            for i, p in enumerate(prompts):
                order = list(nodes)[:: 1 if i % 2 == 0 else -1]
                toks = {}
                for name in order:
                    r = nodes[name].run(p, a.max_new_tokens)
                    tps[name].append(r["tokens_per_second"])
                    secs[name] += r["seconds"]
                    toks[name] = r["tokens"]
                identical += int(toks["sharing"] == toks["plain_sharing_off"])
                print(f"{i + 1}/{len(prompts)} {p.category}: " + " ".join(f"{k} {tps[k][-1]:.1f} tok/s" for k in nodes),
                      file=sys.stderr)
            sharer.pusher.flush()
            pushes = sharer.pusher.stats["pushed"] - pushed0
            for node in nodes.values():
                node.close()
        finally:
            srv.stop()
            sink.stop()
    med = {k: statistics.median(v) for k, v in tps.items()}
    out = {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
           "median_tokens_per_second": {k: round(v, 2) for k, v in med.items()},
           "ratio_sharing_over_off": round(med["sharing"] / med["plain_sharing_off"], 4),
           "median_per_prompt_ratio": round(statistics.median(
               s / o for s, o in zip(tps["sharing"], tps["plain_sharing_off"])), 4),
           "pushes": pushes, "pushes_per_decode_second": round(pushes / max(secs["sharing"], 1e-9), 2),
           "identical": identical}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps({"summary": out, "tokens_per_second": tps}, indent=2))
    return 0 if identical == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
