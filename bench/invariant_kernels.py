"""The two halves of client/batch_invariant.py against torch's own kernels, in bfloat16 on CPU, interleaved,
medians (microseconds):

- attention: the invariant kernel (client/attention_kernel.py) against torch's scaled_dot_product_attention on
  the same queries, keys and tree mask (a prefix every query sees, then a random tree); the kernel three times:
  over a bfloat16 cache (converted to float32 at every call), and over float32 buffers read in place (the
  verifier's cache, ``kv_cache.new_cache(float_buffers=True)``) on the numba kernel and on the C one
  (client/attention_kernel.c, where it builds);
- linear: oneDNN's GEMM on a weight packed once against torch's ``F.linear`` (which repacks on every call).

    python -m specstore.bench.invariant_kernels [--heads 9 --kv-heads 3 --head-dim 64 --keys 400]
        [--queries 1,16,32] [--linear 576x576,1536x576,576x1536,49152x576] [--rows 1,16,32] [--reps 300]

Defaults are SmolLM2-135M's shapes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def _median_us(fns: dict, reps: int) -> dict:
    """Interleaved timing: each repetition runs every function once, in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def tree_visible(n_q: int, n_keys: int, seed: int = 0) -> np.ndarray:
    """[n_q, n_keys] bool: every query sees the first n_keys - n_q keys, then its ancestors in a random tree."""
    from ..client.tree_attention import ancestor_matrix
    from ..client.types import DraftTree

    rng = np.random.default_rng(seed)
    parents = np.array([-1] + [int(rng.integers(0, r)) for r in range(1, n_q)], np.int32)
    tree = DraftTree(np.zeros(n_q, np.int32), parents, np.ones(n_q, np.float32), np.zeros(n_q, np.uint8))
    vis = np.ones((n_q, n_keys), bool)
    vis[:, n_keys - n_q:] = ancestor_matrix(tree)
    return vis


def attention_rows(heads: int, kv_heads: int, dim: int, keys: int, queries, reps: int) -> list[dict]:
    from ..client import native
    from ..client.attention_kernel import attend, visible_lists

    out = []
    for n_q in queries:
        g = torch.Generator().manual_seed(n_q)
        q = torch.randn(heads, n_q, dim, generator=g).bfloat16()
        k = torch.randn(kv_heads, keys, dim, generator=g).bfloat16()
        v = torch.randn(kv_heads, keys, dim, generator=g).bfloat16()
        vis = tree_visible(n_q, keys)
        lists = visible_lists(vis)
        mask = torch.from_numpy(vis)[None, None]
        room = 256                                  # a FloatBufferedLayer's buffer: positions of room past the keys
        bk, bv = (torch.cat([x.float(), torch.zeros(kv_heads, room, dim)], 1) for x in (k, v))
        kf, vf = bk[:, :keys], bv[:, :keys]
        fns = {
            "invariant": lambda: attend(q, k, v, *lists, dim ** -0.5),
            "in_place": lambda: attend(q, kf, vf, *lists, dim ** -0.5, "numba"),
            "torch": lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                                            enable_gqa=True)}
        if native.load() is not None and dim % 16 == 0:
            fns["in_place_c"] = lambda: attend(q, kf, vf, *lists, dim ** -0.5, "native")
        t = _median_us(fns, reps)
        out.append({"queries": n_q, **t})
    return out


def linear_rows(shapes, rows, reps: int) -> list[dict]:
    out = []
    if not shapes:
        return out
    from ..client.batch_invariant import _pack, _packed_linear

    for o, i in shapes:
        w = torch.randn(o, i).bfloat16()
        packed = _pack(w)
        for m in rows:
            x = torch.randn(m, i).bfloat16()
            t = _median_us({"packed": lambda: _packed_linear(packed, x), "torch": lambda: F.linear(x, w)},
                           max(10, reps // (1 + o // 4096)))
            out.append({"weight": f"{o}x{i}", "rows": m, **t})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--keys", type=int, default=400)
    ap.add_argument("--queries", default="1,16,32")
    ap.add_argument("--linear", default="576x576,1536x576,576x1536,49152x576", help="OUTxIN weight shapes")
    ap.add_argument("--rows", default="1,16,32")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ints = lambda s: [int(x) for x in s.split(",") if x]        # noqa: E731
    print(f"attention, {a.heads} heads / {a.kv_heads} kv heads x {a.head_dim}, {a.keys} keys (us, medians)")
    for r in attention_rows(a.heads, a.kv_heads, a.head_dim, a.keys, ints(a.queries), a.reps):
        c = f"   C {r['in_place_c']:8.1f}" if "in_place_c" in r else ""
        print(f"  {r['queries']:>3} queries: invariant {r['invariant']:8.1f}   "
              f"over float32 buffers: numba {r['in_place']:8.1f}{c}   torch {r['torch']:8.1f}")
    print("linear, bfloat16 (us, medians)")
    shapes = [tuple(int(d) for d in s.split("x")) for s in a.linear.split(",") if s]
    for r in linear_rows(shapes, ints(a.rows), a.reps):
        print(f"  {r['weight']:>10} x {r['rows']:>3} rows: packed {r['packed']:8.1f}   torch {r['torch']:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
