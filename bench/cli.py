"""spec-bench: Spec-Bench speed of lossless speculative decoding against plain greedy and prompt lookup.

Runs N first-turn prompts per Spec-Bench category through these methods, interleaved per prompt in one
process on the same model object (the order of methods rotates from prompt to prompt):

  plain          transformers model.generate(do_sample=False): the reference, speedup 1.0
  pld            transformers prompt lookup: generate(..., prompt_lookup_num_tokens=10, do_sample=False)
  ours-plain     our decoder with speculation off (the same code path, one token per forward)
  ours:<D>       our decoder with drafters D, one per --configs entry (default: context,recycling and
                 context; with --datastore/--index also context,recycling,datastore; with --draft-model
                 also draft and context,recycling,draft). Each configuration keeps its drafters, recycling
                 table and budget statistics across prompts, as in real use. A configuration may end in
                 :norasd or :frspec (the draft's RASD pruning off, its FR-Spec vocabulary on).
  assisted       with --draft-model: transformers' assisted decoding with the same draft
                 (generate(..., assistant_model=draft)), unless --no-assisted

Every method first runs once on an extra, unmeasured warm-up prompt (--warmup). Every output of ours is
checked token for token against plain greedy; a difference is reported with its first position and
makes the exit status 1 (unless --allow-mismatch).

Reported per category and overall: MAT (new tokens per target forward; pld's is counted with a forward
hook), tokens/s (total new tokens / total seconds, prefill included) and the speedup over plain: the median
of per-prompt tokens/s ratios and, in brackets, the ratio of totals.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from ..client.cli_support import (DEFAULT_MAX_NEW_TOKENS, MAX_BUDGET_HELP, MODEL_HELP, add_draft_arguments,
                                  choose_max_budget, run_main, validate_common, validate_draft_arguments)
from ..datastore.cli_common import CliParser
from .spec_bench import CATEGORIES, DATASTORE, DEFAULT_CONFIGS, DEFAULT_QUESTIONS, PLD_NUM_TOKENS

RESULTS = Path(__file__).resolve().parent / "results"

EPILOG = f"""\
categories: {', '.join(CATEGORIES)}
  (mt_bench groups the 8 MT-bench categories writing, roleplay, reasoning, math, coding, extraction,
  stem, humanities; its N prompts are spread over them round robin)

examples:
  spec-bench                                        # 5 prompts x 6 categories, 128 new tokens
  spec-bench --n-per-category 1 --max-new-tokens 16 # smoke run
  spec-bench --categories qa,rag --configs context,recycling context recycling
  spec-bench --index ./my-index                     # adds ours:context,recycling,datastore
  spec-bench --threads 2 --report BENCHMARKS.md     # write the report where you want it

