"""``draft-model``: make draft models for speculative decoding.

    draft-model distill (--index DIR | --text PATH...) --out DIR [options]
    draft-model answers (--prompts PATH... | --passages PATH...) --out FILE [options]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..datastore.cli_common import CliParser
from .cli_support import MODEL_HELP, run_main

EPILOG = """\
examples:
  index-build build ../shared/data/corpus --out corpus-idx --no-embeddings
  draft-model distill --index corpus-idx --out drafts/smollm2-draft
  draft-model distill --text notes/ data.jsonl --out drafts/mine --layers 2 --steps 200 --max-minutes 10
  spec-generate --prompt "..." --draft-model drafts/smollm2-draft

Self-distillation (a draft trained on the target's own answers drafts them better):
  draft-model answers --prompts ../shared/data/corpus/grade-school-math_train.jsonl --out answers.jsonl --max-minutes 11
  draft-model distill --text answers.jsonl --init-from drafts/smollm2-draft --out drafts/smollm2-self --steps 180 --lr 0.0015

A feature head (EAGLE-style: one layer that reads the target's own last hidden state, so it agrees with the
target far more often than a small draft LM; spec-generate --draft-model takes either):
  draft-model distill --feature-head --index corpus-idx --text answers.jsonl --out drafts/smollm2-head

A run writes a checkpoint every --checkpoint-every steps, on Ctrl-C and when --max-minutes ends; rerunning
the same command resumes from it (automatically: a checkpoint of another recipe is refused). The finished
folder is a plain Hugging Face model folder (plus distill.json with the recipe and the figures); a
feature head's folder holds feature_head.json and feature_head.safetensors (the target's embedding and
output layer are not copied).
"""


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated layer numbers, e.g. 0,1,2,3") from None


def build_parser() -> argparse.ArgumentParser:
    from .draft_answers import PROMPT_KEYS
    from .draft_distill import (DEFAULT_BATCH, DEFAULT_CHECKPOINT_EVERY, DEFAULT_EVAL_WINDOWS, DEFAULT_FEATURE_WEIGHT,
                                DEFAULT_HEAD_STEPS, DEFAULT_HOLDOUT, DEFAULT_LAYERS, DEFAULT_LR, DEFAULT_SEQ_LEN,
                                DEFAULT_STEPS, DEFAULT_TOP_K)

    p = CliParser(prog="draft-model", description="Make draft models for speculative decoding.",
                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="cmd", metavar="{distill,answers}")
    d = sub.add_parser(
        "distill", help="distill a small draft from the target", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cut a draft from the target (its first --layers layers, its embedding, final norm and "
                    "output layer, so it shares the tokenizer) and train its layers to match the target's "
                    "next-token distribution (KL on the target's logits) on a corpus. Reports the held-out "
                    "top-1 agreement (draft argmax == target argmax) before and after. --feature-head trains "
                    "an EAGLE-style head instead: one layer reading the target's final hidden state.")
    d.add_argument("--model", default=None, help=MODEL_HELP + "; the target the draft drafts for")
    d.add_argument("--index", metavar="DIR", default=None, help="corpus: an index built by index-build (its token shards)")
    d.add_argument("--text", nargs="+", metavar="PATH", default=None,
                   help="corpus: .txt/.md files, JSON lines files with a \"text\" field, or folders of them "
                        "(with --index: both, the index's documents first)")
    d.add_argument("--feature-head", action="store_true",
                   help="train a feature head (EAGLE-style) instead of a draft LM: fc([target's hidden state at the "
                        "previous position ; token embedding]) -> one decoder layer (initialised from the target's "
                        "last) -> the target's output layer")
    d.add_argument("--feature-weight", type=float, default=DEFAULT_FEATURE_WEIGHT, metavar="W",
                   help="--feature-head: weight of the hidden-state regression next to the KL (default %(default)g)")
    d.add_argument("--out", "-o", required=True, metavar="DIR", help="draft folder to create (or resume)")
    d.add_argument("--layers", type=int, default=None, metavar="N",
                   help=f"draft layers (default {DEFAULT_LAYERS}), initialised from the target's first N")
    d.add_argument("--init-layers", type=_layers, default=None, metavar="LIST",
                   help="which target layers initialise the draft's, e.g. 0,1,2,29 (default: the first --layers)")
    d.add_argument("--init-from", metavar="DRAFT", default=None,
                   help="start from an existing draft folder instead (its tokenizer must be the target's)")
    d.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="N",
                   help="tokens per training window (default %(default)s)")
    d.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N", help="windows per step (default %(default)s)")
    d.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default %(default)g)")
    d.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"training steps in all (the learning-rate schedule spans them; default {DEFAULT_STEPS}, and "
                        f"for --feature-head {DEFAULT_HEAD_STEPS['bfloat16']} in bfloat16 or "
                        f"{DEFAULT_HEAD_STEPS['float32']} in float32: about 25-30 minutes on 2 CPU cores)")
    d.add_argument("--warmup", type=int, default=None, metavar="N", help="warm-up steps (default: 5%% of --steps)")
    d.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop training after M minutes (checkpoint + usable draft; rerun to continue)")
    d.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                   help="match the target's top-K tokens, renormalised (default %(default)s; 0 = full vocabulary)")
    d.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT, metavar="F",
                   help="share of windows held out, never trained on (default %(default)s)")
    d.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS, metavar="N",
                   help="held-out windows the agreement is measured on (default %(default)s)")
    d.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                   help="steps between checkpoints (default %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the split and the data order (default 0)")
    d.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the teacher's forward and the draft's training forward: bfloat16 (weights and the optimizer "
                        "stay float32) is ~2-3x faster where the CPU has bf16 matrix units (AMX, AVX512-BF16) or "
                        "on a GPU, and slower elsewhere; auto (the default) picks it there and float32 elsewhere")
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    d.add_argument("--json", action="store_true", help="print distill.json instead of a summary")
    d.add_argument("-v", "--verbose", action="store_true")

    a = sub.add_parser(
        "answers", help="the target's own greedy answers to instructions, for self-distillation",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Write the target's greedy answers to the prompts of JSON / JSON-lines files as JSON lines "
                    '{"text": prompt + answer} (chat-formatted when the tokenizer has a template), the input of '
                    "`draft-model distill --text`. Prompts are taken from the first of the fields "
                    + ", ".join(PROMPT_KEYS) + " an object has (or --field). Appends batch by batch: rerunning "
                    "the same command resumes after the prompts already answered. --passages turns text files "
                    "into prompts about their passages. Never give it the prompts you will measure on.")
    a.add_argument("--model", default=None, help=MODEL_HELP + "; the target whose answers are recorded")
    a.add_argument("--prompts", nargs="+", default=[], metavar="PATH", help=".json / .jsonl files or folders of them")
    a.add_argument("--passages", nargs="+", default=[], metavar="PATH",
                   help=".txt / .md files or folders of them: each passage (paragraphs up to 1,500 characters) "
                        "becomes a prompt to summarise it, state its main point or key facts, or say what it is "
                        "about, so that the draft also learns answers about a given text")
    a.add_argument("--field", default=None, help="the prompt field (default: the first known one an object has)")
    a.add_argument("--out", "-o", required=True, metavar="FILE", help="JSON lines file to write (or resume)")
    a.add_argument("--batch", type=int, default=16, metavar="N", help="prompts per batched generate (default %(default)s)")
    a.add_argument("--max-new-tokens", type=int, default=160, metavar="N", help="answer length cap (default %(default)s)")
    a.add_argument("--max-prompts", type=int, default=None, metavar="N", help="answer at most N prompts in all")
    a.add_argument("--max-minutes", type=float, default=None, metavar="M", help="stop after M minutes (rerun to go on)")
    a.add_argument("--seed", type=int, default=0, help="seed of the prompt order (default 0)")
    a.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the target's precision while answering: bfloat16 is ~1.7x faster where the CPU has bf16 "
                        "matrix units (AMX, AVX512-BF16) and its greedy answers differ from float32's only here and "
                        "there, which does not matter for training data; auto (the default) picks bfloat16 where it "
                        "is fast (AMX, AVX512-BF16, CUDA) and float32 elsewhere")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a.add_argument("-v", "--verbose", action="store_true")
    return p


def _distill(args) -> int:
    from . import draft_distill

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = draft_distill.DistillOptions(
        out=args.out, model=args.model, index=args.index, texts=args.text, layers=args.layers,
        init_layers=args.init_layers, init_from=args.init_from, seq_len=args.seq_len, batch=args.batch, lr=args.lr,
        steps=args.steps, warmup=args.warmup, top_k=args.top_k, holdout=args.holdout, eval_windows=args.eval_windows,
        checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes, seed=args.seed, device=args.device,
        feature_head=args.feature_head, feature_weight=args.feature_weight, precision=args.precision,
        progress=not args.quiet)
    info = draft_distill.distill(opts)
    print(json.dumps(info, indent=2) if args.json else draft_distill.summary(info, args.out))
    return 0


def _answers(args) -> int:
    from ..datastore.cli_common import UsageError
    from .draft_answers import PromptFileError, generate_answers, passage_prompts, read_passages, read_prompts
    from .models import load_model, resolve_precision

    if args.batch < 1 or args.max_new_tokens < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise UsageError("--batch, --max-new-tokens and --max-prompts must be positive")
    if not args.prompts and not args.passages:
        raise UsageError("give --prompts FILE..., --passages FILE..., or both")
    try:
        prompts = read_prompts(args.prompts, args.field) if args.prompts else []
        if args.passages:
            prompts += passage_prompts(read_passages(args.passages), seed=args.seed)
    except PromptFileError as e:
        raise UsageError(str(e)) from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = None if args.device == "auto" else args.device
    model, tokenizer = load_model(args.model, device, resolve_precision(args.precision, device))
    info = generate_answers(model, tokenizer, prompts, args.out, batch=args.batch, max_new_tokens=args.max_new_tokens,
                            max_minutes=args.max_minutes, seed=args.seed, max_prompts=args.max_prompts,
                            progress=not args.quiet)
    print(json.dumps(info))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.error("give a command: distill or answers")
    if args.cmd == "answers":
        return run_main("draft-model", _answers, args, interrupt_hint="rerun the same command to go on")
    return run_main("draft-model", _distill, args,
                    interrupt_hint="rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
