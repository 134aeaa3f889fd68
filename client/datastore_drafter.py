"""The retrieval-datastore drafter: remote (gRPC service) or embedded (the same index, in process).

Per decode step the decoder calls ``prefetch(ctx, budget)`` on every drafter, then local drafters'
``propose``, then ours: the remote round trip overlaps local drafting. ``propose`` uses the prefetched
answer when it was issued for the same context, else makes a blocking call bounded by the client deadline.
A failed lookup gives ``DraftTree.empty(root)`` and counts in ``stats["errors"]``: an unreachable service
is expected, not an error of the decode loop.

Sessions: ``begin_request(prompt_ids, prompt_text)`` opens a session on the service: the prompt's FAISS
top-k documents when ``documents=True`` (lookups then prefer continuations inside them and mark them
``Source.DOCUMENTS``) and a private memory of the request's own tokens when ``memory=True`` (the context's
suffix is also matched inside the prompt and the text generated so far, like REST's self-inserted queries
but per request; such nodes are marked ``Source.CONTEXT``). ``end_request()`` closes it. The embedded
backend needs no session for memory: it sees the whole context.

A sick service never holds a step longer than the lookup deadline: the session opens in the background
(``begin_request`` waits at most the deadline for it; lookups go without it until it is there) and closes
without waiting. A session the service no longer knows (it restarted, perhaps on another index) is opened
again, seeded with the request's tokens so far, at most ``MAX_REOPEN`` times per request.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np

from .fusion import cut_to_budget
from .types import DecodeContext, Drafter, DraftTree, Source, StepResult

log = logging.getLogger("client.datastore")

MAX_REOPEN = 3   # sessions opened again per request after the service lost one (a restart)


class DatastoreUnavailableError(ConnectionError):
    """The datastore named on the command line cannot be reached at start-up."""


class TokenizerMismatchError(ValueError):
    """The index was built with a different tokenizer than the model's: its token ids mean other text."""


def tree_from_result(root: int, r) -> DraftTree:
    """datastore.index.RetrievalResult (nodes below the root) -> DraftTree rooted at ``root``."""
    n = len(r.tokens)
    if n == 0:
        return DraftTree.empty(root)
    tokens = np.concatenate([[root], np.asarray(r.tokens)]).astype(np.int32)
    parents = np.concatenate([[-1], np.asarray(r.parents, dtype=np.int64) + 1]).astype(np.int32)
    probs = np.concatenate([[1.0], np.asarray(r.probs)]).astype(np.float32)
    src = (Source.DATASTORE + Source.DOCUMENTS * np.asarray(r.in_documents, dtype=bool)
           + Source.CONTEXT * np.asarray(r.in_memory, dtype=bool))
    sources = np.concatenate([[0], src]).astype(np.uint8)
    return DraftTree(tokens, parents, probs, sources)


class _Done:
    """A finished 'pending' retrieval (embedded backend, or nothing to do)."""

    __slots__ = ("_tree", "key")

    def __init__(self, tree: DraftTree, key=None):
        self._tree = tree
        self.key = key

    def done(self) -> bool:
        return True

    def cancel(self) -> None:
        pass

    def result(self) -> DraftTree:
        return self._tree


class _Opened:
    """A session opened at once (the embedded backend): the PendingSession interface."""

    __slots__ = ("session_id",)

    def __init__(self, session_id: Optional[str]):
        self.session_id = session_id

    def poll(self, wait_s: float = 0.0) -> tuple[bool, Optional[str]]:
        return True, self.session_id

    def cancel(self) -> None:
        pass


