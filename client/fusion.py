"""Step 2 (fuse) of the decode loop (client/decoder.py, DESIGN §4): merge draft trees by longest common
prefix, then cut to a node budget."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .types import DraftTree


def fuse(trees: Sequence[DraftTree], budget: int) -> DraftTree:
    """Merge trees that share a root token into one tree of at most ``budget`` draft nodes.

    Nodes reached by the same token path from the root are one node: its probability is the largest
    of the estimates and its sources are OR-ed. The cut keeps the ``budget`` nodes of highest path
    probability (ties: shallower first), which is closed under parents because probabilities <= 1.
    """
    if not trees:
        raise ValueError("fuse() needs at least one tree")
    root = trees[0].root
    tokens, parents, probs, sources = [root], [-1], [1.0], [0]
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        if tree.root != root:
            raise ValueError(f"trees disagree on the root token ({tree.root} != {root})")
        local = np.empty(len(tree), dtype=np.int64)
        local[0] = 0
        tt, tp, tpr, ts = tree.tokens.tolist(), tree.parents.tolist(), tree.probs.tolist(), tree.sources.tolist()
        for i in range(1, len(tt)):
            key = (int(local[tp[i]]), tt[i])
            j = index.get(key)
            if j is None:
                j = len(tokens)
                index[key] = j
                tokens.append(tt[i]); parents.append(key[0]); probs.append(tpr[i]); sources.append(ts[i])
            else:
                probs[j] = max(probs[j], tpr[i])
                sources[j] |= ts[i]
            local[i] = j
    merged = DraftTree(np.asarray(tokens, np.int32), np.asarray(parents, np.int32),
                       np.asarray(probs, np.float32), np.asarray(sources, np.uint8))
    return cut_to_budget(merged, budget)


def rank_by_path_prob(tree: DraftTree, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Order the draft nodes best first, so that every prefix of the order is closed under parents.

    probs: [n] conditional probabilities to use instead of ``tree.probs``.
    Returns (order: [n-1] node indices, path: [n] path probability of each node, clamped so that a child
    never exceeds its parent). Ties: shallower first, then lower index.
    """
    q = np.asarray(tree.probs if probs is None else probs, dtype=np.float64)
    pp = np.ones(len(tree), dtype=np.float64)
    par = tree.parents
    for i in range(1, len(tree)):
        pp[i] = min(pp[par[i]] * q[i], pp[par[i]])
    depth = tree.depths()
    order = np.lexsort((np.arange(1, len(tree)), depth[1:], -pp[1:])) + 1
    return order, pp


def cut_to_budget(tree: DraftTree, budget: int) -> DraftTree:
    """Keep the root and the ``budget`` draft nodes with the highest path probability."""
    budget = max(0, int(budget))
    if tree.num_drafts <= budget:
        return tree
    if budget == 0:
        return DraftTree.empty(tree.root)
    order, _ = rank_by_path_prob(tree)
    return tree.subset(np.sort(np.concatenate([[0], order[:budget]])))
