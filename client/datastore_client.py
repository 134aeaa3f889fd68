"""A fail-soft gRPC client of the datastore service (the client-side edge: protobufs stop here).

Every call carries a deadline (a few milliseconds by default). Any failure -- timeout, server down,
overload, bad request -- returns ``None`` (or an empty tree) and bumps a counter in ``stats``; nothing
is raised into the decode loop. A circuit breaker skips calls for ``breaker_cooldown_s`` after
``breaker_failures`` consecutive failures, then lets one probe through (half-open). The gRPC channel
reconnects by itself.

Nothing here makes the decode loop wait longer than the lookup deadline, even on a server that stopped
answering: sessions open in the background (``open_session_async``; the caller waits what it chooses, the
call itself runs up to ``session_timeout_s``) and close without waiting for the answer
(``close_session_async``). A lookup refused because its session is unknown (a restarted server: sessions
live in the server's memory) puts that session in ``lost_sessions``, so that its owner opens a new one.

Lookups travel on one long-lived ``RetrieveStream`` call per client (``stream=True``, the default): a
message on an open stream costs the Python gRPC runtime about a third less than a new unary call. A
stream that ends (server restart, a rejected request) is replaced by a new one at the next lookup; a
server without RetrieveStream (UNIMPLEMENTED) turns the client to unary ``Retrieve`` calls.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc
import numpy as np

from ..datastore.call_wait import CLOCK_METADATA, timeout_metadata
from ..datastore.tls import channel_credentials
from ..protos import datastore_pb2 as pb
from ..protos import datastore_pb2_grpc as pb_grpc

from .types import DraftTree


@dataclass(frozen=True)
class ServerInfo:
    index_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    num_tokens: int
    num_documents: int
    max_context: int
    max_budget: int
    max_batch: int
    documents_available: bool
    manifest_json: str


@dataclass(frozen=True)
class Session:
    session_id: str
    document_ids: np.ndarray
    ttl_s: float
    index_id: str = ""    # the index it was opened on


# codes of a lookup refused for its session (an unknown or expired id: the server restarted, or the session
# expired); any other refusal leaves the session alone
_SESSION_LOST_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def tree_from_response(root: int, resp) -> DraftTree:
    """RetrieveResponse (nodes below the root) -> DraftTree rooted at ``root``."""
    n = len(resp.tokens)
    if n == 0:
        return DraftTree.empty(root)
    # list unpacking reads a repeated field ~2x faster than numpy's sequence protocol does
    tokens = np.array([root, *resp.tokens], dtype=np.int32)
    parents = np.array([-1, *resp.parents], dtype=np.int32)
    parents[1:] += 1
    probs = np.array([1.0, *resp.probs], dtype=np.float32)
    src = resp.sources
    if len(src) == n:
        sources = np.frombuffer(bytearray(b"\0" + src), dtype=np.uint8)   # bytearray: a writable array
    else:
        sources = np.ones(n + 1, dtype=np.uint8)
        sources[0] = 0
    return DraftTree(tokens, parents, probs, sources)


class StreamLookupError(grpc.RpcError):
    """A RetrieveStream lookup without an answer: its deadline passed, or the stream ended cleanly."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _unimplemented(err: Optional[BaseException]) -> bool:
    return isinstance(err, grpc.RpcError) and callable(getattr(err, "code", None)) \
        and err.code() == grpc.StatusCode.UNIMPLEMENTED


class _StreamLookup:
    """One lookup on a RetrieveStream, with the future interface that PendingRetrieval and ``_finish`` use."""

    __slots__ = ("_stream", "_seq", "_box", "_deadline", "_cancelled")

    def __init__(self, stream: "_RetrieveStream", seq: int, box: queue.SimpleQueue, deadline: float):
        self._stream, self._seq, self._box, self._deadline = stream, seq, box, deadline
        self._cancelled = False

    def done(self) -> bool:
        return self._cancelled or not self._box.empty()

    def cancel(self) -> None:
        self._cancelled = True
        self._stream.forget(self._seq)

    def result(self):
        """The RetrieveResponse; raises the stream's error, or DEADLINE_EXCEEDED. Call it once."""
        if self._cancelled:
            raise grpc.FutureCancelledError()
        try:
            item = self._box.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            self._stream.forget(self._seq)   # a late answer is dropped by the reader
            raise StreamLookupError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "no answer on the stream before the deadline") from None
        if isinstance(item, BaseException):
            raise item
        return item


