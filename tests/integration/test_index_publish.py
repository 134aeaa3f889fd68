"""Publishing an index is all-or-nothing (``indexers/build.py`` ``publish``): a real ``index-build`` process
SIGKILLed inside its publish step leaves a complete index at the published path, which a real server opens
and serves; the rerun completes, equals a clean build and leaves no old copy behind. Also: a second build of
the same index is refused while one runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from specstore.datastore.durable import RENAME_EXCHANGE_ENV, exchange_paths
from specstore.datastore.index import DatastoreIndex
from specstore.datastore.server import ServerOptions
from specstore.indexers.build import CRASH_ENV
from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.integration.datastore_support import ServerThread

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--no-embeddings", "--shard-tokens", "400", "-q"]
TOPICS = ["ownership and borrowing", "lifetimes of references", "traits and generics", "error handling"]


def index_build(*args, env=None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in (CRASH_ENV, RENAME_EXCHANGE_ENV)}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "specstore.indexers.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


def write_corpus(folder: Path) -> list:
    """Four small text files (str paths): about 1,000 tokens in all."""
    folder.mkdir(parents=True)
    paths = []
    for i, topic in enumerate(TOPICS):
        p = folder / f"doc{i}.txt"
        p.write_text("".join(f"Chapter {j}: {topic} in Rust, part {j}. The compiler checks {topic} so that "
                             f"programs stay safe without a garbage collector.\n" for j in range(12)))
        paths.append(str(p))
    return paths


def npy_files(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*.npy"))}


def served_index_id(path: Path) -> str:
    """The index id a real server (default opener, 127.0.0.1) answers Info with when started on ``path``."""
    with ServerThread(path) as srv, grpc.insecure_channel(srv.address) as ch:
        return pb_grpc.DatastoreStub(ch).Info(pb.InfoRequest(), timeout=10).index_id


def old_and_clean_builds(root: Path) -> tuple[Path, list]:
    """(root, corpus files) with ``root/old`` built from the first two files and ``root/clean`` from all."""
    files = write_corpus(root / "corpus")
    for name, inputs in (("old", files[:2]), ("clean", files)):
        r = index_build(*inputs, "--out", str(root / name), *FLAGS)
        assert r.returncode == 0, r.stderr
    return root, files


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(root, corpus files, old index built from the first two files, clean build of all four)."""
    return old_and_clean_builds(tmp_path_factory.mktemp("publish"))


@pytest.mark.parametrize("exchange", ["1", "0"], ids=["rename-exchange", "two-renames"])
def test_kill_between_the_renames_of_publish(builds, tmp_path, exchange):
    root, files = builds
    out = tmp_path / "idx"
    shutil.copytree(root / "old", out)
    old_id = DatastoreIndex.open(out, verify=True).index_id
    clean_id = DatastoreIndex.open(root / "clean").index_id
    env = {RENAME_EXCHANGE_ENV: exchange}
    args = [*files, "--out", str(out), *FLAGS]
    reload = ServerOptions(reload=True, reload_interval_s=0.1, retire_after_s=0.5)
    with ServerThread(out, options=reload) as srv, grpc.insecure_channel(srv.address) as ch:
        info = pb_grpc.DatastoreStub(ch).Info
        assert info(pb.InfoRequest(), timeout=10).index_id == old_id
        r = index_build(*args, env={**env, CRASH_ENV: "publish:mid-swap!kill"})
        if exchange == "1" and _has_exchange(tmp_path):
            # one atomic step: there is no instant between two renames to die at
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == -signal.SIGKILL, r.stderr
            assert not out.exists()
            # the published path still serves the complete old index: the --reload server keeps it (and
            # reads the old copy in place when it looks), and a server started now serves it too
            time.sleep(0.5)
            assert info(pb.InfoRequest(), timeout=10).index_id == old_id
            assert served_index_id(out) == old_id
            r = index_build(*args, env=env)
            assert r.returncode == 0, r.stderr
            assert "rolled forward" in r.stderr
        deadline = time.time() + 20
        while info(pb.InfoRequest(), timeout=10).index_id != clean_id:   # --reload picks the new index up
            assert time.time() < deadline
            time.sleep(0.1)
    new = DatastoreIndex.open(out, verify=True)
    assert new.index_id == clean_id != old_id
    assert npy_files(out) == npy_files(root / "clean")
    assert served_index_id(out) == new.index_id
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx"]   # no old copy, no staging


@pytest.mark.parametrize("point", ["publish:before-swap", "publish:after-swap"])
def test_kill_around_the_swap(builds, tmp_path, point):
    """Killed just before the swap the old index is published; just after it, the new one; the rerun
    completes either way and removes what the killed build left."""
    root, files = builds
    out = tmp_path / "idx"
    shutil.copytree(root / "old", out)
    old_id = DatastoreIndex.open(out).index_id
    clean_id = DatastoreIndex.open(root / "clean").index_id
    args = [*files, "--out", str(out), *FLAGS]
    r = index_build(*args, env={CRASH_ENV: f"{point}!kill"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert DatastoreIndex.open(out, verify=True).index_id == (old_id if point.endswith("before-swap") else clean_id)
    r = index_build(*args)
    assert r.returncode == 0, r.stderr
    assert npy_files(out) == npy_files(root / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx"]


def test_old_copy_of_a_killed_publish_is_restored_when_no_build_finished(builds, tmp_path):
    """Roll back: no index at the path, no finished build, only the old copy (as an older version of the
    builder could leave it): the next build puts it back first, then builds."""
    root, files = builds
    shutil.copytree(root / "old", tmp_path / ".idx.old-123-1700000000")
    old_id = DatastoreIndex.open(root / "old").index_id
    assert served_index_id(tmp_path / "idx") == old_id
    r = index_build(*files, "--out", str(tmp_path / "idx"), *FLAGS, env={CRASH_ENV: "publish:before-swap!kill"})
    assert r.returncode == -signal.SIGKILL and "rolled back" in r.stderr
    assert DatastoreIndex.open(tmp_path / "idx", verify=True).index_id == old_id
    r = index_build(*files, "--out", str(tmp_path / "idx"), *FLAGS)
    assert r.returncode == 0, r.stderr
    assert npy_files(tmp_path / "idx") == npy_files(root / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx"]


def _has_exchange(folder: Path) -> bool:
    """The file system under ``folder`` swaps folders in one step (renameat2 RENAME_EXCHANGE)."""
    a, b = folder / ".probe-a", folder / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return exchange_paths(a, b)
    finally:
        a.rmdir()
        b.rmdir()
