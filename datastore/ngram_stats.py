"""Shared next-token statistics: what every decoder of a fleet observed, merged by addition.

A row maps a key (the last 1..``order`` tokens of a context) to next-token weights. Two kinds of
observation feed it, both as expected counts, so that merging is a sum (associative and commutative: any
order of batches, on any replica or shard, gives the same table, as llama.cpp's n-gram caches):

- a *top-k row* (our decoder sees the target's top-k next tokens at every verified node): token ``t``
  with next tokens ``n_i`` of probability ``p_i`` adds ``p_i`` to row ``(t,)`` and 1 to its total;
- a *token run* (any decoder, e.g. vLLM's proposer, which sees accepted tokens only): every position
  ``i >= new_from`` adds 1 to the weight of ``tokens[i]`` in the rows of its 1..``order`` preceding tokens.

Weights decay with a half-life (``half_life_s``), so that the table follows recent traffic: a row keeps
the time of its last update and is scaled by ``0.5 ** (dt / half_life_s)`` when it is next touched or read.
Apply times are explicit arguments (the write-ahead log records them), so a replay gives the same table.

Memory is bounded: a row keeps its ``keep`` heaviest next tokens (the total still counts the dropped
mass, so probabilities stay honest), and past ``max_rows`` rows the least recently updated go first.

``tree(context, budget)`` drafts from the table: best-first over path probability, each node's children
read from the longest key (backing off from ``order`` tokens to 1) that has a row, with
``P(next | key) = weight / (total + 1)`` (the +1 keeps a next token seen once from claiming certainty).
``rows_since(version)`` gives the order-1 rows changed after a version: a client's recycling table
(client/drafters/recycling.py) warm-starts from them.
"""
from __future__ import annotations

import heapq
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .index import build_tree
from .output_shards import shard_matches
from .output_store import OutputStore


@dataclass
class _Row:
    weights: dict          # next token -> weight at time ``t``
    total: float           # all mass ever added at this key (decayed), including dropped next tokens
    t: float               # time of the last update (the weights' time)
    version: int           # the table's version at the last update


@dataclass(frozen=True)
class StatsTree:
    """A draft tree without its root, as ``DatastoreIndex.retrieve`` returns it (parents[i] < i, -1 = root)."""

    tokens: np.ndarray     # [n] int32
    parents: np.ndarray    # [n] int32
    probs: np.ndarray      # [n] float32 P(node | parent)
    match_len: int         # length of the key that gave the root's children (0: no row)


_EMPTY_TREE = StatsTree(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), 0)


