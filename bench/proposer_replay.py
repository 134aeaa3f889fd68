"""Replay the vLLM proposer over recorded greedy outputs: what vLLM would accept, without vLLM.

Under greedy decoding a draft token is accepted exactly when it equals the next token of the plain
output, so a recorded plain output answers every verification. This drives ``SpecstoreProposer`` the way
vLLM's runner does (``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`` per step, rows
admitted as earlier requests finish) with acceptance read from the references, and reports per
configuration: tokens per step (= vLLM's mean accepted length), draft tokens per step, the share of drafts
accepted, and the speed-up over plain decoding that a verify cost of ``c`` per draft token implies
(step time 1 + c * drafts per request). No model and no engine: a configuration takes seconds, so drafting
changes can be compared on many prompts before the (slow, noisy) engine benchmark.

    python -m specstore.bench.proposer_replay --references plain_b1.json [--prompts-file Q.jsonl ...] \
        --config ctx --config index=/tmp/idx --config remote=127.0.0.1:50051

References: a ``vllm_bench --method plain`` report (its prompts are rebuilt from the same arguments and the
model's chat template), or ``--generate N`` greedy outputs of the main environment's model for Spec-Bench
prompts, cached as JSON (``--references`` names the file to write).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from ..client.vllm_proposer import ProposerOptions, SpecstoreProposer
from ..client.budget import StepCostModel

MAX_LEN = 4096


class SimulatedClock:
    """The proposer's clock during a replay: each engine step takes ``a + b * tokens + s * speculated``
    seconds (tokens: every running request's verified tokens; speculated: any row had drafts), times a
    log-normal noise factor, so that the proposer's online step-cost model meets a machine like the one
    measured."""

    def __init__(self, a: float, b: float, s: float, noise: float = 0.1, seed: int = 0):
        self.a, self.b, self.s, self.noise = a, b, s, noise
        self.now = 0.0
        self.engine_seconds = 0.0
        self._rng = np.random.default_rng(seed)

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def step(self, tokens: int, speculated: bool) -> None:
        dt = (self.a + self.b * tokens + self.s * speculated) * float(np.exp(self.noise * self._rng.standard_normal()))
        self.now += dt
        self.engine_seconds += dt


def accepted_length(draft: Sequence[int], truth: Sequence[int]) -> int:
    """Draft tokens a greedy engine accepts when ``truth`` is what it generates from here: the draft's prefix
    that ``truth`` repeats, short of ``truth``'s last token (the engine's own token of the step)."""
    n = 0
    while n < len(draft) and n < len(truth) - 1 and draft[n] == truth[n]:
        n += 1
    return n


def replay(proposer: SpecstoreProposer, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
           batch: int = 1, clock: Optional[SimulatedClock] = None, cohorts: bool = False) -> dict:
    """Greedy engine over ``prompts`` whose target continuation is ``outputs`` (one per prompt).

    ``cohorts``: requests are admitted ``batch`` at a time once every row is free (one ``generate`` call of
    ``batch`` prompts after another, as ``vllm_bench --batch``), instead of as soon as a row is free.

    Returns {"steps", "tokens", "drafts", "accepted", "row_steps", "seconds"}: engine steps, output tokens
    produced, draft tokens proposed and accepted, request-steps (a request decoding in a step), and with
    ``clock`` (the proposer's clock for the replay) the simulated engine time."""
    from ..client import vllm_proposer

    saved = vllm_proposer.time
    if clock is not None:
        vllm_proposer.time = clock
    try:
        return _replay(proposer, prompts, outputs, batch, clock, cohorts)
    finally:
        vllm_proposer.time = saved


def _replay(proposer, prompts, outputs, batch, clock, cohorts) -> dict:
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs)) + proposer.k + 2
    rows = np.zeros((batch, width), dtype=np.int32)
    ntok = np.zeros(batch, dtype=np.int32)
    owner = [-1] * batch
    sampled: list[list[int]] = [[] for _ in range(batch)]
    waiting = list(range(len(prompts)))
    made = [0] * len(prompts)
    totals = dict(steps=0, tokens=0, drafts=0, accepted=0, row_steps=0, seconds=0.0)
    while waiting or any(o >= 0 for o in owner):
        admit = not cohorts or all(o < 0 for o in owner)
        for r in range(batch):
            if admit and owner[r] < 0 and waiting:
                i = waiting.pop(0)
                p, o = prompts[i], outputs[i]
                rows[r, :len(p)] = p
                rows[r, len(p)] = o[0]           # prefill's token
                ntok[r] = len(p) + 1
                owner[r], sampled[r], made[i] = i, [o[0]], 1
                totals["tokens"] += 1
        drafts = proposer.propose(sampled, ntok, rows)
        if isinstance(proposer, OracleProposer):
            drafts = proposer.pick(drafts, [outputs[i][made[i]:] if i >= 0 else [] for i in owner])
        totals["steps"] += 1
        live = 0
        for r in range(batch):
            i = owner[r]
            if i < 0:
                sampled[r] = []
                continue
            out = outputs[i]
            live += 1
            d = list(drafts[r])
            truth = out[made[i]:]
            acc = accepted_length(d, truth)
            new = list(truth[:acc + 1])
            rows[r, ntok[r]:ntok[r] + len(new)] = new
            ntok[r] += len(new)
            made[i] += len(new)
            sampled[r] = new
            totals["row_steps"] += 1
            totals["tokens"] += len(new)
            totals["drafts"] += len(d)
            totals["accepted"] += acc
            if made[i] >= len(out):          # finished: the row is free for the next request
                owner[r], sampled[r] = -1, []
                rows[r] = 0
                ntok[r] = 0
        if clock is not None and live:
            clock.step(live + sum(len(d) for d in drafts), any(len(d) for d in drafts))
    if clock is not None:
        totals["seconds"] = clock.engine_seconds
    return totals