class EmbeddedBackend:
    """The index in process: no server, no network (``spec-generate --index PATH``)."""

    remote = False

    def __init__(self, index: Any, *, context_tail: int = 64, retrieve_opts: Optional[dict] = None,
                 memory: bool = True):
        from ..datastore.memory import DEFAULT_CAPACITY   # (the index side, imported by embedded use only)

        self.index = index
        self.context_tail = int(context_tail)
        self.memory_tokens = DEFAULT_CAPACITY if memory else 0   # history searched per lookup
        self.retrieve_opts = dict(retrieve_opts or {})
        self.stats: Counter = Counter()
        self._sessions: dict[str, np.ndarray] = {}
        self._next = 0

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.index.tokenizer_fingerprint)

    def warm(self) -> None:
        """One lookup of a context taken from the index itself, so that its compiled kernels (numba: seconds
        when the on-disk cache is cold) are built now and not inside the first decode step, where the time
        would read as that step's cost (the vLLM proposer learns its step cost from such times)."""
        try:
            tokens = np.asarray(self.index.shards[0].tokens[1:17], dtype=np.int32)
            if len(tokens) >= 2:
                kw = dict(self.retrieve_opts)
                if self.memory_tokens:
                    kw["memory"] = tokens
                self.index.retrieve(tokens, 8, **kw)
        except Exception as e:  # noqa: BLE001 - warming is an optimisation: a failure shows at the first lookup
            log.debug("embedded index warm-up failed: %s: %s", type(e).__name__, e)

    def retrieve(self, context, budget: int, session_id: Optional[str] = None,
                 hint: Optional[tuple] = None) -> DraftTree:
        """``context``: the request's whole token sequence (its tail is looked up, all of it is memory);
        ``hint``: a draft model's (tokens, probs) after the root (RASD, client/rasd.py)."""
        full = np.asarray(context).reshape(-1)
        ctx = full[-self.context_tail:]
        root = int(ctx[-1])
        self.stats["requests"] += 1
        if budget <= 0:
            return DraftTree.empty(root)
        try:
            kw = dict(self.retrieve_opts)
            docs = self._sessions.get(session_id) if session_id else None
            if docs is not None:
                kw["doc_filter"] = docs
            if self.memory_tokens:
                kw["memory"] = full[-self.memory_tokens:]
            if hint is not None:
                kw["hint_tokens"], kw["hint_probs"] = hint
            r = self.index.retrieve(ctx.astype(np.int32), int(budget), **kw)
            tree = tree_from_result(root, r)
        except Exception as e:  # noqa: BLE001 - never into the decode loop
            self.stats["failures"] += 1
            log.warning("embedded retrieval failed: %s: %s", type(e).__name__, e)
            return DraftTree.empty(root)
        self.stats["hits" if len(tree) > 1 else "misses"] += 1
        return tree

    def retrieve_async(self, context, budget: int, session_id: Optional[str] = None, key=None,
                       hint: Optional[tuple] = None):
        return _Done(self.retrieve(context, budget, session_id, hint), key)

    def retrieve_many(self, contexts: Sequence, budget: int, session_ids: Sequence[Optional[str]]) -> list[DraftTree]:
        """One lookup per context (an engine step's running requests); in process there is nothing to batch."""
        return [self.retrieve(c, budget, s) for c, s in zip(contexts, session_ids)]

    def open_session(self, prompt_ids=None, prompt_text: Optional[str] = None, top_k: int = 8, *,
                     memory: bool = False, documents: bool = True) -> Optional[str]:
        if not prompt_text or not documents:
            return None  # the index searches by text; memory needs no session in process
        try:
            docs = np.sort(np.asarray(self.index.search_documents(prompt_text, k=top_k or 8), dtype=np.int64))
        except Exception as e:  # noqa: BLE001
            self.stats["failures"] += 1
            log.warning("document search failed: %s: %s", type(e).__name__, e)
            return None
        self._next += 1
        sid = f"local-{self._next}"
        self._sessions[sid] = docs
        return sid

    def open_session_async(self, prompt_ids=None, prompt_text: Optional[str] = None, top_k: int = 8, *,
                           memory: bool = False, documents: bool = True) -> _Opened:
        return _Opened(self.open_session(prompt_ids, prompt_text, top_k, memory=memory, documents=documents))

    def session_lost(self, session_id: Optional[str]) -> bool:
        return False

    def close_session(self, session_id: Optional[str], wait_s: float = 0.0) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def close(self) -> None:
        try:
            self.index.close()
        except Exception:  # noqa: BLE001
            pass


