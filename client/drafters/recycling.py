"""Token Recycling: an adjacency table ``token -> top-k next tokens`` refreshed from the target's own logits.

After every verify step each verified node's row is overwritten with the target's top-k next tokens
(and their probabilities) at that node. A proposal expands the table breadth-first along a static tree
template (child rank r of a template node = the r-th candidate in its token's row). The table lives as
long as the drafter (across requests in a process) and can be saved and loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..fusion import cut_to_budget
from ..types import DecodeContext, Drafter, DraftTree, Source, StepResult

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "token_recycle_tree.json"


def load_template(path: Optional[str | Path] = None) -> list[list[int]]:
    """A tree template as children lists: template[u] = child template nodes of u (node 0 = root).

    Accepts ``{"tree_adj": {"0": [1, 2], ...}}`` (Token Recycling) or a path list ``[[0], [1], [0, 0]]``.
    """
    data = json.loads(Path(path or DEFAULT_TEMPLATE).read_text())
    if isinstance(data, dict) and "tree_adj" in data:
        adj = {int(k): [int(c) for c in v] for k, v in data["tree_adj"].items()}
        n = 1 + max([c for v in adj.values() for c in v] + [0])
        return [adj.get(u, []) for u in range(n)]
    if isinstance(data, dict):
        data = next(iter(data.values()))
    # path list: each path is a sequence of child ranks from the root
    paths = sorted((tuple(p) for p in data), key=lambda p: (len(p), p))
    node_of: dict[tuple, int] = {(): 0}
    children: list[list[tuple[int, int]]] = [[]]
    for p in paths:
        node_of[p] = len(children)
        children.append([])
        children[node_of[p[:-1]]].append((p[-1], node_of[p]))
    return [[c for _, c in sorted(ch)] for ch in children]


class RecyclingDrafter(Drafter):
    source = Source.RECYCLED
    needs_target_topk = True

    def __init__(self, vocab_size: int, k: int = 8, template: Optional[str | Path] = None):
        self.vocab_size = int(vocab_size)
        self.k = int(k)
        self.template = load_template(template)
        width = max(len(c) for c in self.template)
        if width > self.k:
            raise ValueError(f"template needs {width} candidates per token but k={self.k}")
        self.table = np.full((self.vocab_size, self.k), -1, dtype=np.int32)
        self.table_probs = np.zeros((self.vocab_size, self.k), dtype=np.float16)

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        root = ctx.last_token
        if budget <= 0 or self.table[root, 0] < 0:
            return DraftTree.empty(root)
        tokens, parents, probs = [root], [-1], [1.0]
        tnode = [0]  # template node of each tree node
        i = 0
        limit = 4 * budget + 1  # enough candidates for the probability cut below
        while i < len(tokens) and len(tokens) < limit:
            row, prow = self.table[tokens[i]], self.table_probs[tokens[i]]
            for rank, tchild in enumerate(self.template[tnode[i]]):
                t = int(row[rank])
                if t < 0:
                    break
                tokens.append(t); parents.append(i); probs.append(float(prow[rank])); tnode.append(tchild)
            i += 1
        tree = DraftTree(np.asarray(tokens, np.int32), np.asarray(parents, np.int32),
                         np.asarray(probs, np.float32),
                         np.concatenate([[0], np.full(len(tokens) - 1, int(Source.RECYCLED))]).astype(np.uint8))
        return cut_to_budget(tree, budget)

    def observe(self, step: StepResult) -> None:
        k = min(self.k, step.node_topk_tokens.shape[1])
        toks = step.tree.tokens
        ok = (toks >= 0) & (toks < self.vocab_size)
        self.table[toks[ok], :k] = step.node_topk_tokens[ok, :k]
        self.table_probs[toks[ok], :k] = step.node_topk_probs[ok, :k]

    def warm_rows(self, rows) -> int:
        """Fill rows this table has not learned yet from ``rows`` [(token, next tokens, probs)] (the fleet's
        shared statistics, client/shared_stats.py); returns how many were filled. Its own observations
        overwrite them later, as they overwrite any row."""
        n = 0
        for token, nxt, probs in rows:
            if not 0 <= token < self.vocab_size or self.table[token, 0] >= 0:
                continue
            pairs = [(t, p) for t, p in zip(nxt, probs) if 0 <= t < self.vocab_size][:self.k]
            if not pairs:
                continue
            self.table[token, :len(pairs)] = [t for t, _ in pairs]
            self.table_probs[token, :len(pairs)] = [p for _, p in pairs]
            n += 1
        return n

    def save(self, path: str | Path) -> None:
        from ...datastore.durable import save_npz

        save_npz(path, table=self.table, probs=self.table_probs)

    def load(self, path: str | Path) -> None:
        with np.load(path) as data:
            table, probs = data["table"], data["probs"]
        if table.shape != self.table.shape:
            raise ValueError(f"recycling table shape {table.shape} does not match {self.table.shape}")
        self.table[:], self.table_probs[:] = table, probs
