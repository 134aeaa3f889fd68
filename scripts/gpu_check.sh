#!/usr/bin/env bash
# The device check (run on a lent GPU machine, see BENCHMARKS.md): GPU tests + verify-cost profile.
# Writes logs and JSON under $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
if ! python3 -c "import transformers,sys; sys.exit(0 if transformers.__version__.startswith('5.') else 1)" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
SPECSTORE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -x \
  tests/unit/test_verifier.py tests/unit/test_decoder_greedy.py tests/unit/test_sampling.py \
  tests/unit/test_drafters.py tests/unit/test_draft_tree.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
# half precision on CUDA is not made batch-invariant: measure whether tree rows get plain decoding's bits
for dt in bfloat16 float16; do
  timeout 60 python3 -m specstore.bench.half_precision_identity --device cuda --dtype $dt \
    --json-out "$OUT/half_precision_identity_$dt.json" 2>&1 | grep -v Warning | tail -3 | tee -a "$OUT/gpu_tests.log"
done
timeout 180 python -m specstore.bench.gpu_profile --config llama3-8b --dtype bfloat16 --out "$OUT/gpu_profile_llama3-8b.json" \
  2>&1 | grep -v Warning | tail -40 | tee "$OUT/gpu_profile.log"
timeout 90 python -m specstore.bench.gpu_profile --config smollm2-135m --dtype bfloat16 --out "$OUT/gpu_profile_smollm2-135m.json" \
  2>&1 | grep -v Warning | grep -E "^t\(n\)|^ours|^hf" | tee -a "$OUT/gpu_profile.log"
