"""spec-generate: lossless speculative generation from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..datastore.cli_common import CliParser
from .cli_support import (DEFAULT_MAX_NEW_TOKENS, MAX_BUDGET_HELP, MODEL_HELP, add_draft_arguments,
                          choose_max_budget, iter_jsonl, run_main, validate_common, validate_draft_arguments)

DRAFTER_NAMES = ("context", "recycling")
# "draft" (a draft model's OPT-Tree, needs --draft-model) and "all" (every drafter the arguments allow)
OPTIONAL_DRAFTERS = ("draft", "all")

EPILOG = """\
examples:
  spec-generate --prompt "Write a haiku about the sea."
  spec-generate --prompts-file prompts.jsonl --json --max-new-tokens 64
  spec-generate --prompt "..." --index ./my-index          # embedded datastore, no server
  spec-generate --prompt "..." --datastore 127.0.0.1:50051 # shared datastore service
  spec-generate --prompt "..." --compare-plain             # also run plain decoding, print the speedup
  spec-generate --prompt "..." --draft-model ./my-draft --drafters all   # + a draft model's trees

Greedy output (the default, --temperature 0) is token for token the output of plain decoding.
With --temperature > 0 tokens are sampled; the distribution is exactly that of plain sampling.
"""


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="spec-generate", description=__doc__, epilog=EPILOG,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (the chat template is applied for chat models)")
    src.add_argument("--prompts-file", type=Path,
                     help="JSON lines file, one object with a 'prompt' field per line (and optionally 'share_output': "
                          "true/false, this request's opt-in to shared outputs, over --share-outputs)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto (default: bfloat16 on CUDA and on CPUs with AMX or "
                   "AVX512-BF16, lossless there by batch-invariant forwards; else float32)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="new tokens per prompt at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--drafters", default=",".join(DRAFTER_NAMES),
                   help=f"comma-separated local drafters from {', '.join(DRAFTER_NAMES + OPTIONAL_DRAFTERS)} "
                        "(default: %(default)s; draft = the --draft-model's trees; all = every drafter available)")
    add_draft_arguments(p)
    p.add_argument("--no-speculation", action="store_true", help="plain decoding through the same code path")
    p.add_argument("--max-budget", type=int, default=None, help=MAX_BUDGET_HELP)
    p.add_argument("--refresh-profile", action="store_true", help="re-measure the verify cost profile t(n)")
    p.add_argument("--recycling-table", type=Path, default=None,
                   help="load the token-recycling table from this file if it exists, and save it at the end")
    p.add_argument("--datastore", metavar="HOST:PORT", default=None, help="draft from a datastore-serve service")
    p.add_argument("--index", type=Path, default=None, help="draft from a local index in process (no server)")
    p.add_argument("--datastore-timeout-ms", type=float, default=None, help="deadline of each remote lookup")
    p.add_argument("--share-stats", action="store_true",
                   help="with --datastore: push what this decoder observes (the target's top-k at accepted nodes, "
                        "accepted tokens) to the service's shared statistics, off the decode path, and warm-start "
                        "the recycling drafter from what the fleet learned (the server needs --stats-dir or "
                        "--stats-redis). Writes need the server's token when it has one: set $DATASTORE_AUTH_TOKEN")
    p.add_argument("--datastore-tls-ca", metavar="PEM", default=None,
                   help="connect to --datastore over TLS, trusting this CA (the server's --tls-cert issuer)")
    p.add_argument("--datastore-tls-cert", metavar="PEM", default=None,
                   help="client certificate for mutual TLS (a server with --tls-client-ca); with --datastore-tls-key")
    p.add_argument("--datastore-tls-key", metavar="PEM", default=None, help="key of --datastore-tls-cert")
    p.add_argument("--share-outputs", action="store_true",
                   help="with --share-stats: also share each finished generation (its output tokens, not the prompt) "
                        "with the service's recent outputs, which every node's lookups match (off by default: "
                        "outputs may be private)")
    p.add_argument("--no-session-memory", action="store_true",
                   help="datastore lookups search the corpus only, not also this request's own tokens")
    p.add_argument("--compare-plain", action="store_true",
                   help="also decode each prompt plainly and report the speedup (and check equality when greedy); "
                        "a short unmeasured warm-up of both modes runs first")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def read_prompts(args) -> list[dict]:
    """[{"prompt": text, "share_output": bool or None}, ...]: --prompt, or one object per line of
    --prompts-file ("share_output" optional: this request's opt-in to shared outputs, over --share-outputs)."""
    if args.prompt is not None:
        return [{"prompt": args.prompt, "share_output": None}]
    path: Path = args.prompts_file
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    prompts = []
    for i, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}:{i}: expected an object with a string 'prompt' field")
        share = obj.get("share_output")
        if share is not None and not isinstance(share, bool):
            raise ValueError(f"{path}:{i}: 'share_output' must be true or false")
        if share and not args.share_stats:
            raise ValueError(f"{path}:{i}: 'share_output' needs --share-stats (outputs travel with the statistics)")
        prompts.append({"prompt": obj["prompt"], "share_output": share})
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def open_datastore(args, tokenizer):
    """The datastore drafter of ``--datastore HOST:PORT`` or ``--index PATH``: raises at once where the service
    is down or the index was built with another tokenizer."""
    from .datastore_drafter import make_datastore_drafter

    from ..datastore.tls import client_tls_options

    opts = client_tls_options(getattr(args, "datastore_tls_ca", None), getattr(args, "datastore_tls_cert", None),
                              getattr(args, "datastore_tls_key", None))
    if args.datastore_timeout_ms is not None:
        opts["timeout_s"] = args.datastore_timeout_ms / 1000.0
    return make_datastore_drafter(address=args.datastore, index_path=str(args.index) if args.index else None,
                                  tokenizer=tokenizer, memory=not getattr(args, "no_session_memory", False),
                                  auth_token=os.environ.get("DATASTORE_AUTH_TOKEN") or None, **opts)


