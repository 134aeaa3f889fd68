"""transformers' Llama forward for the verifier: the same tensor operations in the same order, without the
module machinery around them.

Why: a verify forward of SmolLM2-135M on a 2-core CPU spends ~13 ms of its 33-45 ms outside the linear
layers and attention, much of it in Python: ~400 ``nn.Module`` calls, keyword-argument decorators and
output-recording wrappers per forward. Calling each module's ``forward`` directly, and the very functions
transformers' Llama code calls, saves ~2 ms a verify (BENCHMARKS.md §9.3) and gives the same bits.

Where it applies: a model whose modules are exactly transformers' Llama classes (Llama, SmolLM2, TinyLlama,
...), while no forward hook is set on it (this forward would skip hooks: a verify then goes the model's way).
A probe checks it once per model and attention implementation: a short prompt and a small tree through the
model's own forward and through this one, on two scratch caches; any difference in any logit, or any error,
and the verifier keeps the model's own forward (``usable`` says why not in the log).
``SPECSTORE_LEAN_FORWARD=0`` switches it off.
"""
from __future__ import annotations

import inspect
import logging
from typing import Optional

import numpy as np
import torch

from . import batch_invariant, native_rows, small_linear
from .small_linear import switched_off

log = logging.getLogger(__name__)


def _llama_classes():
    from transformers.models.llama import modeling_llama as ml

    return ml


def _structure_ok(model) -> str:
    """"" if every module is the exact transformers Llama class the forward below reproduces, else why not."""
    try:
        ml = _llama_classes()
    except ImportError as e:
        return f"no transformers Llama code ({e})"
    base = getattr(model, "model", None)
    if type(model) is not ml.LlamaForCausalLM or type(base) is not ml.LlamaModel:
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    parts = (("self_attn", ml.LlamaAttention), ("mlp", ml.LlamaMLP), ("input_layernorm", ml.LlamaRMSNorm),
             ("post_attention_layernorm", ml.LlamaRMSNorm))
    for layer in base.layers:
        if type(layer) is not ml.LlamaDecoderLayer or any(type(getattr(layer, n, None)) is not c for n, c in parts):
            return "a decoder layer of other classes"
    if type(base.norm) is not ml.LlamaRMSNorm or type(base.rotary_emb) is not ml.LlamaRotaryEmbedding:
        return "another norm or rotary embedding"
    return ""


def _hooked(modules: list) -> bool:
    """Whether a forward hook is set on any of ``modules`` or globally: this forward would skip it."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
            cache) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, position_ids [1, n]; attention_mask as the model's forward takes it (the verifier's [1, 1, n,
    past + n] additive tree mask, or None); cache: the verifier's ``DynamicCache`` (appended to, as by the
    model's forward). Returns (logits [1, n, V], final hidden states [1, n, h]), what ``model(...)`` returns
    as ``logits`` and its body as ``last_hidden_state``. Mirrors transformers' LlamaForCausalLM.forward
    (modeling_llama.py) line by line; ``usable`` checks that it still does."""
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ml = _llama_classes()
    base, cfg = model.model, model.config
    h = base.embed_tokens.forward(input_ids)
    mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids,
                              **{_mask_cache_keyword(): cache})
    cos, sin = base.rotary_emb.forward(h, position_ids)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, ml.eager_attention_forward)
    shape = h.shape[:-1]
    fuse_qkv, fuse_gu = _fusion(model) if _fuses(model, h.dtype, input_ids.shape[-1]) else (None, None)
    if fuse_qkv is not None:
        cos4, sin4 = cos.unsqueeze(2), _signed_sin(sin).unsqueeze(2)      # [1, n, 1, d]: heads in dimension 2
    for layer in base.layers[: cfg.num_hidden_layers]:
        att, mlp = layer.self_attn, layer.mlp
        residual = h
        x = layer.input_layernorm.forward(h)
        heads = (*shape, -1, att.head_dim)
        if fuse_qkv is None:
            q = att.q_proj.forward(x).view(heads).transpose(1, 2)
            k = att.k_proj.forward(x).view(heads).transpose(1, 2)
            v = att.v_proj.forward(x).view(heads).transpose(1, 2)
            q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
        else:       # [1, n, q heads + 2 kv heads, d] in one GEMM; rotary over the q and k heads at once
            parts = (att.q_proj, att.k_proj, att.v_proj)
            qkv = _fused_linear(att._specstore_qkv, parts, fuse_qkv, x).view(heads)
            nq, nk = att.q_proj.out_features // att.head_dim, att.k_proj.out_features // att.head_dim
            qk = _rotary(qkv[:, :, : nq + nk], cos4, sin4)
            q, k, v = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2), qkv[:, :, nq + nk:].transpose(1, 2)
        k, v = cache.update(k, v, att.layer_idx)
        out, _ = attend(att, q, k, v, mask, dropout=0.0, scaling=att.scaling)
        h = residual + att.o_proj.forward(out.reshape(*shape, -1).contiguous())
        residual = h
        x = layer.post_attention_layernorm.forward(h)
        if fuse_gu is None:
            act = mlp.act_fn(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x)
        else:
            gate, up = _fused_linear(mlp._specstore_gu, (mlp.gate_proj, mlp.up_proj), fuse_gu,
                                     x).split(mlp.gate_proj.out_features, -1)
            act = mlp.act_fn(gate) * up
        h = residual + mlp.down_proj.forward(act)
    h = base.norm.forward(h)
    return model.lm_head.forward(h), h


