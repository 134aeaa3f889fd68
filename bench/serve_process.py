"""``datastore-serve`` as a child process on 127.0.0.1: the one way the benches and the tests start a real server.

    with ServeProcess(index, "--no-faiss", "--max-concurrency", "8", log_path=work / "serve.log") as s:
        ...   # s.address is "127.0.0.1:PORT"; the server answers lookups

The server is the real CLI (``python -m specstore.datastore.cli``) on a free port (``--port 0``, read back
from ``--port-file``). The constructor returns once the server reports SERVING on the gRPC health service
(its index, and any shared statistics, loaded; the health service answers without a token, also under
``--auth-reads``), or, with ``ready=False``, as soon as the port is bound (``wait_ready()`` then times the
load). ``stop()`` sends SIGTERM (the server drains) and SIGKILL past ``grace_s``; ``kill()`` is SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


class ServeProcess:
    """One ``datastore-serve`` child process; its stderr (the log) goes to ``log_path`` (None: discarded),
    appended to with ``append_log`` (a campaign that restarts a server keeps one log)."""

    def __init__(self, index, *args: str, log_path: Optional[Path] = None, env: Optional[dict] = None,
                 ready: bool = True, append_log: bool = False, start_timeout_s: float = 120.0,
                 cwd: Optional[Path] = None):
        self.log_path = Path(log_path) if log_path is not None else None
        self._log = open(self.log_path, "a" if append_log else "w") if self.log_path is not None else None
        self._port_dir = None
        if self.log_path is not None:
            port_file = self.log_path.with_suffix(".port")
        else:
            import tempfile

            self._port_dir = tempfile.TemporaryDirectory(prefix="serve-")
            port_file = Path(self._port_dir.name) / "port"
        port_file.unlink(missing_ok=True)   # a stale one would name a dead server's port
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specstore.datastore.cli", "--index", str(index), "--host", "127.0.0.1",
             "--port", "0", "--port-file", str(port_file), *args],
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._log if self._log is not None else subprocess.DEVNULL,
            env={**os.environ, **(env or {})})
        deadline = time.monotonic() + start_timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"datastore-serve did not start: {self.log()[-2000:]}")
            time.sleep(0.02)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        if ready:
            self.wait_ready(max(1.0, deadline - time.monotonic()))

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Seconds from the process's start until its health check says SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        serving = health_pb2.HealthCheckResponse.SERVING
        end = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status == serving:
                        return time.monotonic() - self.t0
                except grpc.RpcError:
                    pass
                if time.monotonic() > end or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"datastore-serve at {self.address} never reported SERVING: "
                                       f"{self.log()[-2000:]}")
                time.sleep(0.02)

    def log(self) -> str:
        if self._log is None or self.log_path is None:
            return ""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def rss_bytes(self) -> Optional[int]:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def stop(self, grace_s: float = 30.0) -> int:
        """SIGTERM (the server drains), SIGKILL past ``grace_s``; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._port_dir is not None:
            self._port_dir.cleanup()
            self._port_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
