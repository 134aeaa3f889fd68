"""The datastore gRPC server: index lifecycle (load, reload), health, reflection, metrics, shutdown.

``DatastoreServer`` is used by ``datastore-serve`` (datastore/cli.py) and directly by the tests.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from ..protos import datastore_pb2

from .metrics import Metrics
from .servicer import DatastoreServicer, ServiceConfig
from .tls import server_credentials
from .wire import add_health_to_server, add_to_server

log = logging.getLogger("datastore.server")

SERVICE_NAME = datastore_pb2.DESCRIPTOR.services_by_name["Datastore"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def default_opener(load_faiss: bool = True, shard_group: Optional[tuple[int, int]] = None) -> Callable[[str], Any]:
    def _open(path: str):
        from .index import DatastoreIndex  # deferred: tests may serve a stand-in index
        from .index_format import readable_index_dir

        real = readable_index_dir(path)
        if str(real) != str(path):
            log.warning("no index at the path: an index-build died inside its publish step; serving the old copy "
                        "it left until the next index-build restores or replaces it", extra={"path": str(real)})
        return DatastoreIndex.open(real, load_faiss=load_faiss, shard_group=shard_group)

    return _open


def _warm(index: Any) -> None:
    """Load lazily-initialised parts before the index takes traffic: the lookup's compiled code (one
    throw-away lookup) and the query embedder, so that the first Retrieve / OpenSession doesn't pay
    compilation or seconds of model loading inside a client's deadline."""
    try:
        ctx = np.zeros(2, dtype=np.int32)
        index.retrieve(ctx, 1)
        index.retrieve(ctx, 1, memory=ctx)   # memory sessions take their own compiled variant (int32 memory)
    except Exception:  # noqa: BLE001 - a broken lookup surfaces on Retrieve, with its error
        log.exception("warming the lookup failed")
    if getattr(index, "has_faiss", False):
        try:
            index.search_documents("warm-up", 1)
        except Exception:  # noqa: BLE001 - a broken embedder surfaces on OpenSession, with its error
            log.exception("warming the document search failed")


