"""Shared statistics kept in Redis, so that several ``datastore-serve`` replicas serve the same state.

``datastore-serve --stats-redis redis://HOST:PORT/0`` (instead of ``--stats-dir``). Redis holds the log:

- a push runs one Lua script, atomic in Redis: ``SET <prefix>:batch:<id> NX EX <ttl>`` (the idempotency key,
  kept ``batch_id_ttl_s``), and only when that succeeds ``INCR <prefix>:version`` and ``XADD <prefix>:log``
  of the batch (the PushStatsRequest bytes) with its version. The push is acknowledged once Redis answered:
  it is as durable as Redis is configured to be (``appendonly yes``, ``appendfsync always`` in
  docker-compose.yml and in the tests: survives ``kill -9`` of Redis too);
- every replica tails the stream (``XREAD BLOCK``) and applies each batch to its own in-memory table
  (datastore/ngram_stats.py) in stream order, at the entry's time stamp: all replicas apply the same batches
  in the same order at the same times, so they hold the same table and the same versions; lookups stay local
  (no Redis round trip per Retrieve). A replica answers a push once its own table holds it, so a client
  reads its own writes on the replica it pushed to; other replicas follow within a tail read;
- every ``snapshot_every`` batches one replica (a ``SET NX`` lock) stores its table as a snapshot
  (``<prefix>:snapshot``, with the stream id it covers) and trims the stream to it: a starting replica loads
  the snapshot and replays the rest, and a replica that fell behind a trim reloads the snapshot.

The interface is ``StatsLog``'s (datastore/stats_log.py): ``open``, ``submit(request) -> future of
(applied, version)``, ``stats`` (the table), ``close``.
"""
from __future__ import annotations

import concurrent.futures
import io
import logging
import threading
import time
from typing import Optional

import numpy as np

from ..protos import datastore_pb2 as pb
from .ngram_stats import NgramStats
from .stats_log import apply_push

log = logging.getLogger("datastore.stats")

_PUSH = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  local v = redis.call('INCR', KEYS[3])
  redis.call('XADD', KEYS[2], '*', 'v', v, 'b', ARGV[1])
  return v
end
return false
"""


def _id_time(entry_id: bytes) -> float:
    """A stream entry's time stamp (its id is ``<ms>-<seq>``), in seconds."""
    return int(entry_id.split(b"-")[0]) / 1000.0


