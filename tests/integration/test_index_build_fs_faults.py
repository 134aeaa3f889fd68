"""index-build on a full disk and on a read-only location: one clear line, the published index untouched,
and (disk full) a rerun after making room completes and equals a clean build.

Real file systems, no fault injection: each case runs in its own mount namespace (``unshare -rm``: no root
needed where unprivileged user namespaces are allowed), on a small tmpfs (disk full) or on a read-only bind
mount of the test's folder. The namespace part is this module run as a script (``inner``), which prints
its findings as JSON: the tmpfs is gone once the namespace ends.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specstore.datastore.durable import sha256_file
from tests.integration.test_index_publish import FLAGS, ROOT, index_build, npy_files, old_and_clean_builds


def _files(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                       capture_output=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="no unprivileged mount namespaces (unshare -rm)")


@pytest.fixture(scope="module")
def corpus_and_old(tmp_path_factory):
    return old_and_clean_builds(tmp_path_factory.mktemp("fsfault"))


def _inner(mode: str, work: Path, old: Path, files: list) -> dict:
    """Inside the namespace: mount, run index-build over a copy of ``old``, report."""
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    out = mnt / "idx"
    if mode == "enospc":
        old_bytes = sum(p.stat().st_size for p in old.rglob("*") if p.is_file())
        size = old_bytes + 256 * 1024            # room for the old index and a fraction of the new one
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        shutil.copytree(old, out)
    else:
        shutil.copytree(old, out)
        subprocess.run(["mount", "--bind", str(mnt), str(mnt)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
    before = _files(out)
    r = index_build(*files, "--out", str(out), *FLAGS)
    found = {"rc": r.returncode, "stderr": r.stderr, "intact": _files(out) == before,
             "listing": sorted(p.name for p in mnt.iterdir())}
    from specstore.datastore.index import DatastoreIndex

    found["verifies"] = DatastoreIndex.open(out, verify=True).index_id
    if mode == "enospc":   # make room: the rerun resumes and completes
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        r2 = index_build(*files, "--out", str(out), *FLAGS)
        found.update(rerun_rc=r2.returncode, rerun_stderr=r2.stderr,
                     rerun_sha={k: sha256_file(out / k) for k in npy_files(out)},
                     rerun_listing=sorted(p.name for p in mnt.iterdir()))
    return found


def _run_inner(mode: str, tmp_path: Path, corpus_and_old) -> dict:
    root, files = corpus_and_old
    r = subprocess.run(["unshare", "-rm", sys.executable, "-m", "tests.integration.test_index_build_fs_faults",
                        mode, str(tmp_path), str(root / "old"), *files], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_one_line_and_old_index_intact(got: dict, message: str, root: Path) -> None:
    """The failed build's exit status 1, one stderr line naming ``message``, the old index untouched."""
    from specstore.datastore.index import DatastoreIndex

    assert got["rc"] == 1, got["stderr"]
    err = got["stderr"].strip().splitlines()
    assert len(err) == 1 and message in err[0] and "unchanged" in err[0], got["stderr"]
    assert got["intact"] and got["verifies"] == DatastoreIndex.open(root / "old").index_id


def test_disk_full_gives_one_line_and_keeps_the_old_index(tmp_path, corpus_and_old):
    root, _ = corpus_and_old
    got = _run_inner("enospc", tmp_path, corpus_and_old)
    _assert_one_line_and_old_index_intact(got, "No space left on device", root)
    assert got["rerun_rc"] == 0, got["rerun_stderr"]
    assert "resuming" in got["rerun_stderr"]
    assert got["rerun_sha"] == {k: sha256_file(root / "clean" / k) for k in npy_files(root / "clean")}
    assert got["rerun_listing"] == [".idx.lock", "idx"]


def test_read_only_location_gives_one_line_and_keeps_the_old_index(tmp_path, corpus_and_old):
    root, _ = corpus_and_old
    got = _run_inner("readonly", tmp_path, corpus_and_old)
    _assert_one_line_and_old_index_intact(got, "Read-only file system", root)
    assert got["listing"] == ["idx"]


if __name__ == "__main__":
    mode, work, old, *inputs = sys.argv[1:]
    print(json.dumps(_inner(mode, Path(work), Path(old), inputs)))
