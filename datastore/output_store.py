"""Recent outputs shared by every node (SuffixDecoding's global tree, online): finished generations that
decoders chose to share (``PushStats.outputs``), matched by ``Retrieve`` next to the corpus index.

Bounded: at most ``max_tokens`` tokens; when full, the oldest outputs go first (first in, first out: recent
traffic is what repeats). Each output is appended to one token array with a separator (-1) after it.
Lookup: the positions where the context's last ``KEY`` tokens occur (a hash of each ``KEY``-gram -> its most
recent ``per_key`` positions), ranked by how far back the match goes (longer first, then more recent);
the ``max_matches`` best give ``depth`` tokens of continuation each (stopping at an output's end), counted
into a probability-pruned tree by the corpus lookups' own kernel (``index.build_tree``): ``P(child | parent)``
= the share of matches through the child. Not written to disk by itself: it lives in the statistics'
write-ahead log and snapshots (datastore/stats_log.py), or in Redis (datastore/stats_redis.py).

Every output gets an *ordinal*: the count of outputs added before it (kept in the snapshot arrays; a log replay
re-adds outputs in the same order, so ordinals are reproducible). With ``--stats-dir`` the oldest outputs are
compacted into suffix-array shards (datastore/output_shards.py) and dropped from here by ordinal.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

KEY = 3


class OutputStore:
    """Recent shared outputs and a ``KEY``-gram index over them; not thread-safe (its owner locks)."""

    def __init__(self, max_tokens: int = 1_000_000, per_key: int = 32):
        if max_tokens < 16 or per_key < 1:
            raise ValueError("max_tokens must be >= 16 and per_key >= 1")
        self.max_tokens, self.per_key = int(max_tokens), int(per_key)
        self._tokens: list = []                  # int tokens and -1 separators; _tokens[i] is position _off + i
        self._off = 0
        self._base = 0                           # absolute position of the oldest live token (>= _off)
        self._ends: deque = deque()              # absolute end (exclusive, after the separator) of each output
        self._index: dict[tuple, deque] = {}     # KEY-gram -> absolute positions just after it, newest last
        self.outputs = 0
        self.added = 0                           # outputs ever added: the next output's ordinal

    def __len__(self) -> int:
        return self._off + len(self._tokens) - self._base

    def add(self, tokens: Sequence[int]) -> None:
        toks = [int(t) for t in tokens]
        if len(toks) < 2:
            return
        toks = toks[-(self.max_tokens - 1):]
        start = self._off + len(self._tokens)
        self._tokens.extend(toks)
        self._tokens.append(-1)
        self._ends.append(start + len(toks) + 1)
        for i in range(KEY, len(toks)):
            q = self._index.get(tuple(toks[i - KEY:i]))
            if q is None:
                q = self._index[tuple(toks[i - KEY:i])] = deque(maxlen=self.per_key)
            q.append(start + i)
        self.outputs += 1
        self.added += 1
        while len(self) > self.max_tokens:
            self._pop_oldest()
        self._trim()
        # index entries before _base are skipped at lookup and fall out of their bounded deques

    @property
    def first_ordinal(self) -> int:
        """The ordinal of the oldest output held (== ``added`` when none is)."""
        return self.added - self.outputs

    def _pop_oldest(self) -> None:
        self._base = self._ends.popleft()
        self.outputs -= 1

    def _trim(self) -> None:
        if self._base - self._off > len(self._tokens) // 2:      # drop the dead prefix now and then
            del self._tokens[:self._base - self._off]
            self._off = self._base
            base = self._base
            for key in [k for k, q in self._index.items() if q[-1] < base]:   # keys of evicted outputs only
                del self._index[key]

    def oldest(self, max_tokens: int) -> tuple[int, list[list[int]]]:
        """(ordinal of the first, token lists) of the oldest outputs holding at most ``max_tokens`` tokens
        (separators not counted; at least one output when any is held): what a compaction copies."""
        out, n, start = [], 0, self._base
        for end in self._ends:
            toks = self._tokens[start - self._off:end - 1 - self._off]
            if out and n + len(toks) > max_tokens:
                break
            out.append(toks)
            n += len(toks)
            start = end
        return self.first_ordinal, out

    def drop_before(self, ordinal: int) -> int:
        """Drop the held outputs whose ordinal is below ``ordinal`` (compacted elsewhere); returns how many."""
        n = 0
        while self.outputs and self.first_ordinal < ordinal:
            self._pop_oldest()
            n += 1
        self._trim()
        return n

    def continuations(self, context: Sequence[int], max_matches: int = 16, depth: int = 8,
                      max_span: int = 16) -> tuple[np.ndarray, int]:
        """([M, depth] int64 continuation rows, -1 padded; the longest match length) for the context's end."""
        scored = self.matches(context, max_matches, max_span)
        if not scored:
            return np.zeros((0, depth), np.int64), 0
        return self.rows([pos for _, pos in scored], depth), scored[0][0]

    def matches(self, context: Sequence[int], max_matches: int = 16, max_span: int = 16) -> list[tuple[int, int]]:
        """The ``max_matches`` best [(match length, absolute position of the next token)]: longer first, then
        newer."""
        ctx = [int(t) for t in context[-max_span:]]
        if len(ctx) < KEY:
            return []
        q = self._index.get(tuple(ctx[-KEY:]))
        if not q:
            return []
        toks, base, off = self._tokens, self._base, self._off
        scored = []
        for pos in reversed(q):                   # newest first
            if pos < base:
                continue
            n = KEY
            while n < len(ctx) and pos - n - 1 >= base and toks[pos - n - 1 - off] == ctx[-n - 1]:
                n += 1
            scored.append((n, pos))
        scored.sort(key=lambda x: -x[0])          # stable: equal lengths stay newest first
        return scored[:max_matches]

    def rows(self, positions: Sequence[int], depth: int) -> np.ndarray:
        """[len(positions), depth] int64: the tokens from each position on, -1 from its output's end."""
        toks, off = self._tokens, self._off
        rows = np.full((len(positions), depth), -1, np.int64)
        end = off + len(toks)
        for r, pos in enumerate(positions):
            for d in range(depth):
                if pos + d >= end:
                    break
                t = toks[pos + d - off]
                if t < 0:
                    break
                rows[r, d] = t
        return rows

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The outputs still held, for a snapshot (the index is rebuilt from them)."""
        toks = np.asarray(self._tokens[self._base - self._off:], np.int64)
        return {"outputs_tokens": toks, "outputs_conf": np.array([self.max_tokens, self.per_key], np.int64),
                "outputs_first": np.array([self.first_ordinal], np.int64)}

    @classmethod
    def from_arrays(cls, a: dict, max_tokens=None) -> "OutputStore":
        conf = a["outputs_conf"].tolist()
        s = cls(max_tokens or conf[0], conf[1])
        if "outputs_first" in a:                  # (older snapshots had no ordinals: theirs start at 0)
            s.added = int(a["outputs_first"][0])
        toks = a["outputs_tokens"].tolist()
        start = 0
        for i, t in enumerate(toks):
            if t < 0:
                s.add(toks[start:i])
                start = i + 1
        return s
