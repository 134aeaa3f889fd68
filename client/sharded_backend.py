"""A datastore split into shard groups, each served by its own processes (``datastore-serve --shard-group I/N``).

``--datastore 'A;B;C'`` names one address per group (each may itself list replicas, ``IP:PORT,IP:PORT``).
``ShardedBackend`` has ``RemoteBackend``'s interface (client/datastore_drafter.py): a lookup goes to every
group at once (one client per group, so the calls overlap), and ``result()`` fuses the trees that came back
by longest prefix (client/fusion.py). Each call keeps its own deadline: a group that is down or late
contributes an empty tree, so it costs its share of drafts, never the step's deadline or a changed output.
A session is one session per group; its id is their ids joined by ``,`` (empty where a group failed).
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from .fusion import fuse
from .types import DraftTree

SEP = ";"


def split_groups(address: str) -> list[str]:
    """The shard groups' addresses of ``A;B;...`` (one group: a list of one)."""
    return [a.strip() for a in address.split(SEP) if a.strip()]


class _FanOut:
    """Lookups in flight on every group; ``result()`` fuses their trees."""

    __slots__ = ("pending", "budget", "key", "_tree")

    def __init__(self, pending: list, budget: int, key=None):
        self.pending, self.budget, self.key, self._tree = pending, budget, key, None

    def done(self) -> bool:
        return all(p.done() for p in self.pending)

    def cancel(self) -> None:
        for p in self.pending:
            p.cancel()

    def result(self) -> DraftTree:
        if self._tree is None:
            self._tree = fuse([p.result() for p in self.pending], self.budget)
        return self._tree


class _Openings:
    """Sessions being opened on every group: ``poll`` says when all answered, and the composite id."""

    __slots__ = ("pending",)

    def __init__(self, pending: list):
        self.pending = pending

    def poll(self, wait_s: float = 0.0) -> tuple[bool, Optional[str]]:
        end = time.monotonic() + wait_s
        outs = [p.poll(max(0.0, end - time.monotonic())) for p in self.pending]
        if not all(done for done, _ in outs):
            return False, None
        ids = [s.session_id if s is not None else "" for _, s in outs]
        return True, (",".join(ids) if any(ids) else None)

    def cancel(self) -> None:
        for p in self.pending:
            p.cancel()


class ShardedBackend:
    """Fan-out over shard groups; see the module docstring."""

    remote = True

    def __init__(self, clients: Sequence):
        if not clients:
            raise ValueError("a sharded datastore needs at least one shard group")
        self.clients = list(clients)
        self._pool = ThreadPoolExecutor(len(self.clients), thread_name_prefix="shard-fanout")

    @property
    def client(self):
        """The first group's client (pushes of shared statistics go there: every group shares them only when
        the groups keep their statistics in one Redis)."""
        return self.clients[0]

    @property
    def stats(self) -> Counter:
        total: Counter = Counter()
        for c in self.clients:
            total.update(c.stats)
        return total

    @staticmethod
    def _ids(session_id: Optional[str], n: int) -> list[Optional[str]]:
        if not session_id:
            return [None] * n
        parts = session_id.split(",")
        return [p or None for p in parts] + [None] * (n - len(parts))

    def retrieve_async(self, context, budget: int, session_id: Optional[str] = None, key=None,
                       hint: Optional[tuple] = None) -> _FanOut:
        ids = self._ids(session_id, len(self.clients))
        return _FanOut([c.retrieve_async(context, budget, s, hint=hint) for c, s in zip(self.clients, ids)],
                       budget, key)

    def retrieve(self, context, budget: int, session_id: Optional[str] = None,
                 hint: Optional[tuple] = None) -> DraftTree:
        return self.retrieve_async(context, budget, session_id, hint=hint).result()

    def retrieve_many(self, contexts: Sequence, budget: int, session_ids: Sequence[Optional[str]]) -> list[DraftTree]:
        per_group = [[self._ids(s, len(self.clients))[g] for s in session_ids] for g in range(len(self.clients))]
        futures = [self._pool.submit(c.retrieve_batch, contexts, budget, ids)
                   for c, ids in zip(self.clients, per_group)]
        answers = [f.result() for f in futures]        # each call has its own deadline
        return [fuse([a[i] for a in answers], budget) for i in range(len(contexts))]

    @property
    def deadline_s(self) -> float:
        return max(c.timeout_s for c in self.clients)

    def open_session(self, prompt_ids=None, prompt_text: Optional[str] = None, top_k: int = 0, *,
                     memory: bool = False, documents: bool = True) -> Optional[str]:
        futures = [self._pool.submit(c.open_session, prompt_ids, prompt_text, top_k, memory=memory,
                                     documents=documents) for c in self.clients]
        ids = [(s.session_id if s is not None else "") for s in (f.result() for f in futures)]
        return ",".join(ids) if any(ids) else None

    def open_session_async(self, prompt_ids=None, prompt_text: Optional[str] = None, top_k: int = 0, *,
                           memory: bool = False, documents: bool = True) -> "_Openings":
        return _Openings([c.open_session_async(prompt_ids, prompt_text, top_k, memory=memory, documents=documents)
                          for c in self.clients])

    def session_lost(self, session_id: Optional[str]) -> bool:
        """Whether a group refused a lookup because it does not know its part of ``session_id`` (any more)."""
        return any(s and s in c.lost_sessions for c, s in zip(self.clients, self._ids(session_id, len(self.clients))))

    def close_session(self, session_id: Optional[str], wait_s: float = 0.0) -> None:
        futures = [c.close_session_async(s) for c, s in zip(self.clients, self._ids(session_id, len(self.clients))) if s]
        end = time.monotonic() + wait_s
        for f in futures:
            if f is not None and wait_s > 0:
                try:
                    f.result(timeout=max(0.0, end - time.monotonic()))
                except Exception:  # noqa: BLE001 - the service expires sessions anyway
                    pass

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.clients:
            c.close()
