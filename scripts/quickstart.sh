#!/usr/bin/env bash
# Quick start: installs everything (scripts/setup.sh), builds a small datastore index from the bundled
# corpus (examples/corpus), then generates with speculative decoding and prints the speed against plain
# decoding of the same model. Extra arguments go to spec-generate (e.g. --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
INDEX=${INDEX:-.cache/quickstart-index}
if [ ! -f "$INDEX/manifest.json" ]; then
  .venv/bin/index-build build examples/corpus --out "$INDEX"
fi
if [ $# -eq 0 ]; then
  set -- --prompt "Explain Rust's ownership rules and show a short example with String."
fi
exec .venv/bin/spec-generate --index "$INDEX" --compare-plain --max-new-tokens 128 "$@"
