"""Batch-invariant bfloat16 forwards on CPU: a token's logits do not depend on how many other tokens share
its forward, so a tree verify gives bit for bit what plain decoding gives.

Why: in bfloat16 every layer's output is rounded to 8 bits of mantissa. Two kernels that sum in different
orders (torch's attention for one query without a mask against several queries with a tree mask) differ in
the last float32 bits, the rounding to bfloat16 makes that a whole ulp now and then, and greedy outputs part
within a few dozen tokens (measured: 8 of 12 Spec-Bench prompts). In float32 those differences stay ~1e-6
and leave the argmax alone. Yet on a CPU with AMX a bfloat16 verify of 32 tokens costs ~1.3x one token,
against ~2.3x in float32 (BENCHMARKS.md §8): trees become nearly free.

``install(model)`` makes a CPU bfloat16 (or float16) model batch-invariant, for every forward of that model: our
decoder's and transformers' own ``generate`` (the plain decoding we compare with) alike:

- linear layers, one of two ways, each a property of the BLAS, not a promise: ``install`` checks it on the
  model's own weight shapes for every row count it relies on, and refuses (returns False, logs why) where
  neither holds:
  - "packed": oneDNN's GEMM on weights packed once into its blocked layout (what torch's CPU compiler uses
    for frozen weights) gives each row the same bits for 1..``TREE_ROWS`` rows per call. Every forward
    takes it. It is also faster: torch's own bfloat16 GEMM repacks the weights on every call (one row of
    SmolLM2's 1536x576 weight: 69 us, packed 45 us; BENCHMARKS.md §9.1). It keeps a second, packed copy of
    the linear weights in memory (skipped where that would take over half the memory available).
    ``SPECSTORE_PACKED_LINEAR=0`` turns it off;
  - "chunked": torch's bfloat16 GEMM gives each row the same bits for 1..``CHUNK_ROWS`` rows per call, so a
    verify's up to ``TREE_ROWS`` rows go in chunks of at most ``CHUNK_ROWS``;
  where a BLAS computes one row alone in another order than several (a matrix-vector path), a layer of that
  weight shape computes one row as two (the row twice: ``_as_pair``; checked the same way);
  weights narrower than ``MIN_INNER`` are refused either way (see ``_gemm_mode``);
- attention after the prompt (one decoding step's query, or a tree's queries under their mask) is
  client/attention_kernel.py's: each (query, head) sums over exactly the keys it may see, in order, so the
  same query over the same keys gives the same bits wherever they sit in the cache;
- the prompt itself goes through torch's attention in one forward of the whole prompt, the same call in
  plain decoding and in ours (client/verifier.py prefills the whole prompt for that reason).

Everything else in a Llama-style layer (norms, rotary, activations, residuals) works row by row already.
``SPECSTORE_BATCH_INVARIANT=0`` turns all of it off (bfloat16 outputs are then not identical to plain decoding).

float32 on CPU ("rows"): where the C kernels build (client/native.py), every linear layer runs on
client/row_kernel.c for 1..``TREE_ROWS`` rows (each output one multiply-add chain: a row's bits do not depend on
the other rows, by construction; the cost profile no longer hands some row counts to torch's faster-or-not GEMM)
and the attention after the prompt on client/attention_kernel.c. In float32 kernels' different summation orders
move logits by ~1e-6, which leaves the argmax alone but for near-ties; with this, a tree node gets plain decoding's
bits there too. Without a C compiler, for a head dimension that is not a multiple of 16, or with
``SPECSTORE_BATCH_INVARIANT=0``, float32 keeps torch's kernels (and the few-rows kernel of client/small_linear.py
where it is faster), as before: equal to plain decoding up to such near-ties.
"""
from __future__ import annotations

import logging
import os
import types
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import gqa_attention, kv_cache
from .attention_kernel import attend, kernel, visible_lists
from .small_linear import switched_off

log = logging.getLogger(__name__)

