"""Attention whose result for a query depends only on that query and the keys it may see (numba).

client/batch_invariant.py's attention. Each (query, head) is one task, and every loop in it runs over the
keys the query may see, in position order (their ordinals), never over cache positions: the scores (one dot
product each), the softmax's maximum, exponentials and sum, and the weighted sum of the values. The
compiled code of a task is fixed, so its result is a function of the query and of that ordered list of keys
alone: a query gets the same bits whether it is a decoding step's only query over the whole cache or one
node of a tree whose mask hides the other branches (masked keys are skipped, not added as zeros). Fast-math
lets the compiler vectorise and reorder within that fixed code; it does not make a result depend on where
the keys sit or on other queries. Compiled once (cached on disk), parallel over tasks; the result does not
depend on the thread count.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOG2E = np.float32(1.44269504088896341)


@njit(cache=True, inline="always")
def _exp_neg(x):
    """exp(x) for x <= 0 in float32 (Cephes' expf polynomial; inputs below -87 give ~0), without branches so
    that loops over it vectorise (numba's np.exp calls libm one value at a time)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * np.float32(2.0) ** n


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend(q, k, v, indptr, idx, scale, out):
    """q [H, Q, D], k/v [KV, T, D] float32; query r sees keys idx[indptr[r]:indptr[r + 1]] (ascending);
    out [Q, H, D] float32. Head h reads key/value head h // (H // KV)."""
    n_heads, n_q, dim = q.shape
    groups = n_heads // k.shape[0]
    for task in prange(n_q * n_heads):
        r = task // n_heads
        h = task - r * n_heads
        g = h // groups
        a = indptr[r]
        n = indptr[r + 1] - a
        qs = np.empty(dim, np.float32)
        for t in range(dim):
            qs[t] = q[h, r, t] * scale
        e = np.empty(n, np.float32)
        best = np.float32(-np.inf)
        for jj in range(n):
            kj = k[g, idx[a + jj]]
            s = np.float32(0.0)
            for t in range(dim):
                s += qs[t] * kj[t]
            e[jj] = s
            best = max(best, s)
        for jj in range(n):
            e[jj] = _exp_neg(e[jj] - best)
        z = np.float32(0.0)
        for jj in range(n):
            z += e[jj]
        acc = np.zeros(dim, np.float32)
        for jj in range(n):
            p = e[jj]
            vj = v[g, idx[a + jj]]
            for t in range(dim):
                acc[t] += p * vj[t]
        for t in range(dim):
            out[r, h, t] = acc[t] / z if n else np.float32(0.0)


def visible_lists(visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[Q, T] bool -> (indptr [Q + 1], idx): query r sees keys idx[indptr[r]:indptr[r + 1]], ascending."""
    indptr = np.zeros(visible.shape[0] + 1, np.int64)
    np.cumsum(visible.sum(axis=1), out=indptr[1:])
    return indptr, np.nonzero(visible)[1].astype(np.int64)        # row-major: each row's keys in order


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indptr: np.ndarray, idx: np.ndarray,
           scale: float) -> torch.Tensor:
    """query [H, Q, D], key/value [KV, T, D] (any float dtype), the visible keys of each query
    (``visible_lists``) -> [Q, H, D] float32."""
    q = query.float().contiguous().numpy()
    k = key.float().contiguous().numpy()
    v = value.float().contiguous().numpy()
    out = np.empty((q.shape[1], q.shape[0], q.shape[2]), np.float32)
    _attend(q, k, v, indptr, idx, np.float32(scale), out)
    return torch.from_numpy(out)
