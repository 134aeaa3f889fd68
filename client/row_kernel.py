"""The compiled kernel of client/small_linear.py: a linear layer over a few rows that reads each weight row
from memory once (numba, parallel over blocks of output rows, cached on disk after the first compile)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

OUT_BLOCK = 4    # output rows per task (and per register block)
TOK_BLOCK = 4    # input rows per register block: 4 x 4 sums in registers, 2 FMAs per loaded vector


@njit(parallel=True, fastmath=True, cache=True, nogil=True)   # nogil: other Python threads (lookups) run meanwhile
def rows_matmul(w, x, out):
    """out[t, o] = w[o] . x[t]. w [O, I], x [n, I], out [n, O]: float32, C-contiguous.

    A task takes 4 weight rows and walks the input rows 4 at a time, keeping the 16 sums in registers: each
    weight row is read from memory once for all n inputs, and each loaded vector feeds two multiply-adds (one
    row at a time feeds one per two loads, which is what held torch's GEMM and a one-row kernel back from 4
    rows on). Input rows left over (n not a multiple of 4) go one at a time against the same 4 weight rows.
    Each sum is formed by one thread in an order fixed at compile time, so the result does not depend on the
    thread count."""
    n_out, n_in = w.shape
    n = x.shape[0]
    n4 = n // TOK_BLOCK * TOK_BLOCK
    for b in prange((n_out + OUT_BLOCK - 1) // OUT_BLOCK):
        o0 = b * OUT_BLOCK
        if o0 + OUT_BLOCK > n_out:          # the last, partial block of output rows
            for o in range(o0, n_out):
                wo = w[o]
                for t in range(n):
                    xt = x[t]
                    s = np.float32(0.0)
                    for i in range(n_in):
                        s += wo[i] * xt[i]
                    out[t, o] = s
            continue
        w0 = w[o0]
        w1 = w[o0 + 1]
        w2 = w[o0 + 2]
        w3 = w[o0 + 3]
        for t0 in range(0, n4, TOK_BLOCK):
            x0 = x[t0]
            x1 = x[t0 + 1]
            x2 = x[t0 + 2]
            x3 = x[t0 + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for i in range(n_in):
                a, b_, c, d = w0[i], w1[i], w2[i], w3[i]
                p, q, r, s = x0[i], x1[i], x2[i], x3[i]
                s00 += a * p
                s01 += a * q
                s02 += a * r
                s03 += a * s
                s10 += b_ * p
                s11 += b_ * q
                s12 += b_ * r
                s13 += b_ * s
                s20 += c * p
                s21 += c * q
                s22 += c * r
                s23 += c * s
                s30 += d * p
                s31 += d * q
                s32 += d * r
                s33 += d * s
            out[t0, o0], out[t0 + 1, o0], out[t0 + 2, o0], out[t0 + 3, o0] = s00, s01, s02, s03
            out[t0, o0 + 1], out[t0 + 1, o0 + 1], out[t0 + 2, o0 + 1], out[t0 + 3, o0 + 1] = s10, s11, s12, s13
            out[t0, o0 + 2], out[t0 + 1, o0 + 2], out[t0 + 2, o0 + 2], out[t0 + 3, o0 + 2] = s20, s21, s22, s23
            out[t0, o0 + 3], out[t0 + 1, o0 + 3], out[t0 + 2, o0 + 3], out[t0 + 3, o0 + 3] = s30, s31, s32, s33
        for t in range(n4, n):
            xt = x[t]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for i in range(n_in):
                v = xt[i]
                s0 += w0[i] * v
                s1 += w1[i] * v
                s2 += w2[i] * v
                s3 += w3[i] * v
            out[t, o0], out[t, o0 + 1], out[t, o0 + 2], out[t, o0 + 3] = s0, s1, s2, s3