FUSED_ROWS = 64      # verifies of up to this many nodes use fused GEMMs (checked for each row count 1..64)


def _fuses(model, dtype: torch.dtype, rows: int) -> bool:
    """Whether a forward of ``rows`` tokens in ``dtype`` may take the fused GEMMs that ``_fusion`` names: half
    precision up to FUSED_ROWS; float32 where the parts themselves take the C kernel for that many rows (else they
    take torch's linear, whose bits a fused kernel call would not give)."""
    if dtype in batch_invariant.HALF:
        return rows <= FUSED_ROWS
    return dtype == torch.float32 and rows in (small_linear.kernel_rows(model) or ())


def _fused_linear(holder, parts, pair, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([p(x) for p in parts], -1)`` in one call: oneDNN's packed GEMM in half precision, the C kernel
    in float32."""
    if x.dtype == torch.float32:
        return small_linear.fused_rows(holder, parts, x)
    return batch_invariant.fused_linear(holder, parts, pair, x)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: ``rotate_half(x) * sin == roll(x, d / 2) * _signed_sin(sin)`` bit for bit
    (a product's sign is its factors' signs; the magnitude and its rounding do not depend on them)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` (the same three roundings) in four ATen calls, not seven."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


def _fusion(model) -> tuple:
    """(q/k/v, gate/up): for each group of linear layers, whether the verifier computes it in one GEMM (see
    ``batch_invariant.fused_rows_match``: False, or True = one row as two) or not (None). Set by ``usable``."""
    if switched_off("SPECSTORE_FUSED_LINEAR"):
        return (None, None)
    return getattr(model, "_specstore_fusion", None) or (None, None)


def fused(model) -> bool:
    """Whether the verifier's lean forward computes some group of ``model``'s linear layers in one GEMM now."""
    return _fusion(model) != (None, None)


def _check_fusion(model) -> tuple:
    """``_fusion``'s answer for ``model``, checked on its first layer's weights (a GEMM's order of summation is a
    property of its shapes, the same in every layer), with packed copies made ready for every layer. With
    batch-invariant packed linear layers (half precision on CPU: there the verifier's attention reads any layout,
    and one GEMM of several weights replaces several calls of ~40-80 us each, BENCHMARKS.md §9.4), and with
    float32 linear layers on client/row_kernel.c (a call fewer per part, and the small k/v outputs spread over
    the threads with q's, BENCHMARKS.md §10)."""
    native = small_linear.installed(model) == "native"
    if batch_invariant.installed(model) != "packed" and not native:
        return (None, None)
    layers = model.model.layers
    groups = [[(lyr.self_attn.q_proj, lyr.self_attn.k_proj, lyr.self_attn.v_proj) for lyr in layers],
              [(lyr.mlp.gate_proj, lyr.mlp.up_proj) for lyr in layers]]
    if not batch_invariant.packing_fits([p.weight for g in groups for parts in g for p in parts]):
        return (None, None)
    if native:      # float32 on the C kernel (client/small_linear.py): no pairing there
        answer = tuple(False if small_linear.fused_rows_match(list(g[0])) else None for g in groups)
    else:
        answer = tuple(batch_invariant.fused_rows_match(list(g[0]), FUSED_ROWS) for g in groups)
    pack = native_rows.pack if native else None
    for lyr in layers:
        lyr.self_attn._specstore_qkv = batch_invariant._Packed(pack)
        lyr.mlp._specstore_gu = batch_invariant._Packed(pack)
    return answer


_MASK_KW: Optional[str] = None


def _mask_cache_keyword() -> str:
    """create_causal_mask's keyword for the cache (``cache`` since transformers 5.x renamed it)."""
    global _MASK_KW
    if _MASK_KW is None:
        from transformers.masking_utils import create_causal_mask

        _MASK_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    return _MASK_KW


@torch.inference_mode()
def _probe(model) -> str:
    """"" if ``forward`` gives the model's own logits bit for bit on a prompt and a tree, else why not."""
    from .kv_cache import cache_keyword
    from .tree_attention import build_tree_attention
    from .types import DraftTree

    p = next(model.parameters())
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(0)
    prompt = torch.as_tensor(rng.integers(0, vocab, 12), device=p.device).view(1, -1)
    tree = DraftTree(rng.integers(0, vocab, 5).astype(np.int32), np.array([-1, 0, 0, 1, 3], np.int32),
                     np.ones(5, np.float32), np.zeros(5, np.uint8))
    kw = cache_keyword(model)
    results = []
    for lean in (False, True):
        cache = batch_invariant.new_cache(model)   # as the verifier's
        model(input_ids=prompt, use_cache=True, **{kw: cache})
        logits = []
        for t in (DraftTree(tree.tokens[:1], tree.parents[:1], tree.probs[:1], tree.sources[:1]), tree):
            ti = build_tree_attention(t, cache.get_seq_length(), p.device, p.dtype)
            if lean:
                logits.append(forward(model, ti.input_ids, ti.position_ids, ti.attention_mask, cache)[0])
            else:
                logits.append(model(input_ids=ti.input_ids, position_ids=ti.position_ids,
                                    attention_mask=ti.attention_mask, use_cache=True, **{kw: cache}).logits)
        results.append(logits)
    for own, lean in zip(*results):
        if not torch.equal(own, lean):
            return "its logits differ from the model's own forward"
    return ""


def usable(model) -> bool:
    """Whether the verifier may call ``forward`` for ``model`` now: checked once per attention implementation and
    dtype (the answer kept on the model), and forward hooks, which it would skip, on every call (~20 us)."""
    if switched_off("SPECSTORE_LEAN_FORWARD"):
        return False
    p = next(model.parameters(), None)
    impl = (getattr(model.config, "_attn_implementation", None), None if p is None else p.dtype)
    known = getattr(model, "_specstore_lean", None)
    if known is None or known[0] != impl:
        why = _structure_ok(model)
        if not why:
            try:
                try:
                    model._specstore_fusion = _check_fusion(model)
                except Exception as e:  # noqa: BLE001 - the lean forward without fused GEMMs is still worth having
                    log.info("no fused GEMMs in the lean forward (%s: %s)", type(e).__name__, e)
                    model._specstore_fusion = (None, None)
                why = _probe(model)
                if why and fused(model):      # then without fused GEMMs
                    log.info("lean forward with fused GEMMs: %s; trying it without them", why)
                    model._specstore_fusion = (None, None)
                    why = _probe(model)
            except Exception as e:  # noqa: BLE001 - another transformers: its own forward is always right
                why = f"the probe failed ({type(e).__name__}: {e})"
        if why:
            log.info("verifying with the model's own forward: %s", why)
        model._specstore_lean = known = (impl, not why, list(model.modules()))
    return known[1] and not _hooked(known[2])
