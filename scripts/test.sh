#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: the main environment's tests, then
# the vLLM engine tests (tests/vllm) in the vLLM environment (.venv-vllm). Arguments go to the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=1800 "$@"
if [ "${SPECSTORE_SKIP_VLLM:-0}" != 1 ] && [ $# -eq 0 ]; then
  # the converted SmolLM2 folder that vLLM loads is made by the main environment's tests (load_model)
  .venv/bin/python -c "from specstore.client.models import model_folder; model_folder()"
  .venv-vllm/bin/python -m pytest -q -p no:cacheprovider --timeout=1800 tests/vllm
fi
