"""Recent shared outputs compacted into regular suffix-array shards (``datastore-serve --stats-dir``).

The online store (datastore/output_store.py) answers lookups by a hash of ``KEY``-grams and holds at most a
million tokens. Its oldest outputs are moved, in the background, into shards of the index format (the
token array with separators, the reverse suffix array and the buckets that ``index-build`` writes, built by
datastore/suffix_shard.py), so that far more of the fleet's history stays matchable:

    <stats-dir>/outputs/outputs-<first ordinal:020d>-<end ordinal:020d>/
        tokens.npy rsa.npy buckets.npy docs.npy doc_ids.npy     (doc_ids = the outputs' ordinals)

A shard's vocabulary is its own largest token + 1 (the statistics know no tokenizer): ``buckets`` has that
many rows + 1 and the token dtype follows ``suffix_shard.token_dtype_for``.

``OutputCompactor`` (one thread) does, whenever the online store holds more than ``compact_tokens``:
copy the oldest outputs (about ``compact_tokens`` tokens) under the table's lock; build and write the shard
*outside* it (lookups and pushes go on); under the lock, add the shard to the list that lookups search and
drop exactly those outputs from the online store (``NgramStats.install_output_shard``); then retire the
oldest shards while they hold more than ``max_tokens`` tokens (the newest always stays: its end ordinal
says which outputs are compacted). While the newest shard holds fewer than ``merge_tokens`` tokens (default
16 x ``compact_tokens``), the new outputs are merged into it (one shard rebuilt with both, replacing it):
every shard costs each lookup its own search (`python -m specstore.bench.output_lookup`: ~30 us p50 for one
shard, ~100 us for 16, ~300 us for 64), so shards stay few and large. Each shard is written atomically (``durable.atomic_dir``: temporary
folder, fsynced files, rename, fsynced parent); a retired one is renamed aside before it is deleted.

Crash safety (``open_output_shards`` at ``StatsLog.open``): half-written or half-deleted folders, and a shard
whose outputs a merged one also holds (a kill between the merged shard's rename and the old one's delete),
are removed;
after the snapshot and the log replay (which re-adds outputs in order, so ordinals are reproducible) the
online outputs below the newest shard's end ordinal are dropped: a kill between "shard renamed into place"
and "snapshot written" neither loses nor duplicates an output.
"""
from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .durable import atomic_dir, fsync_dir, save_npy
from .index_format import SHARD_BUCKETS, SHARD_DOC_IDS, SHARD_DOCS, SHARD_RSA, SHARD_TOKENS
from .kernels import ranked_matches
from .output_store import KEY
from .suffix_shard import Shard, build_buckets, build_reverse_sa, pack_documents, token_dtype_for

log = logging.getLogger("datastore.stats")

OUTPUTS_DIR = "outputs"
_PREFIX = "outputs-"
_RETIRED = ".retired"


def shard_name(first: int, end: int) -> str:
    return f"{_PREFIX}{first:020d}-{end:020d}"


@dataclass(frozen=True)
class OutputShard:
    """One compacted shard: the outputs with ordinals ``first .. end - 1``, ``tokens`` real tokens."""

    shard: Shard
    path: Path
    first: int
    end: int
    tokens: int

    @classmethod
    def load(cls, path: Path) -> "OutputShard":
        sh = Shard.load(path, path.name)
        ids = sh.doc_ids
        return cls(sh, path, int(ids[0]), int(ids[-1]) + 1, sh.n - len(ids) - 1)


def write_output_shard(folder: Path, first: int, outputs: Sequence[Sequence[int]]) -> Path:
    """Write the outputs (token lists; ordinals ``first ..``) as one shard in ``folder``, atomically."""
    vocab = max(max(o) for o in outputs) + 1
    dtype = token_dtype_for(vocab)
    T, starts = pack_documents([np.asarray(o, dtype) for o in outputs], dtype)
    path = Path(folder) / shard_name(first, first + len(outputs))
    with atomic_dir(path) as tmp:
        save_npy(tmp / SHARD_TOKENS, T)
        save_npy(tmp / SHARD_RSA, build_reverse_sa(T))
        save_npy(tmp / SHARD_BUCKETS, build_buckets(T, vocab))
        save_npy(tmp / SHARD_DOCS, starts)
        save_npy(tmp / SHARD_DOC_IDS, np.arange(first, first + len(outputs), dtype=np.int64))
    return path


def shard_outputs(sh: Shard) -> list[np.ndarray]:
    """The outputs a shard holds, oldest first (token arrays without separators)."""
    s = sh.doc_starts
    return [np.asarray(sh.tokens[a:b - 1], np.int64) for a, b in zip(s[:-1].tolist(), s[1:].tolist())]


