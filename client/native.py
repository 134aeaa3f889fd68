"""The C kernels, built with the machine's C compiler at first use and loaded with ctypes: client/row_kernel.c (the
few-rows linear layer of client/small_linear.py, wrapped by client/native_rows.py) and client/attention_kernel.c
(the batch-invariant attention of client/attention_kernel.py), one library.

Built with ``-O3 -march=native -fopenmp`` into ``~/.cache/specstore/kernels/`` (``$SPECSTORE_CACHE/kernels``),
under a name made of the sources, the flags, the compiler's version and the CPU's feature flags, so a changed
source or another machine builds its own. Where there is no compiler or the build fails, ``load()`` says why
once in the log and returns None, and each caller keeps its numba kernel. ``SPECSTORE_NATIVE_ROWS=0`` and
``SPECSTORE_NATIVE_ATTENTION=0`` skip one kernel each.

The library's OpenMP calls go to the runtime torch has loaded (the same ``libgomp.so.1``), so its threads are
torch's threads: no second pool spinning next to torch's.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("row_kernel.c"), Path(__file__).with_name("attention_kernel.c")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]

_lib = None            # the loaded library (None: not tried yet; False: unavailable)
_lock = threading.Lock()


def _cache_dir() -> Path:
    from ..datastore.model_files import cache_root

    return cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def library_path(cc: str) -> Path:
    """Where the build for these sources, these flags, this compiler and this CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"kernels-{key}.so"


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)      # then renamed: a reader never sees half a file
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:] or f"{cc} exited with {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """The loaded library, or None where it cannot be built or loaded here (the reason goes to the log once)."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = _try_load() or False
        return _lib or None


def _try_load():
    cc = _compiler()
    if cc is None:
        log.info("no C compiler: the few-rows linear layers and the invariant attention use their numba kernels")
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("could not build the C kernels (%s): the few-rows linear layers and the invariant attention "
                    "use their numba kernels", str(e).splitlines()[-1] if str(e) else type(e).__name__)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.rows_matmul.argtypes = [ptr] * 3 + [i64] * 3 + [ctypes.c_int]
    lib.rows_matmul.restype = None
    lib.pack.argtypes = [ptr] * 2 + [i64] * 2
    lib.pack.restype = None
    lib.panel_width.restype = i64
    lib.attend.argtypes = [ptr] * 3 + [i64] + [ptr] * 2 + [ctypes.c_float, ptr] + [i64] * 4 + [ctypes.c_int]
    lib.attend.restype = ctypes.c_int
    return lib
