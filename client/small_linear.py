"""Linear layers for a few rows on CPU (float32): a kernel that streams the weights once for 1..3 rows,
``y = (W @ x^T)^T`` for 4..8, torch's own ``x @ W^T`` otherwise.

Why: decoding feeds one token per forward and a tree verify a handful, and on CPU torch's BLAS paths for
those shapes stream the weights far below the memory bandwidth:
- one row (a plain decoding step) takes MKL's matrix-vector product, which runs on one thread here: the
  linear layers of SmolLM2-135M took 35 ms per token where the 540 MB of weights can be read in ~17 ms;
- 2..8 rows take a matrix-matrix kernel that packs the weights first, about twice the memory traffic, so a
  verify of 2-4 tokens cost 1.6-1.8x a plain step.
client/row_kernel.py's ``rows_matmul`` (numba, parallel over output rows) reads each weight row once and
computes its dot products with every input row while it is in cache; from 4 rows on ``W @ x^T`` (with
``x`` contiguous) is as fast, and from 9 rows torch's own path is (measured up to 64 rows). Figures:
BENCHMARKS.md §8, `python -m specstore.bench.small_linear`.

The arithmetic is the same dot products of the same rows; only the summation order (and so the rounding,
~1e-6 relative, as between any two kernels) differs, and it is fixed: the same input gives the same output
whatever the thread count. Greedy output stays identical to plain decoding, which runs through the same
layers; the tests check it on every decoding path. ``SPECSTORE_SMALL_LINEAR=0`` turns all of it off;
``SPECSTORE_SMALL_LINEAR=mm`` keeps ``W @ x^T`` for 2..8 rows but not the compiled kernel. A layer whose
weights need gradients (training) keeps the paths autograd knows.
"""
from __future__ import annotations

import os
import threading
import types

import torch
import torch.nn.functional as F

MAX_ROWS = 8           # from 9 rows on, torch's own GEMM is as fast (measured up to 64 rows)
KERNEL_ROWS = 3        # up to this many rows the compiled kernel; from 4, W @ x^T is as fast
_MARK = "_specstore_small_linear"
_kernel = None         # row_kernel.rows_matmul once imported (None: not yet; False: numba unavailable)
_threads = threading.local()   # numba's thread count is per calling thread: the last one set there


def switched_off(variable: str) -> bool:
    """Whether the environment variable says off (0, false, no, off); unset means on."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _mode() -> str:
    if switched_off("SPECSTORE_SMALL_LINEAR"):
        return "off"
    return "mm" if os.environ.get("SPECSTORE_SMALL_LINEAR", "").strip().lower() == "mm" else "on"


def _load_kernel():
    """client/row_kernel.py's kernel, or False where numba cannot be imported (W @ x^T then covers 2..8)."""
    global _kernel
    if _kernel is None:
        try:
            from .row_kernel import rows_matmul
        except ImportError:
            rows_matmul = False
        _kernel = rows_matmul
    return _kernel


def _kernel_threads() -> None:
    """Run the kernel on torch's thread count (``--threads``), within numba's pool."""
    want = torch.get_num_threads()
    if getattr(_threads, "n", None) != want:
        import numba

        numba.set_num_threads(max(1, min(want, numba.config.NUMBA_NUM_THREADS)))
        _threads.n = want


def _small_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if 1 <= rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32:
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        w = self.weight
        if rows <= KERNEL_ROWS and self._specstore_kernel and w.is_contiguous() and not (
                torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            _kernel_threads()
            y = torch.empty(rows, self.out_features)
            self._specstore_kernel(w.detach().numpy(), x2.detach().numpy(), y.numpy())
        elif rows >= 2:
            # x made contiguous: the ``.t()`` output of the layer before would otherwise reach BLAS as a
            # contiguous x^T, which takes the slow kernel again
            y = torch.mm(w, x2.t()).t()
        else:
            return F.linear(x, w, self.bias)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)
    return F.linear(x, self.weight, self.bias)


def enabled() -> bool:
    return _mode() != "off"


def install(model: torch.nn.Module) -> bool:
    """Give every ``nn.Linear`` of a CPU float32 model the few-rows path (idempotent). Returns whether the
    model has it. A model on another device or dtype is left alone (GPU GEMMs have no such gap)."""
    if getattr(model, _MARK, False):
        return True
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32 or not enabled():
        return False
    kernel = (_load_kernel() or None) if _mode() == "on" else None
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:         # subclasses (quantised layers, ...) keep their own forward
            mod.forward = types.MethodType(_small_rows_forward, mod)
            mod._specstore_kernel = kernel
    setattr(model, _MARK, "kernel" if kernel else "mm")
    return True


def uninstall(model: torch.nn.Module) -> None:
    """Back to torch's own linear everywhere (a comparison, e.g. bench/small_linear.py)."""
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_specstore_kernel", None)
    model.__dict__.pop(_MARK, None)


def installed(model: torch.nn.Module) -> str:
    """"kernel" (the compiled kernel for 1..3 rows and W @ x^T for 4..8), "mm" (W @ x^T for 2..8) or ""."""
    return getattr(model, _MARK, "") or ""
