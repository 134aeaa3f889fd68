"""The compiled kernel of client/small_linear.py: a linear layer over 1..3 rows that reads each weight row
once (numba, parallel over output rows, cached on disk after the first compile)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

BLOCK = 16     # output rows per task: small enough that 2 threads stay balanced on a 192-row layer


@njit(parallel=True, fastmath=True, cache=True, nogil=True)   # nogil: other Python threads (lookups) run meanwhile
def rows_matmul(w, x, out):
    """out[t, o] = w[o] . x[t]. w [O, I], x [n, I], out [n, O]: float32, C-contiguous.

    Each weight row is read from memory once and stays in cache for its n dot products. Each dot product is
    summed by one thread in an order fixed at compile time, so the result does not depend on the threads."""
    n_out, n_in = w.shape
    for b in prange((n_out + BLOCK - 1) // BLOCK):
        for o in range(b * BLOCK, min(n_out, b * BLOCK + BLOCK)):
            wo = w[o]
            for t in range(x.shape[0]):
                xt = x[t]
                s = np.float32(0.0)
                for i in range(n_in):
                    s += wo[i] * xt[i]
                out[t, o] = s