class RedisStats:
    """The statistics table of one replica, fed from the Redis stream that every replica shares."""

    def __init__(self, url: str, *, stats: Optional[NgramStats] = None, prefix: str = "specstore:stats",
                 batch_id_ttl_s: int = 7 * 86_400, snapshot_every: int = 10_000, push_threads: int = 4,
                 client=None):
        import redis   # the `shared` extra; imported only when Redis keeps the statistics

        self.url = url
        self.r = client or redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.stats = stats if stats is not None else NgramStats()
        self.prefix = prefix
        self.keys = {k: f"{prefix}:{k}" for k in ("log", "version", "snapshot", "snapshot_id", "snapshot_lock")}
        self.batch_id_ttl_s = int(batch_id_ttl_s)
        self.snapshot_every = int(snapshot_every)
        self.last_id = b"0-0"
        self._since_snapshot = 0
        self._applied = threading.Condition()
        self._stop = threading.Event()
        self._tail: Optional[threading.Thread] = None
        self._push = self.r.register_script(_PUSH)
        self._pool = concurrent.futures.ThreadPoolExecutor(push_threads, thread_name_prefix="stats-push")
        self.replayed = 0
        self.reloads = 0

    # ------------------------------------------------------------------ start
    def open(self, wait_s: float = 30.0) -> "RedisStats":
        """Connect (retrying for ``wait_s``: Redis may still be starting), load, and start following the log."""
        import redis

        end = time.monotonic() + wait_s
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError as e:
                if time.monotonic() > end:
                    raise ConnectionError(f"cannot reach Redis at {self.url} ({e})") from None
                time.sleep(0.2)
        self._load()
        self._tail = threading.Thread(target=self._tail_loop, name="stats-redis-tail", daemon=True)
        self._tail.start()
        log.info("shared statistics from %s: %d rows, version %d, %d batches replayed", self.url, len(self.stats),
                 self.stats.version, self.replayed)
        return self

    def _load(self) -> None:
        """Start from the snapshot (if any), then read the stream to its end."""
        blob, sid = self.r.mget(self.keys["snapshot"], self.keys["snapshot_id"])
        with self._applied:
            if blob:
                with np.load(io.BytesIO(blob)) as a:
                    arrays = {k: a[k] for k in a.files}
                s = self.stats
                self.stats = NgramStats.from_arrays(arrays, keep=s.keep, half_life_s=s.half_life_s,
                                                    max_rows=s.max_rows)
                self.last_id = sid
            else:
                self.stats = NgramStats(order=self.stats.order, keep=self.stats.keep,
                                        half_life_s=self.stats.half_life_s, max_rows=self.stats.max_rows)
                self.last_id = b"0-0"
        while True:
            entries = self.r.xrange(self.keys["log"], min=b"(" + self.last_id, count=1000)
            if not entries:
                break
            self._apply_entries(entries)
            self.replayed += len(entries)

    def _tail_loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.r.xread({self.keys["log"]: self.last_id}, count=1000, block=500)
                for _stream, entries in got or ():
                    self._apply_entries(entries)
                    self._maybe_snapshot()
            except _Gap:
                # the stream was trimmed past entries this replica had not read yet: the snapshot has them
                self.reloads += 1
                self._load()
            except Exception as e:  # noqa: BLE001 - Redis away: lookups go on with the table as it is
                log.warning("shared statistics: reading %s failed (%s: %s); retrying", self.url, type(e).__name__, e)
                self._stop.wait(1.0)

    def _apply_entries(self, entries) -> None:
        """Apply stream entries in order; their versions must follow the table's (else ``_Gap``)."""
        with self._applied:
            for entry_id, fields in entries:
                v = int(fields[b"v"])
                if v <= self.stats.version:
                    continue             # already in the table (a snapshot covered it)
                if v != self.stats.version + 1:
                    raise _Gap(f"entry version {v} after table version {self.stats.version}")
                req = pb.PushStatsRequest.FromString(fields[b"b"])
                apply_push(self.stats, req, _id_time(entry_id))
                self.last_id = entry_id
                self._since_snapshot += 1
            self._applied.notify_all()

    def _maybe_snapshot(self) -> None:
        if self._since_snapshot < self.snapshot_every:
            return
        self._since_snapshot = 0
        if not self.r.set(self.keys["snapshot_lock"], b"1", nx=True, ex=60):
            return                       # another replica is writing one
        try:
            with self._applied:
                arrays, upto = self.stats.to_arrays(), self.last_id
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.keys["snapshot"], buf.getvalue())
            pipe.set(self.keys["snapshot_id"], upto)
            pipe.execute()
            self.r.xtrim(self.keys["log"], minid=upto, approximate=False)   # the snapshot covers all before it
        finally:
            self.r.delete(self.keys["snapshot_lock"])

    # ------------------------------------------------------------------ writes
    def submit(self, req: "pb.PushStatsRequest") -> "concurrent.futures.Future":
        return self._pool.submit(self._push_one, req)

    def _push_one(self, req) -> tuple[bool, int]:
        import redis

        try:
            v = self._push(keys=[f"{self.prefix}:batch:{req.batch_id}", self.keys["log"], self.keys["version"]],
                           args=[req.SerializeToString(), self.batch_id_ttl_s])
        except redis.RedisError as e:
            raise OSError(f"redis: {e}") from None          # the servicer answers UNAVAILABLE
        if v is None:
            return False, int(self.r.get(self.keys["version"]) or 0)
        v = int(v)
        with self._applied:              # read-your-writes on this replica
            self._applied.wait_for(lambda: self.stats.version >= v, timeout=5.0)
        return True, v

    def close(self) -> None:
        self._stop.set()
        if self._tail is not None:
            self._tail.join(5)
            self._tail = None
        self._pool.shutdown(wait=True)
        self.r.close()


class _Gap(Exception):
    """The next stream entry is not the table's next version: entries were trimmed before this replica read them."""
