"""Stress test of client/batch_invariant.py's linear layers beyond what ``install`` checks at load: many random
rows per weight shape, each computed alone (one row per call, as the layer computes it: paired where ``install``
pairs that shape) against the same rows in calls of several rows. Prints, per shape, the way ``install`` picks
and how many rows had other bits at each row count (0 everywhere is what the decoder relies on).

    python -m specstore.bench.gemm_row_stress [--linear 576x576,1536x576,576x1536,192x576,49152x576]
        [--rows 32768] [--head-rows 2048] [--per-call 3,16,32,128] [--dtype bfloat16]

Defaults are SmolLM2-135M's shapes; weights and rows are random (seeded). Takes ~1 minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ..client import batch_invariant as bi


def stress(shape: tuple[int, int], rows: int, per_call: list[int], dtype: torch.dtype = torch.bfloat16,
           seed: int = 0) -> dict:
    """{"weight", "way", "paired", "rows", "other_bits": {rows per call: rows with other bits}} for one random
    weight of ``shape`` [out, in]; way "" where ``install`` would refuse it."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(dtype)
    way, _, paired = bi._gemm_mode([w])
    res = {"weight": f"{shape[0]}x{shape[1]}", "way": way, "paired": bool(paired), "rows": rows, "other_bits": {}}
    if not way:
        return res
    if way == "packed":
        packed = bi._pack(w)
        linear = (lambda x: bi._packed_linear(packed, x))
    else:
        linear = (lambda x: F.linear(x, w))
    one = bi._pairing(linear) if paired else linear
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    alone = torch.cat([one(x[i:i + 1]) for i in range(rows)])
    for n in per_call:
        if way == "chunked" and n > bi.CHUNK_ROWS:
            continue          # the chunked way never calls the GEMM with more rows than CHUNK_ROWS
        together = torch.cat([one(x[s:s + n]) for s in range(0, rows, n)])      # a last call of one row pairs
        res["other_bits"][n] = int((together != alone).any(1).sum())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linear", default="576x576,1536x576,576x1536,192x576,49152x576", help="OUTxIN weight shapes")
    ap.add_argument("--rows", type=int, default=32768, help="random rows per shape")
    ap.add_argument("--head-rows", type=int, default=2048, help="rows for shapes with over 10,000 outputs (slow)")
    ap.add_argument("--per-call", default="3,16,32,128", help="rows per call to compare with one row per call")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    per_call = [int(n) for n in args.per_call.split(",")]
    worst = 0
    for spec in args.linear.split(","):
        shape = tuple(int(d) for d in spec.lower().split("x"))
        t0 = time.perf_counter()
        res = stress(shape, args.head_rows if shape[0] > 10_000 else args.rows, per_call, getattr(torch, args.dtype))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        worst = max([worst, *res["other_bits"].values()])
        print(json.dumps(res), flush=True)
    return 1 if worst else 0


if __name__ == "__main__":
    raise SystemExit(main())