def index_signature(path: str) -> tuple:
    """What changes when a new snapshot is published at ``path`` (symlink swap or manifest rewrite)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(os.path.join(real, "manifest.json"))
        return (real, st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return (real, None, None, None)


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    reflection: bool = False
    metrics_port: Optional[int] = None     # None: no metrics endpoint; 0: any free port
    metrics_host: str = "0.0.0.0"
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None    # PEM CA: clients must present a certificate it signed (mutual TLS)
    reload: bool = False
    reload_interval_s: float = 2.0
    retire_after_s: float = 10.0           # close a replaced index this long after the swap
    shutdown_grace_s: float = 10.0         # in-flight RPCs get this long to finish on SIGTERM
    drain_delay_s: float = 0.0             # NOT_SERVING this long before refusing new RPCs
    reuse_port: bool = False               # SO_REUSEPORT: worker processes share the port (--workers N)
    worker_id: Optional[int] = None        # this process's number under --workers N (None: single process)


class DatastoreServer:
    def __init__(self, index_path: str, config: Optional[ServiceConfig] = None, options: Optional[ServerOptions] = None,
                 *, opener: Optional[Callable[[str], Any]] = None, tokenizer: Any = None, stats: Any = None):
        self.index_path = str(index_path)
        self.options = options or ServerOptions()
        self.metrics = Metrics()
        self.servicer = DatastoreServicer(None, config or ServiceConfig(), self.metrics, tokenizer=tokenizer,
                                          worker_id=self.options.worker_id, stats=stats)
        self.health = health.aio.HealthServicer()
        self._opener = opener or default_opener()
        self._signature: Optional[tuple] = None
        self._server: Optional[grpc.aio.Server] = None
        self._reload_task: Optional[asyncio.Task] = None
        self._reload_lock = asyncio.Lock()
        self._draining = False
        self._metrics_http = None
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, load: bool = True) -> int:
        """Bind and start serving (health NOT_SERVING), then load the index (health SERVING).

        A server whose index was loaded before ``start`` (``load()`` first, as each ``--workers`` process
        does) reports SERVING from its first RPC. SO_REUSEPORT stays off unless ``options.reuse_port``, so
        that a single server on a taken port fails to bind instead of silently sharing it.
        """
        o = self.options
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if o.reuse_port else 0),
                                          ("grpc.max_receive_message_length", 8 << 20)])
        add_to_server(self.servicer, server)   # the generated registration, with request parsing that never raises
        # tolerant parsing too: load balancers and scanners reach the health service without a token
        add_health_to_server(self.health, server, self.servicer.log_undecodable)
        if o.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                server,
            )
        addr = f"{o.host}:{o.port}"
        creds = server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca)
        if creds is not None:
            self.port = server.add_secure_port(addr, creds)
        else:
            self.port = server.add_insecure_port(addr)
        if not self.port:
            raise OSError(f"could not bind {addr}")
        loaded = self.servicer.index is not None and not self._draining
        await self._set_health(SERVING if loaded else NOT_SERVING)
        await server.start()
        self._server = server
        if o.metrics_port is not None:
            self.metrics_port, self._metrics_http = self.metrics.serve(o.metrics_port, o.metrics_host)
        log.info("listening", extra={"port": self.port, "metrics_port": self.metrics_port, "tls": bool(o.tls_cert),
                                     "client_certificates": bool(o.tls_client_ca),
                                     "reflection": o.reflection, "reuse_port": o.reuse_port})
        if load:
            await self.load()
        return self.port

    async def load(self) -> None:
        """Load the index (in a thread: opening mmaps/FAISS may take a while) and start serving."""
        sig = index_signature(self.index_path)
        index = await asyncio.to_thread(self._opener, self.index_path)
        await asyncio.to_thread(_warm, index)
        self._signature = sig
        self.servicer.swap_index(index)
        log.info("index loaded", extra={"index_id": index.index_id, "path": self.index_path,
                                        "num_tokens": index.num_tokens, "vocab_size": index.vocab_size})
        if not self._draining:
            await self._set_health(SERVING)
        if self.options.reload and self._reload_task is None:
            self._reload_task = asyncio.create_task(self._watch())

    async def reload(self, *, force: bool = False) -> bool:
        """Swap to the snapshot now published at the index path, if it changed (or ``force``).

        The new index is opened in a thread while the old one keeps serving; the swap itself is one
        reference assignment. The old index is closed ``retire_after_s`` later. A snapshot that fails to
        open is logged and the old one keeps serving.
        """
        async with self._reload_lock:
            sig = index_signature(self.index_path)
            if not force and sig == self._signature:
                return False
            try:
                index = await asyncio.to_thread(self._opener, self.index_path)
                await asyncio.to_thread(_warm, index)
            except Exception as e:  # noqa: BLE001
                self.metrics.reloads.labels("failed").inc()
                log.error("reload failed; keeping the current index", extra={"error": f"{type(e).__name__}: {e}"})
                self._signature = sig  # don't retry the same broken snapshot every interval
                return False
            self._signature = sig
            old = self.servicer.swap_index(index)
            self.metrics.reloads.labels("ok").inc()
            log.info("index reloaded", extra={"index_id": index.index_id,
                                              "previous_index_id": getattr(old, "index_id", None)})
            if old is not None and old is not index:
                asyncio.get_running_loop().call_later(self.options.retire_after_s, _close_quietly, old)
            return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.reload_interval_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001
                log.exception("reload watcher error")

    async def stop(self, grace: Optional[float] = None) -> None:
        """Drain: health NOT_SERVING, wait drain_delay_s, refuse new RPCs, let in-flight ones finish."""
        if self._server is None:
            return
        self._draining = True
        await self._set_health(NOT_SERVING)
        log.info("draining", extra={"grace_s": self.options.shutdown_grace_s})
        if self.options.drain_delay_s > 0:
            await asyncio.sleep(self.options.drain_delay_s)
        if self._reload_task is not None:
            self._reload_task.cancel()
        ended = self.servicer.end_streams()   # else an idle stream would hold shutdown for the whole grace
        if ended:
            log.info("ended retrieve streams", extra={"streams": ended})
        await self._server.stop(self.options.shutdown_grace_s if grace is None else grace)
        self._server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http = None
        self.servicer.close()
        index = self.servicer.index
        if index is not None:
            _close_quietly(index)
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)


def _close_quietly(index: Any) -> None:
    try:
        index.close()
    except Exception:  # noqa: BLE001
        log.exception("closing a retired index failed")
