"""The types that travel between drafters, fusion, verification and the decode loop.

numpy only (no torch): the datastore service may import this module without pulling in a model.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np


class Source(enum.IntFlag):
    """Where a draft node came from; after fusion a node carries the OR of all its sources."""

    NONE = 0
    DATASTORE = 1
    DOCUMENTS = 2
    RECYCLED = 4
    CONTEXT = 8
    DRAFT_MODEL = 16
    EARLY_EXIT = 32


_NODE_NUMBERS = np.arange(1, 1025, dtype=np.uint64)


def _node_numbers(n: int) -> np.ndarray:
    """[1, 2, ..., n-1] as uint64 (a cached range: tree validation runs on every drafted tree)."""
    global _NODE_NUMBERS
    if n - 1 > len(_NODE_NUMBERS):
        _NODE_NUMBERS = np.arange(1, 2 * n, dtype=np.uint64)
    return _NODE_NUMBERS[:n - 1]


@dataclass(frozen=True, slots=True)
class DraftTree:
    """A draft tree in topological order.

    Node 0 is the root: the last accepted token, not a draft. ``parents[i] < i`` for i > 0.

    tokens:  [n] int32   token id of each node
    parents: [n] int32   parent index, parents[0] == -1
    probs:   [n] float32 estimated P(node accepted | parent accepted); probs[0] == 1
    sources: [n] uint8   Source bits
    """

    tokens: np.ndarray
    parents: np.ndarray
    probs: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 1:
            raise ValueError("a DraftTree has at least its root node")
        if not (len(self.parents) == len(self.probs) == len(self.sources) == n):
            raise ValueError("tokens, parents, probs and sources must have the same length")
        if int(self.parents[0]) != -1:
            raise ValueError("parents[0] must be -1 (node 0 is the root)")
        if n > 1:
            # one comparison for both bounds: viewed as unsigned, a negative parent is >= 2**63 > i
            p = np.asarray(self.parents[1:], dtype=np.int64).view(np.uint64)
            if (p >= _node_numbers(n)).any():
                raise ValueError("parents[i] must satisfy 0 <= parents[i] < i")

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, root: int) -> "DraftTree":
        return cls(
            tokens=np.array([root], dtype=np.int32),
            parents=np.array([-1], dtype=np.int32),
            probs=np.array([1.0], dtype=np.float32),
            sources=np.array([0], dtype=np.uint8),
        )

    @classmethod
    def from_paths(
        cls,
        root: int,
        paths: Iterable[Sequence[int]],
        source: Source | int,
        probs: Optional[Iterable[Sequence[float]]] = None,
    ) -> "DraftTree":
        """Build a tree from token paths that all start below the root (shared prefixes are merged).

        ``probs``, if given, holds one conditional probability per token of each path; when two paths
        share a prefix the larger estimate is kept. Without it every node gets probability 1.
        """
        tokens = [int(root)]
        parents = [-1]
        pr = [1.0]
        children: dict[tuple[int, int], int] = {}
        prob_iter = iter(probs) if probs is not None else None
        for path in paths:
            ppath = next(prob_iter) if prob_iter is not None else None
            cur = 0
            for j, tok in enumerate(path):
                key = (cur, int(tok))
                p = float(ppath[j]) if ppath is not None else 1.0
                nxt = children.get(key)
                if nxt is None:
                    nxt = len(tokens)
                    children[key] = nxt
                    tokens.append(int(tok))
                    parents.append(cur)
                    pr.append(p)
                else:
                    pr[nxt] = max(pr[nxt], p)
                cur = nxt
        return cls(
            tokens=np.asarray(tokens, dtype=np.int32),
            parents=np.asarray(parents, dtype=np.int32),
            probs=np.asarray(pr, dtype=np.float32),
            sources=np.concatenate([[0], np.full(len(tokens) - 1, int(source))]).astype(np.uint8),
        )

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return int(len(self.tokens))

    @property
    def root(self) -> int:
        return int(self.tokens[0])

    @property
    def num_drafts(self) -> int:
        """Number of draft nodes (excluding the root)."""
        return len(self) - 1

    def depths(self) -> np.ndarray:
        """[n] int32 depth of each node; the root has depth 0."""
        d = np.zeros(len(self), dtype=np.int32)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return d

    def path_probs(self) -> np.ndarray:
        """[n] float64 product of conditional probabilities from the root to each node."""
        pp = np.ones(len(self), dtype=np.float64)
        for i in range(1, len(self)):
            pp[i] = pp[self.parents[i]] * float(self.probs[i])
        return pp

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root (exclusive) down to ``node`` (inclusive)."""
        out = []
        while node > 0:
            out.append(int(node))
            node = int(self.parents[node])
        return out[::-1]

    def children_lists(self) -> list[list[int]]:
        ch: list[list[int]] = [[] for _ in range(len(self))]
        for i in range(1, len(self)):
            ch[int(self.parents[i])].append(i)
        return ch

    def subset(self, keep: np.ndarray) -> "DraftTree":
        """Keep the nodes in ``keep`` (sorted indices, must include 0 and be closed under parents)."""
        keep = np.asarray(keep, dtype=np.int64)
        remap = -np.ones(len(self), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        par = self.parents[keep].astype(np.int64)
        new_par = np.where(par >= 0, remap[np.maximum(par, 0)], -1)
        if np.any(new_par[1:] < 0):
            raise ValueError("subset is not closed under parents")
        return DraftTree(
            tokens=self.tokens[keep].astype(np.int32),
            parents=new_par.astype(np.int32),
            probs=self.probs[keep].astype(np.float32),
            sources=self.sources[keep].astype(np.uint8),
        )


@dataclass(slots=True)
class DecodeContext:
    """What a drafter sees at a step.

    tokens:     [L] int64  the prompt followed by every token accepted so far (last one = tree root)
    prompt_len: length of the prompt part of ``tokens``
    session_id: datastore session (documents found for this prompt), if any
    draft_hint: the draft model's next-token distribution after the root, (tokens [k] int, probs [k] float),
                set during prefetch by a drafter that ``provides_hint`` (RASD: the others prune by it)
    target_features: torch [L - 1, h]: the target's final hidden state at every position but the root's
                (given only when a drafter ``needs_target_features``; a feature head reads it)
    """

    tokens: np.ndarray
    prompt_len: int
    session_id: Optional[str] = None
    request_id: int = 0
    draft_hint: Optional[tuple] = None
    target_features: Optional[object] = None

    @property
    def last_token(self) -> int:
        return int(self.tokens[-1])


@dataclass(slots=True)
class StepResult:
    """What the target decided at one verify step.

    tree:            the verified tree
    accepted_nodes:  node indices of the accepted path, starting with 0 (the root)
    new_tokens:      [m] int64 tokens appended this step (accepted drafts + the bonus token), m >= 1
    node_topk_tokens:[n, k] int64 target's top-k next tokens after each tree node (for recycling)
    node_topk_probs: [n, k] float32 their probabilities
    context:         the DecodeContext the tree was proposed for
    """

    tree: DraftTree
    accepted_nodes: np.ndarray
    new_tokens: np.ndarray
    node_topk_tokens: np.ndarray
    node_topk_probs: np.ndarray
    context: Optional[DecodeContext] = None

    @property
    def num_accepted_drafts(self) -> int:
        return int(len(self.accepted_nodes) - 1)


class Drafter(abc.ABC):
    """A source of draft trees: the hooks the decode loop calls, each with a no-op default.

    Every drafter subclasses this and overrides what it needs; the decoder calls every hook on every
    drafter. A hook that raises is counted and logged by the decoder (``SpeculativeDecoder.drafter_errors``)
    and the step goes on: a failed ``propose`` contributes no tree, so the output is the same as without
    that drafter. Per request and step the decoder calls::

        begin_request(prompt_ids, prompt_text)      once, before prefill
        prefetch(ctx, budget)                       every drafter, then
        propose(ctx, budget) -> DraftTree           every drafter (step 1 of the decode loop)
        observe(step)                               every drafter, after the target decided (step 6)
        end_request()                               once, when the request ends (also on error)

    source:            the Source bit this drafter marks its nodes with
    needs_target_topk: ask the decoder for the target's top-k next tokens at every verified node
                       (``StepResult.node_topk_*``; costs a softmax + top-k per step, so only on request)
    provides_hint:     its prefetch sets ``ctx.draft_hint`` (a draft model): the decoder runs it first
    needs_target_features: ask the decoder for the target's final hidden states (``ctx.target_features``)
    """

    source: Source = Source.NONE
    needs_target_topk: bool = False
    provides_hint: bool = False
    needs_target_features: bool = False

    @abc.abstractmethod
    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        """A tree of at most ``budget`` drafts rooted at ``ctx.last_token``; nothing to draft -> empty tree.
        Must not block long: the target waits for it."""

    def observe(self, step: StepResult) -> None:
        """Learn from what the target accepted at the step just verified."""

    def prefetch(self, ctx: DecodeContext, budget: int) -> None:
        """Start slow work for this step's ``propose`` (a remote lookup) without waiting for it: every
        drafter's prefetch runs before any propose, so the wait overlaps local drafting."""

    def begin_request(self, prompt_ids: Optional[Sequence[int]], prompt_text: Optional[str]) -> None:
        """A new request starts (``prompt_text`` is None when the caller gave only token ids)."""

    def end_request(self) -> None:
        """The request ended, normally or not: release what ``begin_request`` took."""