def make_drafters(names: str, model, tokenizer, args, datastore=None) -> list:
    """The drafters of ``names`` (comma-separated), the datastore's first where ``--datastore``/``--index`` is
    given (``datastore``: one already opened by ``open_datastore``)."""
    from .drafters import ContextDrafter, RecyclingDrafter

    out = []
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if "all" in wanted:
        wanted = [n for n in wanted if n != "all"] + list(DRAFTER_NAMES) + (
            ["draft"] if getattr(args, "draft_model", None) else [])
    if getattr(args, "draft_model", None) and "draft" not in wanted:
        wanted.append("draft")
    for name in dict.fromkeys(wanted):
        if name == "draft":
            out.append(make_draft_drafter(model, tokenizer, args))
        elif name == "context":
            out.append(ContextDrafter())
        elif name == "recycling":
            d = RecyclingDrafter(int(model.config.vocab_size))
            if args.recycling_table is not None and args.recycling_table.exists():
                d.load(args.recycling_table)
            out.append(d)
        elif name in ("none", ""):
            continue
        else:
            raise ValueError(f"unknown drafter {name!r}; choose from {', '.join(DRAFTER_NAMES + OPTIONAL_DRAFTERS)}")
    if datastore is None and (args.datastore or args.index):
        datastore = open_datastore(args, tokenizer)
    if datastore is not None:
        out.insert(0, datastore)
        if getattr(args, "share_stats", False):
            from .shared_stats import StatsSharer

            recycling = next((d for d in out if isinstance(d, RecyclingDrafter)), None)
            sharer = StatsSharer(datastore.backend.client, recycling=recycling,
                                 share_outputs=getattr(args, "share_outputs", False))
            sharer.warm_start()
            out.append(sharer)
    return out


def make_draft_drafter(model, tokenizer, args):
    """The draft drafter of ``--draft-model`` on the target's device and dtype, with the machine's measured
    draft forward profile (cached next to the target's t(n)) and the FR-Spec vocabulary if asked for."""
    from .budget import cached_cost_profile
    from .drafters.draft_model import open_draft_model
    from .drafters.feature_head import model_drafter

    path = getattr(args, "draft_model", None)
    if not path:
        raise ValueError("the draft drafter needs --draft-model PATH (a local HF folder, e.g. from "
                         "`draft-model distill`)")
    draft = open_draft_model(path, model, tokenizer)
    vocab_ids = None
    if getattr(args, "draft_vocab", 0):
        from .frequent_vocab import frequent_token_ids, token_counts

        sources = list(args.draft_vocab_from) or ([args.index] if getattr(args, "index", None) else [])
        if not sources:
            raise ValueError("--draft-vocab needs token counts: give --draft-vocab-from PATH or --index PATH")
        eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        vocab_ids = frequent_token_ids(token_counts(sources, tokenizer, int(model.config.vocab_size)),
                                       args.draft_vocab, always=eos)
    drafter = model_drafter(draft, width=args.draft_width, max_depth=args.draft_depth, vocab_ids=vocab_ids,
                            verify_profile=getattr(args, "verify_profile", None),
                            hint_size=0 if getattr(args, "no_rasd", False) else 32)
    # td(m) through the drafter's own forward (its output layer, FR-Spec cut included), cached by size of head
    name = f"draft-{Path(path).resolve().name}-v{len(vocab_ids) if vocab_ids is not None else 'all'}"
    drafter.draft_profile = cached_cost_profile(draft, name, refresh=getattr(args, "refresh_profile", False),
                                                measure=lambda sizes: drafter.measure_profile())
    return drafter


