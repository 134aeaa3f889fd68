#!/usr/bin/env bash
# Optional, for the benchmark only (BENCHMARKS.md §5): ./.venv-vllm-suffix, the vLLM environment plus
# arctic-inference 0.1.1, which vLLM's `suffix` method (SuffixDecoding) needs. Its sdist's build isolation
# would pull a CUDA torch (several GB), so it is built against .venv-vllm's torch without isolation; only its
# suffix-tree extension is compiled (two C++ files, nanobind). arctic-inference also registers a vLLM plugin,
# so it lives in a venv of its own that sees .venv-vllm's packages, never in .venv-vllm itself.
# Usage: bash scripts/setup_vllm.sh && bash scripts/setup_vllm_suffix.sh
#        SUFFIX_PY=.venv-vllm-suffix/bin/python CONFIGS=suffix bash bench/vllm_bench_all.sh INDEX OUT 5
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm-suffix
[ -x .venv-vllm/bin/python ] || { echo "run scripts/setup_vllm.sh first" >&2; exit 2; }
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
base=$(.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$base')" > "$own/zz_vllm_env.pth"   # .venv-vllm's packages and .pth files
$VENV/bin/python -m pip install -q --no-deps nanobind==2.9.2 grpcio-tools setuptools wheel
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
$VENV/bin/python -m pip download -q --no-deps --no-build-isolation arctic-inference==0.1.1 -d "$work"
tar xzf "$work"/arctic_inference-0.1.1.tar.gz -C "$work"
CMAKE_ARGS="-DPython_EXECUTABLE=$PWD/$VENV/bin/python -Dnanobind_DIR=$($VENV/bin/python -m nanobind --cmake_dir)" \
  $VENV/bin/python -m pip install -q --no-deps --no-build-isolation "$work"/arctic_inference-0.1.1
(cd /tmp && "$OLDPWD/$VENV/bin/python" -c "from arctic_inference.suffix_decoding import SuffixDecodingCache; import vllm; print('[setup] vLLM', vllm.__version__, '+ arctic-inference')")
