"""Linear layers for a few rows on CPU (float32): a compiled kernel that streams the weights once, for
1..32 rows; torch's own ``x @ W^T`` otherwise.

Why: decoding feeds one token per forward and a tree verify a handful, and on CPU torch's BLAS paths for
those shapes can stream the weights well below the memory bandwidth. On a 2-core AMD VM:
- one row (a plain decoding step) took MKL's matrix-vector product on one thread: the linear layers of
  SmolLM2-135M took 35 ms per token where the 540 MB of weights can be read in ~17 ms;
- 2..8 rows took a matrix-matrix kernel that packs the weights first (about twice the memory traffic), so a
  verify of 2-4 tokens cost 1.6-1.8x a plain step.
On a 2-core Intel VM torch's paths for 1..3 rows were as fast as the kernel, and from 4 rows on slower.
client/row_kernel.c (built by client/native_rows.py with the machine's C compiler) reads a packed copy of
the weights (panels of 16 output rows, input-major; AVX-512: 32) and keeps 2 x 6 (AVX-512: 2 x 12) vectors of sums in
registers: each weight is read from memory once per 6 (12) rows, with two multiply-adds per broadcast input. The
copy takes as much memory again as the float32 weights (skipped, with a warning, where that would take over half
the memory available). Where there is no compiler, the weights do not fit twice, or ``SPECSTORE_NATIVE_ROWS=0``,
client/row_kernel.py's ``rows_matmul`` (numba, parallel over blocks of 4 output rows, no copy) does the same
product with dot products. Because which path wins depends on the machine, the verify cost profile times the
kernel and torch's path for each size and keeps the faster (``kernel_rows``). Figures: BENCHMARKS.md §8 and §10,
`python -m specstore.bench.small_linear`.

The arithmetic is the same dot products of the same rows; only the summation order (and so the rounding,
~1e-6 relative, as between any two kernels) differs, and it is fixed: the same input gives the same output
whatever the thread count (and, with the C kernel, whatever the other rows of the call: each output is one
multiply-add chain in input order). Greedy output stays identical to plain decoding, which runs through the same
layers; the tests check it on every decoding path. ``SPECSTORE_SMALL_LINEAR=0`` turns it off. A layer whose
weights need gradients (training) keeps the paths autograd knows, and without numba everything stays on
torch's path.
"""
from __future__ import annotations

import os
import threading
import types
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from . import native_rows

MAX_ROWS = 32          # up to this many rows a compiled kernel (where the cost profile finds it the faster path)
_kernel = None         # row_kernel.rows_matmul once imported (None: not yet; False: numba unavailable)
_threads = threading.local()   # numba's thread count is per calling thread: the last one set there


def switched_off(variable: str) -> bool:
    """Whether the environment variable says off (0, false, no, off); unset means on."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _load_kernel():
    """client/row_kernel.py's kernel, or False where numba cannot be imported."""
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
    w = self.weight
    if (rows in self._specstore_rows and x.device.type == "cpu" and x.dtype == torch.float32 and w.is_contiguous()
            and w.dtype == torch.float32 and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
        # x made contiguous: the ``.t()`` output of the layer before arrives as a strided view
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        if self._specstore_panels is not None:
            y = native_rows.matmul(self._specstore_panels.get(w), x2, self.out_features)
        else:
            _kernel_threads()
            y = torch.empty(rows, self.out_features)
            _kernel(w.detach().numpy(), x2.detach().numpy(), y.numpy())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)
    return F.linear(x, w, self.bias)


def enabled() -> bool:
    return not switched_off("SPECSTORE_SMALL_LINEAR")


def install(model: torch.nn.Module) -> bool:
    """Give every ``nn.Linear`` of a CPU float32 model the few-rows path (idempotent). Returns whether the
    model has it. A model on another device or dtype is left alone (GPU GEMMs have no such gap). The C kernel
    where it builds here and its packed copies fit in memory, else the numba kernel."""
    if kernel_rows(model) is not None:
        return True
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32 or not enabled():
        return False
    linears = [mod for mod in model.modules() if type(mod) is torch.nn.Linear]   # subclasses keep their forward
    native = _native_fits(linears)
    if not native and not _load_kernel():
        return False
    from .batch_invariant import _Packed

    rows = set(range(1, MAX_ROWS + 1))          # one set for every layer: kernel_rows() narrows it in place
    for mod in linears:
        mod.forward = types.MethodType(_small_rows_forward, mod)
        mod._specstore_rows = rows
        mod._specstore_panels = _Packed(native_rows.pack) if native else None     # packed at first use
    model._specstore_rows = rows
    model._specstore_native = native
    return True


