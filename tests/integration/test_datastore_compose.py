"""docker-compose.yml, without Docker: parse it and run the same entrypoint commands on 127.0.0.1.

index-build job (tiny corpus on the 'corpus' mount) -> datastore service (index volume) -> the service's
healthcheck command -> a Retrieve -> SIGTERM (the compose stop signal) -> exit 0.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# console scripts of pyproject.toml; run as modules when the scripts are not installed
SCRIPTS = {"index-build": "specstore.indexers.cli", "datastore-serve": "specstore.datastore.cli"}


def resolve(cmd: list[str], mounts: dict[str, Path]) -> list[str]:
    out = []
    for part in cmd:
        for inside, outside in mounts.items():
            if part == inside or part.startswith(inside + "/"):
                part = str(outside) + part[len(inside):]
        out.append(part)
    exe = shutil.which(out[0], path=str(Path(sys.executable).parent))
    if out[0] in SCRIPTS:
        out = ([exe] if exe else [sys.executable, "-m", SCRIPTS[out[0]]]) + out[1:]
    elif out[0] == "python":
        out[0] = sys.executable
    return out


def mounts_of(service: dict, host_paths: dict[str, Path]) -> dict[str, Path]:
    """container path -> host path, for each volume whose source (named volume or ${VAR}) we map."""
    m = {}
    for v in service.get("volumes", []):
        if v.endswith((":ro", ":rw")):
            v = v[:-3]
        src, dst = v.rsplit(":", 1)
        key = "corpus" if "CORPUS_DIR" in src else src
        m[dst] = host_paths[key]
    return m


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compose_file_shape():
    svc = COMPOSE["services"]
    assert svc["datastore"]["depends_on"]["index-build"]["condition"] == "service_completed_successfully"
    assert svc["datastore"]["healthcheck"]["test"][0] == "CMD"
    assert "index" in COMPOSE["volumes"]
    assert svc["datastore"]["build"] == "." and (ROOT / "Dockerfile").exists()


def test_compose_commands_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\nThe quick brown fox sleeps.\n")
    (corpus / "b.jsonl").write_text('{"text": "Ownership is Rust\'s most unique feature."}\n')
    volume = tmp_path / "index-volume"
    volume.mkdir()
    host = {"corpus": corpus, "index": volume}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    job = COMPOSE["services"]["index-build"]
    r = subprocess.run(resolve(job["command"], mounts_of(job, host)), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (volume / "current" / "manifest.json").exists()

    svc = COMPOSE["services"]["datastore"]
    cmd = resolve(svc["command"], mounts_of(svc, host))
    port, mport = free_port(), free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--metrics-port") + 1] = str(mport)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "DATASTORE_AUTH_TOKEN": "t"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        check = [p.replace("50051", str(port)) for p in svc["healthcheck"]["test"][1:]]
        deadline = time.time() + 60
        while True:
            h = subprocess.run(resolve(check, {}), cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
            if h.returncode == 0:
                break
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, h.stdout + h.stderr
            time.sleep(0.3)
        assert "SERVING" in h.stdout

        from specstore.client.datastore_client import DatastoreClient
        from specstore.datastore.model_files import load_tokenizer

        tok = load_tokenizer()
        ids = tok("I saw the quick brown", add_special_tokens=False)["input_ids"]
        with DatastoreClient(f"127.0.0.1:{port}", timeout_s=5, session_timeout_s=30) as c:
            assert c.retrieve(ids, 8).num_drafts > 0
            assert c.open_session(prompt_text="fox") is None  # writes need the token
        with DatastoreClient(f"127.0.0.1:{port}", timeout_s=5, session_timeout_s=30, auth_token="t") as c:
            assert c.open_session(prompt_text="fox") is not None
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert "datastore_request_seconds" in body

        assert svc["stop_signal"] == "SIGTERM"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        h = subprocess.run(resolve(check, {}), cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert h.returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()


def test_compose_replicas_share_statistics_through_redis(tmp_path):
    """The `replicas` profile: the compose file's redis command (a real redis-server) and its two datastore
    replicas (their commands, --stats-redis pointed at it): a push through one is served by the other."""
    svc = COMPOSE["services"]
    assert "--appendfsync" in svc["redis"]["command"] and "always" in svc["redis"]["command"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    volume = tmp_path / "index-volume"
    volume.mkdir()
    host = {"corpus": corpus, "index": volume}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    job = svc["index-build"]
    r = subprocess.run(resolve(job["command"], mounts_of(job, host)), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    rport = free_port()
    redis_cmd = [shutil.which("redis-server") or "redis-server", *svc["redis"]["command"][1:], "--port", str(rport),
                 "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    procs = [subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    from specstore.client.datastore_client import DatastoreClient
    from specstore.protos import datastore_pb2 as pb

    try:
        ports = []
        for name in ("datastore-a", "datastore-b"):
            cmd = resolve(svc[name]["command"], mounts_of(svc[name], host))
            port = free_port()
            cmd[cmd.index("--port") + 1] = str(port)
            cmd[cmd.index("--host") + 1] = "127.0.0.1"
            cmd[cmd.index("--stats-redis") + 1] = f"redis://127.0.0.1:{rport}/0"
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "DATASTORE_AUTH_TOKEN": "t"},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            ports.append(port)
        a = DatastoreClient(f"127.0.0.1:{ports[0]}", auth_token="t", session_timeout_s=30)
        b = DatastoreClient(f"127.0.0.1:{ports[1]}", session_timeout_s=30)
        try:
            for c, p in zip((a, b), procs[1:]):
                deadline = time.time() + 60
                while c.info(timeout_s=10, wait_for_ready=True) is None:   # UNAVAILABLE until its index is loaded
                    if p.poll() is not None or time.time() > deadline:
                        p.terminate()
                        raise AssertionError(f"replica did not start: {p.communicate()[1][-2000:]}")
                    time.sleep(0.2)
            batch = pb.PushStatsRequest(batch_id="compose-1", runs=[pb.TokenRun(tokens=[10, 11, 12, 13], new_from=1)])
            assert a.push_stats(batch, timeout_s=10) == (True, 1)
            deadline = time.time() + 10
            while b.pull_stats(0)[1] < 1:
                assert time.time() < deadline, "replica b never saw the push"
                time.sleep(0.05)
            tree = b.retrieve([10, 11], 4)
            assert tree.tokens.tolist()[1:3] == [12, 13]
        finally:
            a.close(); b.close()
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(30)
