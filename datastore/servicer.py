"""The gRPC servicer: protobufs in, ``DatastoreIndex`` calls, protobufs out (the server-side edge).

Retrieval runs directly in the asyncio handler, on the event loop thread. A lookup is ~10-40 us of
compiled loops over memory-mapped arrays; handing it to a thread pool would add a thread hop and a
future (~50-100 us on this class of machine), i.e. more than the work itself.
Document search (OpenSession: embedding + FAISS, milliseconds) runs in a small thread pool instead so
that it never stalls lookups.

Overload protection is a bounded in-flight counter: a request that arrives when ``max_concurrency``
RPCs are already being handled gets RESOURCE_EXHAUSTED immediately (no queue is built in Python).

Every RPC goes through one of two wrappers, ``_unary`` and ``_stream`` (RetrieveStream: the same steps per
message), which do what is common to all of them: the in-flight count and load shedding, the bearer-token
check, latency and status metrics, and turning an ``RpcError`` into the call's status. The handlers only
translate between protobufs and ``DatastoreIndex`` / session calls.

RetrieveStream serves the same lookups as Retrieve, one response per request on a long-lived stream: a
message on an open HTTP/2 stream costs the Python gRPC runtime about a third less than a new unary call
(see bench/results/datastore.md), and the lookup itself is only ~10 us of that.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import grpc
import numpy as np

from ..protos import datastore_pb2 as pb
from ..protos import datastore_pb2_grpc as pb_grpc

from .memory import TokenMemory
from .metrics import Metrics
from .sessions import SessionStore

log = logging.getLogger("datastore.servicer")

SERVER_VERSION = "0.1.0"

# ``sources`` of a tree whose nodes all come from the corpus outside any session document (the common
# answer), by node count
_ALL_DATASTORE = tuple(bytes([pb.SOURCE_DATASTORE]) * k for k in range(257))

READ_METHODS = frozenset({"Info", "Retrieve", "RetrieveBatch", "RetrieveStream"})
WRITE_METHODS = frozenset({"OpenSession", "CloseSession"})


@dataclass
class ServiceConfig:
    max_context: int = 1024
    max_budget: int = 256
    max_batch: int = 64
    max_concurrency: int = 64
    auth_token: Optional[str] = None
    auth_reads: bool = False
    session_ttl_s: float = 600.0
    max_sessions: int = 10_000
    default_top_k: int = 8
    max_top_k: int = 256
    retrieve_defaults: dict = field(default_factory=dict)   # max_span, min_span, max_matches, depth, min_prob
    search_workers: int = 2
    debug_delay_s: float = 0.0       # tests only: await this long before each lookup (Retrieve, RetrieveStream)


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(msg: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _session_worker(session_id: str) -> Optional[int]:
    """The worker number in a ``w<N>-...`` session id (``--workers N``), else None."""
    head, sep, _ = session_id.partition("-")
    if sep and head[:1] == "w" and head[1:].isdigit():
        return int(head[1:])
    return None


class _OpenStream:
    """An open RetrieveStream: its handler task, and whether it is waiting for its next request."""

    __slots__ = ("task", "idle", "cancelled_idle")

    def __init__(self, task: asyncio.Task):
        self.task, self.idle, self.cancelled_idle = task, False, False


def _unary(method: str, *, shed: bool = True, needs_index: bool = True, lookup: bool = False):
    """Wrap ``handler(self, index, request) -> response`` (a function, or a coroutine function when it must
    wait) into the servicer's ``async method(request, context)`` for the unary RPC ``method``.

    The wrapper counts the call in flight and, when ``shed``, refuses it past ``max_concurrency``; checks
    the bearer token; passes the index snapshot (UNAVAILABLE while none is loaded, unless not
    ``needs_index``: the handler then gets None); for a ``lookup``, awaits the tests' ``debug_delay_s``;
    and records the latency and the status, aborting with an ``RpcError``'s code and details.
    Info and CloseSession are never shed: both are cheap, and refusing CloseSession would keep a session
    alive that its client is done with.
    """
    def wrap(handler):
        waits = inspect.iscoroutinefunction(handler)

        @functools.wraps(handler)
        async def rpc(self, request, context):
            t0 = time.perf_counter()
            self._in_flight += 1
            try:
                if shed:
                    self._check_load()
                self._check_auth(method, context)
                index = self._require_index() if needs_index else self._index
                if lookup and self.config.debug_delay_s:
                    await asyncio.sleep(self.config.debug_delay_s)
                resp = await handler(self, index, request) if waits else handler(self, index, request)
                self.metrics.ok_by_method[method].inc()
                return resp
            except RpcError as e:
                await self._fail(method, context, e)
            finally:
                self._in_flight -= 1
                self.metrics.latency_by_method[method].observe(time.perf_counter() - t0)

        return rpc

    return wrap


def _stream(method: str):
    """Wrap ``handler(self, index, request) -> response`` (a function: it runs once per message) into the
    servicer's async generator for the stream-stream RPC ``method``, one response per request, in order.

    When the stream opens: the bearer token (its metadata comes once) and, while draining, UNAVAILABLE.
    Per message, what ``_unary`` does per call (in-flight count and load shedding, index snapshot, the
    tests' ``debug_delay_s``, latency and status); an ``RpcError`` ends the stream with its status. The
    per-message path holds no await besides reading the next request (and the tests' delay): on this path
    a coroutine or a task per message would cost more than the lookup (see the module docstring).
    ``end_streams`` ends a stream that is waiting for its next request with status OK.
    """
    def wrap(handler):
        @functools.wraps(handler)
        async def rpc(self, request_iterator, context):
            try:
                self._check_auth(method, context)
                if self._draining:
                    raise RpcError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            except RpcError as e:
                await self._fail(method, context, e)
                return
            me = _OpenStream(asyncio.current_task())
            self._streams.add(me)
            m, cfg = self.metrics, self.config
            m.streams.inc()
            latency, ok = m.latency_by_method[method], m.ok_by_method[method]
            requests = request_iterator.__aiter__()
            try:
                while not self._draining:
                    me.idle = True
                    try:
                        request = await requests.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        me.idle = False
                    t0 = time.perf_counter()
                    self._in_flight += 1
                    try:
                        self._check_load()
                        index = self._require_index()
                        if cfg.debug_delay_s:
                            await asyncio.sleep(cfg.debug_delay_s)
                        resp = handler(self, index, request)
                        ok.inc()
                    except RpcError as e:
                        await self._fail(method, context, e)   # ends the stream with e's status
                        return
                    finally:
                        self._in_flight -= 1
                        latency.observe(time.perf_counter() - t0)
                    yield resp
            except asyncio.CancelledError:
                if not (self._draining and me.cancelled_idle):
                    raise
                # end_streams() woke this idle stream: finish with status OK (left cancelled, the call would
                # stay open until the shutdown grace ends)
            finally:
                self._streams.discard(me)
                m.streams.dec()

        return rpc

    return wrap


class DatastoreServicer(pb_grpc.DatastoreServicer):
    """Serves one ``DatastoreIndex`` at a time; ``swap_index`` replaces it atomically (reload)."""

    def __init__(self, index: Any = None, config: Optional[ServiceConfig] = None, metrics: Optional[Metrics] = None,
                 tokenizer: Any = None, worker_id: Optional[int] = None):
        self.config = config or ServiceConfig()
        self.metrics = metrics or Metrics()
        # Under --workers N each process keeps its own sessions; their ids name the worker that holds them.
        self.worker_id = worker_id
        self.sessions = SessionStore(self.config.session_ttl_s, self.config.max_sessions,
                                     prefix="" if worker_id is None else f"w{worker_id}-")
        self.tokenizer = tokenizer           # optional: decodes OpenSession.prompt_ids into a query
        self._index = None
        self._info: Optional[pb.InfoResponse] = None
        self._in_flight = 0                  # RPCs being handled (a RetrieveStream while it answers a message)
        # read when scraped: a gauge updated per RPC would cost a lock round trip on every lookup
        self.metrics.in_flight.set_function(lambda: self._in_flight)
        self._streams: set[_OpenStream] = set()
        self._draining = False
        self._search_pool = ThreadPoolExecutor(max(1, self.config.search_workers), thread_name_prefix="doc-search")
        if index is not None:
            self.swap_index(index)

    # ------------------------------------------------------------------ index lifecycle
    @property
    def index(self):
        return self._index

    def swap_index(self, index: Any):
        """Make ``index`` the one served; returns the previous one (the caller closes it later)."""
        info = pb.InfoResponse(
            index_id=str(index.index_id),
            tokenizer_fingerprint=str(index.tokenizer_fingerprint),
            vocab_size=int(index.vocab_size),
            num_tokens=int(index.num_tokens),
            num_documents=int(index.num_documents),
            manifest_json=json.dumps(index.manifest, sort_keys=True, default=str),
            max_context=self.config.max_context,
            max_budget=self.config.max_budget,
            max_batch=self.config.max_batch,
            documents_available=bool(getattr(index, "has_faiss", True)),
            session_ttl_s=self.config.session_ttl_s,
            server_version=SERVER_VERSION,
        )
        old = self._index
        # One reference assignment each: a handler reads ``self._index`` once at its start and uses that
        # object to the end, so in-flight requests finish on the snapshot they started with.
        self._info = info
        self._index = index
        self.metrics.set_index(info.index_id, info.tokenizer_fingerprint, info.num_tokens)
        return old

    def close(self) -> None:
        self._search_pool.shutdown(wait=False, cancel_futures=True)

    def end_streams(self) -> int:
        """Draining: end every open RetrieveStream with status OK, and refuse new ones. A stream waiting
        for its next request is woken (cancelled inside that wait, which it turns into a normal end); one
        busy with a lookup ends after sending that answer. No lookup is cut midway; a client opens a new
        stream at its next lookup (on another server, behind a balancer). Returns how many were open."""
        self._draining = True
        streams = list(self._streams)
        for st in streams:
            if st.idle:
                st.cancelled_idle = True
                st.task.cancel()
        return len(streams)

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, method: str, context) -> None:
        token = self.config.auth_token
        if not token or (method in READ_METHODS and not self.config.auth_reads):
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                v = value if isinstance(value, str) else value.decode()
                if v.startswith("Bearer ") and hmac.compare_digest(v[7:].encode(), token.encode()):
                    return
                break
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED, f"{method} requires 'authorization: Bearer <token>' metadata")

    def _require_index(self):
        index = self._index
        if index is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no index loaded yet")
        return index

    def _check_load(self) -> None:
        """RESOURCE_EXHAUSTED past ``max_concurrency``; the caller has already added itself to ``_in_flight``."""
        if self._in_flight > self.config.max_concurrency:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"server overloaded ({self._in_flight - 1} requests in flight); retry later")

    async def _fail(self, method: str, context, err: RpcError):
        self.metrics.error(method, err.code.name)
        await context.abort(err.code, err.details)

    async def _search_documents(self, index, query: str, top_k: int) -> np.ndarray:
        """The index's top-k document ids for ``query`` ([<= top_k] int64), searched in the thread pool."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._search_pool, index.search_documents, query, top_k)
        except Exception as e:  # noqa: BLE001 - report, don't crash the server
            log.exception("document search failed")
            raise RpcError(grpc.StatusCode.INTERNAL, f"document search failed: {type(e).__name__}: {e}")

    def _session(self, index, session_id: str):
        s = self.sessions.get(session_id)
        if s is None:
            owner = _session_worker(session_id)
            if self.worker_id is not None and owner is not None and owner != self.worker_id:
                raise _invalid(f"session {session_id!r} lives in worker {owner} of this server, but this call reached "
                               f"worker {self.worker_id}: send a session's calls over the channel (connection) that "
                               "opened it, or serve with --workers 1")
            raise _invalid(f"unknown or expired session {session_id!r}")
        if s.index_id != str(index.index_id):
            # The index was reloaded since the session opened: document ids may mean other documents.
            if len(s.doc_ids) and s.query:
                k = max(1, len(s.doc_ids))
                s.doc_ids = np.sort(np.asarray(index.search_documents(s.query, k=k), dtype=np.int64))
            s.index_id = str(index.index_id)
        return s

    def _retrieve_one(self, index, req) -> pb.RetrieveResponse:
        cfg = self.config
        n = len(req.context)
        if n == 0:
            raise _invalid("context is empty (its last token is the tree root)")
        if n > cfg.max_context:
            raise _invalid(f"context has {n} tokens; the limit is {cfg.max_context} (send only the tail)")
        budget = req.budget
        if budget < 1 or budget > cfg.max_budget:
            raise _invalid(f"budget {budget} is outside 1..{cfg.max_budget}")
        fp = req.tokenizer_fingerprint
        if fp and fp != self._info.tokenizer_fingerprint:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokenizer fingerprint {fp} does not match the index's {self._info.tokenizer_fingerprint}",
            )
        vocab = self._info.vocab_size
        ctx = np.array(req.context, dtype=np.int32)
        # one reduction for both bounds: as uint32, negative ids are >= 2**31 > vocab
        if int(ctx.view(np.uint32).max()) >= vocab:
            raise _invalid(f"context holds token ids outside the vocabulary [0, {vocab})")
        kwargs = dict(cfg.retrieve_defaults)
        if req.hint_tokens:
            if len(req.hint_tokens) != len(req.hint_probs):
                raise _invalid("hint_tokens and hint_probs must have the same length")
            ht = np.asarray(req.hint_tokens, dtype=np.int32)
            hp = np.asarray(req.hint_probs, dtype=np.float32)
            if int(ht.min()) < 0 or int(ht.max()) >= vocab:
                raise _invalid(f"hint_tokens hold ids outside the vocabulary [0, {vocab})")
            if not np.all((hp >= 0) & (hp <= 1)):
                raise _invalid("hint_probs must lie in [0, 1]")
            kwargs["hint_tokens"] = ht
            kwargs["hint_probs"] = hp
        elif req.hint_probs:
            raise _invalid("hint_probs without hint_tokens")
        if req.HasField("options"):
            o = req.options
            for name in ("max_span", "min_span", "max_matches", "depth"):
                v = getattr(o, name)
                if v:
                    if v > 1024:
                        raise _invalid(f"options.{name}={v} is too large")
                    kwargs[name] = int(v)
            if o.min_prob:
                if not 0 <= o.min_prob <= 1:
                    raise _invalid("options.min_prob must lie in [0, 1]")
                kwargs["min_prob"] = float(o.min_prob)
        if req.session_id:
            s = self._session(index, req.session_id)
            if len(s.doc_ids):
                kwargs["doc_filter"] = s.doc_ids
            if s.memory is not None:
                if req.context_end:
                    if req.context_end < n:
                        raise _invalid(f"context_end {req.context_end} is smaller than the context ({n} tokens)")
                    s.memory.sync(ctx, req.context_end)
                kwargs["memory"] = s.memory.tokens
        r = index.retrieve(ctx, int(budget), **kwargs)
        m = self.metrics
        k = len(r.tokens)
        m.tree_size.observe(k)
        if k == 0:
            m.miss.inc()
            return pb.RetrieveResponse(index_id=self._info.index_id, match_len=int(r.match_len))
        m.hit.inc()
        m.nodes_datastore.inc(k)
        in_docs = np.asarray(r.in_documents, dtype=bool)
        nd = np.count_nonzero(in_docs)          # (count_nonzero: a fraction of ndarray.any()'s cost)
        in_mem = r.in_memory
        nm = np.count_nonzero(in_mem)
        if not nd and not nm:
            sources = _ALL_DATASTORE[k] if k < len(_ALL_DATASTORE) else bytes([pb.SOURCE_DATASTORE]) * k
        else:
            src = (pb.SOURCE_DATASTORE + pb.SOURCE_DOCUMENTS * in_docs).astype(np.uint8)
            if nd:
                m.nodes_documents.inc(nd)
            if nm:
                src |= (pb.SOURCE_CONTEXT * np.asarray(in_mem, dtype=bool)).astype(np.uint8)
                m.nodes_memory.inc(nm)
            sources = src.tobytes()
        return pb.RetrieveResponse(
            tokens=r.tokens.tolist(),
            parents=r.parents.tolist(),
            probs=r.probs.tolist(),
            sources=sources,
            index_id=self._info.index_id,
            match_len=int(r.match_len),
        )

    # ------------------------------------------------------------------ RPCs
    # Each handler only translates: (index snapshot, request protobuf) -> response protobuf, raising RpcError
    # for a bad request. Admission, auth, metrics and aborts are the wrappers' (``_unary``, ``_stream``).
    @_unary("Info", shed=False)
    def Info(self, index, request) -> pb.InfoResponse:
        return self._info

    @_unary("Retrieve", lookup=True)
    def Retrieve(self, index, request) -> pb.RetrieveResponse:
        return self._retrieve_one(index, request)

    @_stream("RetrieveStream")
    def RetrieveStream(self, index, request) -> pb.RetrieveResponse:
        resp = self._retrieve_one(index, request)
        resp.seq = request.seq
        return resp

    @_unary("RetrieveBatch")
    def RetrieveBatch(self, index, request) -> pb.RetrieveBatchResponse:
        if len(request.requests) > self.config.max_batch:
            raise _invalid(f"batch of {len(request.requests)} requests; the limit is {self.config.max_batch}")
        out = pb.RetrieveBatchResponse()
        for i, req in enumerate(request.requests):
            try:
                out.responses.append(self._retrieve_one(index, req))
            except RpcError as e:
                raise RpcError(e.code, f"requests[{i}]: {e.details}") from None
        return out

    @_unary("OpenSession")
    async def OpenSession(self, index, request) -> pb.OpenSessionResponse:
        if request.tokenizer_fingerprint and request.tokenizer_fingerprint != self._info.tokenizer_fingerprint:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"tokenizer fingerprint {request.tokenizer_fingerprint} does not match the index's "
                           f"{self._info.tokenizer_fingerprint}")
        ids = None
        if request.prompt_ids:
            if len(request.prompt_ids) > 8 * self.config.max_context:
                raise _invalid(f"prompt_ids has {len(request.prompt_ids)} tokens; the limit is "
                               f"{8 * self.config.max_context}")
            ids = np.asarray(request.prompt_ids, dtype=np.int64)
            if ids.min() < 0 or ids.max() >= self._info.vocab_size:
                raise _invalid("prompt_ids hold ids outside the vocabulary")
        if request.skip_documents and not request.memory:
            raise _invalid("skip_documents needs memory: a session without documents or memory does nothing")
        memory = TokenMemory(ids if ids is not None else ()) if request.memory else None
        query, docs = request.prompt_text, np.zeros(0, np.int64)
        if not request.skip_documents:
            if not query:
                if ids is None:
                    raise _invalid("OpenSession needs prompt_text (or prompt_ids)")
                if self.tokenizer is None:
                    raise _invalid("this server has no tokenizer to decode prompt_ids: send prompt_text")
                query = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            top_k = request.top_k or self.config.default_top_k
            if top_k > self.config.max_top_k:
                raise _invalid(f"top_k {top_k} exceeds {self.config.max_top_k}")
            if not self._info.documents_available:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this index has no document (FAISS) index (open a memory-only session with "
                               "memory=true, skip_documents=true)")
            docs = await self._search_documents(index, query, int(top_k))
        s = self.sessions.create(query, np.asarray(docs, dtype=np.int64), str(index.index_id), memory)
        self.metrics.sessions.set(len(self.sessions))
        return pb.OpenSessionResponse(session_id=s.session_id, document_ids=s.doc_ids.tolist(),
                                      ttl_s=self.sessions.ttl_s, index_id=s.index_id, memory=memory is not None)

    @_unary("CloseSession", shed=False, needs_index=False)
    def CloseSession(self, index, request) -> pb.CloseSessionResponse:
        if not request.session_id:
            raise _invalid("session_id is empty")
        closed = self.sessions.close(request.session_id)
        self.metrics.sessions.set(len(self.sessions))
        return pb.CloseSessionResponse(closed=closed)
