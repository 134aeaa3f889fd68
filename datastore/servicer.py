"""The gRPC servicer: protobufs in, ``DatastoreIndex`` calls, protobufs out (the server-side edge).

Cheap lookups run directly in the asyncio handler, on the event loop thread. A lookup with the default
options is ~10-40 us of compiled loops over memory-mapped arrays; handing it to a thread pool would add a
thread hop and a future (~50-100 us on this class of machine), i.e. more than the work itself.
The work of one lookup is bounded by its options: it reads ``max_matches`` continuations of ``depth``
tokens, so ``max_matches * depth`` ("cells") is its cost, refused past ``max_lookup_cells`` (65,536:
a few ms); options past ``OPTION_LIMITS`` and hints past ``max_hint`` entries are refused too
(INVALID_ARGUMENT, never clamped: a client learns its request was not served as asked). A lookup of more
than ``inline_cells`` cells, and a RetrieveBatch whose lookups sum to more, runs in a small thread pool
instead (``lookup_workers`` threads; the kernels release the GIL), so that it never stalls other callers'
answers. Document search (OpenSession: embedding + FAISS, milliseconds) runs in its own small pool.

Overload protection is a bounded in-flight counter: a request that arrives when ``max_concurrency``
RPCs are already being handled gets RESOURCE_EXHAUSTED immediately (no queue is built in Python). A unary
RPC counts from the start of its handler until gRPC has sent its answer (its done callback), a
RetrieveStream message until gRPC has taken its answer: a handler that never awaits would otherwise leave
the count at 1 and let every other call queue inside gRPC. Calls that wait in gRPC's own queue before any
handler runs (the event loop itself saturated) are bounded by their wait: RESOURCE_EXHAUSTED past
``max_queue_wait_s`` when the client stated its timeout (a RetrieveStream message: when it carries the
client's clock), DEADLINE_EXCEEDED without work once the deadline has passed (datastore/call_wait.py).
Refusing a queued call still takes one loop turn, and gRPC hands the loop one call per method per turn: if
turns are long (lookups inline), refusals queue too. So once a call or message is seen to have waited more
than a quarter of ``max_queue_wait_s``, the loop counts as behind for the next second, and only lookups of
at most ``BEHIND_INLINE_CELLS`` (a default lookup) run on it; wider ones go to the lookup pool, where the
in-flight bound refuses the excess at once.

Every RPC goes through one of two wrappers, ``_unary`` and ``_stream`` (RetrieveStream: the same steps per
message), which do what is common to all of them: the in-flight count and load shedding, the bearer-token
check, requests whose bytes did not parse (INVALID_ARGUMENT after the token check, one log line a minute;
datastore/wire.py), latency and status metrics, and turning an ``RpcError`` into the call's status. The
handlers only translate between protobufs and ``DatastoreIndex`` / session calls. Error details echo ids
(session ids, fingerprints) cut to 64 characters; ids longer than ``MAX_ID_CHARS`` are refused.

Reads and sessions: a session id is a capability, 128 random bits from ``secrets`` returned only to the
caller that opened the session (authenticated when the server has a token). A read carrying it uses and
updates that session (its memory follows the context tails, its TTL is refreshed) without a token:
holding the id is the authorisation, as it is for the opener's own lookups. ``Info`` without the token
shows the manifest without paths (datastore/public_manifest.py).

RetrieveStream serves the same lookups as Retrieve, one response per request on a long-lived stream: a
message on an open HTTP/2 stream costs the Python gRPC runtime about a third less than a new unary call
(see bench/results/datastore.md), and the lookup itself is only ~10 us of that.
"""
from __future__ import annotations

import asyncio
import functools
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

from .auth import client_identity, has_bearer
from .call_wait import ClockBaselines, queue_wait_s
from .logs import RateLimitedLog
from .memory import TokenMemory
from .metrics import Metrics
from .ngram_stats import check_batch
from .public_manifest import public_manifest
from .sessions import SessionLimitError, SessionStore
from .tree_fusion import cut_tree, fuse_trees
from .wire import Undecodable

