"""Linear layers for a few rows on CPU: ``y = (W @ x^T)^T`` instead of ``x @ W^T``.

Why: a tree verify feeds a few tokens, and on CPU (float32) the BLAS path torch takes for ``x @ W^T`` with
2..8 rows streams the weights much more slowly than its one-row matrix-vector path, so a verify of a
handful of tokens cost 1.6-1.8x a plain decoding step. The same product computed as ``W @ x^T`` (with ``x``
contiguous) takes a fast path. From 9 rows on torch's own path is as fast, and one row keeps it too (it is
already the fast one). Figures: BENCHMARKS.md, `python -m specstore.bench.small_linear`.

The arithmetic is the same dot products of the same rows; only the kernel (and so the rounding order, ~1e-5
on the logits, as between any two kernels) differs. Greedy output stays identical to plain decoding; the
tests check it on every decoding path. ``SPECSTORE_SMALL_LINEAR=0`` turns it off.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

MAX_ROWS = 8           # from 9 rows on, torch's own GEMM is as fast (measured up to 64 rows)
_MARK = "_specstore_small_linear"


def _small_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if 2 <= rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32:
        # x made contiguous: the ``.t()`` output of the layer before would otherwise reach BLAS as a
        # contiguous x^T, which takes the slow kernel again
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).contiguous().t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)
    return F.linear(x, self.weight, self.bias)


def enabled() -> bool:
    return os.environ.get("SPECSTORE_SMALL_LINEAR", "1").strip().lower() not in ("0", "false", "no", "off")


def install(model: torch.nn.Module) -> bool:
    """Give every ``nn.Linear`` of a CPU float32 model the few-rows path (idempotent). Returns whether the
    model has it. A model on another device or dtype is left alone (GPU GEMMs have no such gap)."""
    if getattr(model, _MARK, False):
        return True
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32 or not enabled():
        return False
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:         # subclasses (quantised layers, ...) keep their own forward
            mod.forward = types.MethodType(_small_rows_forward, mod)
    setattr(model, _MARK, True)
    return True


def uninstall(model: torch.nn.Module) -> None:
    """Back to torch's own linear everywhere (a comparison, e.g. bench/small_linear.py)."""
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            mod.__dict__.pop("forward", None)
    model.__dict__.pop(_MARK, None)


def installed(model: torch.nn.Module) -> bool:
    return bool(getattr(model, _MARK, False))
