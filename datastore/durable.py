"""Durable writes: a reader, or the next run after a crash, sees the old file or the new one, never half.

Every writer of the project goes through here. A file is written to a temporary sibling (same folder, so
the rename stays on one file system), flushed and fsynced, then ``os.replace``d over the target; on an
exception the temporary file is removed and the target is left as it was. Folders get the same treatment:
``atomic_dir`` fills a temporary sibling folder and renames it into place, ``replace_dir`` swaps a finished
folder onto an existing one (in one atomic step on Linux: ``renameat2(RENAME_EXCHANGE)``). ``fsync_dir``
makes a rename itself survive a power loss; ``exclusive_lock`` keeps two writers of one folder apart.

Temporary names are ``<name>.tmp``; ``unique=True`` makes them ``<name>.tmp<pid>`` for targets that several
processes may write at once (shared caches), so that two writers never share one temporary file.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

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
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise _write_error(e, f, path) from None


def _write_error(e: OSError, f: IO, path: PathLike) -> OSError:
    """``e`` naming the file it failed to write. numpy's writers report a short write (a full disk) as
    "N requested and M written" with no errno: one more byte written to the doomed temporary file gets the
    system's own error (ENOSPC, EDQUOT, ...) to report instead."""
    if e.errno is None:
        try:
            os.write(f.fileno(), b"\0")
        except OSError as real:
            e = OSError(real.errno, real.strerror)
    if e.filename is None and e.errno is not None:
        e = OSError(e.errno, e.strerror, str(path))
    return e


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


#: "0" turns the one-step swap off: ``replace_dir`` then takes the two-rename path of systems without it (tests
#: of that path, and an escape hatch for a file system that misreports the flag)
RENAME_EXCHANGE_ENV = "SPECSTORE_RENAME_EXCHANGE"
_RENAME_EXCHANGE = 2     # linux/fs.h
_AT_FDCWD = -100
_renameat2 = None


def _libc_renameat2():
    """glibc's ``renameat2`` (2.28+) with its argument types, or None (another libc or system)."""
    global _renameat2
    if _renameat2 is None:
        fn = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _renameat2 = fn
    return _renameat2 or None


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Swap two existing paths of one file system in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``:
    ext4, xfs, btrfs, tmpfs, overlayfs ...). False, with nothing moved, where the system, the C library or the
    file system lacks it (NFS, FUSE, macOS) or ``SPECSTORE_RENAME_EXCHANGE=0``; OSError for other failures."""
    if os.environ.get(RENAME_EXCHANGE_ENV, "1") == "0":
        return False
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def old_copy_path(dst: PathLike) -> Path:
    """Where ``replace_dir`` puts the folder it replaces until it is removed: ``.<name>.old-<pid>-<ns>``."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.old-{os.getpid()}-{time.time_ns()}"


def old_copies(dst: PathLike) -> list:
    """Old copies of ``dst`` that a killed ``replace_dir`` left (newest first): Paths."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    found = dst.parent.glob(glob.escape(f".{dst.name}.old-") + "*")

    def age(p: Path) -> int:   # the name's time stamp (pid-ns); mtime for names of older versions (pid-s)
        try:
            return int(p.name.rsplit("-", 1)[1]) if len(p.name.rsplit("-", 1)[1]) > 12 else p.stat().st_mtime_ns
        except (ValueError, OSError):
            return 0

    return sorted((p for p in found if p.is_dir()), key=age, reverse=True)


def replace_dir(src: PathLike, dst: PathLike, *, hook: Optional[Callable[[str], None]] = None) -> None:
    """Put the finished folder ``src`` at ``dst`` (same parent), replacing an existing ``dst``.

    Where the system can (``exchange_paths``) the two folders are swapped in one step: a reader, or the next
    run after a crash at any instant, finds the old complete folder or the new complete one at ``dst``.
    Elsewhere ``dst`` is renamed aside and ``src`` renamed onto it: a crash between the two renames leaves no
    ``dst`` but a complete old copy (``old_copies``), which the next run must restore or replace (for indexes
    ``indexers.build.recover_publish`` does, and readers find it with ``index_format.readable_index_dir``).
    Either way the old folder ends as ``.<name>.old-...`` and is removed; the parent is fsynced after the swap;
    ``src``'s contents are not (see ``fsync_tree``). ``hook(point)`` is called at "before-swap", "mid-swap"
    (two-rename path only, between the renames) and "after-swap" (before the old copy is removed): fault
    injection for tests.
    """
    src, dst = Path(src), Path(dst)
    hook = hook or (lambda point: None)
    hook("before-swap")
    if not dst.exists():
        os.rename(src, dst)
        fsync_dir(dst.parent)
        hook("after-swap")
        return
    old = old_copy_path(dst)
    if exchange_paths(src, dst):
        fsync_dir(dst.parent)
        os.rename(src, old)    # named as an old copy, so that a crash during the removal leaves a known name
    else:
        os.rename(dst, old)
        hook("mid-swap")
        os.rename(src, dst)
        fsync_dir(dst.parent)
    hook("after-swap")
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing, then kept) for the block.

    BlockingIOError at once when another process holds it. The kernel drops the lock when its holder dies,
    even by SIGKILL, so a crash never leaves a stale lock behind.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)
