"""datastore-serve as a real process: SIGTERM drains gracefully; SIGHUP reloads."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import write_fake_index

ROOT = Path(__file__).resolve().parents[2]

# datastore-serve's own main(), serving the stand-in index and with a slow Retrieve (so that requests are
# in flight when SIGTERM arrives). Everything else -- flags, signals, health, drain -- is the real CLI.
DRIVER = textwrap.dedent("""
    import sys, dataclasses
    import specstore.datastore.server as server, specstore.datastore.cli as cli
    from tests.datastore_fake_index import FakeIndex
    server.default_opener = lambda load_faiss=True, **_: FakeIndex.open
    _cfg = cli._config_from_args
    cli._config_from_args = lambda a: dataclasses.replace(_cfg(a), debug_delay_s=float(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
""")


def start(tmp_path, index, delay, *extra):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(delay), "--index", str(index), "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 30
    while not port_file.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    addr = f"127.0.0.1:{port_file.read_text().strip()}"
    ch = grpc.insecure_channel(addr)
    h = health_pb2_grpc.HealthStub(ch)
    while h.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.time() < deadline
        time.sleep(0.05)
    return proc, ch


def test_sigterm_drains_in_flight_requests(tmp_path):
    index = write_fake_index(tmp_path / "index", [[1, 2, 3, 4, 5]], fingerprint="fp")
    proc, ch = start(tmp_path, index, 1.0, "--shutdown-grace", "5")
    try:
        st = pb_grpc.DatastoreStub(ch)
        req = pb.RetrieveRequest(context=[2, 3], budget=4)
        in_flight = [st.Retrieve.future(req, timeout=10) for _ in range(3)]
        time.sleep(0.3)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        for f in in_flight:               # every in-flight request completes normally
            assert list(f.result().tokens) == [4, 5]
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError):  # new requests are refused
            st.Retrieve(req, timeout=2)
        assert proc.wait(10) == 0
        assert time.time() - t0 < 5
        err = proc.stderr.read()
        assert '"event": "draining"' in err and '"event": "stopped"' in err
    finally:
        ch.close()
        if proc.poll() is None:
            proc.kill()


def test_sighup_reloads(tmp_path):
    index = write_fake_index(tmp_path / "index", [[1, 2, 3, 4, 5]], index_id="one", fingerprint="fp")
    proc, ch = start(tmp_path, index, 0.0)
    try:
        st = pb_grpc.DatastoreStub(ch)
        assert st.Info(pb.InfoRequest(), timeout=5).index_id == "one"
        write_fake_index(index, [[1, 2, 3, 9, 9]], index_id="two", fingerprint="fp")
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while st.Info(pb.InfoRequest(), timeout=5).index_id != "two":
            assert time.time() < deadline
            time.sleep(0.05)
        assert list(st.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=4), timeout=5).tokens) == [9, 9]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        ch.close()
        if proc.poll() is None:
            proc.kill()


def test_bad_index_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-c", DRIVER, "0", "--index", str(tmp_path / "missing"), "--port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot load the index" in r.stderr
