"""Steps 3 (verify) and 5 (commit) of the decode loop (client/decoder.py, DESIGN §4): one target forward
over a draft tree, then keep the accepted path.

The KV cache holds every accepted token except the last one (the next tree's root). A verify forward
feeds the whole tree; ``commit`` keeps the KV rows of the accepted path (root included) and drops the
rest, so accepted tokens are never recomputed. Only between a prefill and the first verify is the root in
the cache already: the prefill feeds the whole prompt (see ``Verifier``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import batch_invariant, gqa_attention, lean_forward, small_linear
from .kv_cache import attention_backends, cache_keyword, keep_positions
from .tree_attention import build_tree_attention
from .types import DraftTree


class Verifier:
    """Owns the target model's KV cache for one sequence.

    past_len: number of positions in the cache (all accepted tokens but the root).
    features: with ``keep_features``, the target's final hidden states [m, h] of the last prefill (every
              prompt position but the root's) or verify (every tree node) forward: what a feature head reads

    The prefill feeds the whole prompt, the root too, and keeps the root's logits: the first verify then
    feeds only the tree below the root. The prompt goes through one forward of the same shape as in plain
    decoding (transformers' ``generate`` prefills the whole prompt), which batch-invariant decoding needs
    (client/batch_invariant.py), and the root is not computed twice.
    """

    def __init__(self, model, topk: int = 8, keep_features: bool = False):
        self.model = model
        batch_invariant.install(model)  # bfloat16 on CPU: a tree row gets plain decoding's bits
        small_linear.install(model)     # a verify feeds a few rows per layer: client/small_linear.py
        gqa_attention.install(model)    # ... with a tree mask: client/gqa_attention.py
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.vocab_size)
        self.topk = topk
        self._cache_kw = cache_keyword(model)
        self.cache = None
        self.past_len = 0
        self._pending: Optional[int] = None  # tree size of the last verify, not yet committed
        self.features: Optional[torch.Tensor] = None
        self.keep_features = keep_features
        # after a prefill: the root (the prompt's last token) is already in the cache at ``past_len``
        self._root: Optional[tuple[int, torch.Tensor, Optional[torch.Tensor]]] = None   # token, logits, feature

    def _keep_features(self, module, args, output) -> None:
        self.features = output.last_hidden_state[0]

    def _run(self, **kw):
        """The target's forward; with ``keep_features`` a hook on its body keeps the body's output (before the
        output layer keeps only the last rows, prefill's logits_to_keep). The hook lives for this call only:
        other forwards of the same model (other decoders, plain generate) neither run it nor feed it."""
        if not self.keep_features:
            return self.model(**kw)
        handle = self.model.get_decoder().register_forward_hook(self._keep_features)
        try:
            return self.model(**kw)
        finally:
            handle.remove()

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray) -> None:
        """Feed the whole prompt into a fresh cache; the last token is the first root."""
        self.cache = batch_invariant.new_cache(self.model)
        self._pending = None
        x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device).view(1, -1)
        with attention_backends(self.device):
            out = self._run(input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        self.past_len = x.shape[1] - 1
        feature = None
        if self.keep_features:
            feature, self.features = self.features[-1], self.features[:-1]
        self._root = (int(x[0, -1]), out.logits[0, -1].float(), feature)

    @torch.inference_mode()
    def verify(self, tree: DraftTree) -> torch.Tensor:
        """One forward over the tree. Returns logits [n, V] (float32) for every node."""
        if self._pending is not None:
            raise RuntimeError("verify() called twice without commit()")
        root, self._root = self._root, None
        if root is not None and root[0] != tree.root:        # another root than the prompt's: feed it after all
            keep_positions(self.cache, self.past_len, [])
            root = None
        ti = build_tree_attention(tree, self.past_len, self.device, self.dtype)
        self._pending = len(tree)
        skip = 0 if root is None else 1                       # the root's row came with the prefill
        rows = [] if root is None else [root[1][None]]
        feats = [] if root is None or root[2] is None else [root[2][None]]
        if len(tree) > skip:
            mask = None if ti.attention_mask is None else ti.attention_mask[:, :, skip:]
            with attention_backends(self.device):
                if lean_forward.usable(self.model):      # the same operations without the module machinery
                    logits, hidden = lean_forward.forward(self.model, ti.input_ids[:, skip:], ti.position_ids[:, skip:],
                                                          mask, self.cache)
                    self.features = hidden[0] if self.keep_features else None
                else:
                    logits = self._run(input_ids=ti.input_ids[:, skip:], position_ids=ti.position_ids[:, skip:],
                                       attention_mask=mask, use_cache=True, **{self._cache_kw: self.cache}).logits
            rows.append(logits[0].float())
            feats += [self.features] if feats else []
        if feats:
            self.features = torch.cat(feats)
        return torch.cat(rows)

    @torch.inference_mode()
    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep the KV rows of ``accepted_nodes`` (a root-to-node path, starting with 0)."""
        n = self._pending
        if n is None:
            raise RuntimeError("commit() without verify()")
        self._pending = None
        keep_positions(self.cache, self.past_len, [self.past_len + int(i) for i in accepted_nodes])
        self.past_len += len(accepted_nodes)