NAME = "specstore_invariant"
CHUNK_ROWS = 32         # rows per GEMM call within which rows are computed alike (checked by install)
TREE_ROWS = 128         # inputs up to this many rows (verifies) are chunked; a longer prompt runs whole
HALF = (torch.bfloat16, torch.float16)


def enabled() -> bool:
    return not switched_off("SPECSTORE_BATCH_INVARIANT")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] half-precision weight -> oneDNN's opaque packed copy (for one row per call, decoding's case)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _packed_linear(packed: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _Packed:
    """One layer's packed weight, packed again when the weight changes (storage, dtype, or an in-place change
    that torch counts: not those of tensors made under ``torch.inference_mode``, which keep no count).
    A copy of the module (deepcopy, pickle) gets an empty one and packs on first use: oneDNN's opaque
    tensors cannot be copied. ``pack``: weight -> packed copy (oneDNN's by default; client/small_linear.py
    gives client/native_rows.py's; a module-level function, so that a copy can name it)."""

    def __init__(self, pack: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self._pack = pack
        self._held: tuple = (None, None)        # (key of the weight it was packed from, packed tensor), swapped whole
        self._bias: tuple = (None, None)        # (keys of the biases, them side by side): see ``biases``

    def __reduce__(self):
        return (_Packed, (self._pack,))

    def get(self, *ws: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``ws`` (one weight, or several side by side: ``torch.cat(ws)``, one GEMM for all)."""
        pack = self._pack or _pack
        return self._kept("_held", ws, lambda: pack(ws[0] if len(ws) == 1 else torch.cat([w.detach() for w in ws])))

    def biases(self, *bs: torch.Tensor) -> torch.Tensor:
        """``torch.cat(bs)``, made again only when one of them changes (as ``get``'s weights)."""
        return self._kept("_bias", bs, lambda: torch.cat([b.detach() for b in bs]))

    def _kept(self, slot: str, ts: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """What ``make`` made of ``ts``, kept in ``slot`` as (their keys, it) and made again when a key changes."""
        key = tuple(_weight_key(t) for t in ts)
        held = getattr(self, slot)
        if held[0] != key:
            held = (key, make())
            setattr(self, slot, held)
        return held[1]


def _weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's values for ``_Packed``: its storage, dtype, shape and torch's count of its in-place
    changes (an inference tensor, made under torch.inference_mode, keeps none)."""
    try:
        version = w._version
    except RuntimeError:
        version = None
    return (w.data_ptr(), version, w.dtype, tuple(w.shape))


def _as_pair(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for a one-row ``x`` [..., in] computed as two rows (the row twice), first row kept: where a
    BLAS takes a matrix-vector path for one row that sums in another order than its path for several."""
    x2 = x.reshape(1, x.shape[-1])
    return linear(torch.cat([x2, x2]))[:1].reshape(*x.shape[:-1], -1)


def _pairing(linear: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear`` with one-row inputs computed as two rows (``_as_pair``)."""
    return lambda x: _as_pair(linear, x) if x.numel() == x.shape[-1] else linear(x)


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if x.dtype != w.dtype or not _applies(w) or torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        return F.linear(x, w, self.bias)       # training, or a model since moved off CPU half precision
    if self._specstore_pair and x.numel() == x.shape[-1]:
        return _as_pair(lambda r: _packed_linear(self._specstore_packed.get(w), r, self.bias), x)
    return _packed_linear(self._specstore_packed.get(w), x, self.bias)


def _chunked_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows == 1 and self._specstore_pair:
        return _as_pair(lambda r: F.linear(r, self.weight, self.bias), x)
    if rows <= CHUNK_ROWS or rows > TREE_ROWS:
        return F.linear(x, self.weight, self.bias)
    x2 = x.reshape(rows, x.shape[-1])
    out = torch.cat([F.linear(x2[s:s + CHUNK_ROWS], self.weight, self.bias) for s in range(0, rows, CHUNK_ROWS)])
    return out.reshape(*x.shape[:-1], self.out_features)


def rows_are_invariant(linear: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, max_rows: int,
                       seed: int = 0) -> bool:
    """Whether ``linear`` (x [rows, in] -> [rows, out], computing with ``weight``) gives every row the same
    bits for 1..max_rows rows per call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max_rows, weight.shape[1], generator=g).to(weight.dtype)
    alone = torch.cat([linear(x[i:i + 1]) for i in range(max_rows)])
    return all(torch.equal(linear(x[:n]), alone[:n]) for n in range(2, max_rows + 1))


def linear_is_invariant(weight: torch.Tensor, max_rows: int = CHUNK_ROWS, seed: int = 0, pair: bool = False) -> bool:
    """Whether torch's ``x @ weight^T`` gives every row the same bits for 1..max_rows rows per call (with ``pair``:
    one row computed as two, ``_as_pair``)."""
    linear = (lambda x: F.linear(x, weight))
    return rows_are_invariant(_pairing(linear) if pair else linear, weight, max_rows, seed)


def packed_is_invariant(weight: torch.Tensor, max_rows: int = TREE_ROWS, seed: int = 0, pair: bool = False) -> bool:
    """Whether oneDNN's GEMM on the packed ``weight`` gives every row the same bits for 1..max_rows rows per
    call (with ``pair``: one row computed as two; False where this torch or CPU cannot pack it)."""
    try:
        packed = _pack(weight)
        linear = (lambda x: _packed_linear(packed, x))
        return rows_are_invariant(_pairing(linear) if pair else linear, weight, max_rows, seed)
    except (RuntimeError, AttributeError, NotImplementedError) as e:     # no oneDNN, or not for this dtype
        log.info("no packed half-precision GEMM here (%s)", e)
        return False


MIN_INNER = 96     # inner dimensions below this are refused (see _gemm_mode)


def _available_memory() -> Optional[int]:
    """Bytes of memory available now, or None where unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil: Linux's count, else unknown
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def packing_fits(weights: list[torch.Tensor]) -> bool:
    """Whether packed copies of ``weights`` (each tensor once) take at most half the memory available now."""
    need = sum(w.numel() * w.element_size() for w in {w.data_ptr(): w for w in weights}.values())
    avail = _available_memory()
    if avail is not None and need > avail // 2:
        log.warning("packed copies of the linear layers' weights would take %.2f GB of the %.2f GB available: "
                    "torch's GEMM in chunks instead (slower)", need / 1e9, avail / 1e9)
        return False
    return True


def _paired_shapes(is_invariant: Callable[..., bool], weights: list[torch.Tensor]) -> Optional[set]:
    """The shapes of ``weights`` whose one-row inputs must go as two rows for ``is_invariant`` (a check above)
    to hold, or None where it fails for some weight either way."""
    paired = set()
    for w in weights:
        if not is_invariant(w):
            if not is_invariant(w, pair=True):
                return None
            paired.add(tuple(w.shape))
    return paired


def _gemm_mode(weights: list[torch.Tensor], packed_ok: bool = True) -> tuple[str, str, set]:
    """("packed" or "chunked", "", shapes whose one-row inputs go as two rows) or ("", why neither gives rows
    the same bits whatever the row count, set()): see the module's docstring.

    One row as two: on the AMD EPYC VM of BENCHMARKS.md §9.2, oneDNN took another path for one row of an inner
    dimension of 1536 (SmolLM2's down projections), and about one row in eight then had one other bit in one
    of its 576 outputs; two rows and more agreed with each other, so a one-row call computed as two does too.
    Weights with an inner dimension below ``MIN_INNER`` get neither: on the Intel VM of BENCHMARKS.md §9.1,
    widths of 32..64 gave about one row in 1,000 other bits alone than among others, in both ways, which a check
    of 128 rows misses more often than not; from 96 on no row did, nor in 32,768 rows of each SmolLM2 shape.
    Real models are far wider; tiny ones decode in float32."""
    narrow = sorted({int(w.shape[1]) for w in weights if w.shape[1] < MIN_INNER})
    if narrow:
        return "", (f"its weights' inner dimensions {narrow} are below {MIN_INNER}, where half-precision GEMMs were "
                    "seen to give rows other bits depending on the row count"), set()
    paired = _paired_shapes(packed_is_invariant, weights) if packed_ok else None
    if paired is not None:
        return "packed", "", paired
    paired = _paired_shapes(linear_is_invariant, weights)
    if paired is not None:
        return "chunked", "", paired
    shapes = sorted({tuple(w.shape) for w in weights})
    return "", f"this machine's half-precision GEMMs are not row-invariant for its weights {shapes}", set()


def fusable(parts: list, holder: str) -> bool:
    """Whether linear layers ``parts`` can share one GEMM over their weights side by side: each keeps a packed
    copy in attribute ``holder`` (its path is installed), and they have one input width, one dtype, and all or no
    biases."""
    return (all(getattr(p, holder, None) is not None for p in parts)
            and len({(p.weight.shape[1], p.weight.dtype) for p in parts}) == 1
            and len({p.bias is None for p in parts}) == 1)


def fused_rows_match(parts: list, max_rows: int = TREE_ROWS, seed: int = 0) -> Optional[bool]:
    """Whether one packed GEMM over the weights of ``parts`` (installed linear layers of one input) side by side,
    ``_Packed.get(*weights)``, gives every row, for 1..max_rows rows per call, the bits of the parts' own forwards
    side by side: False = yes, True = yes with one-row inputs computed as two (``_as_pair``), None = neither, or
    the parts are not packed layers of one width and dtype with all or no biases. Each output sums over the same
    inner dimension in both, but a BLAS may block a wider weight otherwise: checked, never assumed."""
    if not fusable(parts, "_specstore_packed"):
        return None
    ws = [p.weight.detach() for p in parts]
    biases = [p.bias for p in parts]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        x = torch.randn(max_rows, ws[0].shape[1], generator=g).to(ws[0].dtype)
        alone = torch.cat([p(x) for p in parts], -1)     # each part's rows are row-invariant (install checked it)
        packed = _pack(torch.cat(ws))

        def fused(r):
            return _packed_linear(packed, r, bias)

        for pair in (False, True):
            f = _pairing(fused) if pair else fused
            if all(torch.equal(f(x[:n]), alone[:n]) for n in range(1, max_rows + 1)):
                return pair
    return None


def fused_linear(holder: "_Packed", parts: list, pair: bool, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([p(x) for p in parts], -1)`` in one packed GEMM, for parts that ``fused_rows_match`` passed with
    ``pair`` (``holder`` keeps the packed copy of their weights side by side)."""
    packed = holder.get(*(p.weight for p in parts))
    bias = None if parts[0].bias is None else holder.biases(*(p.bias for p in parts))

    def linear(r):
        return _packed_linear(packed, r, bias)

    return (_pairing(linear) if pair else linear)(x)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' attention-function signature: query [b, heads, q, d], key/value [b, kv heads, k, d],
    attention_mask [b, 1, q, >= k] (additive or boolean) or None (every key for one query, causal for
    several). Returns (output [b, q, heads, d], None)."""
    b, h, q, d = query.shape
    t = key.shape[2]
    if (q > 1 and t == q) or b != 1 or dropout or torch.is_grad_enabled() and query.requires_grad:
        # the prompt into an empty cache (one forward, as in plain decoding), or what our decoder never runs
        # (batches of sequences, training): torch's attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if key.dtype != query.dtype:        # a float32 cache (``float_cache``) holds half-precision values
            key, value = key.to(query.dtype), value.to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = float(scaling) if scaling is not None else d ** -0.5
    out = attend(query[0], key[0], value[0], *_visible(attention_mask, q, t), scale)     # [q, heads, d] float32
    return out.to(query.dtype).unsqueeze(0), None


_last_mask: tuple = (None, 0, None)     # the mask of the last call, its key count, its visible lists


def _visible(mask, q: int, t: int) -> tuple:
    """Which keys each query sees, as ``attention_kernel.visible_lists``. A forward hands every layer the same
    mask: its lists are made once (the mask is held here, so that its identity is not reused meanwhile; one
    tuple, read and replaced whole, so that decoders in other threads never see another mask's lists)."""
    global _last_mask
    if mask is None:
        if q == 1:
            return np.array([0, t], np.int64), np.arange(t, dtype=np.int64)
        return visible_lists(np.tril(np.ones((q, t), bool), t - q))   # new queries after a cache, causal
    last = _last_mask
    if last[0] is mask and last[1] == t:
        return last[2]
    m = mask[0, 0, :, :t]
    lists = visible_lists((m if m.dtype == torch.bool else m == 0).expand(q, t).cpu().numpy())
    _last_mask = (mask, t, lists)
    return lists


def new_cache(model):
    """A KV cache for ``model``'s verifies (``kv_cache.new_cache``), with float32 buffers where ``float_cache``."""
    return kv_cache.new_cache(float_buffers=float_cache(model))


def float_cache(model) -> bool:
    """Whether ``model``'s KV cache may keep its keys and values in float32 (``kv_cache.new_cache``): its
    attention is this module's, which reads float32 (the same values; no conversion per layer and step).
    ``SPECSTORE_FLOAT_CACHE=0`` keeps the model's dtype (twice the cache's memory otherwise)."""
    return (bool(installed(model)) and getattr(model.config, "_attn_implementation", None) == NAME
            and not switched_off("SPECSTORE_FLOAT_CACHE"))


def attention_kernel(model) -> str:
    """"native" or "numba": which kernel this module's attention runs for ``model`` (client/attention_kernel.py)."""
    c = model.config
    return kernel(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def installed(model) -> str:
    """The linear layers' way ("packed" or "chunked" in half precision, "rows" in float32, see the module's
    docstring), or "" if not installed (or installed for the dtype the model had before a conversion)."""
    mode = getattr(model, "_specstore_invariant", "")
    return mode if mode and (mode == "rows") == (_dtype(model) == torch.float32) else ""


def _dtype(model) -> Optional[torch.dtype]:
    p = next(model.parameters(), None)
    return None if p is None else p.dtype


def _forget(model) -> None:
    """Undo an install made for another dtype (the model was converted since, e.g. ``.to(torch.bfloat16)``)."""
    from . import small_linear

    small_linear.uninstall(model)       # every nn.Linear back to its class's forward
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__dict__.pop("_specstore_packed", None)
            m.__dict__.pop("_specstore_pair", None)
    for attr in ("_specstore_invariant", "_specstore_refused", "_specstore_refused_for"):
        model.__dict__.pop(attr, None)


def _refuse(model, why: str) -> None:
    model._specstore_refused = why
    model._specstore_refused_for = _dtype(model)        # a converted model is looked at again


def _applies(p) -> bool:
    """Whether a model whose first parameter is ``p`` needs batch-invariant forwards: half precision on CPU."""
    return p is not None and p.device.type == "cpu" and p.dtype in HALF


def _install_rows(model) -> bool:
    """float32 on CPU: the linear layers on client/row_kernel.c for 1..TREE_ROWS rows and this module's attention on
    client/attention_kernel.c (the module's docstring). Returns whether installed; why not goes to the log."""
    from . import small_linear

    why = ""
    if not small_linear.install(model) or small_linear.installed(model) != "native":
        why = ("its linear layers are not on client/row_kernel.c (no C compiler, switched off, or no memory for a "
               "packed copy)")
    elif attention_kernel(model) != "native":
        why = "client/attention_kernel.c does not take it (a head dimension not a multiple of 16, or switched off)"
    else:
        try:
            gqa_attention.register(NAME, attention)
            model.set_attn_implementation(NAME)
        except Exception as e:  # noqa: BLE001 - a transformers without attention interfaces
            why = f"its attention cannot be swapped ({e})"
    if why:
        _refuse(model, why)
        log.info("float32 without batch-invariant forwards (a tree row equals plain decoding's to rounding, not "
                 "bit for bit): %s", why)
        return False
    small_linear.pin(model, TREE_ROWS)
    model._specstore_invariant = "rows"
    return True


def install(model) -> bool:
    """Make a CPU half-precision (or, on the C kernels, float32) model batch-invariant (idempotent). Returns whether
    it is; another device or dtype, a BLAS whose GEMM is not row-invariant, or an attention transformers cannot swap
    leaves it as it was (the reason kept on the model for ``check``, and not checked again for that dtype)."""
    if installed(model):
        return True
    p = next(model.parameters(), None)
    if getattr(model, "_specstore_invariant", ""):
        _forget(model)
    dtype = None if p is None else p.dtype
    if getattr(model, "_specstore_refused", "") and getattr(model, "_specstore_refused_for", None) == dtype \
            or not enabled():
        return False
    if p is not None and p.device.type == "cpu" and p.dtype == torch.float32:
        return _install_rows(model)
    if not _applies(p):
        return False
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    shapes = {}
    for m in linears:
        shapes.setdefault(tuple(m.weight.shape), m.weight)
    packed_ok = not switched_off("SPECSTORE_PACKED_LINEAR") and packing_fits([m.weight for m in linears])
    mode, why, paired = _gemm_mode([w.detach() for w in shapes.values()], packed_ok)
    if mode:
        try:
            gqa_attention.register(NAME, attention)
            model.set_attn_implementation(NAME)
        except Exception as e:  # noqa: BLE001 - a transformers without attention interfaces
            mode, why = "", f"its attention cannot be swapped ({e})"
    if not mode:
        _refuse(model, why)
        log.info("no batch-invariant forwards: %s", why)
        return False
    for m in linears:
        if mode == "packed":
            m._specstore_packed = _Packed()
        m._specstore_pair = tuple(m.weight.shape) in paired
        m.forward = types.MethodType(_packed_forward if mode == "packed" else _chunked_forward, m)
    model._specstore_invariant = mode
    return True


class NotBatchInvariantError(ValueError):
    """Half precision on CPU that cannot be made batch-invariant here: a choice of dtype to change (the CLIs
    report it as bad input: one line, exit status 2)."""


_warned_devices: set = set()


def check(model) -> None:
    """Raise unless a CPU half-precision model is batch-invariant, which lossless speculative decoding needs;
    ``SPECSTORE_BATCH_INVARIANT=0`` (asked for by its user) only warns. Half precision on another device
    (CUDA) warns once per device type: its kernels are not made batch-invariant here, and whether a tree row
    gets plain decoding's bits there is measured by ``python -m specstore.bench.half_precision_identity``, not
    promised."""
    p = next(model.parameters(), None)
    if p is not None and p.dtype in HALF and p.device.type != "cpu":
        if p.device.type not in _warned_devices:
            _warned_devices.add(p.device.type)
            log.warning("%s on %s: speculative outputs are token-identical to plain decoding only as far as this "
                        "device's kernels give a tree row the bits of the same token decoded alone, which is not "
                        "enforced here (on CPU it is: client/batch_invariant.py); measure it with python -m "
                        "specstore.bench.half_precision_identity, or use --dtype float32",
                        str(p.dtype).replace("torch.", ""), p.device.type)
        return
    if not _applies(p) or installed(model):
        return
    why = (f"a {str(p.dtype).replace('torch.', '')} model on CPU without batch-invariant forwards "
           "(client/batch_invariant.py): speculative outputs can differ from plain decoding's")
    if not enabled():
        log.warning("%s (SPECSTORE_BATCH_INVARIANT=0)", why)
        return
    reason = getattr(model, "_specstore_refused", "") or "batch_invariant.install() was not run on it"
    raise NotBatchInvariantError(f"{why}: {reason}; use --dtype float32")