Timings are only meaningful on an otherwise idle machine.
"""


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="spec-bench", description=__doc__, epilog=EPILOG,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompts")
    g.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS,
                   help="Spec-Bench questions JSONL (default: %(default)s)")
    g.add_argument("--categories", default="all",
                   help=f"comma-separated categories to run (default: all {len(CATEGORIES)})")
    g.add_argument("--n-per-category", type=int, default=5, help="prompts per category (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="new tokens per prompt (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=1,
                   help="unmeasured warm-up prompts, each run by every method first (default: %(default)s)")

    g = p.add_argument_group("methods")
    g.add_argument("--configs", nargs="+", default=None, metavar="DRAFTERS",
                   help="our decoder configurations, one comma-separated drafter list each, from context, "
                        f"recycling, datastore (default: {' '.join(DEFAULT_CONFIGS)})")
    g.add_argument("--no-pld", action="store_true", help="skip transformers prompt lookup")
    g.add_argument("--no-ours-plain", action="store_true", help="skip our decoder with speculation off")
    g.add_argument("--no-assisted", action="store_true",
                   help="with --draft-model: skip transformers' assisted decoding with the same draft")
    g.add_argument("--max-budget", type=int, default=None, help=MAX_BUDGET_HELP)
    g.add_argument("--refresh-profile", action="store_true", help="re-measure the verify cost profile t(n) first")
    g.add_argument("--verify-profile", type=Path, default=None, metavar="FILE",
                   help="size trees by this verify-cost profile instead of this machine's measured one: a cost "
                        "profile JSON or a bench/gpu_profile.py report (bench/results/gpu_profile_smollm2-135m.json "
                        "is an H100's). MAT then shows what trees sized for that machine get here; the speeds are "
                        "still this machine's, with trees too big for it")
    g.add_argument("--datastore", metavar="HOST:PORT", default=None,
                   help="a datastore-serve service; adds the configuration context,recycling,datastore")
    g.add_argument("--index", type=Path, default=None,
                   help="a local index drafted from in process; adds context,recycling,datastore")
    g.add_argument("--datastore-timeout-ms", type=float, default=None, help="deadline of each remote lookup")
    g.add_argument("--no-session-memory", action="store_true",
                   help="the datastore drafter searches the corpus only, not also the request's own tokens")

    add_draft_arguments(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto (default: bfloat16 on CUDA and on CPUs with AMX or "
                   "AVX512-BF16, lossless there by batch-invariant forwards; else float32)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    g = p.add_argument_group("output")
    g.add_argument("--report", type=Path, default=RESULTS / "spec_bench.md",
                   help="Markdown report (default: bench/results/spec_bench.md)")
    g.add_argument("--plot", type=Path, default=RESULTS / "spec_bench.png",
                   help="PNG bar chart of speedup per category and method (default: bench/results/spec_bench.png)")
    g.add_argument("--json-out", type=Path, default=RESULTS / "spec_bench.json",
                   help="all per-prompt raw numbers and token ids (default: bench/results/spec_bench.json)")
    g.add_argument("--allow-mismatch", action="store_true",
                   help="exit 0 even if an output of ours differs from plain greedy")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


DRAFT_VARIANTS = ("norasd", "frspec")


def split_variant(config: str) -> tuple[str, set]:
    """"context,draft:norasd:frspec" -> ("context,draft", {"norasd", "frspec"})."""
    head, *variants = config.split(":")
    bad = set(variants) - set(DRAFT_VARIANTS)
    if bad:
        raise ValueError(f"unknown configuration variant {sorted(bad)} in {config!r}; choose from {DRAFT_VARIANTS}")
    return head, set(variants)


def _configs(args) -> list[str]:
    configs = list(args.configs) if args.configs else list(DEFAULT_CONFIGS)
    names = {n.strip() for c in configs for n in split_variant(c)[0].split(",") if n.strip()}
    bad = names - {"context", "recycling", DATASTORE, "rest", "draft"}
    if bad:
        raise ValueError(f"unknown drafters {sorted(bad)} in --configs; choose from context, recycling, datastore, "
                         "rest, draft")
    if "draft" in names and not args.draft_model:
        raise ValueError("a configuration uses the draft drafter: give --draft-model PATH")
    if any("frspec" in split_variant(c)[1] for c in configs) and not args.draft_vocab:
        raise ValueError("a :frspec configuration needs --draft-vocab K (and --draft-vocab-from or --index)")
    remote = bool(args.datastore or args.index)
    if DATASTORE in names and not remote:
        raise ValueError("a configuration uses the datastore drafter: give --datastore HOST:PORT or --index PATH")
    if "rest" in names and not args.index:
        raise ValueError("the rest drafter (REST's draftretriever, for comparison) needs --index PATH")
    if remote and not args.configs:
        configs.append(f"context,recycling,{DATASTORE}")
    if args.draft_model and not args.configs:
        configs += ["draft", "context,recycling,draft"]
    return configs


def _drafter_factory(model, tokenizer, args):
    """Drafters by name; the datastore drafter through client.cli.make_drafters (imported lazily)."""
    from ..client.cli import make_drafters

    def factory(config: str) -> list:
        names, variants = split_variant(config)
        parts = [n.strip() for n in names.split(",") if n.strip()]
        remote = DATASTORE in parts
        ns = argparse.Namespace(recycling_table=None, datastore_timeout_ms=args.datastore_timeout_ms,
                                no_session_memory=args.no_session_memory,
                                datastore=args.datastore if remote else None,
                                index=args.index if remote else None,
                                draft_model=args.draft_model if "draft" in parts else None,
                                draft_width=args.draft_width, draft_depth=args.draft_depth,
                                draft_vocab=args.draft_vocab if "frspec" in variants else 0,
                                draft_vocab_from=args.draft_vocab_from or ([args.index] if args.index else []),
                                no_rasd="norasd" in variants, refresh_profile=False,
                                verify_profile=getattr(args, "verify_profile", None))
        local = ",".join(n for n in parts if n not in (DATASTORE, "rest"))
        drafters = make_drafters(local or "none", model, tokenizer, ns)
        if "rest" in parts:  # a fresh draftretriever Reader per configuration (it learns from its queries)
            from .rest_drafter import RestDrafter, build_rest_index

            rest_file = Path(str(args.index).rstrip("/") + ".draftretriever.idx")  # beside the immutable index
            drafters.append(RestDrafter(build_rest_index(args.index, rest_file)))
        return drafters

    return factory


def run(args) -> int:
    import torch

    from ..client.budget import CostProfile, cached_cost_profile
    from ..client.models import load_model
    from ..datastore.model_files import resolve_model

    from .report import OVERALL, write_reports
    from .spec_bench import (OursMethod, build_methods, environment, load_questions, parse_categories,
                             run_benchmark, select_prompts)

    validate_common(args)
    validate_draft_arguments(args)
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    categories = parse_categories(args.categories)
    configs = _configs(args)
    questions = load_questions(args.questions)
    prompts, warm = select_prompts(questions, categories, args.n_per_category)
    warmups = [warm] if warm is not None and args.warmup else []
    if args.warmup > 1:
        chosen = {id(p) for p in prompts}
        extra = [q for q in questions if id(q) not in chosen and q is not warm]
        warmups += extra[: args.warmup - 1]

    if args.threads:
        torch.set_num_threads(args.threads)
    print("spec-bench: loading the model ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    model_name = resolve_model(args.model).name
    if args.verify_profile is not None:
        profile = CostProfile.load(args.verify_profile)
    else:
        profile = cached_cost_profile(model, model_name, refresh=args.refresh_profile)
    max_budget = choose_max_budget(args.max_budget, model, profile)
    args.verify_profile = profile
    assistant = None
    if args.draft_model and not args.no_assisted:
        from ..client.drafters.draft_model import open_draft_model

        from ..client.feature_head import is_feature_head

        if is_feature_head(args.draft_model):   # it reads the target's hidden states: not an assistant model
            print("spec-bench: --draft-model is a feature head; transformers' assisted decoding needs a draft LM, "
                  "so it is left out", file=sys.stderr, flush=True)
        else:
            assistant = open_draft_model(args.draft_model, model, tokenizer)
    methods = build_methods(model, tokenizer, configs, profile=profile, max_budget=max_budget,
                            include_pld=not args.no_pld, include_ours_plain=not args.no_ours_plain,
                            drafter_factory=_drafter_factory(model, tokenizer, args), assistant=assistant)
    encoder = next((m.decoder for m in methods if isinstance(m, OursMethod)), None)
    if encoder is None:  # only transformers' methods: still encode prompts the same way
        from ..client.decoder import SpeculativeDecoder

        encoder = SpeculativeDecoder(model, tokenizer, [], profile=profile, speculate=False)

    argv = getattr(args, "argv", None)
    meta = environment(model, command=None)
    meta["command"] = "spec-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta.update(model=model_name, max_new_tokens=args.max_new_tokens, n_per_category=args.n_per_category,
                categories=categories, configs=configs, max_budget=max_budget, warmup_prompts=len(warmups),
                questions=str(args.questions), pld_num_tokens=PLD_NUM_TOKENS if not args.no_pld else None,
                cost_profile=profile.to_json())
    print(f"spec-bench: {len(prompts)} prompts x {len(methods)} methods ({', '.join(m.name for m in methods)}), "
          f"{args.max_new_tokens} new tokens, {meta['torch_threads']} threads on {meta.get('device')}",
          file=sys.stderr, flush=True)
    result = run_benchmark(methods, prompts, encoder.encode_prompt, max_new_tokens=args.max_new_tokens,
                           warmup=warmups, progress=not args.quiet, meta=meta)
    summary = write_reports(result, args.report, args.plot, args.json_out)

    overall = summary[OVERALL]
    print("", file=sys.stderr)
    for m in result.methods:
        s = overall[m]
        mat = "n/a" if s["mat"] is None else f"{s['mat']:.2f}"
        sp = f"{s['speedup_median']:.2f}x" if s["speedup_median"] is not None else "n/a"
        print(f"{m:>32}: MAT {mat:>5}  {s['tokens_per_second']:7.1f} tok/s  speedup {sp} (median/prompt)",
              file=sys.stderr)
    for path in (args.report, args.plot, args.json_out):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    bad = result.mismatches()
    if bad:
        print(f"spec-bench: MISMATCH: {len(bad)} output(s) of ours differ from plain greedy: "
              + ", ".join(f"{r.method} prompt {r.prompt_index} at position {r.first_diff}" for r in bad),
              file=sys.stderr)
        return 0 if args.allow_mismatch else 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_main("spec-bench", run, args)


if __name__ == "__main__":
    sys.exit(main())
