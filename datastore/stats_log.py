"""Durable shared statistics: a write-ahead log with group commit, snapshots, and idempotent batches.

``StatsLog(directory).open()`` rebuilds the table (datastore/ngram_stats.py) from the last snapshot and the
log records after it; ``submit(batch_id, request_bytes, rows, runs)`` returns a future that resolves to
``(applied, version)`` once the batch's record is fsynced and applied: a push is acknowledged only then,
so an acknowledged push survives ``kill -9``. A batch id seen before resolves to ``(False, version)``
without a second record (a client's retry after a lost answer is applied once); the ids live in the
records and in the snapshot, so this holds across restarts too (the newest ``max_batch_ids`` ids).

One writer thread does all writes: it takes every batch queued meanwhile, appends their records, fsyncs
once for all of them (group commit: one disk flush per burst, not per push), applies them in order and
resolves their futures. A write error (disk full, I/O error) cuts the file back to its length before the
group and fails those futures: nothing unacknowledged is ever half-applied.

Files in ``directory``:
- ``wal-<first seq>.log``: records ``[u32 length][u32 crc32][u64 seq][f64 apply time][PushStatsRequest]``
  (length and crc cover seq, time and the request bytes). A record cut short or failing its crc at the end
  of the newest segment is a write that was never acknowledged (a crash mid-write): it is cut off at
  open. Anywhere else it is corruption, and ``open`` refuses with the file and offset.
- ``snapshot.npz``: the table, the recent batch ids and the last seq it includes; written atomically every
  ``snapshot_every`` records, after which the segments it covers are deleted (replay time stays bounded).
- ``outputs/``: the recent shared outputs compacted into suffix-array shards, with ``outputs_compact_tokens``
  (datastore/output_shards.py): a background thread, lookups and pushes go on meanwhile. At open, after the
  replay, the online outputs a shard already holds are dropped (a kill between a shard's rename and the
  next snapshot neither loses nor duplicates an output).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..protos import datastore_pb2 as pb
from .durable import fsync_dir, save_npz
from .ngram_stats import NgramStats
from .output_shards import OUTPUTS_DIR, OutputCompactor, open_output_shards

log = logging.getLogger("datastore.stats")

_HEAD = struct.Struct("<II")      # length of the body, crc32 of the body
_BODY = struct.Struct("<Qd")      # seq, apply time; then the PushStatsRequest bytes
SNAPSHOT = "snapshot.npz"


class StatsLogCorrupt(RuntimeError):
    """A record in the middle of the log fails its check: the directory needs a person's look."""


def _segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.log"))


def apply_push(stats: NgramStats, req: "pb.PushStatsRequest", now: float) -> int:
    """Apply one PushStatsRequest to ``stats`` at time ``now`` (the log's replay and Redis's followers alike);
    returns the table's new version."""
    return stats.apply([(r.token, r.next_tokens, r.probs) for r in req.rows], [(r.tokens, r.new_from) for r in req.runs],
                       now, [o.tokens for o in req.outputs])


