"""RASD (retrieval-augmented speculative decoding): retrieval trees pruned by the draft model's first-step
distribution before fusion.

The datastore applies the rule itself to the hint sent with each lookup (``Retrieve.hint_tokens`` /
``hint_probs``); this module applies the same rule (datastore/tree_fusion.py ``hint_args``) to the trees of
local drafters (context, recycling) in the decode loop.
"""
from __future__ import annotations

import numpy as np

from ..datastore.tree_fusion import apply_hint, hint_args
from .types import DraftTree


def prune_by_hint(tree: DraftTree, hint: tuple) -> DraftTree:
    """``tree`` with first-level probabilities sqrt(p * hint) and, when the hint is confident, the first-level
    tokens it lacks dropped with their subtrees. hint: (tokens [k] int, probs [k] float)."""
    if tree.num_drafts == 0 or hint is None:
        return tree
    first = np.flatnonzero(tree.parents == 0)
    probs, keep = apply_hint(tree.tokens[first], tree.probs[first], hint_args(*hint))
    new_probs = tree.probs.copy()
    new_probs[first] = probs
    alive = np.ones(len(tree), bool)
    alive[first] = keep
    for i in range(1, len(tree)):       # parents come first: a dropped node drops its subtree
        alive[i] = alive[i] and alive[tree.parents[i]]
    pruned = DraftTree(tree.tokens, tree.parents, new_probs.astype(np.float32), tree.sources)
    return pruned if alive.all() else pruned.subset(np.flatnonzero(alive))
