"""client/row_kernel.c, built with the machine's C compiler at first use and loaded with ctypes: the few-rows
linear layer of client/small_linear.py over a packed copy of the weights.

Built with ``-O3 -march=native -fopenmp`` into ``~/.cache/specstore/kernels/`` (``$SPECSTORE_CACHE/kernels``),
under a name made of the source, the flags, the compiler's version and the CPU's feature flags, so a changed
source or another machine builds its own. Where there is no compiler or the build fails, ``load()`` says why
once in the log and returns None, and client/small_linear.py keeps its numba kernel (client/row_kernel.py).
``SPECSTORE_NATIVE_ROWS=0`` skips it.

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

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_kernel.c")
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
    """Where the build for this source, these flags, this compiler and this CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"row_kernel-{key}.so"


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)      # then renamed: a reader never sees half a file
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
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
    from .small_linear import switched_off      # here, not above: client/small_linear.py imports this module

    if switched_off("SPECSTORE_NATIVE_ROWS"):
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler: the few-rows linear layers use the numba kernel")
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("could not build client/row_kernel.c (%s): the few-rows linear layers use the numba kernel",
                    str(e).splitlines()[-1] if str(e) else type(e).__name__)
        return None
    lib.rows_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.rows_matmul.restype = None
    lib.pack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.pack.restype = None
    lib.panel_width.restype = ctypes.c_int64
    return lib


def pack(w: torch.Tensor) -> torch.Tensor:
    """The packed copy of a float32 weight [out, in] that ``matmul`` reads: panels of ``panel_width()`` output
    rows, input-major, zero-padded (flat, float32)."""
    lib = load()
    w = w.detach().contiguous()
    n_out, n_in = w.shape
    pw = lib.panel_width()
    p = torch.empty((n_out + pw - 1) // pw * pw * n_in, dtype=torch.float32)
    lib.pack(w.data_ptr(), p.data_ptr(), n_out, n_in)
    return p


def matmul(packed: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x @ w^T`` for x [rows, in] (float32, C-contiguous) and ``packed = pack(w)``, on torch's thread count.
    Each output is one fused multiply-add chain over the inputs in order: a row's outputs have the same bits
    whatever the other rows."""
    rows, n_in = x.shape
    out = torch.empty(rows, n_out, dtype=torch.float32)
    load().rows_matmul(packed.data_ptr(), x.data_ptr(), out.data_ptr(), n_out, n_in, rows, torch.get_num_threads())
    return out