class _RetrieveStream:
    """One RetrieveStream call. Requests go through a queue to gRPC's request thread; a reader thread hands
    each response to the lookup waiting for its ``seq``. When the stream ends, every waiting lookup gets
    the error (the server's status, e.g. INVALID_ARGUMENT for the request it rejected)."""

    def __init__(self, stub, metadata):
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self.ended = False
        self.error: Optional[BaseException] = None   # why the stream ended
        self._call = stub.RetrieveStream(self._requests(), metadata=metadata)   # no deadline: lives until closed
        threading.Thread(target=self._read, name="datastore-stream-reader", daemon=True).start()

    def _requests(self):
        while True:
            req = self._outbox.get()
            if req is None:
                return
            yield req

    def _read(self) -> None:
        err: BaseException
        try:
            for resp in self._call:
                box = self._waiting.pop(resp.seq, None)
                if box is not None:
                    box.put(resp)
            err = StreamLookupError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
        except grpc.RpcError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - e.g. a malformed message: fail the waiters, never hang them
            err = e
        with self._lock:
            self.error = err
            self.ended = True
            boxes = list(self._waiting.values())
            self._waiting.clear()
        for box in boxes:
            box.put(err)

    def send(self, req, deadline: float) -> Optional[_StreamLookup]:
        """Queue ``req`` (its ``seq`` is set here); None when the stream has ended."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self.ended:
                return None
            self._seq += 1
            req.seq = seq = self._seq
            req.sent_us = time.monotonic_ns() // 1000   # lets the server see how long it waited
            self._waiting[seq] = box
        self._outbox.put(req)
        return _StreamLookup(self, seq, box, deadline)

    def forget(self, seq: int) -> None:
        self._waiting.pop(seq, None)

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()


class PendingSession:
    """An OpenSession in flight (``DatastoreClient.open_session_async``).

    ``poll(wait_s)`` waits at most ``wait_s`` seconds: ``(True, Session or None)`` once the call has ended
    (None: it failed), ``(False, None)`` while it runs. The outcome counts for the client's breaker when
    the call ends, polled or not (an unresolved half-open probe would keep the breaker open for good).
    ``cancel()`` abandons it; a session the server opens anyway is closed as soon as its answer arrives."""

    __slots__ = ("_client", "_future", "_outcome", "_cancelled", "_lock")

    def __init__(self, client: "DatastoreClient", future):
        self._client, self._future = client, future
        self._outcome: Optional[tuple[bool, Optional[Session]]] = None if future is not None else (True, None)
        self._cancelled = False
        self._lock = threading.Lock()
        if future is not None:
            future.add_done_callback(self._settle)

    def _settle(self, f) -> None:
        """Record how the call ended, once (from gRPC's callback thread or from ``poll``)."""
        with self._lock:
            if self._outcome is not None:
                return
            try:
                r = f.result()
            except Exception as e:  # noqa: BLE001 - grpc.RpcError or a cancelled future: no session
                self._client._failure(e)
                self._outcome = (True, None)
                return
            self._client._success()
            self._outcome = (True, Session(r.session_id, np.asarray(r.document_ids, dtype=np.int64), r.ttl_s,
                                           r.index_id))
            cancelled = self._cancelled
        if cancelled:
            self._client.close_session_async(r.session_id)

    def poll(self, wait_s: float = 0.0) -> tuple[bool, Optional[Session]]:
        if self._outcome is None:
            try:
                self._future.result(timeout=max(0.0, wait_s))
            except Exception:  # noqa: BLE001 - still running (timeout) or failed: _settle records which
                pass
            if self._future.done():
                self._settle(self._future)
        return self._outcome if self._outcome is not None else (False, None)

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            opened = self._outcome[1] if self._outcome is not None else None
        if opened is not None:   # it opened, but nobody took it
            self._client.close_session_async(opened.session_id)


class PendingRetrieval:
    """Handle of an in-flight Retrieve: ``result()`` blocks at most until the call's deadline."""

    __slots__ = ("_client", "_future", "root", "_tree", "key", "session_id")

    def __init__(self, client: "DatastoreClient", future, root: int, key=None, session_id: Optional[str] = None):
        self._client = client
        self._future = future
        self.root = root
        self._tree: Optional[DraftTree] = None if future is not None else DraftTree.empty(root)
        self.key = key
        self.session_id = session_id

    def done(self) -> bool:
        return self._tree is not None or self._future is None or self._future.done()

    def cancel(self) -> None:
        if self._future is not None and self._tree is None:
            self._future.cancel()

    def result(self) -> DraftTree:
        if self._tree is None:
            self._tree = self._client._finish(self._future, self.root, self.session_id)
        return self._tree


def channel_target(address: str) -> str:
    """gRPC's target for ``address``: ``HOST:PORT``, or replicas as ``IP:PORT,IP:PORT,...`` (balanced with gRPC's
    ``round_robin`` policy: each call goes to the next replica that is up, and a replica that goes down is
    left out until it answers again), or a target gRPC knows (``dns:///name:port``, whose addresses are
    balanced the same way)."""
    if "," not in address:
        return address
    parts = [p.strip() for p in address.split(",") if p.strip()]
    v6 = any(p.startswith("[") for p in parts)
    return ("ipv6:" if v6 else "ipv4:") + ",".join(parts)


class DatastoreClient:
    """``tls``: a TLS channel, trusting ``root_certificates`` (PEM; None: the system's roots); with
    ``certificate_chain`` and ``private_key`` (PEM) the client presents a certificate (mutual TLS, the
    server's ``--tls-client-ca``). ``datastore.tls.client_tls_options(ca, cert, key)`` reads these from files."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 0.005,
        tokenizer_fingerprint: Optional[str] = None,
        auth_token: Optional[str] = None,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        context_tail: int = 64,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 1.0,
        session_timeout_s: float = 1.0,
        channel_options: Sequence[tuple] = (),
        stream: bool = True,
    ):
        self.address = address
        self.stream = bool(stream)
        self.timeout_s = float(timeout_s)
        self.session_timeout_s = float(session_timeout_s)
        self.tokenizer_fingerprint = tokenizer_fingerprint or ""
        self.context_tail = int(context_tail)
        self.breaker_failures = int(breaker_failures)
        self.breaker_cooldown_s = float(breaker_cooldown_s)
        self.stats: Counter = Counter()
        self.last_error: Optional[str] = None
        self.last_index_id: Optional[str] = None
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        self._lookup_metadata = self._md(self.timeout_s)
        self._session_metadata = self._md(self.session_timeout_s)
        self._stream_metadata = (*(self._metadata or ()), CLOCK_METADATA)
        opts = [("grpc.enable_retries", 0), ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000), *channel_options]
        address = channel_target(address)
        if address.startswith(("ipv4:", "ipv6:", "dns:")):
            opts.append(("grpc.lb_policy_name", "round_robin"))
        if bool(certificate_chain) != bool(private_key):
            raise ValueError("a client certificate (mutual TLS) needs certificate_chain and private_key")
        if tls or certificate_chain:
            creds = channel_credentials(root_certificates, certificate_chain, private_key)
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        self._stub = pb_grpc.DatastoreStub(self._channel)
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self._open_until = 0.0
        self._probe_in_flight = False
        self._stream: Optional[_RetrieveStream] = None
        self.lost_sessions: set[str] = set()   # sessions a lookup was refused for (see _lost_session)

    # ------------------------------------------------------------------ circuit breaker
    @property
    def breaker_open(self) -> bool:
        return self._consecutive_failures >= self.breaker_failures and time.monotonic() < self._open_until

    def _allow(self) -> bool:
        if self._consecutive_failures < self.breaker_failures:
            return True
        with self._lock:
            if time.monotonic() < self._open_until or self._probe_in_flight:
                self.stats["skipped_breaker_open"] += 1
                return False
            self._probe_in_flight = True  # half-open: exactly one probe
            self.stats["breaker_probes"] += 1
            return True

    def _success(self) -> None:
        self._consecutive_failures = 0
        self._probe_in_flight = False

    def _failure(self, err: BaseException) -> None:
        code = err.code() if isinstance(err, grpc.RpcError) and hasattr(err, "code") else None
        name = code.name if code is not None else type(err).__name__
        self.stats["failures"] += 1
        self.stats[f"failure_{name}"] += 1
        self.last_error = f"{name}: {err.details() if hasattr(err, 'details') else err}"
        with self._lock:
            self._probe_in_flight = False
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.breaker_failures:
                if time.monotonic() >= self._open_until:
                    self.stats["breaker_opened"] += 1
                self._open_until = time.monotonic() + self.breaker_cooldown_s

    # ------------------------------------------------------------------ calls
    def info(self, timeout_s: Optional[float] = None, wait_for_ready: bool = False) -> Optional[ServerInfo]:
        try:
            t = timeout_s or self.session_timeout_s
            r = self._stub.Info(pb.InfoRequest(), timeout=t, metadata=self._md(t), wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            self._failure(e)
            return None
        self._success()
        self.last_index_id = r.index_id
        return ServerInfo(r.index_id, r.tokenizer_fingerprint, r.vocab_size, r.num_tokens, r.num_documents,
                          r.max_context, r.max_budget, r.max_batch, r.documents_available, r.manifest_json)

    def _session_request(self, prompt_ids, prompt_text, top_k: int, memory: bool, documents: bool):
        req = pb.OpenSessionRequest(prompt_text=prompt_text or "", top_k=top_k,
                                    tokenizer_fingerprint=self.tokenizer_fingerprint, memory=bool(memory),
                                    skip_documents=not documents)
        if prompt_ids is not None and (memory or not prompt_text):
            req.prompt_ids.extend(np.asarray(prompt_ids, dtype=np.int64).tolist())
        self.stats["open_session"] += 1
        return req

    def open_session(self, prompt_ids: Optional[Sequence[int]] = None, prompt_text: Optional[str] = None,
                     top_k: int = 0, *, memory: bool = False, documents: bool = True) -> Optional[Session]:
        """Open a session: the prompt's FAISS documents (``documents``) and/or a server-side memory of this
        request's tokens, seeded with ``prompt_ids`` (``memory``). None on any failure."""
        if not self._allow() or not (memory or documents):
            return None
        req = self._session_request(prompt_ids, prompt_text, top_k, memory, documents)
        try:
            r = self._stub.OpenSession(req, timeout=self.session_timeout_s, metadata=self._session_metadata)
        except grpc.RpcError as e:
            self._failure(e)
            return None
        self._success()
        return Session(r.session_id, np.asarray(r.document_ids, dtype=np.int64), r.ttl_s, r.index_id)

    def open_session_async(self, prompt_ids: Optional[Sequence[int]] = None, prompt_text: Optional[str] = None,
                           top_k: int = 0, *, memory: bool = False, documents: bool = True) -> PendingSession:
        """``open_session`` without waiting: the call runs up to ``session_timeout_s`` in the background
        (document search can take longer than a lookup deadline); ``PendingSession.poll`` says how it ended."""
        if not self._allow() or not (memory or documents):
            return PendingSession(self, None)
        req = self._session_request(prompt_ids, prompt_text, top_k, memory, documents)
        try:
            fut = self._stub.OpenSession.future(req, timeout=self.session_timeout_s, metadata=self._session_metadata)
        except Exception as e:  # noqa: BLE001 - e.g. a closed channel
            self._failure(e)
            return PendingSession(self, None)
        return PendingSession(self, fut)

    def close_session_async(self, session_id: Optional[str]):
        """Close a session without waiting for the answer (the server expires sessions it is not told to
        close); skipped while the breaker is open. Returns the call's future, or None when none was sent."""
        if not session_id or self.breaker_open:
            return None
        try:
            fut = self._stub.CloseSession.future(pb.CloseSessionRequest(session_id=session_id),
                                                 timeout=self.session_timeout_s, metadata=self._session_metadata)
        except Exception as e:  # noqa: BLE001 - e.g. a closed channel
            self._failure(e)
            return None
        self.stats["close_session"] += 1
        return fut

    def _lost_session(self, session_id: Optional[str], err: BaseException) -> None:
        """A lookup carrying ``session_id`` was refused: if for its session, note the session as lost."""
        code = err.code() if isinstance(err, grpc.RpcError) and callable(getattr(err, "code", None)) else None
        if session_id and code in _SESSION_LOST_CODES and session_id not in self.lost_sessions:
            if len(self.lost_sessions) > 4096:   # ids of sessions nobody asked about again
                self.lost_sessions.clear()
            self.lost_sessions.add(session_id)
            self.stats["sessions_lost"] += 1

    def close_session(self, session_id: Optional[str]) -> bool:
        if not session_id or self.breaker_open:
            return False
        try:
            r = self._stub.CloseSession(pb.CloseSessionRequest(session_id=session_id),
                                        timeout=self.session_timeout_s, metadata=self._session_metadata)
        except grpc.RpcError as e:
            self._failure(e)
            return False
        self._success()
        return bool(r.closed)

    def _request(self, context, budget: int, session_id: Optional[str], hint) -> tuple[int, "pb.RetrieveRequest"]:
        full = np.asarray(context).reshape(-1)
        ctx = full[-self.context_tail:]
        root = int(ctx[-1])
        # context_end lets a memory session append exactly the tokens it has not seen yet
        req = pb.RetrieveRequest(context=ctx.astype(np.int32).tolist(), budget=int(budget),
                                 session_id=session_id or "", tokenizer_fingerprint=self.tokenizer_fingerprint,
                                 context_end=len(full))
        if hint is not None:
            ht, hp = hint
            req.hint_tokens.extend(np.asarray(ht, dtype=np.int32).tolist())
            req.hint_probs.extend(np.asarray(hp, dtype=np.float32).tolist())
        return root, req

    def _md(self, timeout_s: float) -> tuple:
        """A unary call's metadata: the token, and the timeout it is made with, which lets the server tell
        how long the call waited in its queue (datastore/call_wait.py)."""
        return (*(self._metadata or ()), timeout_metadata(timeout_s))

    def _send(self, req):
        """Start one lookup: on the RetrieveStream (opened or replaced as needed), else a unary future."""
        if self.stream:
            for _ in range(2):   # a stream found ended is replaced once
                s = self._stream
                if s is not None and s.ended and _unimplemented(s.error):
                    self._no_stream()   # refused before it carried a lookup
                    break
                if s is None or s.ended:
                    with self._lock:
                        if self._stream is s:
                            self._stream = _RetrieveStream(self._stub, self._stream_metadata)
                            self.stats["streams_opened"] += 1
                        s = self._stream
                lookup = s.send(req, time.monotonic() + self.timeout_s)
                if lookup is not None:
                    return lookup
        return self._stub.Retrieve.future(req, timeout=self.timeout_s, metadata=self._lookup_metadata)

    def _no_stream(self) -> None:
        """The server has no RetrieveStream (an older version): unary Retrieve from now on."""
        if self.stream:
            self.stream = False
            self.stats["stream_unsupported"] += 1

    def retrieve_async(self, context, budget: int, session_id: Optional[str] = None,
                       hint: Optional[tuple] = None, key=None) -> PendingRetrieval:
        """Issue a Retrieve without waiting; ``.result()`` gives the DraftTree (empty on any failure)."""
        root = int(np.asarray(context).reshape(-1)[-1])
        self.stats["requests"] += 1
        if budget <= 0 or not self._allow():
            return PendingRetrieval(self, None, root, key)
        try:
            root, req = self._request(context, budget, session_id, hint)
            fut = self._send(req)
            if self.stream:
                # let gRPC's request thread take the GIL and send now, not when this thread next blocks
                time.sleep(0)
        except Exception as e:  # noqa: BLE001 - e.g. a closed channel
            self._failure(e)
            return PendingRetrieval(self, None, root, key)
        return PendingRetrieval(self, fut, root, key, session_id)

    def _finish(self, fut, root: int, session_id: Optional[str] = None) -> DraftTree:
        try:
            resp = fut.result()
        except grpc.FutureCancelledError:
            self.stats["cancelled"] += 1
            return DraftTree.empty(root)
        except Exception as e:  # noqa: BLE001 - grpc.RpcError, or anything else: no draft this step
            if self.stream and isinstance(fut, _StreamLookup) and _unimplemented(e):
                self._no_stream()
            self._lost_session(session_id, e)
            self._failure(e)
            return DraftTree.empty(root)
        return self._convert(resp, root)

    def _convert(self, resp, root: int) -> DraftTree:
        self._success()
        self.last_index_id = resp.index_id
        try:
            tree = tree_from_response(root, resp)
        except Exception as e:  # noqa: BLE001 - malformed answer
            self._failure(e)
            return DraftTree.empty(root)
        self.stats["hits" if len(tree) > 1 else "misses"] += 1
        return tree

    def retrieve(self, context, budget: int, session_id: Optional[str] = None,
                 hint: Optional[tuple] = None) -> DraftTree:
        """Blocking lookup (at most ``timeout_s``).

        ``context``: the request's whole token sequence so far (int [L]); only its last ``context_tail``
        tokens travel, with L as ``context_end`` so that a memory session stays in step."""
        root = int(np.asarray(context).reshape(-1)[-1])
        self.stats["requests"] += 1
        if budget <= 0 or not self._allow():
            return DraftTree.empty(root)
        try:
            root, req = self._request(context, budget, session_id, hint)
            if self.stream:
                return self._finish(self._send(req), root, session_id)
            # the plain unary call path is ~0.1 ms cheaper than a unary future
            resp = self._stub.Retrieve(req, timeout=self.timeout_s, metadata=self._lookup_metadata)
        except Exception as e:  # noqa: BLE001 - grpc.RpcError or a closed channel: no draft this step
            self._lost_session(session_id, e)
            self._failure(e)
            return DraftTree.empty(root)
        return self._convert(resp, root)

    def retrieve_batch(self, contexts: Sequence, budget: int,
                       session_id: Optional[str] | Sequence[Optional[str]] = None) -> list[DraftTree]:
        """One RetrieveBatch call for several contexts (e.g. every running request of an engine step).

        ``session_id``: one session for all contexts, or one per context (None = no session)."""
        roots = [int(np.asarray(c).reshape(-1)[-1]) for c in contexts]
        self.stats["requests"] += len(contexts)
        if not contexts or budget <= 0 or not self._allow():
            return [DraftTree.empty(r) for r in roots]
        sessions = [session_id] * len(contexts) if session_id is None or isinstance(session_id, str) \
            else list(session_id)
        try:
            batch = pb.RetrieveBatchRequest(requests=[self._request(c, budget, s, None)[1]
                                                      for c, s in zip(contexts, sessions)])
            t = self.timeout_s * max(1, len(contexts) ** 0.5)
            resp = self._stub.RetrieveBatch(batch, timeout=t, metadata=self._md(t))
        except Exception as e:  # noqa: BLE001
            for s in set(sessions):   # one unknown session refuses the whole batch: which one is not said
                self._lost_session(s, e)
            self._failure(e)
            return [DraftTree.empty(r) for r in roots]
        self._success()
        return [tree_from_response(r, x) for r, x in zip(roots, resp.responses)]

    def push_stats(self, batch: "pb.PushStatsRequest", timeout_s: float = 2.0) -> tuple[bool, int]:
        """Push one batch of observations (client/shared_stats.py builds them): (applied, version); False
        when the server had applied this batch_id before. Raises grpc.RpcError (the caller retries with
        the same batch_id); pushes do not count toward the lookups' circuit breaker."""
        if self.tokenizer_fingerprint and not batch.tokenizer_fingerprint:
            batch.tokenizer_fingerprint = self.tokenizer_fingerprint
        r = self._stub.PushStats(batch, timeout=timeout_s, metadata=self._md(timeout_s))
        return r.applied, r.version

    def pull_stats(self, since_version: int = 0, max_rows: int = 0, timeout_s: float = 5.0):
        """One page of the shared order-1 rows changed after ``since_version``: (rows [(token, next tokens,
        probs)], version to ask from next, more). Raises grpc.RpcError."""
        r = self._stub.PullStats(pb.PullStatsRequest(since_version=since_version, max_rows=max_rows,
                                                     tokenizer_fingerprint=self.tokenizer_fingerprint),
                                 timeout=timeout_s, metadata=self._md(timeout_s))
        return [(x.token, list(x.next_tokens), list(x.probs)) for x in r.rows], r.version, r.more

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._channel.close()

    def __enter__(self) -> "DatastoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