def open_output_shards(folder: Path) -> list[OutputShard]:
    """The complete shards in ``folder``, oldest first; leftovers of a killed write, merge or delete are
    removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith(_PREFIX) or ".tmp" in p.name or p.name.endswith(_RETIRED):
            log.warning("removing %s (a shard write or delete cut by a crash)", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            continue
        found.append(OutputShard.load(p))
    kept = [o for o in found
            if not any(q is not o and q.first <= o.first and o.end <= q.end for q in found)]
    for o in found:
        if o not in kept:
            log.warning("removing %s (merged into a newer shard before a crash)", o.path)
            retire_output_shard(o.path)
    return kept


def retire_output_shard(path: Path) -> None:
    """Delete a shard lookups no longer search: renamed aside first, so a crash never leaves half a shard
    under a live name."""
    aside = path.with_name(path.name + _RETIRED)
    path.rename(aside)
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def shard_matches(sh: Shard, context: Sequence[int], max_matches: int, max_span: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64 [k], positions int64 [k]) of the ``max_matches`` best occurrences of the context's end
    (at least ``KEY`` tokens and a next token, as in the online store): longer first, then newer (a later
    position); a position is the last matched token's, its continuation starts after it. One compiled walk
    (datastore/kernels.py ranked_matches): the nested suffix-array ranges of the match lengths m, m-1, ... KEY
    each add the occurrences of exactly that length."""
    ctx = np.asarray(context, np.int64).ravel()[-max_span:]
    none = np.zeros(0, np.int64)
    if len(ctx) < KEY:
        return none, none
    rev = np.ascontiguousarray(ctx[::-1])
    lens, poss = np.empty(max_matches, np.int64), np.empty(max_matches, np.int64)
    n = ranked_matches(sh.tokens, sh.rsa, sh.buckets, rev, sh.vocab, sh.sep, KEY, max_matches, lens, poss)
    return lens[:n], poss[:n]


class OutputCompactor:
    """The background thread that compacts the online store of ``stats`` (an NgramStats) into ``folder``.

    ``poke()`` (cheap; the log's writer calls it after each commit) wakes it when the store holds more than
    ``compact_tokens``. ``build_hook()``, when set, runs just before a shard is built, outside the lock (tests
    hold a build there to show that lookups go on).
    """

    def __init__(self, stats, folder: Path, compact_tokens: int, max_tokens: int,
                 build_hook: Optional[Callable[[], None]] = None, merge_tokens: Optional[int] = None):
        if compact_tokens < 1 or max_tokens < 1:
            raise ValueError("compact_tokens and max_tokens must be positive")
        self.stats, self.folder = stats, Path(folder)
        self.compact_tokens, self.max_tokens = int(compact_tokens), int(max_tokens)
        self.merge_tokens = int(merge_tokens if merge_tokens is not None else 16 * compact_tokens)
        self.build_hook = build_hook
        self.compactions = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outputs-compactor", daemon=True)

    def start(self) -> "OutputCompactor":
        self._thread.start()
        self.poke()
        return self

    def poke(self) -> None:
        if len(self.stats.outputs) > self.compact_tokens:
            self._wake.set()

    def compact_once(self) -> bool:
        """One compaction of the oldest outputs, if the store holds more than ``compact_tokens``."""
        first, outs = self.stats.outputs_to_compact(self.compact_tokens)
        if not outs:
            return False
        # only this thread changes the shard list, so the newest shard read here is still the newest below
        base = self.stats.output_shards[-1] if self.stats.output_shards else None
        if base is not None and base.end == first and base.tokens + sum(map(len, outs)) <= self.merge_tokens:
            first, outs = base.first, shard_outputs(base.shard) + list(outs)
        else:
            base = None
        if self.build_hook is not None:
            self.build_hook()
        sh = OutputShard.load(write_output_shard(self.folder, first, outs))
        dropped = self.stats.install_output_shard(sh, replaces=base)
        if base is not None:
            retire_output_shard(base.path)
        self.compactions += 1
        log.info("compacted %d recent outputs (%d tokens, ordinals %d..%d) into %s", dropped, sh.tokens, sh.first,
                 sh.end - 1, sh.path.name)
        for old in self.stats.retire_output_shards(self.max_tokens):
            retire_output_shard(old.path)
        return True

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                while not self._stopping.is_set() and len(self.stats.outputs) > self.compact_tokens:
                    if not self.compact_once():
                        break
            except Exception:  # noqa: BLE001 - a full disk must not end the service: the online store stays
                log.exception("compacting the recent outputs into %s failed; retrying in 30 s", self.folder)
                self._stopping.wait(30.0)

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
