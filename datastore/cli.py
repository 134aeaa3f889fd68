"""datastore-serve: serve a built index over gRPC.

    datastore-serve --index /data/index --port 50051 --metrics-port 9100 --reload
    datastore-serve --index /data/index --port 50051 --workers auto     # one server process per CPU

With ``--workers N`` (N > 1) this process becomes a supervisor of N server processes sharing the port
(datastore/workers.py).

Exit status (datastore/cli_common.py): 0 after a SIGTERM drain, 130 after a SIGINT (Ctrl-C) drain, 2 for bad
options or an index that cannot be loaded at start, 1 for an internal error (one line naming the traceback file).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .workers import Worker

from .cli_common import EXIT_INTERRUPTED, EXIT_OK, CliParser, UsageError, run_cli
from .logs import setup_logging

# recent shared outputs (datastore/output_shards.py): compact past 256K online tokens, merged into shards of
# up to 4M tokens; keep 64M compacted tokens (~16 shards, a few hundred MB in all)
OUTPUTS_COMPACT_TOKENS = 1 << 18
OUTPUTS_MAX_COMPACTED_TOKENS = 1 << 26

log = logging.getLogger("datastore.cli")


def build_parser() -> argparse.ArgumentParser:
    from .server import ServerOptions
    from .servicer import ServiceConfig

    C, S = ServiceConfig(), ServerOptions()   # the defaults live in the config dataclasses
    ap = CliParser(prog="datastore-serve", description="Serve a retrieval index over gRPC.")
    ap.add_argument("--index", required=True, help="index folder (or a symlink to the current snapshot)")
    g = ap.add_argument_group("network")
    g.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port; default 50051)")
    g.add_argument("--port-file", default=None,
                   help="write the bound gRPC port here once listening (with --workers N > 1: once every worker "
                        "listens with its index loaded)")
    g.add_argument("--workers", default="1", metavar="N|auto",
                   help="server processes sharing the port via SO_REUSEPORT (default 1: one process, no "
                        "SO_REUSEPORT). 0 or 'auto' = one per CPU. The kernel spreads connections, not calls: "
                        "all calls of one gRPC channel reach one worker, so sessions work per channel. "
                        "Each worker maps the index itself; --metrics-port P serves worker i on P+i")
    g.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (off by default; with --workers N: worker i on port+i, or each "
                        "on a free port with 0)")
    g.add_argument("--metrics-host", default=S.metrics_host)
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS with --tls-key)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--tls-client-ca", default=None,
                   help="PEM CA certificate(s): require every client to present a certificate signed by it "
                        "(mutual TLS; needs --tls-cert/--tls-key)")
    g = ap.add_argument_group("auth")
    g.add_argument("--auth-token", default=None,
                   help="bearer token required for writes (OpenSession, CloseSession); default: $DATASTORE_AUTH_TOKEN")
    g.add_argument("--auth-token-file", default=None, help="read the bearer token from this file")
    g.add_argument("--auth-reads", action="store_true", help="also require the token for Info/Retrieve/RetrieveBatch")
    g = ap.add_argument_group("limits")
    g.add_argument("--max-context", type=int, default=C.max_context, help=f"max context ids per Retrieve (default {C.max_context})")
    g.add_argument("--max-budget", type=int, default=C.max_budget, help=f"max draft nodes per Retrieve (default {C.max_budget})")
    g.add_argument("--max-batch", type=int, default=C.max_batch, help=f"max requests per RetrieveBatch (default {C.max_batch})")
    g.add_argument("--max-concurrency", type=int, default=C.max_concurrency,
                   help="RPCs handled at once; beyond it RESOURCE_EXHAUSTED (default 64)")
    g.add_argument("--max-queue-wait", type=float, default=C.max_queue_wait_s,
                   help="seconds a call (a RetrieveStream message) may wait in gRPC's queue before it is served; "
                        "one that waited longer gets RESOURCE_EXHAUSTED. Known when the client sends its timeout "
                        "as 'specstore-timeout-ms' metadata (unary calls) or its clock in each stream message "
                        "(sent_us), as this project's clients do (default %(default)s)")
    g.add_argument("--max-lookup-cells", type=int, default=C.max_lookup_cells,
                   help="max max_matches x depth of one lookup, its work (default %(default)s)")
    g.add_argument("--max-hint", type=int, default=C.max_hint,
                   help="max entries of a Retrieve's draft hint (default %(default)s)")
    g.add_argument("--lookup-workers", type=int, default=C.lookup_workers,
                   help="threads for lookups of more than --inline-cells cells (a batch: in sum), so that they "
                        "do not stall the event loop (default %(default)s)")
    g.add_argument("--inline-cells", type=int, default=C.inline_cells,
                   help="lookups of at most this many cells (a batch: in sum) run on the event loop, larger ones "
                        "in the lookup threads; for a second after a call is seen waiting over a quarter of "
                        "--max-queue-wait, at most 512 (default %(default)s)")
    g.add_argument("--session-ttl", type=float, default=C.session_ttl_s,
                   help=f"idle session lifetime in seconds (default {C.session_ttl_s:g})")
    g.add_argument("--max-sessions", type=int, default=C.max_sessions,
                   help=f"open sessions kept (LRU beyond; default {C.max_sessions})")
    g.add_argument("--max-sessions-per-client", type=int, default=C.max_sessions_per_client,
                   help="open sessions of one client address; beyond it OpenSession answers RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    g.add_argument("--top-k", type=int, default=C.default_top_k,
                   help=f"documents per session by default (default {C.default_top_k})")
    g = ap.add_argument_group("retrieval defaults (clients may override per request)")
    g.add_argument("--max-span", type=int, default=None)
    g.add_argument("--min-span", type=int, default=None)
    g.add_argument("--max-matches", type=int, default=None)
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--min-prob", type=float, default=None)
    g = ap.add_argument_group("index lifecycle")
    g.add_argument("--no-faiss", action="store_true", help="don't load FAISS (no document sessions)")
    g.add_argument("--shard-group", default=None, metavar="I/N",
                   help="serve only the index's shards at positions p with p %% N == I: N processes (or machines) "
                        "serve one index together; clients list them separated by ';' (--datastore 'A;B') and fan "
                        "each lookup out to all, fusing the trees")
    g.add_argument("--tokenizer", default=None,
                   help="model spec whose tokenizer decodes OpenSession.prompt_ids (optional)")
    g.add_argument("--reload", action="store_true",
                   help="watch the index path (symlink target / manifest.json) and swap to new snapshots; "
                        "SIGHUP reloads at once")
    g.add_argument("--reload-interval", type=float, default=S.reload_interval_s,
                   help=f"seconds between checks (default {S.reload_interval_s:g})")
    g.add_argument("--shutdown-grace", type=float, default=S.shutdown_grace_s,
                   help="seconds in-flight RPCs get to finish on SIGTERM (default 10)")
    g.add_argument("--drain-delay", type=float, default=S.drain_delay_s,
                   help="seconds to report NOT_SERVING before refusing new RPCs on SIGTERM (default 0)")
    g = ap.add_argument_group("shared statistics (what decoders push with PushStats; issue 11)")
    g.add_argument("--stats-dir", default=None,
                   help="keep the fleet's shared next-token statistics here (write-ahead log + snapshots): enables "
                        "PushStats/PullStats, and Retrieve fuses them with the corpus. An acknowledged push "
                        "survives kill -9. Off by default; one process only (not with --workers N > 1)")
    g.add_argument("--stats-redis", default=None, metavar="URL",
                   help="keep them in Redis instead (redis://HOST:PORT/DB), shared by every replica started with the "
                        "same URL (and by --workers N processes): a push through one replica is served by all. As "
                        "durable as Redis is configured (appendonly yes, appendfsync always)")
    g.add_argument("--stats-half-life", type=float, default=86_400.0,
                   help="seconds after which a statistic weighs half (default 86400: follow a day's traffic)")
    g.add_argument("--stats-max-rows", type=int, default=1_000_000,
                   help="rows kept (least recently updated go first; default 1,000,000, ~0.3-0.5 GB)")
    g.add_argument("--stats-snapshot-every", type=int, default=10_000,
                   help="snapshot after this many pushes, which bounds the log replayed at start (default 10000)")
    g.add_argument("--outputs-compact-tokens", type=int, default=OUTPUTS_COMPACT_TOKENS, metavar="N",
                   help="with --stats-dir: when the recent shared outputs held online exceed this many tokens, the "
                        "oldest are compacted, in the background, into a suffix-array shard in <stats-dir>/outputs/ "
                        f"that lookups search too (default {OUTPUTS_COMPACT_TOKENS}; below the online bound of "
                        "1,000,000). With --stats-redis the outputs stay online only")
    g.add_argument("--outputs-max-compacted-tokens", type=int, default=OUTPUTS_MAX_COMPACTED_TOKENS, metavar="N",
                   help="with --stats-dir: tokens kept in compacted output shards; past it the oldest shards are "
                        f"deleted (default {OUTPUTS_MAX_COMPACTED_TOKENS:,}; at least --outputs-compact-tokens)")
    g = ap.add_argument_group("logging")
    g.add_argument("--log-level", default="info")
    g.add_argument("--log-format", choices=("json", "text"), default="json")
    return ap


def _config_from_args(a):
    from .servicer import ServiceConfig

    token = a.auth_token
    if a.auth_token_file:
        token = Path(a.auth_token_file).read_text().strip()
    if token is None:
        token = os.environ.get("DATASTORE_AUTH_TOKEN") or None
    if a.tls_client_ca and not (a.tls_cert and a.tls_key):
        raise UsageError("--tls-client-ca needs TLS (--tls-cert and --tls-key)")
    if a.auth_reads and not token:
        raise UsageError("--auth-reads needs a token (--auth-token, --auth-token-file or $DATASTORE_AUTH_TOKEN)")
    defaults = {k: getattr(a, k) for k in ("max_span", "min_span", "max_matches", "depth", "min_prob")
                if getattr(a, k) is not None}
    config = ServiceConfig(
        max_context=a.max_context, max_budget=a.max_budget, max_batch=a.max_batch,
        max_concurrency=a.max_concurrency, max_queue_wait_s=a.max_queue_wait, auth_token=token,
        auth_reads=a.auth_reads,
        session_ttl_s=a.session_ttl, max_sessions=a.max_sessions, max_sessions_per_client=a.max_sessions_per_client,
        default_top_k=a.top_k,
        retrieve_defaults=defaults, max_lookup_cells=a.max_lookup_cells, max_hint=a.max_hint,
        lookup_workers=a.lookup_workers, inline_cells=a.inline_cells,
    )
    try:
        config.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return config


async def _serve(a, worker: Optional["Worker"] = None) -> int:
    """Serve until SIGTERM/SIGINT. ``worker``: this is one process of ``--workers N`` (datastore/workers.py),
    which loads its index before it listens, shares the port (SO_REUSEPORT) and reports to the supervisor."""
    from .server import DatastoreServer, ServerOptions, default_opener

    config = _config_from_args(a)
    opts = ServerOptions(
        host=a.host, port=a.port if worker is None else worker.port, reflection=a.reflection,
        metrics_port=a.metrics_port if worker is None else worker.metrics_port, metrics_host=a.metrics_host,
        tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca, reload=a.reload,
        reload_interval_s=a.reload_interval,
        shutdown_grace_s=a.shutdown_grace, drain_delay_s=a.drain_delay,
        reuse_port=worker is not None, worker_id=None if worker is None else worker.id,
    )
    tokenizer = None
    if a.tokenizer:
        from .model_files import load_tokenizer

        tokenizer = load_tokenizer(a.tokenizer)
    stats = None
    if a.stats_dir or a.stats_redis:
        from .ngram_stats import NgramStats

        table = NgramStats(half_life_s=a.stats_half_life, max_rows=a.stats_max_rows)
        if a.stats_dir and a.outputs_compact_tokens >= table.outputs.max_tokens:
            # the online store would evict its oldest outputs before they were ever compacted
            raise UsageError(f"--outputs-compact-tokens must be below the online outputs' bound "
                             f"({table.outputs.max_tokens} tokens)")
        if a.stats_redis:
            from .stats_redis import RedisStats

            stats = RedisStats(a.stats_redis, stats=table, snapshot_every=a.stats_snapshot_every).open()
        else:
            from .stats_log import StatsLog

            stats = StatsLog(a.stats_dir, stats=table, snapshot_every=a.stats_snapshot_every,
                             outputs_compact_tokens=a.outputs_compact_tokens,
                             outputs_max_compacted_tokens=a.outputs_max_compacted_tokens).open()
    server = DatastoreServer(a.index, config, opts,
                             opener=default_opener(load_faiss=not a.no_faiss, shard_group=_shard_group(a.shard_group)),
                             tokenizer=tokenizer, stats=stats)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    status = EXIT_OK

    def interrupt():
        # Ctrl-C drains like SIGTERM but exits EXIT_INTERRUPTED (a worker leaves that to its supervisor)
        nonlocal status
        status = EXIT_INTERRUPTED
        stop.set()

    def handle_signals():
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set if worker is not None else interrupt)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload(force=True)))

    if worker is not None:
        # A worker loads first and only then listens: the kernel hands connections to listening sockets
        # only, so no client of the shared port ever reaches a worker without an index. Until it listens
        # the signals keep their default action (SIGTERM ends it at once; there is nothing to drain yet).
        try:
            await server.load()
        except Exception as e:  # noqa: BLE001
            log.error("cannot load the index", extra={"path": a.index, "error": f"{type(e).__name__}: {e}"})
            server.servicer.close()
            return 2
        await server.start(load=False)
        handle_signals()
        worker.ready(server.metrics_port)
        await stop.wait()
        log.info("signal received, shutting down")
        await server.stop()
        return 0
    handle_signals()
    port = await server.start(load=False)
    if a.port_file:
        from .durable import write_text

        write_text(a.port_file, f"{port}\n")
    try:
        await server.load()
    except Exception as e:  # noqa: BLE001
        log.error("cannot load the index", extra={"path": a.index, "error": f"{type(e).__name__}: {e}"})
        await server.stop(grace=0)
        return 2
    await stop.wait()
    log.info("signal received, shutting down")
    await server.stop()
    return status


def _shard_group(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard-group {value!r}: expected I/N, e.g. 0/2") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard-group {value!r}: need 0 <= I < N")
    return i, n


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_cli("datastore-serve", lambda: _main(a))


def _main(a) -> int:
    setup_logging(a.log_level, a.log_format == "json")
    if a.metrics_port is not None and a.metrics_port < 0:
        raise UsageError("--metrics-port must be >= 0")
    from .workers import parse_workers

    try:
        workers = parse_workers(a.workers)
    except ValueError as e:
        raise UsageError(f"--workers: {e}") from None
    _shard_group(a.shard_group)      # a bad value fails here, before any worker starts
    if a.stats_dir and a.stats_redis:
        raise UsageError("give --stats-dir (one process) or --stats-redis (replicas), not both")
    if (a.stats_dir or a.stats_redis) and (a.stats_half_life <= 0 or a.stats_max_rows < 1 or a.stats_snapshot_every < 1):
        raise UsageError("--stats-half-life, --stats-max-rows and --stats-snapshot-every must be positive")
    if a.stats_dir and a.outputs_compact_tokens < 1:
        raise UsageError("--outputs-compact-tokens must be positive")
    if a.stats_dir and a.outputs_max_compacted_tokens < a.outputs_compact_tokens:
        raise UsageError("--outputs-max-compacted-tokens must be at least --outputs-compact-tokens")
    if a.stats_redis:
        try:
            import redis  # noqa: F401
        except ImportError:
            raise UsageError("--stats-redis needs the redis package: pip install 'specstore[shared]'") from None
    if workers == 1:
        return asyncio.run(_serve(a))
    if a.stats_dir:
        raise UsageError("--stats-dir needs one server process: the statistics have one writer "
                         "(drop --workers, or keep them in Redis: --stats-redis)")
    if a.metrics_port and a.metrics_port + workers - 1 > 65535:
        raise UsageError(f"--metrics-port {a.metrics_port} + {workers} workers exceeds 65535")
    _config_from_args(a)  # bad auth settings fail here once, not in every worker
    from .workers import WorkerOptions, run_workers

    opts = WorkerOptions(host=a.host, port=a.port, port_file=a.port_file, metrics_port=a.metrics_port,
                         drain_delay_s=a.drain_delay, shutdown_grace_s=a.shutdown_grace)
    return run_workers(opts, workers, functools.partial(_serve, a))


if __name__ == "__main__":
    sys.exit(main())