def fused_rows_match(parts: list) -> bool:
    """Whether ``fused_rows`` over ``parts`` (linear layers of one input, each on the C kernel) gives, for 1..MAX_ROWS
    rows, the bits of the parts' own calls side by side. Each output is its own multiply-add chain, so it should;
    checked on the weights, not assumed."""
    from .batch_invariant import _Packed, fusable

    if not fusable(parts, "_specstore_panels"):
        return False
    x = torch.randn(MAX_ROWS, parts[0].weight.shape[1], generator=torch.Generator().manual_seed(0))
    holder = _Packed(native_rows.pack)
    rows = parts[0]._specstore_rows
    with torch.inference_mode():
        every = set(range(1, MAX_ROWS + 1))
        keep = set(rows)
        rows.update(every)               # the parts' own calls on the kernel for every row count, then as before
        try:
            return all(torch.equal(fused_rows(holder, parts, x[:n]), torch.cat([p(x[:n]) for p in parts], -1))
                       for n in every)
        finally:
            rows.clear()
            rows.update(keep)


def fused_rows(holder, parts: list, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([p(x) for p in parts], -1)`` in one call of the C kernel over the parts' weights side by side
    (``holder``: a ``batch_invariant._Packed(native_rows.pack)``, which keeps that packed copy). x [..., in], float32,
    at most MAX_ROWS rows."""
    rows = x.numel() // x.shape[-1]
    y = native_rows.matmul(holder.get(*(p.weight for p in parts)), x.reshape(rows, x.shape[-1]).contiguous(),
                           sum(p.out_features for p in parts))
    if parts[0].bias is not None:
        y = y + holder.biases(*(p.bias for p in parts))
    return y.reshape(*x.shape[:-1], -1)


def _native_fits(linears: list) -> bool:
    """Whether the C kernel builds here and packed copies of these layers' weights fit in memory."""
    from .batch_invariant import packing_fits

    return bool(linears) and native_rows.load() is not None and packing_fits([m.weight for m in linears])


def uninstall(model: torch.nn.Module) -> None:
    """Back to torch's own linear everywhere (a comparison, e.g. bench/small_linear.py)."""
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_specstore_rows", None)
            mod.__dict__.pop("_specstore_panels", None)
    model.__dict__.pop("_specstore_rows", None)
    model.__dict__.pop("_specstore_native", None)
    model.__dict__.pop("_specstore_pinned", None)


def installed(model: torch.nn.Module) -> str:
    """"native" (client/row_kernel.c for 1..MAX_ROWS rows), "kernel" (the numba kernel) or "" (torch's own
    linear)."""
    if kernel_rows(model) is None:
        return ""
    return "native" if getattr(model, "_specstore_native", False) else "kernel"


def pin(model: torch.nn.Module, rows: int) -> None:
    """Every row count 1..rows on the C kernel (installed) for good: ``kernel_rows`` no longer narrows it. For
    client/batch_invariant.py's float32 forwards, where a row's bits must not depend on how many rows share its call
    (torch's GEMM for some counts would sum in another order)."""
    live = model._specstore_rows
    live.clear()
    live.update(range(1, rows + 1))
    model._specstore_pinned = True


def pinned(model: torch.nn.Module) -> bool:
    return getattr(model, "_specstore_pinned", False)


def kernel_rows(model: torch.nn.Module, rows: Optional[Iterable[int]] = None) -> Optional[set[int]]:
    """The row counts that take the kernel in ``model`` (None: not installed); with ``rows``, take the kernel
    for those (within 1..MAX_ROWS) and torch's path for the others.

    Which path is faster for a few rows depends on the machine, not only on the shapes: on one 2-core VM the
    kernel made a one-row forward 27% faster, on another (whose OpenMP thread hand-offs between numba's and
    torch's pools cost more) 8% slower, while it won from 4 rows on on both. The verify cost profile times
    both paths and keeps the faster for each size (client/budget.py: ``measure_cost_profile``)."""
    live = getattr(model, "_specstore_rows", None)
    if live is not None and rows is not None and not pinned(model):
        keep = {int(r) for r in rows if 1 <= int(r) <= MAX_ROWS}
        live.clear()
        live.update(keep)
    return live