class PlainProposer:
    """No drafts: the plain engine, for the simulated clock's baseline."""

    def __init__(self, k: int):
        self.k = k

    def propose(self, sampled_token_ids, *_, **__):
        return [[] for _ in sampled_token_ids]

    def close(self):
        pass


class OracleProposer:
    """Every given proposer drafts at every step (each keeps its own state and learning); each row then gets
    whichever draft the reference accepts furthest, the shortest of those on a tie. No drafter can know this:
    it bounds what any way of choosing between these proposers' drafts (or fusing them) could accept."""

    def __init__(self, proposers: Sequence, cut: bool = False):
        self.proposers = list(proposers)
        self.k = max(p.k for p in self.proposers)
        self.cut = cut      # also drop what would be rejected: a perfect choice of the chain's length

    def propose(self, *args, **kwargs):
        return [p.propose(*args, **kwargs) for p in self.proposers]

    def pick(self, candidates: list, truths: list) -> list[list[int]]:
        out = []
        for r, truth in enumerate(truths):
            drafts = [list(c[r]) for c in candidates]
            best = min(drafts, key=lambda d: (-accepted_length(d, truth), len(d)))
            out.append(best[:accepted_length(best, truth)] if self.cut else best)
        return out

    def close(self):
        for p in self.proposers:
            p.close()


class SuffixProposer:
    """vLLM's ``suffix`` method in the replay: arctic-inference's ``SuffixDecodingCache`` driven as vLLM 0.32's
    ``SuffixDecodingProposer`` drives it (a prompt tree per request, a global tree of finished outputs, the
    last ``max_tree_depth`` tokens as the pattern, vLLM's defaults), with requests told apart by row the way
    the replay admits them (a row whose first tokens change, or that shrinks, holds a new request). Needs
    ``arctic-inference`` (``.venv-vllm-suffix``)."""

    def __init__(self, k: int, max_tree_depth: int = 24, max_spec_factor: float = 1.0, min_token_prob: float = 0.1):
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.k, self.depth, self.factor, self.min_prob = k, max_tree_depth, max_spec_factor, min_token_prob
        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth, max_cached_requests=10000)
        self._rows: dict[int, tuple] = {}       # row -> (request id, head tokens, tokens seen)
        self._next = 0

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, **_):
        out = []
        seen = set()
        for r, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[r])
            if not len(sampled) or n == 0:
                out.append([])
                continue
            head = tuple(int(x) for x in token_ids_cpu[r, :16])
            held = self._rows.get(r)
            if held is None or held[1] != head or n < held[2]:
                if held is not None:
                    self.cache.stop_request(held[0])
                rid = f"r{self._next}"
                self._next += 1
                self.cache.start_request(rid, token_ids_cpu[r, :n - len(sampled)].astype(np.int32))
                held = (rid, head, n)
            self.cache.add_active_response(held[0], [int(x) for x in sampled])
            self._rows[r] = (held[0], head, n)
            seen.add(r)
            pattern = token_ids_cpu[r, max(0, n - self.depth):n].astype(np.int32)
            draft = self.cache.speculate(held[0], pattern, max_spec_tokens=min(self.k, MAX_LEN - n - 1),
                                         max_spec_factor=self.factor, min_token_prob=self.min_prob)
            out.append(list(draft.token_ids))
        for r in [r for r in self._rows if r not in seen]:
            self.cache.stop_request(self._rows.pop(r)[0])
        return out

    def close(self):
        for rid, _, _ in self._rows.values():
            self.cache.stop_request(rid)
        self._rows.clear()