def build_decoder(args):
    """Load the model and assemble a SpeculativeDecoder from parsed CLI arguments."""
    import torch

    from .budget import cached_cost_profile
    from .decoder import SpeculativeDecoder
    from ..datastore.model_files import load_tokenizer, resolve_model
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    datastore = None
    if not args.no_speculation and (args.datastore or args.index):
        # before the model: a service that is down, or an index of another tokenizer, fails in seconds, not after
        # a model load (or a first GGUF conversion)
        datastore = open_datastore(args, load_tokenizer(args.model))
    try:
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        profile = cached_cost_profile(model, resolve_model(args.model).name, refresh=args.refresh_profile)
        args.verify_profile = profile
        drafters = [] if args.no_speculation else make_drafters(args.drafters, model, tokenizer, args, datastore)
    except BaseException:
        if datastore is not None:
            datastore.close()
        raise
    max_budget = choose_max_budget(args.max_budget, model, profile)
    dec = SpeculativeDecoder(model, tokenizer, drafters, profile=profile, max_budget=max_budget,
                             speculate=not args.no_speculation)
    return dec


def _validate(args) -> None:
    from .sampling import SamplingParams

    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    validate_common(args)
    if args.share_stats and not args.datastore:
        raise ValueError("--share-stats needs --datastore HOST:PORT (the statistics are the service's)")
    if args.share_outputs and not args.share_stats:
        raise ValueError("--share-outputs goes with --share-stats (outputs travel in the same pushes)")
    validate_draft_arguments(args)


def run(args) -> int:
    _validate(args)
    prompts = read_prompts(args)
    dec = build_decoder(args)
    gen_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    sharer = next((d for d in dec.drafters if hasattr(d, "share_outputs")), None)
    if args.compare_plain:  # the first calls in a process are slow (kernel warm-up): keep them out of the timing
        warm = dec.encode_prompt(prompts[0]["prompt"], raw=args.raw)
        if sharer is not None:
            sharer.share_outputs = False    # a warm-up is no output of anyone's
        dec.generate(warm, max_new_tokens=8, decode_text=False)
        _plain(dec, warm, None, {"max_new_tokens": 8})
    for i, request in enumerate(prompts):
        text = request["prompt"]
        if sharer is not None:   # opt-in per request, else the node's --share-outputs
            share = request["share_output"]
            sharer.share_outputs = bool(args.share_outputs if share is None else share)
        ids = dec.encode_prompt(text, raw=args.raw)
        if args.json:
            res = dec.generate(ids, prompt_text=text, **gen_kw)
            out = {**res.summary(), "_tokens": res.new_tokens}
        else:
            out = _stream(dec, ids, text, gen_kw)
        if args.compare_plain:
            plain = _plain(dec, ids, text, gen_kw)
            out["plain_tokens_per_second"] = round(plain.tokens_per_second, 3)
            out["speedup"] = round(out["tokens_per_second"] / max(plain.tokens_per_second, 1e-9), 3)
            if args.temperature == 0:
                out["identical_to_plain"] = plain.new_tokens == out["_tokens"]
        out.pop("_tokens", None)
        if args.json:
            print(json.dumps(out, ensure_ascii=False), flush=True)
        else:
            stats = {k: v for k, v in out.items() if k != "text"}
            print(f"\n[{i + 1}/{len(prompts)}] " + " ".join(f"{k}={v}" for k, v in stats.items()),
                  file=sys.stderr, flush=True)
    for d in reversed(dec.drafters):   # a StatsSharer (last) flushes before the datastore drafter closes the channel
        close = getattr(d, "close", None)
        if close is not None:
            close()
    rt = getattr(args, "recycling_table", None)
    if rt is not None:
        from .drafters import RecyclingDrafter

        for d in dec.drafters:
            if isinstance(d, RecyclingDrafter):
                d.save(rt)
    return 0


def _stream(dec, ids, text, gen_kw) -> dict:
    tok = dec.tokenizer
    from .decoder import StreamState

    state = StreamState()
    new: list[int] = []
    shown = ""
    for toks in dec.stream(ids, prompt_text=text, state=state, **gen_kw):
        new.extend(toks)
        full = tok.decode(new, skip_special_tokens=True)
        if not full.endswith("\ufffd"):  # wait for multi-byte characters to complete
            sys.stdout.write(full[len(shown):])
            sys.stdout.flush()
            shown = full
    final = state.text or tok.decode(new, skip_special_tokens=True)
    sys.stdout.write(final[len(shown):] + "\n")
    sys.stdout.flush()
    secs = state.seconds
    return {"text": final, "new_tokens": len(new), "steps": state.steps,
            "accepted_per_step": round(len(new) / max(state.steps, 1), 4), "decode_seconds": round(secs, 4),
            "tokens_per_second": round(len(new) / max(secs, 1e-9), 3), "finish_reason": state.finish,
            "_tokens": new}


def _plain(dec, ids, text, gen_kw):
    spec = dec.speculate
    dec.speculate = False
    try:
        return dec.generate(ids, prompt_text=text, **gen_kw)
    finally:
        dec.speculate = spec


def main(argv: Optional[list[str]] = None) -> int:
    # numpy's BLAS threads (the embedder behind --index sessions) spin after each call and steal the cores
    # torch's decode threads need; set before numpy loads
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return run_main("spec-generate", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
