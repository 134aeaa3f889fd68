"""Longest-prefix fusion of draft trees and the cut to a node budget, on plain arrays.

The one implementation of the rule, shared by the service (which fuses the corpus tree with the shared
statistics' tree before answering) and the client's step 2 (client/fusion.py, on ``DraftTree``s):
nodes reached by the same token path from the root are one node, whose probability is the largest of
the estimates and whose sources are OR-ed; the cut keeps the ``budget`` nodes of highest path
probability (ties: shallower first, then earlier), which is closed under parents because a child's path
probability never exceeds its parent's.

A tree here has no root entry: ``tokens``, ``parents`` (-1 = child of the root, parents[i] < i),
``probs`` (P(node | parent)) and ``sources`` (uint8 bit sets), each of length n.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Tree = tuple  # (tokens [n] int, parents [n] int, probs [n] float, sources [n] uint8)


def fuse_trees(trees: Sequence[Tree]) -> Tree:
    """One tree holding every path of ``trees`` (same root); see the module docstring. Nodes keep the
    order in which they first appear (trees in order, nodes in order), so parents[i] < i holds."""
    tokens, parents, probs, sources = [], [], [], []
    index: dict[tuple[int, int], int] = {}
    for tt, tp, tpr, ts in trees:
        tt, tp, tpr, ts = (np.asarray(x).tolist() for x in (tt, tp, tpr, ts))
        local = [0] * len(tt)
        for i in range(len(tt)):
            key = (local[tp[i]] if tp[i] >= 0 else -1, tt[i])
            j = index.get(key)
            if j is None:
                j = len(tokens)
                index[key] = j
                tokens.append(tt[i]); parents.append(key[0]); probs.append(tpr[i]); sources.append(ts[i])
            else:
                if tpr[i] > probs[j]:
                    probs[j] = tpr[i]
                sources[j] |= ts[i]
            local[i] = j
    return (np.asarray(tokens, np.int32), np.asarray(parents, np.int32), np.asarray(probs, np.float32),
            np.asarray(sources, np.uint8))


def rank_nodes(parents: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order: [n] node indices best first, every prefix closed under parents; path: [n] path probability,
    clamped so that a child never exceeds its parent). Ties: shallower first, then lower index."""
    n = len(parents)
    q = np.asarray(probs, dtype=np.float64)
    pp = np.ones(n, dtype=np.float64)
    depth = np.zeros(n, dtype=np.int64)
    par = np.asarray(parents).tolist()
    for i in range(n):
        p = par[i]
        up, d = (1.0, 0) if p < 0 else (pp[p], depth[p])
        pp[i] = min(up * q[i], up)
        depth[i] = d + 1
    order = np.lexsort((np.arange(n), depth, -pp))
    return order, pp


def cut_tree(tree: Tree, budget: int) -> Tree:
    """``tree`` with only its ``budget`` best nodes (see the module docstring), in their original order."""
    tokens, parents, probs, sources = tree
    n, budget = len(tokens), max(0, int(budget))
    if n <= budget:
        return tree
    order, _ = rank_nodes(parents, probs)
    keep = np.sort(order[:budget])
    new_of = np.full(n, -1, np.int64)
    new_of[keep] = np.arange(len(keep))
    par = np.asarray(parents)[keep]
    return (np.asarray(tokens)[keep], np.where(par >= 0, new_of[np.maximum(par, 0)], -1).astype(np.int32),
            np.asarray(probs)[keep], np.asarray(sources)[keep])


_NO_HINT = (np.zeros(0, np.int64), np.zeros(0, np.float64), 0.0, False)
HINT_CONFIDENT = 0.8


def hint_args(hint_tokens, hint_probs, hint_confident: float = HINT_CONFIDENT) -> tuple:
    """A draft model's first-step distribution (RASD) as the lookup kernels take it: (sorted tokens int64,
    their probs float64, the probability of a token the hint lacks, whether the hint is confident enough
    to veto such tokens). The rule: a first-level probability p becomes sqrt(p * hint); a token the hint
    lacks gets the hint's leftover mass, or goes (with its subtree) when the veto holds."""
    if hint_tokens is None or hint_probs is None or not len(hint_tokens):
        return _NO_HINT
    ht = np.asarray(hint_tokens, dtype=np.int64)
    hp = np.asarray(hint_probs, dtype=np.float64)
    srt = np.argsort(ht, kind="stable")
    return ht[srt], hp[srt], max(0.0, 1.0 - float(hp.sum())), float(hp.max()) >= hint_confident


def apply_hint(first_tokens: np.ndarray, first_probs: np.ndarray, hint: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``hint_args``' rule on one tree's first-level nodes: (new probabilities [m] float64, keep [m] bool)."""
    ht, hp, left, veto = hint
    tok = np.asarray(first_tokens, dtype=np.int64)
    if len(ht) == 0:
        return np.asarray(first_probs, np.float64), np.ones(len(tok), bool)
    j = np.minimum(np.searchsorted(ht, tok), len(ht) - 1)
    hit = ht[j] == tok
    h = np.where(hit, hp[j], left)
    return np.sqrt(np.asarray(first_probs, np.float64) * h), hit | (not veto)