log = logging.getLogger("datastore.servicer")

SERVER_VERSION = "0.1.0"

# ``sources`` of a tree whose nodes all come from the corpus outside any session document (the common
# answer), by node count
_ALL_DATASTORE = tuple(bytes([pb.SOURCE_DATASTORE]) * k for k in range(257))

READ_METHODS = frozenset({"Info", "Retrieve", "RetrieveBatch", "RetrieveStream", "PullStats"})
WRITE_METHODS = frozenset({"OpenSession", "CloseSession", "PushStats"})
# Largest push batch (PushStats): rows, runs, tokens per run, next tokens per row; and rows per PullStats
PUSH_LIMITS = {"max_rows": 4096, "max_runs": 256, "max_run": 4096, "max_next": 64, "max_outputs": 16,
               "max_output": 16_384}
PULL_ROWS = 4096

# Largest value of each RetrieveOptions field (0 = the server's default). A span beyond the longest context
# (--max-context) changes nothing; the cost of a lookup is bounded by max_matches x depth (max_lookup_cells).
OPTION_LIMITS = {"max_span": 1024, "min_span": 1024, "max_matches": 1024, "depth": 1024}
# DatastoreIndex.retrieve's defaults, for the cost of a request that leaves them unset (a unit test checks)
INDEX_DEFAULTS = {"max_span": 16, "min_span": 2, "max_matches": 64, "depth": 8, "min_prob": 0.1}
MEMORY_MATCHES = 16        # DatastoreIndex.retrieve's memory_matches: more rows of a memory session
MAX_ID_CHARS = 128         # session ids and tokenizer fingerprints longer than this are refused
ECHO_CHARS = 64            # an id in error details is cut to this
BEHIND_INLINE_CELLS = 512  # while the loop is behind, only lookups up to this (a default lookup) run on it
BEHIND_FOR_S = 1.0         # how long a long wait marks the loop as behind


def _clip(s: str, n: int = ECHO_CHARS) -> str:
    """``s`` for error details: its first ``n`` characters and its length when longer (gRPC sends details
    as trailing metadata; a 100 KB id would exceed the peer's metadata limit and read as RESOURCE_EXHAUSTED)."""
    return repr(s) if len(s) <= n else f"{s[:n]!r}... ({len(s)} characters)"


