"""Durable writes: a reader, or the next run after a crash, sees the old file or the new one, never half.

Every writer of the project goes through here. A file is written to a temporary sibling (same folder, so
the rename stays on one file system), flushed and fsynced, then ``os.replace``d over the target; on an
exception the temporary file is removed and the target is left as it was. Folders get the same treatment:
``atomic_dir`` fills a temporary sibling folder and renames it into place, ``replace_dir`` swaps a finished
folder onto an existing one. ``fsync_dir`` makes a rename itself survive a power loss.

Temporary names are ``<name>.tmp``; ``unique=True`` makes them ``<name>.tmp<pid>`` for targets that several
processes may write at once (shared caches), so that two writers never share one temporary file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any, Iterator, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


def temp_path(path: PathLike, unique: bool = False) -> Path:
    """The temporary sibling that ``path`` is written to before the rename."""
    path = Path(path)
    return path.with_name(path.name + (f".tmp{os.getpid()}" if unique else ".tmp"))


def sha256_file(path: PathLike, bufsize: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``bufsize`` blocks (files may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(bufsize), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """fsync a folder (makes renames and new entries in it durable). Best effort: some file systems
    refuse to open or fsync a folder, and there is nothing better to do there."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file and folder below ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for f in files:
            fsync_file(Path(folder) / f)
        fsync_dir(folder)


@contextlib.contextmanager
def _swap_in(path: Path, unique: bool, sync_tmp: bool) -> Iterator[Path]:
    tmp = temp_path(path, unique)
    try:
        yield tmp
        if sync_tmp:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike, *, unique: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write ``path`` through, for writers that take a file name (FAISS,
    draftretriever); when the block ends it is fsynced and renamed over ``path``."""
    with _swap_in(Path(path), unique, sync_tmp=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, unique: bool = False) -> Iterator[IO]:
    """Yield an open temporary file (``mode`` "wb" or "w"); when the block ends it is flushed, fsynced
    and renamed over ``path``."""
    with _swap_in(Path(path), unique, sync_tmp=False) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: PathLike, data: bytes, *, unique: bool = False) -> None:
    with atomic_open(path, "wb", unique=unique) as f:
        f.write(data)


def write_text(path: PathLike, text: str, *, unique: bool = False) -> None:
    with atomic_open(path, "w", unique=unique) as f:
        f.write(text)


def write_json(path: PathLike, obj: Any, *, indent: int = 2, unique: bool = False) -> None:
    """``obj`` as indented JSON plus a final newline (serialised before the temporary file is opened, so
    an unserialisable object leaves no trace)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n", unique=unique)


def save_npy(path: PathLike, arr: np.ndarray, *, unique: bool = False) -> None:
    """``np.save`` to exactly ``path`` (numpy appends no suffix to an open file)."""
    with atomic_open(path, "wb", unique=unique) as f:
        np.save(f, arr)


def save_npz(path: PathLike, *, compressed: bool = True, unique: bool = False, **arrays: np.ndarray) -> None:
    """``np.savez[_compressed]`` of ``arrays`` (name -> array) to exactly ``path``."""
    with atomic_open(path, "wb", unique=unique) as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder to fill (``<name>.tmp<pid>``); when the block ends its
    contents are fsynced and it is renamed to ``path``, unless ``path`` appeared meanwhile: another process
    finished the same work first, its copy wins and ours is removed. On an exception the temporary folder
    is removed and ``path`` is not touched."""
    path = Path(path)
    tmp = temp_path(path, unique=True)
    shutil.rmtree(tmp, ignore_errors=True)   # left by a killed process that had our pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        try:
            os.rename(tmp, path)   # refused when path exists and is not empty
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: PathLike, dst: PathLike) -> None:
    """Rename the finished folder ``src`` to ``dst`` (same parent), replacing an existing ``dst``.

    An existing ``dst`` is renamed aside first and removed after the swap, so a reader sees the old complete
    folder or the new complete one (for the instant between the two renames, none), never a mix. The parent
    is fsynced after the swap; ``src``'s contents are not (see ``fsync_tree``).
    """
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{int(time.time())}"
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
