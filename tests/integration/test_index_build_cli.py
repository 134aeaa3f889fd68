"""index-build as a process: SIGKILL mid-stage, rerun resumes, result equals a clean build; inspect."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"


def run(*args, env=None):
    e = dict(os.environ)
    e.pop("SPECSTORE_INDEX_CRASH_AT", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "specstore.indexers.cli", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(not (CORPUS / "rust-book").is_dir(), reason="shared corpus not present")
def test_killed_build_resumes_and_matches_clean_build(tmp_path):
    files = sorted((CORPUS / "rust-book").glob("*.md"))[:6]
    args = [*map(str, files), "--no-embeddings", "--shard-tokens", "3000", "-q"]
    out, clean = tmp_path / "idx", tmp_path / "clean"
    r = run(*args, "--out", str(out), env={"SPECSTORE_INDEX_CRASH_AT": "sa:shard-00001!kill"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and (tmp_path / ".idx.building" / "stages").is_dir()
    r = run(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "resumed" in r.stdout
    r = run(*args, "--out", str(clean))
    assert r.returncode == 0, r.stderr
    a = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")}
    b = {p.relative_to(clean): p.read_bytes() for p in clean.rglob("*.npy")}
    assert a == b and len(a) >= 10
    r = run("inspect", str(out), "--verify")
    assert r.returncode == 0 and "all checksums OK" in r.stdout
    # rebuilding over a published index swaps it atomically and leaves no staging or old copies behind (the
    # lock files stay: removing a lock file others may be waiting on would let two builds in at once)
    r = run(*args, "--out", str(out))
    assert r.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clean.lock", ".idx.lock", "clean", "idx"]
