"""Attention whose result for a query depends only on that query and the keys it may see.

client/batch_invariant.py's attention. For each (query, head) every loop runs over the keys the query may see,
in position order (their ordinals), never over cache positions: the scores (one dot
product each), the softmax's maximum, exponentials and sum, and the weighted sum of the values. The
compiled code of a task is fixed, so its result is a function of the query and of that ordered list of keys
alone: a query gets the same bits whether it is a decoding step's only query over the whole cache or one
node of a tree whose mask hides the other branches (masked keys are skipped, not added as zeros). Fast-math
lets the compiler vectorise and reorder within that fixed code; it does not make a result depend on where
the keys sit or on other queries. Compiled once (cached on disk), parallel over tasks; the result does not
depend on the thread count.

Two kernels hold to this: client/attention_kernel.c (built by client/native.py; the same loops, with sixteen
keys' scores summed at once by a transposing tree) where it builds and the head dimension is a multiple of 16,
else ``_attend`` below (numba). They round differently (~1e-7), so a process keeps one: the choice depends only on
the machine, the head dimension and ``SPECSTORE_NATIVE_ATTENTION`` (0: numba), all fixed while a model decodes.
The C kernel ran 1.6-2.0x faster from 8 queries on (BENCHMARKS.md §11).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from . import native
from .small_linear import switched_off

_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOG2E = np.float32(1.44269504088896341)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _exp_neg_into(x, e, bits, n):
    """e[:n] = exp(x[:n]) for x <= 0 in float32 (Cephes' expf polynomial; inputs below -87 give ~0). The power
    of two is built from its exponent bits (``bits`` [>= n] int32, read back as float32), so that both loops
    vectorise without calls (numba's np.exp calls libm one value at a time, ``2.0 ** k`` calls powf)."""
    for jj in range(n):
        y = max(x[jj], np.float32(-87.0))
        k = np.floor(y * _LOG2E + np.float32(0.5))
        r = y - k * _LN2_HI
        r = r - k * _LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        e[jj] = p * r * r + r + np.float32(1.0)
        bits[jj] = (np.int32(k) + np.int32(127)) << np.int32(23)      # 2**k, k in [-125, 0]: a normal float
    two_k = bits.view(np.float32)
    for jj in range(n):
        e[jj] = e[jj] * two_k[jj]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend(q, k, v, indptr, idx, scale, out):
    """q [H, Q, D], k/v [KV, T, D] float32; query r sees keys idx[indptr[r]:indptr[r + 1]] (ascending);
    out [Q, H, D] float32. Head h reads key/value head h // (H // KV).

    One task per (query, key/value head) does that head's query heads together, so that each key and value
    row is read once for all of them. The values are summed four keys at a time (by ordinal, so the order
    of the additions is still fixed by the list of keys), which quarters the chain of dependent updates of
    the sums."""
    n_heads, n_q, dim = q.shape
    n_kv = k.shape[0]
    groups = n_heads // n_kv
    for task in prange(n_q * n_kv):     # key/value head major: a thread's run of tasks shares its keys and values
        g = task // n_q
        r = task - g * n_q
        a = indptr[r]
        n = indptr[r + 1] - a
        qs = np.empty((groups, dim), np.float32)
        for hh in range(groups):
            for t in range(dim):
                qs[hh, t] = q[g * groups + hh, r, t] * scale
        s = np.empty((groups, n), np.float32)
        for jj in range(n):
            kj = k[g, idx[a + jj]]
            for hh in range(groups):
                dot = np.float32(0.0)
                for t in range(dim):
                    dot += qs[hh, t] * kj[t]
                s[hh, jj] = dot
        e = np.empty((groups, n), np.float32)
        bits = np.empty(n, np.int32)
        z = np.empty(groups, np.float32)
        for hh in range(groups):
            best = np.float32(-np.inf)
            for jj in range(n):
                best = max(best, s[hh, jj])
            for jj in range(n):
                s[hh, jj] = s[hh, jj] - best
            _exp_neg_into(s[hh], e[hh], bits, n)
            total = np.float32(0.0)
            for jj in range(n):
                total += e[hh, jj]
            z[hh] = total
        acc = np.zeros((groups, dim), np.float32)
        n4 = n - n % 4
        for jj in range(0, n4, 4):
            v0 = v[g, idx[a + jj]]
            v1 = v[g, idx[a + jj + 1]]
            v2 = v[g, idx[a + jj + 2]]
            v3 = v[g, idx[a + jj + 3]]
            for hh in range(groups):
                p0 = e[hh, jj]
                p1 = e[hh, jj + 1]
                p2 = e[hh, jj + 2]
                p3 = e[hh, jj + 3]
                for t in range(dim):
                    acc[hh, t] += ((p0 * v0[t] + p1 * v1[t]) + p2 * v2[t]) + p3 * v3[t]
        for jj in range(n4, n):
            vj = v[g, idx[a + jj]]
            for hh in range(groups):
                p = e[hh, jj]
                for t in range(dim):
                    acc[hh, t] += p * vj[t]
        for hh in range(groups):
            for t in range(dim):
                out[r, g * groups + hh, t] = acc[hh, t] / z[hh] if n else np.float32(0.0)


def visible_lists(visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[Q, T] bool -> (indptr [Q + 1], idx): query r sees keys idx[indptr[r]:indptr[r + 1]], ascending."""
    indptr = np.zeros(visible.shape[0] + 1, np.int64)
    np.cumsum(visible.sum(axis=1), out=indptr[1:])
    return indptr, np.nonzero(visible)[1].astype(np.int64)        # row-major: each row's keys in order


def _rows(x: torch.Tensor) -> np.ndarray:
    """[KV, T, D] -> a C-contiguous float32 array [KV, >= T, D] whose first T positions per head are ``x``'s.
    A float32 view of the first positions of a buffer [KV, capacity, D] (a ``FloatBufferedLayer``'s keys) is
    read in place, the whole buffer seen (the kernel reads only the positions it is given); anything else is
    converted and copied."""
    kv, t, d = x.shape
    if x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == d and x.stride(0) % d == 0:
        cap = x.stride(0) // d if kv > 1 else t
        if cap >= t and x.storage_offset() + kv * cap * d <= x.untyped_storage().nbytes() // 4:
            return torch.as_strided(x, (kv, cap, d), (cap * d, d, 1)).numpy()
    return x.float().contiguous().numpy()


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indptr: np.ndarray, idx: np.ndarray,
           scale: float, which: Optional[str] = None) -> torch.Tensor:
    """query [H, Q, D], key/value [KV, T, D] (any float dtype), the visible keys of each query
    (``visible_lists``) -> [Q, H, D] float32. ``which``: "numba" or "native" for that kernel (a comparison,
    bench/invariant_kernels.py), else ``kernel(D)``'s."""
    q = query.float().contiguous().numpy()
    k = _rows(key)
    v = _rows(value)
    out = np.empty((q.shape[1], q.shape[0], q.shape[2]), np.float32)
    lib = None if which == "numba" else native.load() if which == "native" else _native(q.shape[2])
    if lib is None:
        _attend(q, k, v, indptr, idx, np.float32(scale), out)
    else:
        n_heads, n_q, dim = q.shape
        indptr = np.ascontiguousarray(indptr, np.int64)
        idx = np.ascontiguousarray(idx, np.int64)
        rc = lib.attend(q.ctypes.data, k.ctypes.data, v.ctypes.data, k.strides[0] // 4, indptr.ctypes.data,
                        idx.ctypes.data, scale, out.ctypes.data, n_heads, n_q, k.shape[0], dim,
                        torch.get_num_threads())
        if rc:
            raise MemoryError("client/attention_kernel.c could not allocate its buffers")
    return torch.from_numpy(out)


def _native(dim: int):
    """The C kernels' library for a head dimension of ``dim``, or None for the numba kernel."""
    if dim % 16 or dim > 512 or switched_off("SPECSTORE_NATIVE_ATTENTION"):
        return None
    return native.load()


def kernel(dim: int) -> str:
    """"native" (client/attention_kernel.c) or "numba": which kernel ``attend`` runs for a head dimension of ``dim``."""
    return "numba" if _native(dim) is None else "native"
