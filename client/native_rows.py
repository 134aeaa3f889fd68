"""client/row_kernel.c (the few-rows linear layer of client/small_linear.py), from the C kernels' library that
client/native.py builds at first use: a packed copy of the weights and the product over it.
``SPECSTORE_NATIVE_ROWS=0`` skips it (client/small_linear.py then keeps its numba kernel)."""
from __future__ import annotations

import torch

from . import native


def load():
    """The C kernels' library where it builds here and this kernel is not switched off, else None."""
    from .small_linear import switched_off      # here, not above: client/small_linear.py imports this module

    return None if switched_off("SPECSTORE_NATIVE_ROWS") else native.load()


def pack(w: torch.Tensor) -> torch.Tensor:
    """The packed copy of a float32 weight [out, in] that ``matmul`` reads: panels of ``panel_width()`` output
    rows, input-major, zero-padded (flat, float32)."""
    lib = native.load()
    w = w.detach().contiguous()
    n_out, n_in = w.shape
    pw = lib.panel_width()
    p = torch.empty((n_out + pw - 1) // pw * pw * n_in, dtype=torch.float32)
    lib.pack(w.data_ptr(), p.data_ptr(), n_out, n_in)
    return p


def matmul(packed: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x @ w^T`` for x [rows, in] (float32, C-contiguous) and ``packed = pack(w)``, on torch's thread count.
    Each output is one fused multiply-add chain over the inputs in order: a row's outputs have the same bits
    whatever the other rows."""
    rows, n_in = x.shape
    out = torch.empty(rows, n_out, dtype=torch.float32)
    native.load().rows_matmul(packed.data_ptr(), x.data_ptr(), out.data_ptr(), n_out, n_in, rows,
                              torch.get_num_threads())
    return out
