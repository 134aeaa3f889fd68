"""How often a draft model's (or a feature head's) top-1 next token equals the target's on the target's own
greedy answers.

For each prompt: the target answers greedily; then both models read prompt + answer once (teacher forcing)
and their argmax at every answer position is compared. Then the draft drafts for real (width 1, depth 1,
speculation at every step) and its first-node acceptance is counted: the two figures agree when the draft's
KV handling is right.

    python -m specstore.bench.draft_agreement DRAFT [--n-per-category 1] [--max-new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    from ..client.budget import CostProfile
    from ..client.decoder import SpeculativeDecoder
    from ..client.draft_distill import draft_logits
    from ..client.drafters.draft_model import open_draft_model
    from ..client.drafters.feature_head import model_drafter
    from ..client.feature_head import target_outputs
    from ..client.models import load_model
    from .spec_bench import DEFAULT_QUESTIONS, load_questions, parse_categories, select_prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("draft")
    p.add_argument("--model", default=None)
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--n-per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="float32")   # the precision of the figures in BENCHMARKS.md
    draft = open_draft_model(args.draft, model, tok)
    prompts, _ = select_prompts(load_questions(args.questions), parse_categories("all"), args.n_per_category)
    dm = model_drafter(draft, width=1, max_depth=1)
    dec = SpeculativeDecoder(model, tok, [dm], profile=CostProfile.flat(3), max_budget=1)
    agree = total = 0
    for pr in prompts:
        ids = dec.encode_prompt(pr.text)
        ans = dec.generate(ids, max_new_tokens=args.max_new_tokens, decode_text=False).new_tokens
        seq = torch.tensor([ids + ans])
        with torch.inference_mode():
            f, lg = target_outputs(model, seq)
            a = lg[0, len(ids) - 1:-1].argmax(-1)
            b = draft_logits(draft, seq, f)[1][0, len(ids) - 1:-1].argmax(-1)
        agree += int((a == b).sum())
        total += len(ans)
    st = dec.drafter_stats[type(dm).__name__]
    print(json.dumps({"prompts": len(prompts), "positions": total, "teacher_forced_top1_agreement": agree / total,
                      "first_node_acceptance": st["accepted"] / max(st["verified"], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