class RemoteBackend:
    """The datastore service over gRPC (``spec-generate --datastore HOST:PORT``)."""

    remote = True

    def __init__(self, client):
        self.client = client

    @property
    def stats(self) -> Counter:
        return self.client.stats

    def retrieve_async(self, context, budget: int, session_id: Optional[str] = None, key=None,
                       hint: Optional[tuple] = None):
        return self.client.retrieve_async(context, budget, session_id, hint=hint, key=key)

    def retrieve(self, context, budget: int, session_id: Optional[str] = None,
                 hint: Optional[tuple] = None) -> DraftTree:
        return self.client.retrieve(context, budget, session_id, hint=hint)

    def retrieve_many(self, contexts: Sequence, budget: int, session_ids: Sequence[Optional[str]]) -> list[DraftTree]:
        """Every context in one RetrieveBatch call, each with its own session."""
        return self.client.retrieve_batch(contexts, budget, session_ids)

    @property
    def deadline_s(self) -> float:
        return self.client.timeout_s

    def open_session(self, prompt_ids=None, prompt_text: Optional[str] = None, top_k: int = 0, *,
                     memory: bool = False, documents: bool = True) -> Optional[str]:
        s = self.client.open_session(prompt_ids, prompt_text, top_k, memory=memory, documents=documents)
        return s.session_id if s is not None else None

    def open_session_async(self, prompt_ids=None, prompt_text: Optional[str] = None, top_k: int = 0, *,
                           memory: bool = False, documents: bool = True) -> "_RemoteOpening":
        return _RemoteOpening(self.client.open_session_async(prompt_ids, prompt_text, top_k, memory=memory,
                                                             documents=documents))

    def session_lost(self, session_id: Optional[str]) -> bool:
        """Whether a lookup was refused because the service does not know ``session_id`` (any more)."""
        return bool(session_id) and session_id in self.client.lost_sessions

    def close_session(self, session_id: Optional[str], wait_s: float = 0.0) -> None:
        """Close, waiting at most ``wait_s`` for the answer (the call goes on in the background)."""
        fut = self.client.close_session_async(session_id)
        if fut is not None and wait_s > 0:
            try:
                fut.result(timeout=wait_s)
            except Exception:  # noqa: BLE001 - still running, or failed: the service expires sessions anyway
                pass

    def close(self) -> None:
        self.client.close()


class _RemoteOpening:
    """A PendingSession whose outcome is the session id (the backends' common interface)."""

    __slots__ = ("_pending",)

    def __init__(self, pending):
        self._pending = pending

    def poll(self, wait_s: float = 0.0) -> tuple[bool, Optional[str]]:
        done, session = self._pending.poll(wait_s)
        return done, session.session_id if session is not None else None

    def cancel(self) -> None:
        self._pending.cancel()


