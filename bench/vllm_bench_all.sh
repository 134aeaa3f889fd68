#!/usr/bin/env bash
# Every vLLM method at batch 1 and 8, each in its own engine process, over the same Spec-Bench prompts
# (BENCHMARKS.md §5); our proposer's counters and learned step cost go to OUT_DIR/stats/.
# Usage: bash bench/vllm_bench_all.sh INDEX_DIR OUT_DIR [N_PER_CATEGORY] [ROUNDS]
# Environment: CONFIGS (default "plain ngram ctx index remote"; also "shared", "null" (speculative mode, no drafts); "suffix" needs arctic-inference in the Python
# named by SUFFIX_PY), BATCHES (default "1 8"), FIRST_ROUND (default 1: numbers the reports of a later run).
# The remote configuration starts datastore-serve on 127.0.0.1 over the same index (same 2 cores). The shared
# configuration gets its own fresh datastore-serve with --stats-dir per run (nothing learned carries over
# between runs, as each engine's own caches do not) and the proposer pushes its accepted n-grams and finished
# outputs to it (SPECSTORE_SHARE_STATS=1, SPECSTORE_SHARE_OUTPUTS=1): a fleet's shared learning, one node.
set -euo pipefail
cd "$(dirname "$0")/.."
INDEX=$1; OUT=$2; N=${3:-2}; ROUNDS=${4:-1}
mkdir -p "$OUT/stats"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
Q=${QUESTIONS:-../shared/data/bench/spec-bench_question.jsonl}
PY=.venv-vllm/bin/python
SERVERS=()
trap 'for p in "${SERVERS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
# serve NAME [FLAGS...]: datastore-serve over INDEX on 127.0.0.1 (log OUT/NAME.log); sets SERVE_PID, SERVE_ADDR.
# Its port file is removed first: a later run into the same OUT must not read a previous, dead server's port.
serve() {
  local name=$1; shift
  rm -f "$OUT/$name.port"
  .venv/bin/datastore-serve --index "$INDEX" --host 127.0.0.1 --port 0 --port-file "$OUT/$name.port" --no-faiss \
    --log-level WARNING "$@" 2>>"$OUT/$name.log" &
  SERVE_PID=$!; SERVERS+=("$SERVE_PID")
  for _ in $(seq 100); do [ -s "$OUT/$name.port" ] && break; sleep 0.3; done
  SERVE_ADDR=127.0.0.1:$(cat "$OUT/$name.port")
}
serve datastore
ADDR=$SERVE_ADDR
FIRST=${FIRST_ROUND:-1}
for r in $(seq "$FIRST" $((FIRST + ROUNDS - 1))); do
  for b in ${BATCHES:-1 8}; do
    for cfg in ${CONFIGS:-plain ngram ctx index remote}; do
      run=$PY; env=(); SH=
      case $cfg in
        plain|ngram|null) args=(--method "$cfg");;
        suffix) args=(--method suffix); run=${SUFFIX_PY:?SUFFIX_PY: a Python with vLLM and arctic-inference};;
        ctx) args=(--method specstore);;
        index) args=(--method specstore --index "$INDEX");;
        remote) args=(--method specstore --datastore "$ADDR");;
        shared)
          rm -rf "$OUT/shared-stats"
          serve shared --stats-dir "$OUT/shared-stats"; SH=$SERVE_PID
          args=(--method specstore --datastore "$SERVE_ADDR")
          env=(SPECSTORE_SHARE_STATS=1 SPECSTORE_SHARE_OUTPUTS=1);;
      esac
      env "${env[@]}" SPECSTORE_STATS_FILE="$OUT/stats/${cfg}_b${b}_r${r}.json" \
      $run -m specstore.bench.vllm_bench "${args[@]}" --batch "$b" --prompts-file "$Q" --n-per-category "$N" \
        --max-new-tokens 128 --json-out "$OUT/${cfg}_b${b}_r${r}.json" 2>"$OUT/${cfg}_b${b}_r${r}.log" | tail -1
      if [ -n "$SH" ]; then kill "$SH"; wait "$SH" 2>/dev/null || true; fi
    done
  done
done
$PY -m specstore.bench.vllm_bench --summarize "$OUT" | tee "$OUT/summary.md"