class NgramStats:
    """Thread-safe table ``key (1..order tokens) -> next-token weights``, with decay and bounded size."""

    def __init__(self, order: int = 3, keep: int = 16, half_life_s: float = 86_400.0, max_rows: int = 1_000_000,
                 max_output_tokens: int = 1_000_000):
        if order < 1 or keep < 1 or half_life_s <= 0 or max_rows < 1:
            raise ValueError("order, keep, half_life_s and max_rows must be positive")
        # finished generations shared as they are (datastore/output_store.py): same log, same lock
        self.outputs = OutputStore(max_output_tokens)
        # its compacted older part (datastore/output_shards.py OutputShard), oldest first; replaced, never
        # mutated, so a lookup reads it once under the lock and searches the shards outside it
        self.output_shards: tuple = ()
        self.order, self.keep = int(order), int(keep)
        self.half_life_s, self.max_rows = float(half_life_s), int(max_rows)
        self.version = 0                     # +1 per applied batch
        self.evicted = 0
        self._rows: "OrderedDict[tuple, _Row]" = OrderedDict()   # least recently updated first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ writes
    def apply(self, topk_rows: Iterable[tuple[int, Sequence[int], Sequence[float]]],
              runs: Iterable[tuple[Sequence[int], int]], now: float, outputs: Iterable[Sequence[int]] = ()) -> int:
        """Add one batch (validated by the caller) at time ``now``; returns the new version.

        topk_rows: (token, next tokens, their probabilities); runs: (tokens, new_from); outputs: finished
        generations for the recent-outputs store.
        """
        with self._lock:
            self.version += 1
            for out in outputs:
                self.outputs.add(out)
            for token, nxt, probs in topk_rows:
                self._add((int(token),), zip(nxt, probs), 1.0, now)
            for tokens, new_from in runs:
                toks = [int(x) for x in tokens]
                for i in range(max(1, int(new_from)), len(toks)):
                    for n in range(1, min(self.order, i) + 1):
                        self._add(tuple(toks[i - n:i]), ((toks[i], 1.0),), 1.0, now)
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)
                self.evicted += 1
            return self.version

    def _decay(self, dt: float) -> float:
        return 1.0 if dt <= 0 else 0.5 ** (dt / self.half_life_s)

    def _add(self, key: tuple, pairs, mass: float, now: float) -> None:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row({}, 0.0, now, self.version)
        else:
            f = self._decay(now - row.t)
            if f != 1.0:
                row.weights = {k: w * f for k, w in row.weights.items()}
                row.total *= f
            row.t = max(row.t, now)
            row.version = self.version
            self._rows.move_to_end(key)
        w = row.weights
        for tok, p in pairs:
            tok = int(tok)
            w[tok] = w.get(tok, 0.0) + float(p)
        row.total += mass
        if len(w) > self.keep:
            for tok in heapq.nsmallest(len(w) - self.keep, w, key=lambda k: (w[k], -k)):
                del w[tok]

    # ------------------------------------------------------------------ reads
    def _next(self, path: Sequence[int]) -> tuple[int, list[tuple[int, float]]]:
        """(key length, [(next token, P)] heaviest first) of the longest key ending ``path`` that has a row."""
        for n in range(min(self.order, len(path)), 0, -1):
            row = self._rows.get(tuple(path[-n:]))
            if row is not None and row.weights:
                z = row.total + 1.0
                nxt = sorted(row.weights.items(), key=lambda kv: (-kv[1], kv[0]))
                return n, [(tok, w / z) for tok, w in nxt]
        return 0, []

    def tree(self, context: Sequence[int], budget: int, *, min_prob: float = 0.1, depth: int = 8,
             width: int = 4) -> StatsTree:
        """Best-first draft tree after ``context`` (its last token is the root): at most ``budget`` nodes,
        ``width`` children per node, ``depth`` levels, path probability >= ``min_prob``."""
        ctx = [int(x) for x in context[-self.order:]]
        if budget <= 0 or not ctx:
            return _EMPTY_TREE
        tokens, parents, probs = [], [], []
        with self._lock:
            match_len, first = self._next(ctx)
            if not first:
                return _EMPTY_TREE
            heap = [(-p, 0, -1, tok, p, 1, ctx) for tok, p in first[:width]]
            heapq.heapify(heap)
            tie = len(heap)
            while heap and len(tokens) < budget:
                neg_pp, _, parent, tok, p, d, path = heapq.heappop(heap)
                if -neg_pp < min_prob:
                    break
                me = len(tokens)
                tokens.append(tok); parents.append(parent); probs.append(p)
                if d >= depth:
                    continue
                here = (path + [tok])[-self.order:]
                for ntok, np_ in self._next(here)[1][:width]:
                    tie += 1
                    heapq.heappush(heap, (neg_pp * np_, tie, me, ntok, np_, d + 1, here))
        return StatsTree(np.asarray(tokens, np.int32), np.asarray(parents, np.int32),
                         np.asarray(probs, np.float32), match_len)

    def output_tree(self, context: Sequence[int], budget: int, *, min_prob: float = 0.1, depth: int = 8,
                    max_matches: int = 16, max_span: int = 16) -> StatsTree:
        """The recent outputs' continuation tree after ``context``: the online store's matches and the
        compacted shards' (datastore/output_store.py, datastore/output_shards.py), ranked together by match
        length, then newer first, the ``max_matches`` best counted into one tree (``index.build_tree``)."""
        if budget <= 0 or not (len(self.outputs) or self.output_shards):
            return _EMPTY_TREE
        with self._lock:
            scored = self.outputs.matches(context, max_matches, max_span)
            rows = [self.outputs.rows([p for _, p in scored], depth)] if scored else []
            shards = self.output_shards
        lens = [np.asarray([n for n, _ in scored], np.int64)] if scored else []
        for o in reversed(shards):                   # newest first: the online store's outputs are newer still
            n, pos = shard_matches(o.shard, context, max_matches, max_span)
            if len(pos):
                lens.append(n)
                rows.append(o.shard.continuations(pos, depth))
        if not rows:
            return _EMPTY_TREE
        n, rows = np.concatenate(lens), np.concatenate(rows)
        pick = np.argsort(-n, kind="stable")[:max_matches]
        t = build_tree(rows[pick], np.zeros(len(pick), bool), budget, min_prob)
        if t is None:
            return _EMPTY_TREE
        return StatsTree(t[0], t[1], t[2], int(n[pick[0]]))

    # ------------------------------------------------------------------ compaction (OutputCompactor's steps)
    def outputs_to_compact(self, max_tokens: int) -> tuple[int, list]:
        """A copy of the oldest online outputs (at most ``max_tokens`` tokens): (first ordinal, token lists)."""
        with self._lock:
            return self.outputs.oldest(max_tokens)

    def install_output_shard(self, shard, replaces=None) -> int:
        """Search ``shard`` from now on (instead of ``replaces``, a shard merged into it) and drop the online
        outputs it holds (ordinals below its end, which also covers every older shard's); returns how many
        were dropped."""
        with self._lock:
            keep = [o for o in self.output_shards if o is not replaces and o.path != shard.path]
            self.output_shards = tuple(sorted((*keep, shard), key=lambda o: o.first))
            return self.outputs.drop_before(max(o.end for o in self.output_shards))

    def retire_output_shards(self, max_tokens: int) -> list:
        """Stop searching the oldest shards while the shards hold more than ``max_tokens`` tokens (the newest
        stays: it records what is compacted); returns them, for the caller to delete."""
        with self._lock:
            keep = list(self.output_shards)
            total = sum(o.tokens for o in keep)
            gone = []
            while len(keep) > 1 and total > max_tokens:
                gone.append(keep.pop(0))
                total -= gone[-1].tokens
            self.output_shards = tuple(keep)
            return gone

    def rows_since(self, version: int, limit: int, k: int = 8) -> tuple[list[tuple[int, list[int], list[float]]], int, bool]:
        """Order-1 rows updated after ``version``, oldest update first: ([(token, next tokens, P)], the version
        to ask from next time, whether rows remain). At most ``limit`` rows, except that the rows of one
        batch are never split (a page ends at a version boundary), and at most ``k`` next tokens each."""
        out, more, last = [], False, version
        with self._lock:
            upto = self.version
            for key, row in self._rows.items():      # in update order, so in non-decreasing version
                if len(key) != 1 or row.version <= version or not row.weights:
                    continue
                if len(out) >= limit and row.version != last:
                    more = True
                    break
                last = row.version
                z = row.total + 1.0
                nxt = sorted(row.weights.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
                out.append((key[0], [t for t, _ in nxt], [w / z for _, w in nxt]))
        return out, (last if more else upto), more

    # ------------------------------------------------------------------ snapshots
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The whole table as flat arrays (for a snapshot): rows in update order."""
        with self._lock:
            n = len(self._rows)
            keys = np.full((n, self.order), -1, np.int64)
            meta = np.zeros((n, 3), np.float64)          # total, t, version
            counts = np.zeros(n, np.int64)
            nxt, wts = [], []
            for i, (key, row) in enumerate(self._rows.items()):
                keys[i, :len(key)] = key
                meta[i] = (row.total, row.t, row.version)
                counts[i] = len(row.weights)
                nxt.extend(row.weights.keys()); wts.extend(row.weights.values())
            conf = np.array([self.order, self.keep, self.half_life_s, self.max_rows, self.version, self.evicted],
                            np.float64)
            return dict(keys=keys, meta=meta, counts=counts, next=np.asarray(nxt, np.int64),
                        weights=np.asarray(wts, np.float64), conf=conf, **self.outputs.to_arrays())

    @classmethod
    def from_arrays(cls, a: dict, **overrides) -> "NgramStats":
        """The table of ``to_arrays`` (its order; ``overrides`` may change keep, half-life, max_rows)."""
        order, keep, half, max_rows, version, evicted = a["conf"].tolist()
        kw = dict(order=int(order), keep=int(keep), half_life_s=half, max_rows=int(max_rows))
        kw.update({k: v for k, v in overrides.items() if v is not None and k != "order"})
        s = cls(**kw)
        s.version, s.evicted = int(version), int(evicted)
        if "outputs_tokens" in a:
            s.outputs = OutputStore.from_arrays(a)
        ends = np.cumsum(a["counts"])
        nxt, wts = a["next"].tolist(), a["weights"].tolist()
        start = 0
        for i, end in enumerate(ends.tolist()):
            key = tuple(int(x) for x in a["keys"][i] if x >= 0)
            total, t, ver = a["meta"][i].tolist()
            s._rows[key] = _Row(dict(zip(nxt[start:end], wts[start:end])), total, t, int(ver))
            start = end
        return s

    def same_as(self, other: "NgramStats", rel: float = 1e-9) -> bool:
        """Whether two tables hold the same rows (weights equal up to float rounding of sums in another
        order): merging is a sum, so any order of the same batches must give this."""
        if self._rows.keys() != other._rows.keys():
            return False
        for key, a in self._rows.items():
            b = other._rows[key]
            if a.weights.keys() != b.weights.keys() or not math.isclose(a.total, b.total, rel_tol=rel):
                return False
            if any(not math.isclose(w, b.weights[t], rel_tol=rel, abs_tol=1e-12) for t, w in a.weights.items()):
                return False
        return True


def check_batch(topk_rows, runs, vocab_size: int, *, max_rows: int, max_run: int, max_runs: int,
                max_next: int, outputs=(), max_outputs: int = 16, max_output: int = 16_384) -> Optional[str]:
    """Why a push batch is invalid (a message for INVALID_ARGUMENT), or None.

    topk_rows: objects with ``token``, ``next_tokens``, ``probs``; runs: objects with ``tokens``, ``new_from``;
    outputs: objects with ``tokens``.
    """
    if len(topk_rows) > max_rows:
        return f"{len(topk_rows)} top-k rows; the limit is {max_rows}"
    if len(runs) > max_runs:
        return f"{len(runs)} token runs; the limit is {max_runs}"
    if len(outputs) > max_outputs:
        return f"{len(outputs)} outputs; the limit is {max_outputs}"
    if not topk_rows and not runs and not outputs:
        return "an empty batch (no rows, runs or outputs)"
    for i, o in enumerate(outputs):
        n = len(o.tokens)
        if n < 2 or n > max_output:
            return f"outputs[{i}] has {n} tokens; an output has 2..{max_output}"
        t = np.asarray(o.tokens, np.int64)
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            return f"outputs[{i}].tokens hold ids outside the vocabulary [0, {vocab_size})"
    for i, r in enumerate(topk_rows):
        if not 0 <= r.token < vocab_size:
            return f"rows[{i}].token {r.token} is outside the vocabulary [0, {vocab_size})"
        if len(r.next_tokens) != len(r.probs) or not r.next_tokens:
            return f"rows[{i}]: next_tokens and probs must be non-empty and of the same length"
        if len(r.next_tokens) > max_next:
            return f"rows[{i}] has {len(r.next_tokens)} next tokens; the limit is {max_next}"
        nt = np.asarray(r.next_tokens, np.int64)
        if int(nt.min()) < 0 or int(nt.max()) >= vocab_size:
            return f"rows[{i}].next_tokens hold ids outside the vocabulary [0, {vocab_size})"
        p = np.asarray(r.probs, np.float64)
        if not np.all((p >= 0) & (p <= 1)) or float(p.sum()) > 1.0 + 1e-3:
            return f"rows[{i}].probs must lie in [0, 1] and sum to at most 1"
    for i, r in enumerate(runs):
        n = len(r.tokens)
        if n < 2 or n > max_run:
            return f"runs[{i}] has {n} tokens; a run has 2..{max_run}"
        if r.new_from >= n:
            return f"runs[{i}].new_from {r.new_from} is not inside its {n} tokens"
        t = np.asarray(r.tokens, np.int64)
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            return f"runs[{i}].tokens hold ids outside the vocabulary [0, {vocab_size})"
    return None