class DatastoreDrafter(Drafter):
    """A Drafter (client/types.py) over a datastore backend."""

    source = Source.DATASTORE

    def __init__(self, backend, *, documents: bool = True, memory: bool = True, top_k: int = 8,
                 max_budget: Optional[int] = None):
        self.backend = backend
        self.documents = bool(documents)
        self.memory = bool(memory)
        self.top_k = int(top_k)
        self.max_budget = max_budget
        self.session_id: Optional[str] = None
        self._pending = None
        self._opening = None           # a session being opened (its poll() says when it is there)
        self._prompt_text: Optional[str] = None
        self._reopened = 0             # sessions opened again in this request
        self.counters: Counter = Counter()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def remote(cls, address: str, *, documents: bool = True, memory: bool = True, top_k: int = 8,
               **client_opts) -> "DatastoreDrafter":
        from .datastore_client import DatastoreClient

        return cls(RemoteBackend(DatastoreClient(address, **client_opts)), documents=documents, memory=memory,
                   top_k=top_k)

    @classmethod
    def embedded(cls, index_path: str, *, documents: bool = True, memory: bool = True, top_k: int = 8,
                 context_tail: int = 64, retrieve_opts: Optional[dict] = None, index: Any = None
                 ) -> "DatastoreDrafter":
        if index is None:
            from ..datastore.index import DatastoreIndex  # torch-free; FAISS is the datastore side's business

            index = DatastoreIndex.open(index_path, load_faiss=documents)
        backend = EmbeddedBackend(index, context_tail=context_tail, retrieve_opts=retrieve_opts, memory=memory)
        backend.warm()
        return cls(backend, documents=documents, memory=memory, top_k=top_k)

    # ------------------------------------------------------------------ Drafter hooks
    @property
    def stats(self) -> Counter:
        return self.counters + self.backend.stats

    @staticmethod
    def _key(ctx: DecodeContext) -> tuple:
        t = ctx.tokens
        return (len(t), tuple(int(x) for x in t[-8:]))

    def _budget(self, budget: int) -> int:
        return min(budget, self.max_budget) if self.max_budget else budget

    def _session(self, ctx: DecodeContext) -> Optional[str]:
        return ctx.session_id or self.session_id

    def _take_session(self, wait_s: float = 0.0) -> None:
        """Adopt the session being opened once it is there (waiting at most ``wait_s``)."""
        if self._opening is None:
            return
        done, sid = self._opening.poll(wait_s)
        if done:
            self._opening = None
            self.session_id = sid
            self.counters["sessions" if sid else "session_failures"] += 1

    def _reopen_if_lost(self, ctx: DecodeContext) -> None:
        """The service refused a lookup for not knowing our session (it restarted): open a new one, seeded
        with every token so far, so that its memory is in step with the request."""
        if not self.session_id or not getattr(self.backend, "session_lost", None) \
                or not self.backend.session_lost(self.session_id):
            return
        self.session_id = None
        if self._reopened >= MAX_REOPEN:
            return
        self._reopened += 1
        self.counters["sessions_reopened"] += 1
        self._open(ctx.tokens, self._prompt_text, wait_s=0.0)

    def _open(self, prompt_ids, prompt_text: Optional[str], wait_s: float) -> None:
        memory = self.memory and self.backend.remote   # in process the backend sees the whole context
        documents = self.documents and bool(prompt_text)   # documents are searched by the prompt's text
        if not (documents or memory):
            return
        self._opening = self.backend.open_session_async(prompt_ids, prompt_text, self.top_k, memory=memory,
                                                        documents=documents)
        self._take_session(wait_s)

    def prefetch(self, ctx: DecodeContext, budget: int) -> None:
        """Issue the lookup for this step now (non-blocking for the remote backend)."""
        try:
            self._take_session()
            if self._pending is not None:
                self._pending.cancel()
            if not self.backend.remote:
                self._pending = None  # in process the lookup is cheaper than any overlap
                return
            self._pending = self.backend.retrieve_async(ctx.tokens, self._budget(budget), self._session(ctx),
                                                        key=self._key(ctx), hint=ctx.draft_hint)
            self.counters["prefetched"] += 1
        except Exception as e:  # noqa: BLE001
            self._pending = None
            self.counters["errors"] += 1
            log.warning("datastore prefetch failed: %s", e)

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        root = ctx.last_token
        try:
            budget = self._budget(budget)
            pending, self._pending = self._pending, None
            if pending is not None and pending.key == self._key(ctx):
                self.counters["prefetch_used"] += 1
                tree = pending.result()
            else:
                if pending is not None:
                    pending.cancel()
                    self.counters["prefetch_stale"] += 1
                tree = self.backend.retrieve(ctx.tokens, budget, self._session(ctx), hint=ctx.draft_hint)
            self._reopen_if_lost(ctx)
            if tree.root != root:
                return DraftTree.empty(root)
            return cut_to_budget(tree, budget)
        except Exception as e:  # noqa: BLE001 - never into the decode loop
            self.counters["errors"] += 1
            log.warning("datastore propose failed: %s", e)
            return DraftTree.empty(root)

    def observe(self, step: StepResult) -> None:
        src = step.tree.sources
        acc = step.accepted_nodes[1:]
        self.counters["accepted"] += int(np.count_nonzero(src[acc] & int(Source.DATASTORE)))
        self.counters["proposed"] += int(np.count_nonzero(src & int(Source.DATASTORE)))

    def begin_request(self, prompt_ids: Optional[Sequence[int]] = None, prompt_text: Optional[str] = None) -> None:
        """Open the request's session; waits at most the lookup deadline for it (the first lookups go
        without it when the service is slower than that)."""
        self.end_request()
        self._prompt_text, self._reopened = prompt_text, 0
        try:
            self._open(prompt_ids, prompt_text, wait_s=getattr(self.backend, "deadline_s", 0.0))
        except Exception as e:  # noqa: BLE001
            self.session_id, self._opening = None, None
            self.counters["session_failures"] += 1
            log.warning("datastore session failed: %s", e)

    def end_request(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._opening is not None:   # a session still being opened is closed when it arrives
            self._opening.cancel()
            self._opening = None
        sid, self.session_id = self.session_id, None
        if sid:
            try:
                self.backend.close_session(sid, wait_s=getattr(self.backend, "deadline_s", 0.0))
            except Exception as e:  # noqa: BLE001 - the service expires sessions it is not told to close
                self.counters["errors"] += 1
                log.warning("datastore session close failed: %s", e)

    def close(self) -> None:
        self.end_request()
        self.backend.close()


def make_datastore_drafter(
    address: Optional[str] = None,
    index_path: Optional[str] = None,
    tokenizer: Any = None,
    *,
    documents: bool = True,
    memory: bool = True,
    top_k: int = 8,
    timeout_s: float = 0.005,
    connect_timeout_s: float = 5.0,
    auth_token: Optional[str] = None,
    tls: bool = False,
    root_certificates: Optional[bytes] = None,
    strict: bool = True,
    max_budget: Optional[int] = None,
    **client_opts,
) -> DatastoreDrafter:
    """Build the drafter for ``spec-generate --datastore HOST:PORT`` or ``--index PATH``.

    Checks at start that the index was built with ``tokenizer`` (same fingerprint), raising
    ``TokenizerMismatchError`` otherwise. With ``address``, an unreachable server raises
    ``DatastoreUnavailableError`` when ``strict`` (else a warning: the drafter then drafts nothing until
    the server comes up).
    """
    if (address is None) == (index_path is None):
        raise ValueError("give exactly one of address (HOST:PORT) or index_path")
    fp = None
    if tokenizer is not None:
        from ..datastore.index_format import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
    if index_path is not None:
        drafter = DatastoreDrafter.embedded(index_path, documents=documents, memory=memory, top_k=top_k)
        have = drafter.backend.tokenizer_fingerprint
        if fp is not None and have != fp:
            drafter.close()
            raise TokenizerMismatchError(
                f"index {index_path} was built with tokenizer {have}, but the model's tokenizer is {fp}: "
                "rebuild the index with this model's tokenizer (index-build --model ...)"
            )
        drafter.max_budget = max_budget
        return drafter
    from .datastore_client import DatastoreClient
    from .sharded_backend import ShardedBackend, split_groups

    groups = split_groups(address)
    clients, infos = [], []
    for group in groups:     # each shard group (one address, or its replicas' list) is checked alike
        client = DatastoreClient(group, timeout_s=timeout_s, tokenizer_fingerprint=fp, auth_token=auth_token, tls=tls,
                                 root_certificates=root_certificates, **client_opts)
        clients.append(client)
        info = client.info(timeout_s=connect_timeout_s, wait_for_ready=True)
        infos.append(info)
        if info is None:
            msg = f"cannot reach the datastore at {group} ({client.last_error})"
            if strict:
                for c in clients:
                    c.close()
                raise DatastoreUnavailableError(msg + "; is datastore-serve running?")
            log.warning("%s; drafting without it until it answers", msg)
        elif fp is not None and info.tokenizer_fingerprint != fp:
            for c in clients:
                c.close()
            raise TokenizerMismatchError(
                f"the datastore at {group} serves index {info.index_id} built with tokenizer "
                f"{info.tokenizer_fingerprint}, but the model's tokenizer is {fp}: use a matching index"
            )
    ids = {i.index_id for i in infos if i is not None}
    if len(ids) > 1:
        for c in clients:
            c.close()
        raise ValueError(f"the shard groups {address!r} serve different indexes ({sorted(ids)}): every group must "
                         "serve the same index (datastore-serve --shard-group I/N)")
    backend = RemoteBackend(clients[0]) if len(clients) == 1 else ShardedBackend(clients)
    docs = all(i is None or i.documents_available for i in infos)
    return DatastoreDrafter(backend, documents=documents and docs, memory=memory, top_k=top_k, max_budget=max_budget)
