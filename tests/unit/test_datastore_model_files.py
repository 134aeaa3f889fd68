"""Model files and the tokenizer load offline by themselves: no environment variables set, no network tried."""
from __future__ import annotations

import os
import subprocess
import sys

# Runs in a fresh interpreter without HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (tests/conftest.py sets them for
# this process), with every outgoing connection refused and recorded.
SCRIPT = r"""
import os, socket
attempts = []

def refuse(*a, **k):
    attempts.append(repr(a[:2]))
    raise OSError("network refused by the test")

socket.getaddrinfo = socket.create_connection = refuse
_connect = socket.socket.connect
socket.socket.connect = lambda s, addr: refuse(addr) if s.family in (socket.AF_INET, socket.AF_INET6) else _connect(s, addr)
keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
import specstore.datastore.model_files as mf
assert all(k not in os.environ for k in keys), "import set environment variables"
tok = mf.load_tokenizer()
assert len(tok) == 49152 and tok("Hello world")["input_ids"]
assert all(k not in os.environ for k in keys), "loading set environment variables"
assert not attempts, attempts
print("ok")
"""


def test_tokenizer_loads_offline_without_environment_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "TOKENIZERS_PARALLELISM")}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
