"""Steps 3 (verify) and 5 (commit) of the decode loop (client/decoder.py, DESIGN §4): one target forward
over a draft tree, then keep the accepted path.

The KV cache holds every accepted token except the last one (the next tree's root). A verify forward
feeds the whole tree; ``commit`` keeps the KV rows of the accepted path (root included) and drops the
rest, so accepted tokens are never recomputed.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import numpy as np
import torch

from .tree_attention import build_tree_attention
from .types import DraftTree


class Verifier:
    """Owns the target model's KV cache for one sequence.

    past_len: number of positions in the cache (all accepted tokens but the root).
    """

    def __init__(self, model, topk: int = 8):
        from transformers import DynamicCache

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.vocab_size)
        self.topk = topk
        self._cache_cls = DynamicCache
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.past_len = 0
        self._pending: Optional[int] = None  # tree size of the last verify, not yet committed

    def _attention_backends(self):
        """On CUDA, keep SDPA off the cuDNN backend: it builds a new execution plan for every new sequence
        length (~0.1-1 s each), and a decode loop sees a new length every step. Measured on an H100 with a
        Llama-3-8B-sized model: tree verify 104 ms with cuDNN chosen vs 12-14 ms with the other backends."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray) -> None:
        """Feed every prompt token but the last (the first root) into a fresh cache."""
        self.cache = self._cache_cls()
        self.past_len = 0
        self._pending = None
        if len(ids) > 1:
            x = torch.as_tensor(np.asarray(ids[:-1], dtype=np.int64), device=self.device).view(1, -1)
            with self._attention_backends():
                self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
            self.past_len = len(ids) - 1

    @torch.inference_mode()
    def verify(self, tree: DraftTree) -> torch.Tensor:
        """One forward over the tree. Returns logits [n, V] (float32) for every node."""
        if self._pending is not None:
            raise RuntimeError("verify() called twice without commit()")
        ti = build_tree_attention(tree, self.past_len, self.device, self.dtype)
        with self._attention_backends():
            out = self.model(input_ids=ti.input_ids, position_ids=ti.position_ids,
                             attention_mask=ti.attention_mask, use_cache=True, **{self._cache_kw: self.cache})
        self._pending = len(tree)
        return out.logits[0].float()

    @torch.inference_mode()
    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep the KV rows of ``accepted_nodes`` (a root-to-node path, starting with 0)."""
        n = self._pending
        if n is None:
            raise RuntimeError("commit() without verify()")
        self._pending = None
        k = len(accepted_nodes)
        if k != n:
            end = self.past_len + k
            chain = list(accepted_nodes) == list(range(k))  # a chain prefix: slicing is enough
            if not chain:
                idx = torch.as_tensor([self.past_len + int(i) for i in accepted_nodes], device=self.device)
            for layer in self.cache.layers:
                if chain:
                    layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
                else:
                    layer.keys = torch.cat([layer.keys[:, :, : self.past_len], layer.keys.index_select(2, idx)], 2)
                    layer.values = torch.cat([layer.values[:, :, : self.past_len],
                                              layer.values.index_select(2, idx)], 2)
        self.past_len += k
