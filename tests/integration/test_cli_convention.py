"""The console scripts as processes: --version, one-line usage errors (exit 2), internal errors (exit 1
with the traceback's log file), Ctrl-C (exit 130). The convention itself: datastore/cli_common.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest

from tests.datastore_fake_index import write_fake_index

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("spec-generate", "spec-bench", "index-build", "datastore-serve", "draft-model")

# Runs console script NAME through its entry point after replacing MODULE:ATTR (unless "-") with a function
# that raises: the internal error of a real run, without a real failure to provoke.
ENTRY = textwrap.dedent("""
    import importlib, sys
    from importlib.metadata import entry_points
    name, target, *argv = sys.argv[1:]
    if target != "-":
        module, attr = target.split(":")
        def boom(*args, **kwargs):
            raise RuntimeError("injected failure")
        setattr(importlib.import_module(module), attr, boom)
    ep = next(iter(entry_points(group="console_scripts", name=name)))
    sys.argv = [name, *argv]
    sys.exit(ep.load()())
""")


def script(name: str) -> list[str]:
    """The installed console script next to this interpreter, else the same entry point through python -c."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-c", ENTRY, name, "-"]


def run(cmd: list[str], tmp_path: Path, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path), **env_vars}  # TMPDIR: where internal errors write their traceback
    env.pop("DATASTORE_AUTH_TOKEN", None)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_version(name, tmp_path):
    r = run([*script(name), "--version"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{name} {metadata.version('specstore')}\n"


@pytest.mark.parametrize("name,argv", [
    ("spec-generate", []),                                      # --prompt or --prompts-file is required
    ("spec-generate", ["--prompt", "hi", "--max-new-tokens", "many"]),
    ("spec-generate", ["--prompt", "hi", "--max-new-tokens", "2", "--datastore", "127.0.0.1:1"]),  # nothing there
    ("spec-bench", ["--n-per-category", "x"]),
    ("index-build", []),                                        # no command
    ("index-build", ["build", "--out", "x"]),                   # no INPUT
    ("index-build", ["inspect", "/no/such/index"]),             # not an index
    ("datastore-serve", []),                                    # --index is required
    ("datastore-serve", ["--index", "x", "--workers", "many"]),
    ("datastore-serve", ["--index", "x", "--auth-reads"]),      # no token
    ("draft-model", []),                                        # no command
    ("draft-model", ["distill", "--out", "d"]),                 # no corpus
    ("draft-model", ["distill", "--text", "x", "--out", "d", "--layers", "many"]),
])
def test_usage_and_input_errors_are_one_line_exit_2(name, argv, tmp_path):
    cache = tmp_path / "cache"      # an empty model cache: the error must come before any model load or conversion
    r = run([*script(name), *argv], tmp_path, SPECSTORE_CACHE=str(cache))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(name), r.stderr
    assert "Traceback" not in r.stderr
    assert not list(cache.glob("models/*/hf")), "the model was loaded before the error"


@pytest.mark.parametrize("name,target,argv", [
    ("spec-generate", "specstore.client.cli:build_decoder", ["--prompt", "hi"]),
    ("spec-bench", "specstore.bench.spec_bench:load_questions", ["--quiet"]),
    ("index-build", "specstore.indexers.build:build_index", ["notes.txt", "--out", "idx", "--no-embeddings"]),
    ("datastore-serve", "specstore.datastore.server:DatastoreServer", ["--index", "idx", "--port", "0"]),
    ("draft-model", "specstore.client.draft_distill:distill", ["distill", "--text", "notes.txt", "--out", "d"]),
])
def test_internal_error_exits_1_with_the_log_file(name, target, argv, tmp_path):
    r = run([sys.executable, "-c", ENTRY, name, target, *argv], tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"{name}: internal error: RuntimeError: injected failure (full traceback in ")
    (log,) = tmp_path.glob(f"{name}-*.log")
    assert str(log) in last
    assert "Traceback (most recent call last)" in log.read_text()


# datastore-serve's main() on the stand-in index (as in test_datastore_process.py)
SERVE = textwrap.dedent("""
    import sys
    import specstore.datastore.server as server, specstore.datastore.cli as cli
    from tests.datastore_fake_index import FakeIndex
    server.default_opener = lambda load_faiss=True, **_: FakeIndex.open
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_drains_datastore_serve_and_exits_130(workers, tmp_path):
    index = write_fake_index(tmp_path / "index", [[1, 2, 3, 4, 5]], fingerprint="fp")
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "--index", str(index), "--host", "127.0.0.1", "--port", "0",
                             "--port-file", str(port_file), "--workers", workers],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not port_file.exists():   # written once listening (every worker with its index loaded)
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        assert '"event": "stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