@dataclass
class ServiceConfig:
    max_context: int = 1024
    max_budget: int = 256
    max_batch: int = 64
    max_concurrency: int = 64
    max_queue_wait_s: float = 0.25  # a call (stream message) that waited longer to be served is refused (call_wait.py)
    auth_token: Optional[str] = None
    auth_reads: bool = False
    session_ttl_s: float = 600.0
    max_sessions: int = 10_000
    max_sessions_per_client: int = 1024   # open sessions of one client address (RESOURCE_EXHAUSTED beyond)
    default_top_k: int = 8
    max_top_k: int = 256
    retrieve_defaults: dict = field(default_factory=dict)   # max_span, min_span, max_matches, depth, min_prob
    search_workers: int = 2
    max_lookup_cells: int = 65_536   # max_matches x depth of one lookup (its work: a few ms at most)
    max_hint: int = 1024             # entries of hint_tokens / hint_probs
    inline_cells: int = 4096         # lookups (a batch: their sum) of more cells run in the lookup pool
    lookup_workers: int = 2          # threads of the lookup pool
    debug_delay_s: float = 0.0       # tests only: await this long before each lookup (Retrieve, RetrieveStream)

    def check(self) -> None:
        """ValueError when a limit is not positive or the retrieval defaults exceed the per-request limits."""
        for name in ("max_context", "max_budget", "max_batch", "max_concurrency", "max_lookup_cells", "max_hint",
                     "inline_cells", "lookup_workers", "max_sessions_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.max_queue_wait_s > 0:
            raise ValueError("max_queue_wait_s must be > 0")
        d = {**INDEX_DEFAULTS, **self.retrieve_defaults}
        for name, limit in OPTION_LIMITS.items():
            if not 1 <= d[name] <= limit:
                raise ValueError(f"the default {name} {d[name]} is outside 1..{limit}")
        if not 0 <= d["min_prob"] <= 1:
            raise ValueError("the default min_prob must lie in [0, 1]")
        if d["max_matches"] * d["depth"] > self.max_lookup_cells:
            raise ValueError(f"the default max_matches x depth = {d['max_matches'] * d['depth']} exceeds "
                             f"max_lookup_cells {self.max_lookup_cells}")


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(msg: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, msg)


@dataclass
class _Lookup:
    """A validated Retrieve request: the arguments of ``index.retrieve`` and the cost they declare."""
    ctx: np.ndarray          # int32 [n] context tail
    budget: int
    kwargs: dict             # retrieve() keyword arguments (options, hint, doc_filter, memory)
    cells: int               # max_matches x depth (+ the memory's rows): the bound on the lookup's work


def _session_worker(session_id: str) -> Optional[int]:
    """The worker number in a ``w<N>-...`` session id (``--workers N``), else None."""
    head, sep, _ = session_id.partition("-")
    if sep and head[:1] == "w" and head[1:].isdigit():
        return int(head[1:])
    return None


def _first(answers: list):
    return answers[0]


class _OpenStream:
    """An open RetrieveStream: its handler task, and whether it is waiting for its next request."""

    __slots__ = ("task", "idle", "cancelled_idle")

    def __init__(self, task: asyncio.Task):
        self.task, self.idle, self.cancelled_idle = task, False, False


def _unary(method: str, *, shed: bool = True, needs_index: bool = True, lookup: bool = False,
           with_auth: bool = False, with_client: bool = False):
    """Wrap ``handler(self, index, request) -> response`` (a function, or a coroutine function when it must
    wait; it may also return a future of the response: a lookup sent to the pool) into the servicer's
    ``async method(request, context)`` for the unary RPC ``method``.

    The wrapper counts the call in flight until gRPC has sent its answer and, when ``shed``, refuses it
    past ``max_concurrency``; checks the bearer token; answers INVALID_ARGUMENT for undecodable request
    bytes; passes the index snapshot (UNAVAILABLE while none is loaded, unless not ``needs_index``: the
    handler then gets None); for a ``lookup``, awaits the tests' ``debug_delay_s``; with ``with_auth``
    passes whether the caller showed the server's token (a fourth argument); with ``with_client`` passes
    the caller's identity (datastore/auth.py ``client_identity``: its address) last; and records the latency
    and the status, aborting with an ``RpcError``'s code and details.
    Info and CloseSession are never shed: both are cheap, and refusing CloseSession would keep a session
    alive that its client is done with.
    """
    def wrap(handler):
        waits = inspect.iscoroutinefunction(handler)

        @functools.wraps(handler)
        async def rpc(self, request, context):
            t0 = time.perf_counter()
            counted = self._admit(context)
            try:
                if shed:
                    self._check_load()
                    self._check_wait(context)
                authed = self._check_auth(method, context, with_auth)
                if type(request) is Undecodable:
                    raise self._undecodable(method, request)
                index = self._require_index() if needs_index else self._index
                if lookup and self.config.debug_delay_s:
                    await asyncio.sleep(self.config.debug_delay_s)
                args = (self, index, request, authed) if with_auth else (self, index, request)
                if with_client:
                    args += (client_identity(context.peer()),)
                resp = await handler(*args) if waits else handler(*args)
                if isinstance(resp, asyncio.Future):
                    resp = await resp
                self.metrics.ok_by_method[method].inc()
                return resp
            except RpcError as e:
                await self._fail(method, context, e)
            finally:
                if not counted:
                    self._in_flight -= 1
                self.metrics.latency_by_method[method].observe(time.perf_counter() - t0)

        return rpc

    return wrap


def _stream(method: str):
    """Wrap ``handler(self, index, request) -> response`` (a function: it runs once per message; it may
    return a future of the response, a lookup sent to the pool) into the servicer's async generator for
    the stream-stream RPC ``method``, one response per request, in order.

    When the stream opens: the bearer token (its metadata comes once) and, while draining, UNAVAILABLE.
    Per message, what ``_unary`` does per call (in-flight count and load shedding, undecodable bytes, index
    snapshot, the tests' ``debug_delay_s``, latency and status); an ``RpcError`` ends the stream with its
    status. A message that carries its client's clock (``sent_us``) and waited longer than
    ``max_queue_wait_s`` (datastore/call_wait.py ``DelayBaseline``) ends the stream with RESOURCE_EXHAUSTED,
    as a refusal past ``max_concurrency`` does. A message counts in flight until gRPC has taken its answer
    (the generator resumes then). The per-message path of a cheap lookup holds no await besides reading the
    next request and handing over the answer (and the tests' delay): on this path a coroutine or a task per
    message would cost more than the lookup (see the module docstring).
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
            waits = self._clock_baselines.for_stream(client_identity(context.peer()),
                                                     context.invocation_metadata())
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
                        try:
                            self._check_load()
                            if type(request) is Undecodable:
                                raise self._undecodable(method, request)
                            if request.sent_us:
                                self._refuse_if_waited(waits.wait_s(request.sent_us, time.monotonic_ns() // 1000),
                                                       "message")
                            index = self._require_index()
                            if cfg.debug_delay_s:
                                await asyncio.sleep(cfg.debug_delay_s)
                            resp = handler(self, index, request)
                            if isinstance(resp, asyncio.Future):
                                resp = await resp
                            ok.inc()
                        except RpcError as e:
                            await self._fail(method, context, e)   # ends the stream with e's status
                            return
                        finally:
                            latency.observe(time.perf_counter() - t0)
                        yield resp
                    finally:
                        self._in_flight -= 1
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
                 tokenizer: Any = None, worker_id: Optional[int] = None, stats: Any = None):
        self.config = config or ServiceConfig()
        # shared statistics (datastore/stats_log.py StatsLog), or None: PushStats/PullStats then refuse
        self.stats = stats
        self.config.check()
        self.metrics = metrics or Metrics()
        # Under --workers N each process keeps its own sessions; their ids name the worker that holds them.
        self.worker_id = worker_id
        self.sessions = SessionStore(self.config.session_ttl_s, self.config.max_sessions,
                                     prefix="" if worker_id is None else f"w{worker_id}-",
                                     max_per_owner=self.config.max_sessions_per_client)
        self.tokenizer = tokenizer           # optional: decodes OpenSession.prompt_ids into a query
        self._index = None
        self._info: Optional[pb.InfoResponse] = None          # for callers with the server's token
        self._public_info: Optional[pb.InfoResponse] = None   # for the others: the manifest without paths
        self._in_flight = 0                  # RPCs being handled (a RetrieveStream while it answers a message)
        # read when scraped: a gauge updated per RPC would cost a lock round trip on every lookup
        self.metrics.in_flight.set_function(lambda: self._in_flight)
        self._streams: set[_OpenStream] = set()
        self._clock_baselines = ClockBaselines()   # RetrieveStream clients' clocks: their messages' waits
        self._behind_until = 0.0             # time.monotonic() until which the loop counts as behind
        self._draining = False
        self._search_pool = ThreadPoolExecutor(max(1, self.config.search_workers), thread_name_prefix="doc-search")
        self._lookup_pool = ThreadPoolExecutor(self.config.lookup_workers, thread_name_prefix="lookup")
        self._bad_bytes_log = RateLimitedLog(log)
        if stats is not None:
            self.metrics.stats_rows.set_function(lambda: len(stats.stats))
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
        public = pb.InfoResponse()
        public.CopyFrom(info)
        public.manifest_json = json.dumps(public_manifest(index.manifest), sort_keys=True, default=str)
        old = self._index
        # One reference assignment each: a handler reads ``self._index`` once at its start and uses that
        # object to the end, so in-flight requests finish on the snapshot they started with.
        self._info = info
        self._public_info = public
        self._index = index
        self.metrics.set_index(info.index_id, info.tokenizer_fingerprint, info.num_tokens)
        return old

    def close(self) -> None:
        self._search_pool.shutdown(wait=False, cancel_futures=True)
        self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        if self.stats is not None:
            self.stats.close()     # after the last push was answered: the writer finishes its queue

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
    def _authenticated(self, context) -> bool:
        """Whether the call carries ``authorization: Bearer <the server's token>`` (constant-time compare)."""
        return has_bearer(context.invocation_metadata(), self.config.auth_token)

    def _check_auth(self, method: str, context, want: bool = False) -> bool:
        """UNAUTHENTICATED when ``method`` needs the token and the call lacks it. Returns whether the call
        has it (for an open read only when ``want``: the metadata is not read otherwise)."""
        if not self.config.auth_token:
            return False
        if method in READ_METHODS and not self.config.auth_reads:
            return want and self._authenticated(context)
        if not self._authenticated(context):
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED,
                           f"{method} requires 'authorization: Bearer <token>' metadata")
        return True

    def _admit(self, context) -> bool:
        """Count a unary call in flight until gRPC has finished it (its done callback); returns False when
        the context takes no callback (the caller then uncounts it when the handler returns)."""
        self._in_flight += 1
        try:
            context.add_done_callback(self._release)
            return True
        except (AttributeError, NotImplementedError):
            return False

    def _release(self, _context=None) -> None:
        self._in_flight -= 1

    def log_undecodable(self, method: str, request: Undecodable) -> None:
        """One rate-limited line for undecodable request bytes (of any service on the server: health too)."""
        self._bad_bytes_log.warning("undecodable request", method=method, bytes=request.size, error=request.error)

    def _undecodable(self, method: str, request: Undecodable) -> RpcError:
        self.log_undecodable(method, request)
        return _invalid(request.details())

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

    def _check_wait(self, context) -> None:
        """DEADLINE_EXCEEDED for a call whose deadline passed while it waited (its caller has given up: the
        lookup would be wasted); RESOURCE_EXHAUSTED for one that waited in gRPC's queue longer than
        ``max_queue_wait_s`` (known when its client stated its timeout; datastore/call_wait.py)."""
        remaining = context.time_remaining()
        if remaining is None:
            return
        if remaining <= 0:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it was served")
        self._refuse_if_waited(queue_wait_s(remaining, context.invocation_metadata()), "call")

    def _refuse_if_waited(self, waited: Optional[float], what: str) -> None:
        """RESOURCE_EXHAUSTED when a call (``what``: "call", or a stream's "message") waited longer than
        ``max_queue_wait_s`` to be served; ``waited`` None: unknown. A wait over a quarter of the bound marks
        the loop as behind (``_inline_limit``)."""
        if waited is None:
            return
        if waited > 0.25 * self.config.max_queue_wait_s:
            self._behind_until = time.monotonic() + BEHIND_FOR_S
            self.metrics.loop_behind.inc()
        if waited > self.config.max_queue_wait_s:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"server overloaded (the {what} waited {waited * 1000:.0f} ms to be served); retry later")

    async def _fail(self, method: str, context, err: RpcError):
        self.metrics.error(method, err.code.name)
        # details travel as trailing metadata: keep them far below the peers' metadata limits
        await context.abort(err.code, err.details if len(err.details) <= 1024 else err.details[:1024] + "...")

    async def _search_documents(self, index, query: str, top_k: int) -> np.ndarray:
        """The index's top-k document ids for ``query`` ([<= top_k] int64), searched in the thread pool."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._search_pool, index.search_documents, query, top_k)
        except Exception as e:  # noqa: BLE001 - report, don't crash the server
            log.exception("document search failed")
            raise RpcError(grpc.StatusCode.INTERNAL, f"document search failed: {type(e).__name__}: {e}")

    def _session(self, index, session_id: str):
        if len(session_id) > MAX_ID_CHARS:
            raise _invalid(f"session_id has {len(session_id)} characters; session ids have at most {MAX_ID_CHARS}")
        s = self.sessions.get(session_id)
        if s is None:
            owner = _session_worker(session_id)
            if self.worker_id is not None and owner is not None and owner != self.worker_id:
                raise _invalid(f"session {_clip(session_id)} lives in worker {owner} of this server, but this call "
                               f"reached worker {self.worker_id}: send a session's calls over the channel "
                               "(connection) that opened it, or serve with --workers 1")
            raise _invalid(f"unknown or expired session {_clip(session_id)}")
        if s.index_id != str(index.index_id):
            # The index was reloaded since the session opened: document ids may mean other documents.
            if len(s.doc_ids) and s.query:
                k = max(1, len(s.doc_ids))
                s.doc_ids = np.sort(np.asarray(index.search_documents(s.query, k=k), dtype=np.int64))
            s.index_id = str(index.index_id)
        return s

    def _check_fingerprint(self, fp: str) -> None:
        if fp and fp != self._info.tokenizer_fingerprint:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"tokenizer fingerprint {_clip(fp)} does not match the index's "
                           f"{self._info.tokenizer_fingerprint}")

    def _prepare(self, index, req) -> _Lookup:
        """Validate a RetrieveRequest (RpcError when it is bad) and bring its session's memory up to date;
        runs on the event loop thread (sessions are touched there only)."""
        cfg = self.config
        n = len(req.context)
        if n == 0:
            raise _invalid("context is empty (its last token is the tree root)")
        if n > cfg.max_context:
            raise _invalid(f"context has {n} tokens; the limit is {cfg.max_context} (send only the tail)")
        budget = req.budget
        if budget < 1 or budget > cfg.max_budget:
            raise _invalid(f"budget {budget} is outside 1..{cfg.max_budget}")
        self._check_fingerprint(req.tokenizer_fingerprint)
        vocab = self._info.vocab_size
        ctx = np.array(req.context, dtype=np.int32)
        # one reduction for both bounds: as uint32, negative ids are >= 2**31 > vocab
        if int(ctx.view(np.uint32).max()) >= vocab:
            raise _invalid(f"context holds token ids outside the vocabulary [0, {vocab})")
        kwargs = dict(cfg.retrieve_defaults)
        if req.hint_tokens:
            if len(req.hint_tokens) > cfg.max_hint:
                raise _invalid(f"hint_tokens has {len(req.hint_tokens)} entries; the limit is {cfg.max_hint} "
                               "(send the draft's most likely tokens)")
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
            for name, limit in OPTION_LIMITS.items():
                v = getattr(o, name)
                if v:
                    if v > limit:
                        raise _invalid(f"options.{name}={v} is too large (the limit is {limit})")
                    kwargs[name] = int(v)
            if o.min_prob:
                if not 0 <= o.min_prob <= 1:
                    raise _invalid("options.min_prob must lie in [0, 1]")
                kwargs["min_prob"] = float(o.min_prob)
        matches = kwargs.get("max_matches", INDEX_DEFAULTS["max_matches"])
        depth = kwargs.get("depth", INDEX_DEFAULTS["depth"])
        if matches * depth > cfg.max_lookup_cells:
            raise _invalid(f"options.max_matches x options.depth = {matches} x {depth} = {matches * depth} "
                           f"exceeds the limit of {cfg.max_lookup_cells} continuation tokens per lookup")
        cells = matches * depth
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
                cells += MEMORY_MATCHES * depth
        return _Lookup(ctx, int(budget), kwargs, cells)

    def _respond(self, index, lookups: list[_Lookup], build):
        """``build(answers)`` of the lookups' answers (RetrieveResponses): computed here when the lookups
        are cheap together (<= ``inline_cells``), else a future of it computed in the lookup pool (the
        memory arrays are copied first: the loop thread may append to a session's memory meanwhile)."""
        if sum(lk.cells for lk in lookups) <= self._inline_limit():
            return build([self._answer(index, lk) for lk in lookups])
        for lk in lookups:
            if "memory" in lk.kwargs:
                lk.kwargs["memory"] = lk.kwargs["memory"].copy()

        def work():
            return build([self._answer(index, lk) for lk in lookups])

        return asyncio.get_running_loop().run_in_executor(self._lookup_pool, work)

    def _inline_limit(self) -> int:
        """Cells a call's lookups may sum to and still run on the loop: ``inline_cells``, or at most
        ``BEHIND_INLINE_CELLS`` while the loop is behind (long turns would queue even the refusals)."""
        limit = self.config.inline_cells
        if limit > BEHIND_INLINE_CELLS and time.monotonic() < self._behind_until:
            return BEHIND_INLINE_CELLS
        return limit

    def _answer(self, index, lk: _Lookup) -> pb.RetrieveResponse:
        """The lookup itself and its response (on the loop thread or in the lookup pool)."""
        r = index.retrieve(lk.ctx, lk.budget, **lk.kwargs)
        if self.stats is not None:
            return self._answer_with_stats(index, lk, r)
        m = self.metrics
        k = len(r.tokens)
        m.tree_size.observe(k)
        index_id = str(index.index_id)
        if k == 0:
            m.miss.inc()
            return pb.RetrieveResponse(index_id=index_id, match_len=int(r.match_len))
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
            index_id=index_id,
            match_len=int(r.match_len),
        )

    def _answer_with_stats(self, index, lk: _Lookup, r) -> pb.RetrieveResponse:
        """The corpus tree ``r`` fused with the shared statistics' tree and the recent shared outputs' tree
        by longest prefix (the client's fusion rule, datastore/tree_fusion.py), cut to the budget."""
        kw = lk.kwargs
        st = self.stats.stats.tree(lk.ctx, lk.budget, min_prob=kw.get("min_prob", INDEX_DEFAULTS["min_prob"]),
                                   depth=kw.get("depth", INDEX_DEFAULTS["depth"]))
        m = self.metrics
        src = (pb.SOURCE_DATASTORE + pb.SOURCE_DOCUMENTS * np.asarray(r.in_documents, bool)
               + pb.SOURCE_CONTEXT * np.asarray(r.in_memory, bool)).astype(np.uint8)
        trees = [(r.tokens, r.parents, r.probs, src)]
        ot = self.stats.stats.output_tree(lk.ctx, lk.budget, min_prob=kw.get("min_prob", INDEX_DEFAULTS["min_prob"]),
                                          depth=kw.get("depth", INDEX_DEFAULTS["depth"]))
        for t in (st, ot):
            if len(t.tokens):
                trees.append((t.tokens, t.parents, t.probs, np.full(len(t.tokens), pb.SOURCE_RECYCLED, np.uint8)))
        tok, par, prob, srcs = cut_tree(fuse_trees(trees), lk.budget) if len(trees) > 1 else trees[0]
        k = len(tok)
        m.tree_size.observe(k)
        (m.hit if k else m.miss).inc()
        for bit, counter in ((pb.SOURCE_DATASTORE, m.nodes_datastore), (pb.SOURCE_DOCUMENTS, m.nodes_documents),
                             (pb.SOURCE_CONTEXT, m.nodes_memory), (pb.SOURCE_RECYCLED, m.nodes_stats)):
            c = int(np.count_nonzero(srcs & bit))
            if c:
                counter.inc(c)
        return pb.RetrieveResponse(tokens=np.asarray(tok).tolist(), parents=np.asarray(par).tolist(),
                                   probs=np.asarray(prob).tolist(), sources=np.asarray(srcs, np.uint8).tobytes(),
                                   index_id=str(index.index_id),
                                   match_len=int(max(r.match_len, st.match_len, ot.match_len)))

    def _require_stats(self):
        if self.stats is None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "this server keeps no shared statistics "
                           "(start it with --stats-dir DIR or --stats-redis URL)")
        return self.stats

    # ------------------------------------------------------------------ RPCs
    # Each handler only translates: (index snapshot, request protobuf) -> response protobuf (or its future:
    # a lookup in the pool), raising RpcError for a bad request. Admission, auth, metrics and aborts are
    # the wrappers' (``_unary``, ``_stream``).
    @_unary("Info", shed=False, with_auth=True)
    def Info(self, index, request, authenticated: bool) -> pb.InfoResponse:
        return self._info if authenticated else self._public_info

    @_unary("Retrieve", lookup=True)
    def Retrieve(self, index, request):
        return self._respond(index, [self._prepare(index, request)], _first)

    @_stream("RetrieveStream")
    def RetrieveStream(self, index, request):
        seq = request.seq

        def with_seq(answers):
            answers[0].seq = seq
            return answers[0]

        return self._respond(index, [self._prepare(index, request)], with_seq)

    @_unary("RetrieveBatch")
    def RetrieveBatch(self, index, request):
        if len(request.requests) > self.config.max_batch:
            raise _invalid(f"batch of {len(request.requests)} requests; the limit is {self.config.max_batch}")
        lookups = []
        for i, req in enumerate(request.requests):
            try:
                lookups.append(self._prepare(index, req))
            except RpcError as e:
                raise RpcError(e.code, f"requests[{i}]: {e.details}") from None
        return self._respond(index, lookups, lambda answers: pb.RetrieveBatchResponse(responses=answers))

    @_unary("OpenSession", with_client=True)
    async def OpenSession(self, index, request, client: str) -> pb.OpenSessionResponse:
        self._check_fingerprint(request.tokenizer_fingerprint)
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
        try:
            s = self.sessions.create(query, np.asarray(docs, dtype=np.int64), str(index.index_id), memory, owner=client)
        except SessionLimitError as e:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{e} ({self.config.max_sessions_per_client}): close sessions you are done with "
                           "(CloseSession) or let them expire") from None
        self.metrics.sessions.set(len(self.sessions))
        return pb.OpenSessionResponse(session_id=s.session_id, document_ids=s.doc_ids.tolist(),
                                      ttl_s=self.sessions.ttl_s, index_id=s.index_id, memory=memory is not None)

    @_unary("CloseSession", shed=False, needs_index=False)
    def CloseSession(self, index, request) -> pb.CloseSessionResponse:
        if not request.session_id:
            raise _invalid("session_id is empty")
        if len(request.session_id) > MAX_ID_CHARS:
            raise _invalid(f"session_id has {len(request.session_id)} characters; session ids have at most "
                           f"{MAX_ID_CHARS}")
        closed = self.sessions.close(request.session_id)
        self.metrics.sessions.set(len(self.sessions))
        return pb.CloseSessionResponse(closed=closed)

    @_unary("PushStats")
    async def PushStats(self, index, request) -> pb.PushStatsResponse:
        stats = self._require_stats()
        bid = request.batch_id
        if not bid or len(bid) > MAX_ID_CHARS or not bid.isprintable():
            raise _invalid(f"batch_id must be 1..{MAX_ID_CHARS} printable characters")
        self._check_fingerprint(request.tokenizer_fingerprint)
        why = check_batch(request.rows, request.runs, self._info.vocab_size, outputs=request.outputs, **PUSH_LIMITS)
        if why:
            raise _invalid(why)
        try:
            applied, version = await asyncio.wrap_future(stats.submit(request))
        except OSError as e:
            log.error("statistics log write failed", extra={"error": f"{type(e).__name__}: {e}"})
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the statistics log could not be written; retry later") from None
        self.metrics.stats_pushes.labels("applied" if applied else "duplicate").inc()
        return pb.PushStatsResponse(applied=applied, version=version)

    @_unary("PullStats")
    def PullStats(self, index, request) -> pb.PullStatsResponse:
        stats = self._require_stats()
        self._check_fingerprint(request.tokenizer_fingerprint)
        limit = request.max_rows or PULL_ROWS
        if limit > PULL_ROWS:
            raise _invalid(f"max_rows {limit} exceeds {PULL_ROWS}")
        rows, version, more = stats.stats.rows_since(int(request.since_version), limit)
        return pb.PullStatsResponse(rows=[pb.TopkRow(token=t, next_tokens=n, probs=p) for t, n, p in rows],
                                    version=version, more=more)
