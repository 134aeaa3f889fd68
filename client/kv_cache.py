"""KV-cache handling shared by the target's verifier and the draft model: one cache per sequence (a
transformers ``DynamicCache``), positions in the order they were fed, cut back to an accepted path.

Layout of every layer's keys/values: [batch 1, kv heads, positions, head dim].
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

import torch


def cache_keyword(model) -> str:
    """The forward's keyword for the cache: transformers 5.x renamed ``past_key_values`` to ``cache`` (the
    old name still works, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def attention_backends(device: torch.device):
    """On CUDA, keep SDPA off the cuDNN backend: it builds a new execution plan for every new sequence
    length (~0.1-1 s each), and a decode loop sees a new length every step. Measured on an H100 with a
    Llama-3-8B-sized model: tree verify 104 ms with cuDNN chosen vs 12-14 ms with the other backends."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def cache_length(cache) -> int:
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        return 0
    return int(layers[0].keys.shape[2])


def keep_positions(cache, past_len: int, rows: Sequence[int]) -> None:
    """Keep positions [0, past_len) and then ``rows`` (absolute positions >= past_len, in this order); drop
    the rest. A run ``past_len, past_len + 1, ...`` is a slice; anything else one index_select per layer."""
    rows = [int(r) for r in rows]
    total = cache_length(cache)
    if rows == list(range(past_len, past_len + len(rows))):
        end = past_len + len(rows)
        if end == total:
            return
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
        return
    idx = torch.as_tensor(rows, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[:, :, :past_len], layer.keys.index_select(2, idx)], 2)
        layer.values = torch.cat([layer.values[:, :, :past_len], layer.values.index_select(2, idx)], 2)