class StatsLog:
    """The statistics table behind a write-ahead log; see the module docstring."""

    def __init__(self, directory, *, stats: Optional[NgramStats] = None, snapshot_every: int = 10_000,
                 max_batch_ids: int = 1_000_000, fsync: bool = True, clock: Callable[[], float] = time.time,
                 outputs_compact_tokens: Optional[int] = None, outputs_max_compacted_tokens: int = 1 << 26):
        self.dir = Path(directory)
        self.stats = stats if stats is not None else NgramStats()   # (an empty table is falsy: len 0)
        self.snapshot_every = int(snapshot_every)
        self.max_batch_ids = int(max_batch_ids)
        self.fsync = bool(fsync)
        self.clock = clock
        self._ids: "OrderedDict[str, None]" = OrderedDict()
        self.last_seq = 0
        self._since_snapshot = 0
        self._file = None
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self.replayed = 0
        self.cut_tail_bytes = 0
        # None: the recent outputs stay online only (shards already on disk are still searched)
        self.outputs_compact_tokens = outputs_compact_tokens
        self.outputs_max_compacted_tokens = int(outputs_max_compacted_tokens)
        self.compactor: Optional[OutputCompactor] = None

    # ------------------------------------------------------------------ start
    def open(self) -> "StatsLog":
        self.dir.mkdir(parents=True, exist_ok=True)
        snap = self.dir / SNAPSHOT
        if snap.exists():
            with np.load(snap) as a:
                arrays = {k: a[k] for k in a.files}
            self.stats = NgramStats.from_arrays(arrays, keep=self.stats.keep, half_life_s=self.stats.half_life_s,
                                                max_rows=self.stats.max_rows)
            self.last_seq = int(arrays["last_seq"][0])
            ids = bytes(arrays["batch_ids"]).decode()
            self._ids = OrderedDict.fromkeys(ids.split("\n") if ids else ())
        segs = _segments(self.dir)
        for i, seg in enumerate(segs):
            self._replay(seg, newest=i == len(segs) - 1)
        self._open_output_shards()
        self._start_segment()
        self._thread = threading.Thread(target=self._writer, name="stats-wal", daemon=True)
        self._thread.start()
        log.info("shared statistics: %d rows, version %d, %d records replayed from %s", len(self.stats),
                 self.stats.version, self.replayed, self.dir)
        return self

    def _open_output_shards(self) -> None:
        folder = self.dir / OUTPUTS_DIR
        if self.outputs_compact_tokens is None and not folder.exists():
            return
        dropped = 0
        for sh in open_output_shards(folder):
            dropped += self.stats.install_output_shard(sh)
        if self.stats.output_shards:
            log.info("recent outputs: %d compacted shards; %d replayed outputs they already hold dropped",
                     len(self.stats.output_shards), dropped)
        if self.outputs_compact_tokens is not None:
            self.compactor = OutputCompactor(self.stats, folder, self.outputs_compact_tokens,
                                             self.outputs_max_compacted_tokens).start()

    def _replay(self, seg: Path, newest: bool) -> None:
        data = seg.read_bytes()
        pos = 0
        while pos < len(data):
            bad = None
            if pos + _HEAD.size > len(data):
                bad = "a cut header"
            else:
                n, crc = _HEAD.unpack_from(data, pos)
                body = data[pos + _HEAD.size: pos + _HEAD.size + n]
                if len(body) < n or n < _BODY.size:
                    bad = "a cut record"
                elif zlib.crc32(body) != crc:
                    bad = "a crc mismatch"
            if bad:
                if not newest:
                    raise StatsLogCorrupt(f"{seg}: {bad} at byte {pos} of {len(data)} in a sealed segment")
                # a write cut by a crash: never acknowledged (the fsync had not returned)
                self.cut_tail_bytes += len(data) - pos
                log.warning("%s: %s at byte %d; cutting off %d unacknowledged bytes", seg, bad, pos, len(data) - pos)
                with open(seg, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
                return
            seq, now = _BODY.unpack_from(body)
            pos += _HEAD.size + n
            if seq <= self.last_seq:
                continue
            req = pb.PushStatsRequest.FromString(body[_BODY.size:])
            self._apply(req, now)
            self.last_seq = seq
            self.replayed += 1

    def _start_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        path = self.dir / _segment_name(self.last_seq + 1)
        self._file = open(path, "ab")
        fsync_dir(self.dir)

    # ------------------------------------------------------------------ writes
    def submit(self, req: "pb.PushStatsRequest") -> "concurrent.futures.Future":
        """Queue a validated batch; the future resolves to (applied, version) once it is durable."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((req, fut))
        return fut

    def _apply(self, req, now: float) -> int:
        version = apply_push(self.stats, req, now)
        self._ids[req.batch_id] = None
        while len(self._ids) > self.max_batch_ids:
            self._ids.popitem(last=False)
        return version

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            while len(group) < 512:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)   # finish this group, then stop
                    break
                group.append(nxt)
            try:
                self._commit(group)
            except Exception as e:  # noqa: BLE001 - the futures carry it to the callers
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(e)

    def _commit(self, group) -> None:
        now = self.clock()
        fresh, seen, records = [], set(), []
        seq = self.last_seq
        for req, fut in group:
            if req.batch_id in self._ids or req.batch_id in seen:
                continue
            seen.add(req.batch_id)
            seq += 1
            body = _BODY.pack(seq, now) + req.SerializeToString()
            records.append(_HEAD.pack(len(body), zlib.crc32(body)) + body)
            fresh.append((req, fut))
        if records:
            f = self._file
            if f is None:
                raise OSError("the statistics log failed to write earlier; restart the server")
            start = f.tell()
            try:
                f.write(b"".join(records))
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            except OSError:
                try:
                    f.truncate(start)
                    f.seek(start)
                except OSError:
                    # a record may be cut in the file: write nothing more after it (it stays the newest
                    # segment's tail, cut off at the next open); pushes fail until a restart
                    self._file = None
                    f.close()
                raise
        applied = {id(fut) for _, fut in fresh}
        for req, _ in fresh:
            self._apply(req, now)
        self.last_seq = seq
        version = self.stats.version
        for req, fut in group:
            fut.set_result((id(fut) in applied, version))
        self._since_snapshot += len(fresh)
        if self.compactor is not None:
            self.compactor.poke()
        if self._since_snapshot >= self.snapshot_every:
            self.snapshot()

    def snapshot(self) -> None:
        """Write the table as of ``last_seq``, then drop the log segments it covers (writer thread, or
        before the writer starts / after it stopped)."""
        self._start_segment()            # records after this snapshot go to a new segment
        a = self.stats.to_arrays()
        ids = "\n".join(self._ids).encode()
        save_npz(self.dir / SNAPSHOT, compressed=False, last_seq=np.array([self.last_seq], np.int64),
                 batch_ids=np.frombuffer(ids, np.uint8), **a)
        fsync_dir(self.dir)
        current = self.dir / _segment_name(self.last_seq + 1)
        for seg in _segments(self.dir):
            if seg != current:
                seg.unlink()
        fsync_dir(self.dir)
        self._since_snapshot = 0

    def close(self) -> None:
        if self.compactor is not None:
            self.compactor.close()
            self.compactor = None
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None