def summary(name: str, t: dict, costs: Sequence[float], plain_seconds: Optional[float] = None) -> dict:
    per = max(t["row_steps"], 1)
    tps = (t["tokens"] - 0) / per        # tokens per request-step (prefill's token included, as vLLM's MAL)
    dps = t["drafts"] / per
    row = {"config": name, "tokens_per_step": round(tps, 3), "drafts_per_step": round(dps, 3),
           "accepted_share": round(t["accepted"] / max(t["drafts"], 1), 3)}
    for c in costs:
        row[f"speedup@{c:g}"] = round(tps / (1.0 + c * dps), 3)
    if plain_seconds:
        row["simulated_speedup"] = round(plain_seconds / t["seconds"], 3)
    return row


def make_proposer(spec: str, k: int, token_cost: float, tokenizer_dir: Optional[str],
                  learn_cost: bool = False) -> tuple[str, SpecstoreProposer]:
    """``plain`` | ``suffix`` (vLLM's method) | ``ctx`` | ``index=DIR`` | ``remote=HOST:PORT`` |
    ``oracle=A|B...`` (each row's best of those proposers' drafts at each step: an upper bound; ``oracle-cut=``
    also cuts it to what is accepted), then optionally ``,key=value`` proposer options
    (``SPECSTORE_KEY``; ``+`` separates the items of a list: ``ctx,drafters=context+outputs``)."""
    if spec == "plain":
        return spec, PlainProposer(k)
    if spec == "suffix":
        return spec, SuffixProposer(k)
    if spec.startswith(("oracle=", "oracle-cut=")):
        head, _, rest = spec.partition("=")
        parts = [make_proposer(x, k, token_cost, tokenizer_dir, learn_cost)[1] for x in rest.split("|")]
        return spec, OracleProposer(parts, cut=head == "oracle-cut")
    head, *opts = spec.split(",")
    name, _, where = head.partition("=")
    env = {"SPECSTORE_TOKEN_COST": str(token_cost)}
    if name == "index":
        env["SPECSTORE_INDEX"] = where
    elif name == "remote":
        env["SPECSTORE_DATASTORE"] = where
    elif name != "ctx":
        raise ValueError(f"--config {spec}: expected ctx, index=DIR or remote=HOST:PORT")
    for kv in opts:   # proposer options; a list value joins its items with "+" (drafters=context+outputs)
        key, _, value = kv.partition("=")
        env[f"SPECSTORE_{key.upper()}"] = value.replace("+", ",")
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                          model_config=SimpleNamespace(max_model_len=MAX_LEN, model=tokenizer_dir,
                                                       tokenizer=tokenizer_dir))
    prop = SpecstoreProposer(cfg, ProposerOptions.from_env(env))
    if not learn_cost:   # replay time is not engine time: the verify cost stays the given prior
        prop.step_cost = StepCostModel(prior_token_cost=token_cost, warmup=10 ** 12)
    return spec, prop


def report_prompts(report: dict, tokenizer, prompts_file, n_per_category: Optional[int] = None,
                   categories: Optional[list] = None) -> list[list[int]]:
    """The chat-templated prompt ids a ``vllm_bench`` report ran: its Spec-Bench selection (categories and
    prompts per category, unless ``n_per_category`` is given) rebuilt from ``prompts_file``; with
    ``categories`` (a list), each prompt's category is appended to it."""
    from .spec_bench import load_questions, parse_categories, select_prompts

    qs, _ = select_prompts(load_questions(prompts_file), parse_categories(report.get("categories")),
                           n_per_category or report["n_per_category"])
    if categories is not None:
        categories.extend(q.category for q in qs)
    return _chat_ids(tokenizer, [q.text for q in qs])


def _chat_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append([int(x) for x in ids])
    return out


