"""Context lookup (PLD / suffix-decoding style) over the prompt and everything generated so far.

An incremental n-gram index maps each n-gram (n = 1..max_ngram) to the positions that follow it. A
proposal takes the longest suffix of the context seen before, gathers the continuations of its most
recent occurrences and counts them into a tree: node probability = (count of the child) / (count of
the parent + 1), scaled down for short matches. These are raw estimates; the budget controller
calibrates them against what the target actually accepts.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..fusion import cut_to_budget
from ..types import DecodeContext, Drafter, DraftTree, Source

# short suffix matches predict worse than long ones
_MATCH_WEIGHT = {1: 0.35, 2: 0.7}


class ContextDrafter(Drafter):
    source = Source.CONTEXT

    def __init__(self, max_ngram: int = 6, min_ngram: int = 1, max_matches: int = 8, depth: int = 10):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_matches = max_matches
        self.depth = depth
        self._reset()

    def _reset(self) -> None:
        self._request = None
        self._indexed = 0  # positions < _indexed have had their preceding n-grams indexed
        self._grams: list[dict[tuple, list[int]]] = [defaultdict(list) for _ in range(self.max_ngram + 1)]

    def _catch_up(self, toks: list[int], L: int) -> None:
        """Index the n-grams ending just before positions _indexed..L-1 (their continuation exists)."""
        for p in range(max(self._indexed, 1), L):
            for n in range(1, min(self.max_ngram, p) + 1):
                self._grams[n][tuple(toks[p - n:p])].append(p)
        self._indexed = max(self._indexed, L)

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        root = ctx.last_token
        if self._request != ctx.request_id or len(ctx.tokens) < self._indexed:
            self._reset()
            self._request = ctx.request_id
        L = len(ctx.tokens)
        toks = ctx.tokens.tolist()
        self._catch_up(toks, L)
        if budget <= 0:
            return DraftTree.empty(root)
        for n in range(min(self.max_ngram, L), self.min_ngram - 1, -1):
            hits = self._grams[n].get(tuple(toks[L - n:]))
            if hits:
                return self._tree(toks, hits[-self.max_matches:][::-1], n, root, budget)
        return DraftTree.empty(root)

    def _tree(self, toks: list[int], starts: list[int], n: int, root: int, budget: int) -> DraftTree:
        # trie of continuations: key (parent node, token) -> node; counts per node
        counts = [len(starts)]
        parents = [-1]
        tokens = [root]
        child: dict[tuple[int, int], int] = {}
        L = len(toks)
        for s in starts:
            cur = 0
            for t in toks[s:min(s + self.depth, L)]:
                key = (cur, t)
                j = child.get(key)
                if j is None:
                    j = len(tokens)
                    child[key] = j
                    tokens.append(t); parents.append(cur); counts.append(0)
                counts[j] += 1
                cur = j
        c = np.asarray(counts, dtype=np.float64)
        par = np.asarray(parents, dtype=np.int64)
        probs = np.ones(len(tokens), dtype=np.float64)
        probs[1:] = c[1:] / (c[par[1:]] + 1.0)
        first = par == 0
        probs[first] *= _MATCH_WEIGHT.get(n, 1.0)
        tree = DraftTree(np.asarray(tokens, np.int32), par.astype(np.int32), probs.astype(np.float32),
                         np.concatenate([[0], np.full(len(tokens) - 1, int(Source.CONTEXT))]).astype(np.uint8))
        return cut_to_budget(tree, budget)
