"""Sessions: a prompt's FAISS top-k documents and/or a memory of the request's own tokens, kept for a TTL,
bounded in number.

A session remembers its query text so that, after an index reload (a new snapshot with possibly
different document ids), its document set is recomputed lazily against the new index instead of
silently filtering by ids that mean something else now.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .memory import TokenMemory


@dataclass
class Session:
    session_id: str
    query: str
    doc_ids: np.ndarray          # int64, sorted (empty: no document preference)
    index_id: str                # index snapshot the doc ids belong to
    expires_at: float
    memory: Optional[TokenMemory] = None   # the request's own tokens (memory sessions)
    owner: str = ""              # the client that opened it (datastore/auth.py client_identity)


# A session id is a capability: whoever holds it may use and update the session (datastore/servicer.py), so
# it is 128 bits from the OS's CSPRNG, returned only to the caller that opened the session.
ID_BYTES = 16


class SessionLimitError(Exception):
    """A client already holds ``max_per_owner`` open sessions (the servicer answers RESOURCE_EXHAUSTED)."""


class SessionStore:
    """Thread-safe LRU+TTL map ``session_id -> Session``.

    ``max_sessions`` bounds memory: when full, expired sessions are dropped first, then the least
    recently used one is evicted (a client that forgets CloseSession cannot exhaust the server).
    Every successful lookup refreshes the TTL.

    ``max_per_owner`` bounds the open sessions of one client (``owner``): past it ``create`` raises
    ``SessionLimitError`` instead of evicting, so that one client cannot push everybody else's sessions
    out of the LRU by opening many.

    ``prefix`` starts every session id (``datastore-serve --workers N`` uses ``w<worker>-``, so that a
    worker receiving another worker's session can say so).
    """

    def __init__(self, ttl_s: float = 600.0, max_sessions: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 prefix: str = "", max_per_owner: Optional[int] = None):
        if ttl_s <= 0 or max_sessions <= 0 or (max_per_owner is not None and max_per_owner <= 0):
            raise ValueError("ttl_s, max_sessions and max_per_owner must be positive")
        self.max_per_owner = max_per_owner
        self._owned: Counter = Counter()   # owner -> open sessions
        self.prefix = prefix
        self.ttl_s = float(ttl_s)
        self.max_sessions = int(max_sessions)
        self._clock = clock
        self._lock = threading.Lock()
        self._items: "OrderedDict[str, Session]" = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._items)

    def create(self, query: str, doc_ids: np.ndarray, index_id: str, memory: Optional[TokenMemory] = None,
               owner: str = "") -> Session:
        """A new session of ``owner``; ``SessionLimitError`` when ``owner`` holds ``max_per_owner`` already."""
        now = self._clock()
        sid = self.prefix + secrets.token_hex(ID_BYTES)
        s = Session(sid, query, np.sort(np.asarray(doc_ids, dtype=np.int64)), index_id, now + self.ttl_s, memory,
                    owner)
        with self._lock:
            self._purge_locked(now)
            if self.max_per_owner is not None and self._owned[owner] >= self.max_per_owner:
                raise SessionLimitError(f"this client has {self._owned[owner]} open sessions, the limit per client")
            while len(self._items) >= self.max_sessions:
                self._disown(self._items.popitem(last=False)[1])
                self.evicted += 1
            self._items[sid] = s
            self._owned[owner] += 1
        return s

    def owned(self, owner: str) -> int:
        """Open sessions of ``owner`` (expired ones count until purged)."""
        with self._lock:
            return self._owned[owner]

    def _disown(self, s: Session) -> None:
        self._owned[s.owner] -= 1
        if self._owned[s.owner] <= 0:
            del self._owned[s.owner]

    def get(self, session_id: str) -> Optional[Session]:
        now = self._clock()
        with self._lock:
            s = self._items.get(session_id)
            if s is None:
                return None
            if s.expires_at <= now:
                self._disown(self._items.pop(session_id))
                self.expired += 1
                return None
            s.expires_at = now + self.ttl_s
            self._items.move_to_end(session_id)
            return s

    def close(self, session_id: str) -> bool:
        with self._lock:
            s = self._items.pop(session_id, None)
            if s is None:
                return False
            self._disown(s)
            return True

    def purge(self) -> int:
        with self._lock:
            return self._purge_locked(self._clock())

    def _purge_locked(self, now: float) -> int:
        n = 0
        # OrderedDict is in LRU order and every touch extends the TTL by the same amount, so expired
        # sessions are exactly a prefix.
        while self._items:
            sid, s = next(iter(self._items.items()))
            if s.expires_at > now:
                break
            self._disown(self._items.pop(sid))
            n += 1
        self.expired += n
        return n
