"""OPT-Tree growth: a draft tree grown layer by layer from a model's next-token distributions, shaped to
maximise the expected number of accepted tokens (Wang et al., "OPT-Tree", 2024).

A node's path probability is the product of the draft's conditional probabilities from the root. Each
layer: every frontier node offers its top children, scored by path probability; the best ``width`` offers
over the whole frontier become the next layer (so one draft forward per depth covers the whole layer).
The tree handed to verification is the ``budget`` nodes of highest path probability over all layers: for
draft probabilities taken as acceptance probabilities, the set of ``n`` nodes (closed under parents) with
the largest sum of path probabilities is the one with the largest expected accepted length, and the best
``n`` by path probability is that set (a child never beats its parent). Growth with ``width >= n`` and
``n`` layers therefore contains the optimum of the whole (infinite) tree: tests/unit/test_opt_tree.py
checks it against brute force.

Nothing here knows about models: ``OptTree`` takes the children distributions as arrays, so the draft
model, an early-exit head or anything else that scores next tokens can grow a tree with it.
"""
from __future__ import annotations

import numpy as np

from .fusion import rank_by_path_prob
from .types import DraftTree, Source


def best_offers(frontier_pp: np.ndarray, child_probs: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` best children over a frontier.

    frontier_pp:  [m] path probability of each frontier node
    child_probs:  [m, c] the conditional probabilities of each frontier node's candidate next tokens
    Returns (rows [w], cols [w]): where the w <= width offers of highest ``frontier_pp[row] * prob`` sit
    (ties: earlier row, then earlier column), best first, offers of probability 0 left out.
    """
    score = (np.asarray(frontier_pp, np.float64)[:, None] * np.asarray(child_probs, np.float64)).ravel()
    order = np.argsort(-score, kind="stable")[: max(0, int(width))]
    order = order[score[order] > 0]
    c = np.asarray(child_probs).shape[1]
    return order // c, order % c


class OptTree:
    """A tree being grown. Node 0 is the root; nodes are appended layer by layer (topological order).

    tokens, parents: node token ids and parent indices; probs: P(node | parent) as the drafter scored it;
    q: the same scaled by ``add_layer``'s calibration; pp: path probabilities (products of q);
    layers: the node indices of each depth (layers[0] = [0]).
    """

    def __init__(self, root: int):
        self.tokens: list[int] = [int(root)]
        self.parents: list[int] = [-1]
        self.probs: list[float] = [1.0]
        self.q: list[float] = [1.0]
        self.pp: list[float] = [1.0]
        self.layers: list[np.ndarray] = [np.array([0])]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def add_layer(self, child_tokens: np.ndarray, child_probs: np.ndarray, width: int,
                  scale: float = 1.0) -> np.ndarray:
        """Grow one layer below the current last layer.

        child_tokens, child_probs: [m, c] the candidates after each node of the last layer (m = its size).
        scale: each conditional probability is multiplied by it (clipped at 1) for ranking and path
        probabilities (a calibration of the drafter's confidence); ``probs`` keep the raw values.
        Returns the new nodes' indices (empty: nothing worth adding).
        """
        frontier = self.layers[-1]
        fpp = np.asarray([self.pp[i] for i in frontier])
        ct = np.asarray(child_tokens)
        cp = np.asarray(child_probs, np.float64)
        q = np.minimum(cp * scale, 1.0)
        rows, cols = best_offers(fpp, q, width)
        first = len(self.tokens)
        for r, c in zip(rows.tolist(), cols.tolist()):
            parent = int(frontier[r])
            self.tokens.append(int(ct[r, c]))
            self.parents.append(parent)
            self.probs.append(float(cp[r, c]))
            self.q.append(float(q[r, c]))
            self.pp.append(self.pp[parent] * float(q[r, c]))
        new = np.arange(first, len(self.tokens))
        if len(new):
            self.layers.append(new)
        return new

    def expected_length(self, budget: int) -> float:
        """1 + the sum of the path probabilities of the best ``budget`` nodes: expected tokens per step if
        the (scaled) draft probabilities were acceptance probabilities."""
        pp = np.sort(np.asarray(self.pp[1:]))[::-1][: max(0, int(budget))]
        return 1.0 + float(pp.sum())

    def layer_gain(self, d: int) -> float:
        """Sum of the path probabilities of layer ``d``'s nodes."""
        return float(sum(self.pp[i] for i in self.layers[d])) if d < len(self.layers) else 0.0

    def to_tree(self, budget: int, source: int = Source.DRAFT_MODEL) -> DraftTree:
        """The best ``budget`` nodes by path probability, as a DraftTree (probs: the raw conditionals)."""
        n = len(self.tokens)
        tree = DraftTree(np.asarray(self.tokens, np.int32), np.asarray(self.parents, np.int32),
                         np.asarray(self.probs, np.float32),
                         np.concatenate([[0], np.full(n - 1, int(source))]).astype(np.uint8))
        if tree.num_drafts <= budget:
            return tree
        if budget <= 0:
            return DraftTree.empty(self.tokens[0])
        order, _ = rank_by_path_prob(tree, np.asarray(self.q))
        return tree.subset(np.sort(np.concatenate([[0], order[:budget]])))
