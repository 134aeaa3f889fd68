"""Durable writes (datastore/durable.py): the old file (or folder) stays whole until the new one is complete."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from specstore.datastore import durable
from specstore.datastore.durable import (RENAME_EXCHANGE_ENV, atomic_dir, atomic_open, atomic_path, exchange_paths,
                                        exclusive_lock, old_copies, replace_dir, save_npy, save_npz,
                                         sha256_file, temp_path, write_bytes, write_json, write_text)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    p = tmp_path / "f.txt"
    write_text(p, "old")
    write_text(p, "new\n")
    assert p.read_text() == "new\n"
    write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=2) + "\n"   # key order kept, final newline
    write_json(p, {"x": 1}, indent=1)
    assert json.loads(p.read_text()) == {"x": 1}
    assert _leftovers(tmp_path) == []


def test_a_crash_before_the_rename_leaves_the_old_file_intact(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    write_text(p, "old")

    def crash(src, dst):
        raise OSError("power cut before the rename")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_text(p, "new")
    with pytest.raises(OSError, match="power cut"):
        save_npy(p, np.arange(3))
    assert p.read_text() == "old" and _leftovers(tmp_path) == []


def test_an_error_while_writing_leaves_the_old_file_intact(tmp_path):
    p = tmp_path / "f.bin"
    write_bytes(p, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write(b"half of the new")
            raise RuntimeError("writer failed")
    with pytest.raises(TypeError):
        write_json(p, {"not json": object()})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert p.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_writers_that_take_a_file_name(tmp_path):
    p = tmp_path / "index.bin"
    with atomic_path(p) as tmp:
        assert tmp == temp_path(p) and tmp.parent == p.parent
        tmp.write_bytes(b"by name")
    assert p.read_bytes() == b"by name" and _leftovers(tmp_path) == []


def test_unique_temporary_names_for_shared_targets(tmp_path):
    p = tmp_path / "profile.json"
    assert temp_path(p).name == "profile.json.tmp"
    assert temp_path(p, unique=True).name == f"profile.json.tmp{os.getpid()}"
    write_text(p, "x", unique=True)
    assert p.read_text() == "x" and _leftovers(tmp_path) == []


def test_numpy_files_land_at_exactly_the_given_path(tmp_path):
    a, b = np.arange(10, dtype=np.int64), np.ones((2, 3), np.float32)
    save_npy(tmp_path / "a.npy", a)
    assert (np.load(tmp_path / "a.npy") == a).all()
    for compressed in (True, False):
        p = tmp_path / f"table-{compressed}.bin"       # no .npz suffix: numpy must not add one
        save_npz(p, compressed=compressed, table=a, probs=b)
        with np.load(p) as z:
            assert (z["table"] == a).all() and (z["probs"] == b).all()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.npy", "table-False.bin", "table-True.bin"]


def test_sha256_file_reads_in_blocks(tmp_path):
    p = tmp_path / "data"
    data = os.urandom(10_000)
    p.write_bytes(data)
    assert sha256_file(p) == sha256_file(p, bufsize=7) == hashlib.sha256(data).hexdigest()


def test_atomic_dir(tmp_path):
    out = tmp_path / "cache" / "tokenizer"
    with atomic_dir(out) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and not out.exists()
        (tmp / "a.json").write_text("1")
    assert (out / "a.json").read_text() == "1" and _leftovers(out.parent) == []
    # another process finished the same work first: its copy wins, ours goes
    out2 = tmp_path / "hf"
    with atomic_dir(out2) as tmp:
        (tmp / "mine").write_text("mine")
        out2.mkdir()
        (out2 / "theirs").write_text("theirs")
    assert [p.name for p in out2.iterdir()] == ["theirs"] and _leftovers(tmp_path) == []
    # a failure leaves neither the folder nor its temporary copy
    out3 = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        with atomic_dir(out3) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("conversion failed")
    assert not out3.exists() and _leftovers(tmp_path) == []


def test_replace_dir_swaps_whole_folders(tmp_path):
    dst = tmp_path / "idx"
    new = tmp_path / ".idx.building"
    new.mkdir()
    (new / "manifest.json").write_text("v1")
    replace_dir(new, dst)
    assert (dst / "manifest.json").read_text() == "v1" and not new.exists()
    new.mkdir()
    (new / "manifest.json").write_text("v2")
    (dst / "stale").write_text("only in v1")
    replace_dir(new, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.json"] and (dst / "manifest.json").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.mark.parametrize("exchange", ["1", "0"], ids=["rename-exchange", "two-renames"])
def test_replace_dir_paths_and_fault_points(tmp_path, monkeypatch, exchange):
    """The one-step swap (Linux) and the two-rename fallback: what a crash at each fault point would leave."""
    monkeypatch.setenv(RENAME_EXCHANGE_ENV, exchange)
    dst, new = tmp_path / "idx", tmp_path / ".idx.building"
    dst.mkdir()
    (dst / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    seen = {}

    def hook(point):
        seen[point] = ((dst / "v").read_text() if dst.exists() else None, [p.name for p in old_copies(dst)])

    replace_dir(new, dst, hook=hook)
    assert (dst / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert seen["before-swap"] == ("old", [])
    assert seen["after-swap"][0] == "new" and len(seen["after-swap"][1]) == 1   # the old copy, about to go
    if exchange == "1" and "mid-swap" not in seen:
        return                                  # one step: no instant without a folder at dst
    assert exchange == "0" and seen["mid-swap"][0] is None and len(seen["mid-swap"][1]) == 1


def test_exchange_paths_swaps_in_one_step(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange_paths(a, b):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        exchange_paths(a, tmp_path / "missing")
    monkeypatch.setenv(RENAME_EXCHANGE_ENV, "0")
    assert not exchange_paths(a, b) and (a / "x").read_text() == "b"


def test_old_copies_newest_first_and_exclusive_lock(tmp_path):
    for name in (".idx.old-7-1700000000", ".idx.old-8-1800000000000000000", ".idx.old-9-1700000001000000000",
                 ".idxx.old-1-1", "idx"):
        (tmp_path / name).mkdir()
    os.utime(tmp_path / ".idx.old-7-1700000000", ns=(1600000000 * 10**9,) * 2)  # old naming: its mtime counts
    assert [p.name for p in old_copies(tmp_path / "idx")] == [
        ".idx.old-8-1800000000000000000", ".idx.old-9-1700000001000000000", ".idx.old-7-1700000000"]
    lock = tmp_path / ".idx.lock"
    with exclusive_lock(lock):
        with pytest.raises(BlockingIOError):
            with exclusive_lock(lock):
                pass
    with exclusive_lock(lock):   # released when the block ends
        pass
