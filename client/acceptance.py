"""Step 4 (accept) of the decode loop (client/decoder.py, DESIGN §4): which path of a verified tree the
target accepts.

Greedy: the longest path whose tokens equal the target's argmax, plus the bonus token (the argmax
after the last accepted node). Sampling: recursive rejection over siblings. Each draft child is a
point mass, so child c is accepted with probability p_res(c) where p_res is the target distribution
with the already-rejected siblings removed and renormalised; if every child is rejected, the bonus
token is drawn from p_res. The result is distributed exactly as ``warp(logits)`` sampled token by token.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .types import DraftTree


def greedy_accept(tree: DraftTree, argmax: np.ndarray, children: list[list[int]]) -> tuple[list[int], int]:
    """argmax: [n] target argmax after each node (an array, or any object indexed by node, such as
    ``ProcessedLogits.argmax``: only the nodes on the walked path are read).

    Returns (accepted node path starting at 0, bonus token)."""
    path = [0]
    cur = 0
    while True:
        want = int(argmax[cur])
        nxt = -1
        for c in children[cur]:
            if int(tree.tokens[c]) == want:
                nxt = c
                break
        if nxt < 0:
            return path, want
        path.append(nxt)
        cur = nxt


def sample_accept(tree: DraftTree, probs_of: Callable[[int], np.ndarray], children: list[list[int]],
                  rng: np.random.Generator) -> tuple[list[int], int]:
    """probs_of(node) -> [V] float64 target distribution after ``node`` (warped).

    Returns (accepted node path starting at 0, bonus token sampled from the residual distribution).
    """
    path = [0]
    cur = 0
    while True:
        p = probs_of(cur).copy()
        nxt = -1
        for c in children[cur]:
            tok = int(tree.tokens[c])
            total = p.sum()
            if total <= 0:
                break
            if rng.random() * total < p[tok]:
                nxt = c
                break
            p[tok] = 0.0
        if nxt < 0:
            total = p.sum()
            if total <= 0:  # cannot happen for a proper distribution; fall back to the unmodified one
                p = probs_of(cur)
                total = p.sum()
            return path, _draw(p, total, rng)
        path.append(nxt)
        cur = nxt


def _draw(p: np.ndarray, total: float, rng: np.random.Generator) -> int:
    """One token from the unnormalised distribution p (inverse CDF)."""
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, rng.random() * total, side="right"))
    return min(i, len(p) - 1) if p[min(i, len(p) - 1)] > 0 else int(np.flatnonzero(p)[-1])
