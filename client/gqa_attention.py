"""Attention with a mask over grouped key/value heads (GQA) on CPU, without copying the KV cache.

Why: a tree verify passes an attention mask, and transformers' SDPA path then repeats every layer's cached
keys and values once per query head of a group (``repeat_kv``: SmolLM2 has 9 query heads over 3 KV heads, so
3x the cache copied per layer per step) before calling torch's attention. torch's CPU attention takes the
groups itself (``enable_gqa=True``), with the same arithmetic (bit-identical outputs, measured) at about
half the time: ~2 ms of a 45 ms SmolLM2 verify at 300 positions, growing with the context. Everything else
(no mask, one query, GPUs, other options) goes to transformers' own ``sdpa`` function unchanged.

``install(model)`` registers the function as the attention implementation ``specstore_sdpa`` (with
``sdpa``'s masks) and switches a CPU model that uses ``sdpa`` to it. ``SPECSTORE_GQA_ATTENTION=0`` turns it
off.
"""
from __future__ import annotations

import logging

import torch.nn.functional as F

from .small_linear import switched_off

log = logging.getLogger(__name__)

NAME = "specstore_sdpa"
_registered: set = set()


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' attention-function signature: query [b, heads, q, d], key/value [b, kv heads, k, d],
    attention_mask [b, 1, q, >= k] additive (or None). Returns (output [b, q, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is not None and query.shape[2] > 1 and query.device.type == "cpu"
            and getattr(module, "num_key_value_groups", 1) > 1 and attention_mask.dim() == 4
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask[:, :, :, :key.shape[2]],
                                             dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register(name: str, function) -> None:
    """Register ``function`` (transformers' attention-function signature) as attention implementation ``name``,
    with ``sdpa``'s masks (once per name)."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered.add(name)


def installed(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def install(model) -> bool:
    """Switch a CPU model with ``sdpa`` attention to ``specstore_sdpa`` (idempotent). Returns whether it uses it."""
    if installed(model):
        return True
    p = next(model.parameters(), None)
    if model.config._attn_implementation != "sdpa" or p is None or p.device.type != "cpu" \
            or switched_off("SPECSTORE_GQA_ATTENTION"):
        return False
    try:
        register(NAME, attention)
        model.set_attn_implementation(NAME)
    except Exception as e:  # noqa: BLE001 - an older or newer transformers: keep its own sdpa
        log.debug("keeping sdpa attention: %s", e)
        return False
    return installed(model)
