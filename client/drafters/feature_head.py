"""The feature head (client/feature_head.py) as a tree drafter: the draft-model drafter's OPT-Tree growth, cost
accounting and calibration, with rows that read the target's hidden states.

    catch-up   the accepted tokens are fed with the target's real features (``DecodeContext.target_features``,
               which the decoder keeps when a drafter ``needs_target_features``); the root's row gives the
               first layer of the tree and, as the draft model's does, this step's RASD hint
    grow       a node's row reads its parent's output instead (no target feature exists for it yet)
    observe    the tree's rows are dropped, accepted ones included: they read predicted features, and the
               next catch-up feeds the accepted path again with the real ones (one forward of a few rows)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..feature_head import FeatureHead
from ..opt_tree import OptTree
from ..types import DecodeContext
from .draft_model import DraftModelDrafter


class FeatureHeadDrafter(DraftModelDrafter):
    """``head``: a client.feature_head.FeatureHead on the target's device and dtype; other arguments as
    DraftModelDrafter's."""

    needs_target_features = True
    reuses_tree_rows = False

    def _reset(self) -> None:   # also DraftModelDrafter.__init__'s: sets up these attributes
        super()._reset()
        self._feats: Optional[torch.Tensor] = None       # DecodeContext.target_features of this step
        self._node_h: dict[int, torch.Tensor] = {}       # tree node -> the head's output row for it

    def prefetch(self, ctx: DecodeContext, budget: int) -> None:
        if ctx.target_features is None:
            raise RuntimeError("the feature head needs the target's hidden states: the decoder gives them to "
                               "drafters whose needs_target_features is set")
        self._feats = ctx.target_features
        super().prefetch(ctx, budget)

    def propose(self, ctx: DecodeContext, budget: int):
        if ctx.target_features is not None:
            self._feats = ctx.target_features
        return super().propose(ctx, budget)

    # ------------------------------------------------------------------ what the rows read
    def _inputs(self, x: torch.Tensor, prev: Optional[torch.Tensor]) -> dict:
        if prev is None:   # a cost profile's random rows: zeros cost the same
            prev = self._zeros(x.shape[1])
        return {"inputs_embeds": self.model.inputs(x, prev.to(self.dtype).view(1, x.shape[1], -1))}

    def _catch_up_features(self, tokens: np.ndarray, keep: int) -> Optional[torch.Tensor]:
        """Rows keep..L-1 read the target's features at positions keep-1..L-2 (row 0: zeros)."""
        L = len(tokens)
        f = self._feats
        if f is None:
            return None
        if len(f) < L - 1:
            raise RuntimeError(f"the target's features cover {len(f)} positions, the sequence has {L}")
        rows = f[max(keep - 1, 0): L - 1]
        return torch.cat([self._zeros(1), rows.to(self.dtype)]) if keep == 0 else rows

    def _zeros(self, n: int) -> torch.Tensor:
        """[n, h] zero features (row 0's, which has no previous position)."""
        return torch.zeros((n, self.model.fc.in_features // 2), device=self.device, dtype=self.dtype)

    def _layer_features(self, tree: OptTree, nodes: Sequence[int]) -> Optional[torch.Tensor]:
        return torch.stack([self._node_h[int(tree.parents[i])] for i in nodes])

    def _fed(self, nodes: Sequence[int]) -> None:
        if len(nodes) == 1 and nodes[0] == 0:
            self._node_h = {0: self._hidden[-1]}
            return
        for j, i in enumerate(nodes):
            self._node_h[int(i)] = self._hidden[j]


def model_drafter(draft, **kw) -> DraftModelDrafter:
    """The drafter for what ``open_draft_model`` returned: a FeatureHeadDrafter for a feature head, else a
    DraftModelDrafter; ``kw`` as theirs."""
    return (FeatureHeadDrafter if isinstance(draft, FeatureHead) else DraftModelDrafter)(draft, **kw)