def _generate(model_dir: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    for i, p in enumerate(prompts):
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)
        outs.append(g[0, len(p):].tolist())
        print(f"reference {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--references", type=Path, required=True,
                    help="a vllm_bench plain report, or the JSON file --generate writes/reads")
    ap.add_argument("--generate", action="store_true", help="make greedy references with the model (cached)")
    ap.add_argument("--prompts-file", default="../shared/data/bench/spec-bench_question.jsonl")
    ap.add_argument("--n-per-category", type=int, default=None, help="default: the report's")
    ap.add_argument("--skip-per-category", type=int, default=0,
                    help="skip the first N prompts of each category (a tuning set apart from the benchmark's)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", default=None, help="HF folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--config", action="append", default=[], help="suffix | ctx | index=DIR | remote=HOST:PORT [,opt=v] | oracle=A|B")
    ap.add_argument("--by-category", action="store_true",
                    help="after the whole set, each Spec-Bench category on its own (fresh proposers)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cohorts", action="store_true",
                    help="admit --batch requests at a time once all rows are free (vllm_bench's batches), "
                         "not as soon as a row is free (a continuous stream)")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--token-cost", type=float, default=0.05,
                    help="verify cost of one draft token relative to a plain step (the proposer's prior)")
    ap.add_argument("--costs", default="0.02,0.05,0.1", help="costs c for the modelled speed-up columns")
    ap.add_argument("--step-model", default=None, metavar="A,B,S",
                    help="simulate the engine clock: a step takes A + B*tokens + S*speculated seconds (x noise); "
                         "the proposer learns its step cost from it, and simulated_speedup compares with plain. "
                         "vLLM for CPU with SmolLM2 at batch 1 on the 2-core VM: about 0.055,0.005,0.0065")
    ap.add_argument("--noise", type=float, default=0.1, help="log-normal sigma of the simulated step times")
    args = ap.parse_args(argv)

    from ..datastore.model_files import load_tokenizer, resolve_model
    from .spec_bench import load_questions, select_prompts

    model = args.model or str(resolve_model(None).cache_dir / "hf")
    tok = load_tokenizer(model)
    if args.generate and not args.references.exists():
        n = args.n_per_category or 2
        qs, _ = select_prompts(load_questions(args.prompts_file), _categories(), n + args.skip_per_category)
        qs = _skip(qs, args.skip_per_category)
        prompts = _chat_ids(tok, [q.text for q in qs])
        outputs = _generate(model, prompts, args.max_new_tokens)
        args.references.write_text(json.dumps({"prompts": prompts, "outputs": outputs,
                                                "categories": [q.category for q in qs]}))
    ref = json.loads(args.references.read_text())
    if "outputs" in ref:
        prompts, outputs = ref["prompts"], ref["outputs"]
        cats = ref.get("categories") or ["all"] * len(prompts)
    else:   # a vllm_bench report
        cats = []
        prompts = report_prompts(ref, tok, args.prompts_file, args.n_per_category, cats)
        runs = sorted(ref["runs"], key=lambda r: r["index"])
        outputs = [r["token_ids"] for r in runs]
    keep = [i for i, o in enumerate(outputs) if o]
    prompts, outputs, cats = [prompts[i] for i in keep], [outputs[i] for i in keep], [cats[i] for i in keep]
    groups = [("all", list(range(len(prompts))))]
    if args.by_category:
        groups += [(c, [i for i, x in enumerate(cats) if x == c]) for c in dict.fromkeys(cats)]
    costs = [float(c) for c in args.costs.split(",") if c]
    step_model = [float(x) for x in args.step_model.split(",")] if args.step_model else None
    for group, idx in groups:
        ps, outs = [prompts[i] for i in idx], [outputs[i] for i in idx]
        plain_seconds = None
        if step_model:
            plain_seconds = replay(PlainProposer(args.num_speculative_tokens), ps, outs, args.batch,
                                   SimulatedClock(*step_model, noise=args.noise), args.cohorts)["seconds"]
        for spec in args.config or ["ctx"]:
            t0 = time.perf_counter()
            name, prop = make_proposer(spec, args.num_speculative_tokens, args.token_cost, model,
                                       learn_cost=step_model is not None)
            clock = SimulatedClock(*step_model, noise=args.noise) if step_model else None
            try:
                t = replay(prop, ps, outs, args.batch, clock, args.cohorts)
            finally:
                prop.close()
            row = summary(name, t, costs, plain_seconds)
            if args.by_category:
                row = {"category": group, "prompts": len(idx), **row}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
    return 0


def _categories():
    from .spec_bench import parse_categories

    return parse_categories(None)


def _skip(qs, n: int):
    if n <= 0:
        return qs
    seen: dict[str, int] = {}
    out = []
    for q in qs:
        seen[q.category] = seen.get(q.category, 0) + 1
        if seen[q.category] > n:
            out.append(q)
    return out


if __name__ == "__main__":
    sys.exit(main())
