"""Verify time of the target over trees of n nodes, through client/lean_forward.py and through the model's own
forward, interleaved step by step on two verifiers of the same model with the same trees (a warm cache of
``--past`` tokens), medians; and whether every logit was the same.

    python -m specstore.bench.lean_forward [--model PATH] [--dtype bfloat16] [--sizes 1,4,8,16,24] [--reps 31]
        [--against own|unfused|half-cache|numba-rows|numba-attention]

One JSON line per size: {"n", "own_ms", "lean_ms", "saved_ms", "identical"}; exit status 1 if any differ.
``--against unfused``: the lean forward with fused GEMMs (q/k/v and gate/up, half precision on CPU or float32 on
client/row_kernel.c) against the lean forward without them (``SPECSTORE_FUSED_LINEAR=0``); "own_ms" is then the
unfused lean forward's time.
``--against half-cache``: a verifier whose KV cache keeps half-precision keys and values in float32 buffers (read in
place by the batch-invariant attention) against one whose cache keeps them in the model's dtype
(``SPECSTORE_FLOAT_CACHE=0``, converted in every layer at every verify); "own_ms" is then the latter's time.
``--against numba-rows``: float32 linear layers over 1..32 rows through client/row_kernel.c (packed weights, fused
q/k/v and gate/up) against client/row_kernel.py's numba kernel (unfused), both in the lean forward; "own_ms" is then
numba's time. The two sum in other orders, so the logits differ by rounding: "identical" is then reported,
"max_diff" added, and neither fails the run.
``--against numba-attention``: the batch-invariant attention (half precision on CPU) through
client/attention_kernel.c against client/attention_kernel.py's numba kernel (``SPECSTORE_NATIVE_ATTENTION=0``), both in
the lean forward; "own_ms" is then numba's time; rounding differs as with numba-rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="auto", help="as spec-generate's --dtype")
    ap.add_argument("--sizes", default="1,4,8,16,24", help="tree sizes (root included)")
    ap.add_argument("--reps", type=int, default=31, help="verifies per size and way (the first is dropped)")
    ap.add_argument("--past", type=int, default=256, help="tokens in the cache before the trees")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--against", choices=("own", "unfused", "half-cache", "numba-rows", "numba-attention"),
                    default="own",
                    help="the baseline: the model's own forward, the lean forward without fused GEMMs, a KV cache "
                         "in the model's dtype, or the numba few-rows (attention) kernel instead of the C one")
    args = ap.parse_args(argv)
    import torch

    from ..client import batch_invariant, lean_forward, small_linear
    from ..client.models import load_model
    from ..client.types import DraftTree
    from ..client.verifier import Verifier

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, None, args.dtype)[0]
    lean, own = Verifier(model), Verifier(model)
    if not lean_forward.usable(model):
        print("the lean forward does not apply to this model (see the log)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    vocab = int(model.config.vocab_size)
    past = rng.integers(100, min(vocab, 30000), args.past + 1)
    for way, v in (("lean", lean), ("own", own)):       # the cache's kind is chosen at the prefill
        os.environ["SPECSTORE_FLOAT_CACHE"] = "0" if way == "own" and args.against == "half-cache" else "1"
        v.prefill(past)
    os.environ.pop("SPECSTORE_FLOAT_CACHE", None)
    switch = {"own": "SPECSTORE_LEAN_FORWARD", "unfused": "SPECSTORE_FUSED_LINEAR",
              "numba-rows": "SPECSTORE_FUSED_LINEAR",         # numba's turn: no fused C calls either
              "numba-attention": "SPECSTORE_NATIVE_ATTENTION"}.get(args.against)
    rounding = args.against in ("numba-rows", "numba-attention")       # two kernels: logits equal up to rounding
    if args.against == "numba-attention" and batch_invariant.attention_kernel(model) != "native":
        print("needs the batch-invariant attention (half precision on CPU) on client/attention_kernel.c (see the log)",
              file=sys.stderr)
        return 2
    panels = {}                 # --against numba-rows: each linear layer's packed weights, taken away for numba's turn
    if args.against == "numba-rows":
        if small_linear.installed(model) != "native" or not small_linear._load_kernel():
            print("needs float32 on CPU with both the C and the numba kernel (see the log)", file=sys.stderr)
            return 2
        panels = {m: m._specstore_panels for m in model.modules() if getattr(m, "_specstore_panels", None)}
    bad = False
    for n in (int(s) for s in args.sizes.split(",")):
        times: dict = {"lean": [], "own": []}
        same, diff = True, 0.0
        for r in range(args.reps + 1):
            parents = np.concatenate([[-1], [rng.integers(0, i) for i in range(1, n)]]).astype(np.int32)
            tree = DraftTree(np.concatenate([[past[-1]], rng.integers(100, 1000, n - 1)]).astype(np.int32), parents,
                             np.ones(n, np.float32), np.zeros(n, np.uint8))
            out = {}
            for way, v in (("lean", lean), ("own", own)) if r % 2 else (("own", own), ("lean", lean)):
                if switch:
                    os.environ[switch] = "1" if way == "lean" else "0"
                for m, p in panels.items():
                    m._specstore_panels = p if way == "lean" else None
                t0 = time.perf_counter()
                out[way] = v.verify(tree)
                times[way].append(time.perf_counter() - t0)
                v.commit([0])
            if r:                                                               # the first: the prefill's root
                same &= bool(torch.equal(out["lean"], out["own"]))
                diff = max(diff, float((out["lean"].float() - out["own"].float()).abs().max()))
        os.environ.pop("SPECSTORE_LEAN_FORWARD", None)
        os.environ.pop("SPECSTORE_FUSED_LINEAR", None)
        os.environ.pop("SPECSTORE_NATIVE_ATTENTION", None)
        med = {w: statistics.median(t[1:]) * 1e3 for w, t in times.items()}
        bad |= not same and not rounding
        line = {"n": n, "own_ms": round(med["own"], 2), "lean_ms": round(med["lean"], 2),
                "saved_ms": round(med["own"] - med["lean"], 2), "identical": same}
        if rounding:
            line["max_diff"] = diff
        print(json.dumps(line), flush=True)
    for m, p in panels.items():
        m._specstore_panels = p
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
