"""Step 2 (fuse) of the decode loop (client/decoder.py, DESIGN §4): merge draft trees by longest common
prefix, then cut to a node budget."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..datastore.tree_fusion import fuse_trees, rank_nodes
from .types import DraftTree


def fuse(trees: Sequence[DraftTree], budget: int) -> DraftTree:
    """Merge trees that share a root token into one tree of at most ``budget`` draft nodes.

    Nodes reached by the same token path from the root are one node: its probability is the largest
    of the estimates and its sources are OR-ed. The cut keeps the ``budget`` nodes of highest path
    probability (ties: shallower first), which is closed under parents because probabilities <= 1.
    The rule is datastore/tree_fusion.py's, which the service uses too.
    """
    if not trees:
        raise ValueError("fuse() needs at least one tree")
    root = trees[0].root
    for tree in trees:
        if tree.root != root:
            raise ValueError(f"trees disagree on the root token ({tree.root} != {root})")
    tok, par, pr, src = fuse_trees([(t.tokens[1:], t.parents[1:] - 1, t.probs[1:], t.sources[1:]) for t in trees])
    merged = DraftTree(np.concatenate([[root], tok]).astype(np.int32), np.concatenate([[-1], par + 1]).astype(np.int32),
                       np.concatenate([[1.0], pr]).astype(np.float32), np.concatenate([[0], src]).astype(np.uint8))
    return cut_to_budget(merged, budget)


def rank_by_path_prob(tree: DraftTree, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Order the draft nodes best first, so that every prefix of the order is closed under parents.

    probs: [n] conditional probabilities to use instead of ``tree.probs``.
    Returns (order: [n-1] node indices, path: [n] path probability of each node, clamped so that a child
    never exceeds its parent). Ties: shallower first, then lower index.
    """
    q = np.asarray(tree.probs if probs is None else probs)
    order, pp = rank_nodes(tree.parents[1:].astype(np.int64) - 1, q[1:])
    return order + 1, np.concatenate([[1.0], pp])


def cut_to_budget(tree: DraftTree, budget: int) -> DraftTree:
    """Keep the root and the ``budget`` draft nodes with the highest path probability."""
    budget = max(0, int(budget))
    if tree.num_drafts <= budget:
        return tree
    if budget == 0:
        return DraftTree.empty(tree.root)
    order, _ = rank_by_path_prob(tree)
    return tree.subset(np.sort(np.concatenate([[0], order[:budget]])))
