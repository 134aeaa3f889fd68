"""``datastore-serve --workers N``: N server processes on one port, supervised by the parent process.

One Python server process is bound to one core by the GIL (about 0.5 ms of every call is Python gRPC
itself), so throughput grows with processes, not threads. The parent:

- reserves the port (``--port 0``: picks one) and fails at once if another socket is bound to it, so a
  port clash fails loudly even though the workers bind with SO_REUSEPORT;
- forks N workers; each loads the index itself (memory maps: the page cache is shared, not copied), only
  then binds the port with SO_REUSEPORT, and reports ready. The kernel hands each new *connection* to one
  of the listening workers; a gRPC channel keeps one HTTP/2 connection, so all calls of a channel reach
  the same worker (sessions work per channel; see docs/datastore.md);
- writes ``--port-file`` once every worker is ready;
- forwards SIGTERM/SIGINT (each worker drains as a single server does; exit status 130 after SIGINT) and
  SIGHUP (reload);
- if a worker dies unexpectedly, stops the others (graceful drain) and exits non-zero (2 if the worker
  could not load the index, else 1). It does not restart workers: a crash loop stays visible to the
  orchestrator (compose/k8s restart the whole service and watch its health) instead of a server that
  quietly runs on fewer workers or keeps restarting one that fails on every start;
- leaves no orphans: workers get SIGTERM if the parent dies (``PR_SET_PDEATHSIG``), and any worker still
  alive ``drain_delay + shutdown_grace + 10`` s after the stop signal is killed.

Workers are forked (not spawned) so that they start in milliseconds from the parent's imported modules;
the parent creates no gRPC object before forking. Worker i serves metrics on ``--metrics-port + i`` (each
worker has its own counters; ``--metrics-port 0``: each on a free port, logged with ``"worker": i``).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Awaitable, Callable, Optional

from .cli_common import EXIT_INTERRUPTED

log = logging.getLogger("datastore.workers")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STOP = (signal.SIGTERM, signal.SIGINT)


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_workers(value) -> int:
    """``--workers``: a count >= 1, or 0 / 'auto' = the CPUs this process may run on."""
    v = str(value).strip().lower()
    if v == "auto":
        return cpu_count()
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"expected a number or 'auto', got {value!r}") from None
    if n < 0:
        raise ValueError(f"must be >= 0 (0 = auto), got {n}")
    return n or cpu_count()


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` (port 0: a free one) and return a socket that holds it for the workers.

    First a plain bind (SO_REUSEADDR only, which on Linux passes over TIME_WAIT leftovers but not over a
    bound or listening socket) proves that nobody else holds the port; then the port is re-bound with
    SO_REUSEPORT and kept, unlistened (it takes no connections), until the server exits.
    """
    family, type_, proto, _, addr = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                                       0, socket.AI_PASSIVE)[0]
    probe = socket.socket(family, type_, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
        port = probe.getsockname()[1]
    finally:
        probe.close()
    hold = socket.socket(family, type_, proto)
    try:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind((addr[0], port, *addr[2:]))
    except OSError:
        hold.close()
        raise
    return hold


@dataclass(frozen=True)
class WorkerOptions:
    """The supervisor's settings: the ``datastore-serve`` flags it needs (datastore/cli.py builds them)."""
    host: str
    port: int                              # 0: any free port
    port_file: Optional[str]               # written once every worker is ready; None: none
    metrics_port: Optional[int]            # worker i serves metrics on this + i; 0: each on a free port; None: off
    drain_delay_s: float                   # a worker's stop takes up to drain_delay_s + shutdown_grace_s
    shutdown_grace_s: float

    def worker_metrics_port(self, i: int) -> Optional[int]:
        """Worker ``i``'s metrics port: ``metrics_port + i``; 0 (each a free port) and None (off) stay."""
        return self.metrics_port + i if self.metrics_port else self.metrics_port


@dataclass
class Worker:
    """What a worker process knows about itself (passed to the ``serve`` function, ``cli._serve``)."""
    id: int
    count: int
    port: int
    metrics_port: Optional[int] = None     # this worker's (None: no metrics endpoint; 0: any free port)
    conn: Optional[Connection] = None

    def ready(self, metrics_port: Optional[int]) -> None:
        """Tell the supervisor that this worker listens with its index loaded."""
        if self.conn is not None:
            self.conn.send(("ready", os.getpid(), metrics_port))
            self.conn.close()
            self.conn = None


class _WorkerTag(logging.Filter):
    def __init__(self, worker_id: int):
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker_id
        return True


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when the parent dies, even by SIGKILL (Linux); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(worker: Worker, parent_pid: int, hold: socket.socket,
                 serve: Callable[[Worker], Awaitable[int]]) -> None:
    # Forked with the stop/reload signals blocked: give them their default action before unblocking,
    # so that the parent's handlers never run here; cli._serve installs its own once it listens.
    for s in _FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    hold.close()  # this process's copy of the parent's reservation
    for h in logging.getLogger().handlers:
        h.addFilter(_WorkerTag(worker.id))
    sys.exit(asyncio.run(serve(worker)))


def run_workers(a: WorkerOptions, n: int, serve: Callable[[Worker], Awaitable[int]]) -> int:
    """Start ``n`` workers with the options ``a``, supervise them until a stop signal or a worker's death;
    the exit status.

    ``serve(worker)`` runs in each worker process: it loads the index, listens on ``worker.port`` with
    SO_REUSEPORT, calls ``worker.ready(metrics_port)`` and serves until SIGTERM/SIGINT, returning the
    worker's exit status (2: the index could not be loaded).
    """
    try:
        hold = reserve_port(a.host, a.port)
    except OSError as e:
        what = "is in use" if e.errno == errno.EADDRINUSE else "cannot be bound"
        log.error(f"port {what}", extra={"host": a.host, "port": a.port, "error": str(e)})
        return 1
    port = hold.getsockname()[1]
    ctx = mp.get_context("fork")
    procs: list = []                 # worker i is procs[i]
    reaped: set = set()              # ids of workers whose exit was handled
    conns: dict = {}                 # reader -> worker id, until that worker reported ready
    ready: dict = {}                 # worker id -> metrics port
    state = {"stopping": False, "since": 0.0, "status": 0}

    def alive():
        return [p for p in procs if p.exitcode is None]

    def send(sig: int) -> None:
        for p in alive():
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    def stop(status: int) -> None:
        if not state["stopping"]:
            state.update(stopping=True, since=time.monotonic(), status=status)
            send(signal.SIGTERM)

    def on_signal(sig, _frame):
        if sig in _STOP:
            log.info("signal received, stopping workers", extra={"signal": signal.Signals(sig).name})
            if state["stopping"]:
                send(sig)
            stop(EXIT_INTERRUPTED if sig == signal.SIGINT else 0)
        else:
            send(sig)

    previous = {s: signal.signal(s, on_signal) for s in _FORWARDED}
    log.info("starting workers", extra={"workers": n, "port": port, "host": a.host})
    try:
        for i in range(n):
            if state["stopping"]:
                break
            reader, writer = ctx.Pipe(duplex=False)
            worker = Worker(i, n, port, a.worker_metrics_port(i), writer)
            p = ctx.Process(target=_worker_main, name=f"datastore-worker-{i}", daemon=True,
                            args=(worker, os.getpid(), hold, serve))
            signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
            try:
                p.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
            writer.close()
            procs.append(p)
            conns[reader] = i
        grace = a.drain_delay_s + a.shutdown_grace_s + 10.0
        announced = False
        while len(reaped) < len(procs):   # until every worker's exit has been handled
            for obj in wait([*conns, *(p.sentinel for p in alive())], timeout=0.5):
                if obj in conns:
                    i = conns.pop(obj)
                    try:
                        _, _pid, metrics_port = obj.recv()
                        ready[i] = metrics_port
                    except (EOFError, OSError):
                        pass  # the worker died before it was ready: its sentinel says so
                    obj.close()
            for i, p in enumerate(procs):
                if p.exitcode is None or i in reaped:
                    continue
                reaped.add(i)
                if state["stopping"]:
                    log.info("worker stopped", extra={"worker": i, "pid": p.pid, "exitcode": p.exitcode})
                    if p.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                        state["status"] = state["status"] or 1
                else:
                    log.error("worker exited unexpectedly; stopping the others",
                              extra={"worker": i, "pid": p.pid, "exitcode": p.exitcode})
                    stop(2 if p.exitcode == 2 else 1)
            if not announced and len(ready) == n and not state["stopping"]:
                announced = True
                if a.port_file:
                    from .durable import write_text

                    write_text(a.port_file, f"{port}\n")
                log.info("workers ready", extra={"workers": n, "port": port, "pids": [p.pid for p in procs],
                                                 "metrics_ports": [ready[i] for i in range(n)]})
            if state["stopping"] and time.monotonic() - state["since"] > grace:
                log.error("workers did not stop in time; killing them", extra={"pids": [p.pid for p in alive()]})
                send(signal.SIGKILL)
                state["status"] = state["status"] or 1
                for p in procs:
                    p.join(5)
    finally:
        for p in alive():           # only on an error in this loop: never leave a worker behind
            p.kill()
            p.join(5)
        for s, h in previous.items():
            signal.signal(s, h)
        hold.close()
    log.info("stopped", extra={"status": state["status"]})
    return state["status"]
