"""KV-cache handling shared by the target's verifier and the draft model: one cache per sequence (a
transformers ``DynamicCache`` whose layers write into a buffer with room to grow), positions in the order
they were fed, cut back to an accepted path.

Layout of every layer's keys/values: [batch 1, kv heads, positions, head dim]; with ``BufferedLayer`` they
are views of the first positions of a buffer [1, kv heads, capacity, head dim].
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


def new_cache(float_buffers: bool = False):
    """A ``DynamicCache`` of ``BufferedLayer``s (a plain one where this transformers cannot take them).

    float_buffers: keep half-precision keys and values in float32 buffers (the same values: a half-precision
    number is a float32 one), for an attention that reads float32 (client/batch_invariant.py's): it then reads
    the buffers in place instead of converting every cached position in every layer at every step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is not None and not cache.layers:
        cache.layer_class_to_replicate = _buffered_layer_class(float_buffers)
    return cache


_BUFFERED: dict = {}


def _buffered_layer_class(float_buffers: bool = False):
    """``BufferedLayer`` (or ``FloatBufferedLayer``), made on first use (transformers is imported lazily here)."""
    if _BUFFERED:
        return _BUFFERED[float_buffers]
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A ``DynamicLayer`` that appends in place: new positions are written into a buffer with room to
        grow (by a quarter, at least 256 positions: a long prompt does not double the memory of its cache),
        and ``keys``/``values`` are views of its first positions.

        Why: ``DynamicLayer`` appends with ``torch.cat``, which copies the whole cache of every layer at every
        step: on CPU that cost a SmolLM2 step 1.6 ms at 300 positions and 3 ms at 900 (BENCHMARKS §8). A
        cut (``crop``, ``keep_positions``) keeps a view of the same buffer, so the next append writes in place;
        keys or values replaced by another tensor are copied into a new buffer once."""

        MIN_CAPACITY = 256    # positions of room at least, past the ones written
        BUFFER_DTYPE = None   # the buffers' dtype: None = the keys' own
        _bk = _bv = None      # the buffers (None until the first append)

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._bk = self._bv = None

        def _in_buffer(self) -> bool:
            k, v, bk, bv = self.keys, self.values, self._bk, self._bv
            return (bk is not None and k.dim() == 4 and k.data_ptr() == bk.data_ptr() and k.stride() == bk.stride()
                    and v.data_ptr() == bv.data_ptr() and v.stride() == bv.stride())

        def update(self, key_states, value_states, *args, **kwargs):
            if torch.is_grad_enabled():       # a forward that autograd records keeps torch.cat's copies
                self._bk = self._bv = None
                return super().update(key_states, value_states, *args, **kwargs)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            # buffers made in inference mode are inference tensors: they are written in it (a caller under
            # no_grad, e.g. the draft model, included)
            with torch.inference_mode():
                n = key_states.shape[-2]
                have = self.keys.shape[-2] if self.keys.dim() == 4 else 0
                if not self._in_buffer() or have + n > self._bk.shape[-2]:
                    cap = have + n + max(self.MIN_CAPACITY, (have + n) // 4)
                    dtype = self.BUFFER_DTYPE or key_states.dtype
                    bk = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1], dtype=dtype)
                    bv = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1], dtype=dtype)
                    if have:
                        bk[..., :have, :] = self.keys
                        bv[..., :have, :] = self.values
                    self._bk, self._bv = bk, bv
                self._bk[..., have:have + n, :] = key_states
                self._bv[..., have:have + n, :] = value_states
                self.keys = self._bk[..., :have + n, :]
                self.values = self._bv[..., :have + n, :]
            return self.keys, self.values

        def keep(self, past_len: int, idx) -> None:
            """Keep positions [0, past_len) and then ``idx`` (a tensor of positions >= past_len), in place."""
            with torch.inference_mode():
                k, v = self.keys.index_select(2, idx), self.values.index_select(2, idx)   # copies: rows may overlap
                self.keys = self._bk[..., :past_len + len(idx), :]
                self.values = self._bv[..., :past_len + len(idx), :]
                self.keys[..., past_len:, :] = k
                self.values[..., past_len:, :] = v

        def reset(self) -> None:
            self._bk = self._bv = None
            super().reset()

    class FloatBufferedLayer(BufferedLayer):
        """A ``BufferedLayer`` whose buffers are float32 (``new_cache(float_buffers=True)``)."""

        BUFFER_DTYPE = torch.float32

    _BUFFERED.update({False: BufferedLayer, True: FloatBufferedLayer})
    return _BUFFERED[float_buffers]


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
        if hasattr(layer, "keep") and layer._in_buffer():
            layer.keep(past_len, idx)
            continue
        layer.keys = torch.cat([layer.keys[:, :, :past_len], layer.keys.index_select(2, idx)], 2)
        layer.values = torch.cat([layer.values[:, :, :past_len], layer.values.index_select(2, idx)], 2)
