"""Prometheus metrics of the datastore service, on their own registry, served on a side port."""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0
)
_TREE_BUCKETS = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_METHODS = ("Info", "OpenSession", "CloseSession", "Retrieve", "RetrieveBatch", "RetrieveStream", "PushStats",
            "PullStats")


class Metrics:
    """All metrics of one server. Children with fixed labels are resolved once (cheap per request)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "datastore_request_seconds", "Server-side handling time per RPC", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter("datastore_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.lookups = Counter(
            "datastore_lookups", "Retrieval lookups by outcome: hit (non-empty tree) or miss", ["outcome"], registry=r
        )
        self.nodes = Counter("datastore_nodes", "Draft nodes returned, by source bit", ["source"], registry=r)
        self.tree_size = Histogram(
            "datastore_tree_nodes", "Draft nodes per returned tree", buckets=_TREE_BUCKETS, registry=r
        )
        # read from the servicer's counter when scraped (DatastoreServicer sets its function)
        self.in_flight = Gauge("datastore_in_flight", "RPCs being handled", registry=r)
        self.sessions = Gauge("datastore_sessions", "Open document sessions", registry=r)
        self.streams = Gauge("datastore_streams", "Open RetrieveStream streams", registry=r)
        self.stats_pushes = Counter("datastore_stats_pushes", "PushStats batches: applied, or a duplicate (a retry)",
                                    ["outcome"], registry=r)
        self.stats_rows = Gauge("datastore_stats_rows", "Rows of the shared statistics", registry=r)
        self.loop_behind = Counter("datastore_loop_behind", "Calls and stream messages that waited over a quarter "
                                   "of --max-queue-wait before being served (each keeps wide lookups off the "
                                   "event loop for a second)", registry=r)
        self.reloads = Counter("datastore_reloads", "Index reloads by outcome", ["outcome"], registry=r)
        self.index_info = Info("datastore_index", "The index being served", registry=r)
        self.latency_by_method = {m: self.latency.labels(m) for m in _METHODS}
        self.hit = self.lookups.labels("hit")
        self.miss = self.lookups.labels("miss")
        self.nodes_datastore = self.nodes.labels("datastore")
        self.nodes_documents = self.nodes.labels("documents")
        self.nodes_memory = self.nodes.labels("memory")
        self.nodes_stats = self.nodes.labels("stats")
        self.ok_by_method = {m: self.requests.labels(m, "OK") for m in _METHODS}

    def error(self, method: str, code_name: str) -> None:
        self.requests.labels(method, code_name).inc()

    def set_index(self, index_id: str, fingerprint: str, num_tokens: int) -> None:
        self.index_info.info({"index_id": index_id, "tokenizer_fingerprint": fingerprint, "num_tokens": str(num_tokens)})

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_port, server
