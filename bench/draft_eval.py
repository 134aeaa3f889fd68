"""Held-out figures and decode cost of a draft made by ``draft-model distill``.

    python -m specstore.bench.draft_eval DRAFT [--eval-windows N] [--threads N] [--json-out FILE]

Re-reads the corpus named by DRAFT/distill.json, re-makes its held-out split (same seed, same windows),
and measures on it the draft as saved and the untrained cut it started from (the target's layers named by
the recipe): top-1 agreement with the target, how often the target's top-1 is among the draft's top 5,
KL on the target's top 64. The saved draft must reproduce distill.json's "after" figure: a check of the
folder as well. Then the cost of one decode step (batch 1, one new token after a 256-token KV cache,
median of 40) of the target and of the draft.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def decode_ms(model, ctx: int = 256, n: int = 40) -> float:
    """Median milliseconds of one cached single-token forward after a ``ctx``-token prefill."""
    x = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    tok = torch.tensor([[5]])
    with torch.no_grad():
        cache = model(input_ids=x, use_cache=True).past_key_values
        times = []
        for i in range(n + 5):
            t = time.perf_counter()
            cache = model(input_ids=tok, past_key_values=cache, use_cache=True).past_key_values
            if i >= 5:   # warm-up steps are not counted
                times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("draft", type=Path)
    p.add_argument("--eval-windows", type=int, default=None, help="default: the recipe's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from ..client.draft_build import build_draft
    from ..client.draft_compat import check_draft_compatible, read_distill_info
    from ..client.draft_corpus import load_corpus, split_windows
    from ..client.draft_distill import HeldOut, evaluate
    from ..client.models import load_model

    info = read_distill_info(args.draft)
    if info is None:
        print(f"{args.draft}: no distill.json (not made by draft-model distill)", file=sys.stderr)
        return 2
    rec = info["recipe"]
    target, tok = load_model(rec["target"]["folder"], device="cpu", dtype="float32")
    check_draft_compatible(target, tok, args.draft)
    corpus = rec["corpus"]
    texts = [f["path"] for f in corpus.get("files", [])] or None
    c = load_corpus(corpus.get("path") if corpus["kind"] == "index" else None, texts, tok, target.config)
    tr = rec["train"]
    windows = split_windows(c.stream, tr["seq_len"], rec["held_out"]["fraction"], tr["seed"])
    n_eval = args.eval_windows or rec["held_out"]["eval_windows"]
    held = HeldOut.compute(target, windows.held_out[:n_eval], tr["batch"])
    draft = AutoModelForCausalLM.from_pretrained(str(args.draft), dtype=torch.float32, local_files_only=True).eval()
    out = {"draft": str(args.draft), "held_out_windows": n_eval, "saved": evaluate(draft, held, tr["batch"]),
           "reported_after": info["agreement"]["after"]}
    init = rec["draft"].get("init_layers")
    if init:
        out["untrained_cut"] = evaluate(build_draft(target, init).eval(), held, tr["batch"])
    out["decode_ms"] = {"target": decode_ms(target.eval()), "draft": decode_ms(draft),
                        "threads": torch.get_num_threads()}
    out["decode_ms"]["draft_over_target"] = out["decode_ms"]["draft"] / out["decode_ms"]["target"]
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
