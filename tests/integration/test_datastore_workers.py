"""datastore-serve --workers 2 as real processes on 127.0.0.1: one port (SO_REUSEPORT), connection
affinity of sessions, reload in every worker, signals, no leftover processes."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import write_fake_index

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT load spreading: Linux")

ROOT = Path(__file__).resolve().parents[2]

# datastore-serve's own main() serving the stand-in index; flags, workers, signals are the real CLI.
DRIVER = textwrap.dedent("""
    import sys
    import specstore.datastore.server as server, specstore.datastore.cli as cli
    from tests.datastore_fake_index import FakeIndex
    server.default_opener = lambda load_faiss=True, **_: FakeIndex.open
    sys.exit(cli.main(sys.argv[1:]))
""")
DOCS = [[1, 2, 3, 4, 5, 6, 7], [9, 2, 3, 4, 8, 8]]
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]   # else channels of one process share a connection


def events(log_path: Path, name: str) -> list[dict]:
    out = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == name:
            out.append(rec)
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


class Served:
    def __init__(self, tmp_path: Path, index, *extra, workers="2"):
        self.log = tmp_path / "serve.log"
        self.port_file = tmp_path / "port"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, "--index", str(index), "--host", "127.0.0.1", "--port", "0",
             "--port-file", str(self.port_file), "--workers", workers, *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._err,
        )
        self.pids: list[int] = []

    def wait_ready(self, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while not self.port_file.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() < deadline, self.log.read_text()
            time.sleep(0.05)
        # the supervisor writes the port file, then logs "workers ready": the line may lag the file a little
        while not (ready := events(self.log, "workers ready")):
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()
            time.sleep(0.02)
        self.pids = ready[0]["pids"]
        return f"127.0.0.1:{self.port_file.read_text().strip()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self._err.close()


@pytest.fixture
def index(tmp_path):
    return write_fake_index(tmp_path / "index", DOCS, index_id="one", fingerprint="fp")


def test_two_workers_one_port_sessions_per_channel_reload_and_sigterm(tmp_path, index):
    s = Served(tmp_path, index, "--metrics-port", "0")
    channels = []
    try:
        addr = s.wait_ready()
        assert len(s.pids) == 2 and s.proc.pid not in s.pids
        ch = grpc.insecure_channel(addr)
        channels.append(ch)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        st = pb_grpc.DatastoreStub(ch)
        assert list(st.Retrieve(pb.RetrieveRequest(context=[0, 2, 3], budget=16), timeout=5).tokens) == [4, 5, 6, 7, 8, 8]

        # 16 channels, each with its own connection: the kernel spreads connections over both workers, and
        # every call of a channel reaches the worker that holds the channel's session.
        stubs, owner = [], {}
        for k in range(16):
            c = grpc.insecure_channel(addr, options=OWN_CONNECTION)
            channels.append(c)
            stubs.append(pb_grpc.DatastoreStub(c))
        for k, stub in enumerate(stubs):
            sess = stub.OpenSession(pb.OpenSessionRequest(prompt_text="a prompt", top_k=1), timeout=5)
            assert sess.session_id[:3] in ("w0-", "w1-") and list(sess.document_ids) == [0]
            owner[k] = int(sess.session_id[1])
            for _ in range(5):
                r = stub.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=8, session_id=sess.session_id), timeout=5)
                assert list(r.tokens) == [4, 5, 6, 7, 8, 8] and r.sources[:1] == bytes([3])  # in the session's doc
            assert stub.CloseSession(pb.CloseSessionRequest(session_id=sess.session_id), timeout=5).closed
        assert set(owner.values()) == {0, 1}, owner   # both workers took connections (P(fail) = 2**-15)

        # a session used over a connection to the other worker is refused, naming both workers
        a = next(k for k in owner if owner[k] == 0)
        b = next(k for k in owner if owner[k] == 1)
        sess = stubs[a].OpenSession(pb.OpenSessionRequest(prompt_text="q"), timeout=5)
        with pytest.raises(grpc.RpcError) as ei:
            stubs[b].Retrieve(pb.RetrieveRequest(context=[2, 3], budget=4, session_id=sess.session_id), timeout=5)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "worker 0" in ei.value.details() and "worker 1" in ei.value.details()

        # each worker serves its own metrics (--metrics-port 0: each on a free port, listed when ready)
        ports = events(s.log, "workers ready")[0]["metrics_ports"]
        assert len(set(ports)) == 2
        for p in ports:
            body = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode()
            assert 'datastore_requests_total{code="OK",method="Retrieve"}' in body

        # SIGHUP to the parent reloads every worker
        write_fake_index(index, [[1, 2, 3, 9, 9]], index_id="two", fingerprint="fp")
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        for k in (a, b):
            while stubs[k].Info(pb.InfoRequest(), timeout=5).index_id != "two":
                assert time.time() < deadline
                time.sleep(0.05)
            assert list(stubs[k].Retrieve(pb.RetrieveRequest(context=[2, 3], budget=4), timeout=5).tokens) == [9, 9]

        # SIGTERM: the parent drains the workers and exits 0; nothing is left behind
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(15) == 0
        assert wait_gone(s.pids), [p for p in s.pids if not gone(p)]
        assert len(events(s.log, "stopped")) == 3          # two workers and the parent
    finally:
        for c in channels:
            c.close()
        s.close()


def test_worker_death_stops_the_server(tmp_path, index):
    s = Served(tmp_path, index)
    try:
        s.wait_ready()
        os.kill(s.pids[1], signal.SIGKILL)
        assert s.proc.wait(15) == 1
        assert wait_gone(s.pids)
        dead = events(s.log, "worker exited unexpectedly; stopping the others")
        assert dead and dead[0]["worker"] == 1
    finally:
        s.close()


def test_parent_killed_workers_follow(tmp_path, index):
    s = Served(tmp_path, index)
    try:
        s.wait_ready()
        s.proc.kill()                       # no chance to forward anything: PR_SET_PDEATHSIG does it
        s.proc.wait(5)
        assert wait_gone(s.pids), [p for p in s.pids if not gone(p)]
    finally:
        s.close()


def test_bad_index_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-c", DRIVER, "--index", str(tmp_path / "missing"), "--port", "0",
                        "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot load the index" in r.stderr


def test_port_clash_fails_loudly(tmp_path, index):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", DRIVER, "--index", str(index), "--host", "127.0.0.1",
                            "--port", str(port), "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 1 and "port is in use" in r.stderr


def test_workers_flag_values():
    from specstore.datastore.workers import cpu_count, parse_workers

    assert parse_workers("1") == 1 and parse_workers("3") == 3
    assert parse_workers("auto") == parse_workers("0") == cpu_count() >= 1
    for bad in ("-1", "two"):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_worker_options_give_each_worker_its_metrics_port():
    from specstore.datastore.workers import WorkerOptions

    opts = WorkerOptions(host="127.0.0.1", port=0, port_file=None, metrics_port=9100, drain_delay_s=0.0,
                         shutdown_grace_s=10.0)
    assert [opts.worker_metrics_port(i) for i in range(3)] == [9100, 9101, 9102]
    for base in (0, None):        # 0: each worker picks a free port; None: no metrics endpoint
        assert dataclasses.replace(opts, metrics_port=base).worker_metrics_port(2) == base
