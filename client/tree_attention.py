"""The one place where a DraftTree becomes attention inputs for a single target forward pass (step 3,
verify, of the decode loop).

Layout of a verify forward: the KV cache holds the ``past_len`` tokens before the root; the forward's
inputs are the tree's ``n`` nodes (node 0 = the root). Node i attends to every past position and to its
own ancestors (itself included), and sits at position ``past_len + depth(i)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .types import DraftTree


@dataclass(frozen=True, slots=True)
class TreeInputs:
    """input_ids: [1, n] int64; position_ids: [1, n] int64;
    attention_mask: [1, 1, n, past_len + n] additive float mask (0 = attend, dtype min = blocked),
    or None for a one-node tree (plain causal step, the model's own fast path)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None


def ancestor_matrix(tree: DraftTree) -> np.ndarray:
    """[n, n] bool: anc[i, j] is True when j is i or an ancestor of i."""
    n = len(tree)
    anc = np.zeros((n, n), dtype=bool)
    anc[0, 0] = True
    for i in range(1, n):
        anc[i] = anc[tree.parents[i]]
        anc[i, i] = True
    return anc


def build_tree_attention(tree: DraftTree, past_len: int, device: torch.device | str,
                         dtype: torch.dtype = torch.float32) -> TreeInputs:
    n = len(tree)
    ids = torch.as_tensor(tree.tokens.astype(np.int64), device=device).view(1, n)
    pos = torch.as_tensor(past_len + tree.depths().astype(np.int64), device=device).view(1, n)
    if n == 1:
        return TreeInputs(ids, pos, None)
    return TreeInputs(ids, pos, additive_mask(ancestor_matrix(tree), past_len, device, dtype))


def additive_mask(tree_part: np.ndarray, past_len: int, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 1, m, past_len + t] additive mask for m new positions that see every past position and, of the
    t tree positions after it, those where ``tree_part`` ([m, t] bool) is True."""
    m, t = tree_part.shape
    allowed = np.ones((m, past_len + t), dtype=bool)
    allowed[:, past_len:] = tree_part
    mask = torch.zeros((1, 1, m, past_len + t), dtype=dtype)
    mask.masked_fill_(torch.from_numpy(~allowed).view(1, 1, m, past_len + t), torch.finfo(dtype).min)
    return mask.to(device)
