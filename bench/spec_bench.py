"""Spec-Bench harness: plain greedy, transformers prompt lookup and our decoder, interleaved on the same prompts.

For every prompt each method runs back to back in one process (the order rotates from prompt to prompt so
that slow drift of the machine -- thermal, other load -- falls on every method alike). Every greedy output of
our decoder is checked token for token against plain ``model.generate(do_sample=False)``.

The pieces are importable and injectable (model, tokenizer, prompt ids), so that tests can run the whole
harness on a tiny random model; ``bench/cli.py`` is the command line (``spec-bench``).
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..client.budget import MAX_BUDGET_CPU

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "bench" / "spec-bench_question.jsonl"

CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_SUBCATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
DEFAULT_CONFIGS = ("context,recycling", "context")
DATASTORE = "datastore"

PLAIN, PLD, OURS_PLAIN, ASSISTED = "plain", "pld", "ours-plain", "assisted"
PLD_NUM_TOKENS = 10


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One benchmark prompt: the first turn of a Spec-Bench question. ``ids`` (optional) bypasses the
    tokenizer (tests); otherwise the chat template is applied to ``text``."""

    category: str
    subcategory: str
    question_id: int | str
    text: str
    ids: Optional[list[int]] = None


def category_of(raw_category: str) -> str:
    """Spec-Bench's category, with the 8 MT-bench categories grouped as ``mt_bench``."""
    return "mt_bench" if raw_category in MT_BENCH_SUBCATEGORIES else raw_category


def load_questions(path: str | Path) -> list[Prompt]:
    """All questions of a Spec-Bench JSONL file (first turn only), in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (give the Spec-Bench questions with --questions)")
    out = []
    from ..client.cli_support import iter_jsonl

    for i, obj in iter_jsonl(path):
        turns = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("category"), str) or not turns \
                or not isinstance(turns[0], str):
            raise ValueError(f"{path}:{i}: expected an object with 'category' and a non-empty 'turns' list")
        raw = obj["category"]
        out.append(Prompt(category_of(raw), raw, obj.get("question_id", i), turns[0]))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def parse_categories(spec: Optional[str | Sequence[str]]) -> list[str]:
    """``None``/``all`` -> the six categories; else a comma-separated subset (validated, order kept)."""
    if spec is None:
        return list(CATEGORIES)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names or names == ["all"]:
        return list(CATEGORIES)
    bad = [n for n in names if n not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; choose from {', '.join(CATEGORIES)}")
    return list(dict.fromkeys(names))


def select_prompts(questions: Sequence[Prompt], categories: Sequence[str], n_per_category: int
                   ) -> tuple[list[Prompt], Optional[Prompt]]:
    """(N prompts per category, one extra unmeasured warm-up prompt).

    Other categories take their first N questions in file order. ``mt_bench`` is spread across its
    sub-categories: round robin over writing, roleplay, ... humanities, taking each one's next question
    in file order. The warm-up prompt is the first question not selected (None if there is none).
    """
    if n_per_category < 1:
        raise ValueError("--n-per-category must be >= 1")
    by_cat: dict[str, list[Prompt]] = {}
    for q in questions:
        by_cat.setdefault(q.category, []).append(q)
    chosen: list[Prompt] = []
    for cat in categories:
        pool = by_cat.get(cat, [])
        if not pool:
            raise ValueError(f"category {cat!r} has no questions in the file")
        if cat == "mt_bench":
            subs = {s: [q for q in pool if q.subcategory == s] for s in MT_BENCH_SUBCATEGORIES}
            picked: list[Prompt] = []
            rank = 0
            while len(picked) < min(n_per_category, len(pool)):
                for s in MT_BENCH_SUBCATEGORIES:
                    if rank < len(subs[s]) and len(picked) < n_per_category:
                        picked.append(subs[s][rank])
                rank += 1
            chosen.extend(picked)
        else:
            chosen.extend(pool[:n_per_category])
    taken = {id(p) for p in chosen}
    rest = [q for q in questions if id(q) not in taken]
    # prefer a warm-up from a measured category (similar prompt lengths), else any
    warm = next((q for q in rest if q.category in categories), rest[0] if rest else None)
    return chosen, warm


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class Run:
    """One method on one prompt. ``forwards``: target forwards that produced tokens (None if unknown)."""

    tokens: list[int]
    seconds: float
    forwards: Optional[int]


class ForwardCounter:
    """Counts calls of ``model.forward`` (a forward hook); read deltas around a run."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


class HFMethod:
    """transformers ``model.generate`` greedy; with ``prompt_lookup`` set, its prompt lookup decoding; with
    ``assistant`` (a draft model), its assisted decoding."""

    def __init__(self, name: str, model, eos_token_ids: Iterable[int], pad_token_id: Optional[int],
                 counter: ForwardCounter, prompt_lookup: Optional[int] = None, assistant=None):
        self.name = name
        self.model = model
        self.eos = sorted(set(int(e) for e in eos_token_ids)) or None
        self.pad = pad_token_id if pad_token_id is not None else (self.eos[0] if self.eos else 0)
        self.counter = counter
        self.prompt_lookup = prompt_lookup
        self.assistant = assistant

    def run(self, ids: list[int], max_new_tokens: int) -> Run:
        import torch

        dev = next(self.model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                  eos_token_id=self.eos, pad_token_id=self.pad, attention_mask=torch.ones_like(x),
                  temperature=None, top_p=None, top_k=None)
        if self.prompt_lookup:
            kw["prompt_lookup_num_tokens"] = self.prompt_lookup
        if self.assistant is not None:
            kw["assistant_model"] = self.assistant
        c0 = self.counter.calls
        _sync(dev)
        t0 = time.perf_counter()
        out = self.model.generate(x, **kw)
        _sync(dev)
        secs = time.perf_counter() - t0
        return Run([int(t) for t in out[0, len(ids):].tolist()], secs, self.counter.calls - c0)


class OursMethod:
    """Our SpeculativeDecoder (greedy). The decoder -- drafters, recycling table, budget controller --
    lives across prompts, as in a long-running process."""

    def __init__(self, name: str, decoder):
        self.name = name
        self.decoder = decoder

    def run(self, ids: list[int], max_new_tokens: int, prompt_text: Optional[str] = None) -> Run:
        dev = next(self.decoder.model.parameters()).device
        _sync(dev)
        t0 = time.perf_counter()
        res = self.decoder.generate(ids, max_new_tokens=max_new_tokens, prompt_text=prompt_text, decode_text=False)
        _sync(dev)
        secs = time.perf_counter() - t0
        return Run(list(res.new_tokens), secs, int(res.steps))


def _sync(dev) -> None:
    if getattr(dev, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def config_name(drafters: str) -> str:
    return "ours:" + ",".join(n.strip() for n in drafters.split(",") if n.strip())


def build_methods(model, tokenizer, configs: Sequence[str], *, profile=None, max_budget: int = MAX_BUDGET_CPU,
                  include_pld: bool = True, include_ours_plain: bool = True,
                  drafter_factory: Optional[Callable[[str], list]] = None, assistant=None) -> list:
    """plain, pld, ours-plain, assisted (with ``assistant``, a draft model) and one ``ours:<drafters>`` per
    config, all on the same model object.

    drafter_factory(names) -> list of drafters; default: ContextDrafter / RecyclingDrafter by name
    (``datastore`` needs a factory that knows the address: see bench/cli.py).
    """
    from ..client.decoder import SpeculativeDecoder

    counter = ForwardCounter(model)
    plain_dec = SpeculativeDecoder(model, tokenizer, [], profile=profile, max_budget=max_budget, speculate=False)
    eos = plain_dec.eos_token_ids
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    methods: list = [HFMethod(PLAIN, model, eos, pad, counter)]
    if include_pld:
        methods.append(HFMethod(PLD, model, eos, pad, counter, prompt_lookup=PLD_NUM_TOKENS))
    if assistant is not None:
        methods.append(HFMethod(ASSISTED, model, eos, pad, counter, assistant=assistant))
    if include_ours_plain:
        methods.append(OursMethod(OURS_PLAIN, plain_dec))
    factory = drafter_factory or (lambda names: default_drafters(names, model))
    seen = set()
    for cfg in configs:
        name = config_name(cfg)
        if name in seen or name == "ours:":
            continue
        seen.add(name)
        dec = SpeculativeDecoder(model, tokenizer, factory(cfg), profile=profile, max_budget=max_budget,
                                 speculate=True)
        methods.append(OursMethod(name, dec))
    return methods


def default_drafters(names: str, model) -> list:
    from ..client.drafters import ContextDrafter, RecyclingDrafter

    out = []
    for n in [s.strip() for s in names.split(",") if s.strip()]:
        if n == "context":
            out.append(ContextDrafter())
        elif n == "recycling":
            out.append(RecyclingDrafter(int(model.config.vocab_size)))
        else:
            raise ValueError(f"unknown drafter {n!r} (context, recycling; datastore needs --datastore or --index)")
    return out


# ---------------------------------------------------------------------------------------------- harness
@dataclass
class Record:
    """Raw numbers of one method on one prompt."""

    prompt_index: int
    category: str
    subcategory: str
    question_id: int | str
    prompt_tokens: int
    method: str
    order: int                      # position of this method in the prompt's rotated order
    new_tokens: int
    seconds: float
    tokens_per_second: float
    forwards: Optional[int]
    mat: Optional[float]            # new tokens per target forward
    speedup: Optional[float] = None  # tokens/s over plain's on this prompt
    identical: Optional[bool] = None  # equals plain greedy token for token
    first_diff: Optional[int] = None  # first differing position (None when identical)
    tokens: list[int] = field(default_factory=list)


@dataclass
class BenchResult:
    meta: dict
    methods: list[str]
    records: list[Record]

    def to_json(self) -> dict:
        return {"meta": self.meta, "methods": self.methods, "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_json(cls, d: dict) -> "BenchResult":
        return cls(d["meta"], list(d["methods"]), [Record(**r) for r in d["records"]])

    def mismatches(self) -> list[Record]:
        return [r for r in self.records if r.identical is False and r.method.startswith("ours")]


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """First position where two token lists differ (length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _run_method(m, ids: list[int], max_new_tokens: int, text: Optional[str]) -> Run:
    if isinstance(m, OursMethod):
        return m.run(ids, max_new_tokens, prompt_text=text)
    return m.run(ids, max_new_tokens)


def run_benchmark(methods: Sequence, prompts: Sequence[Prompt], encode: Callable[[str], list[int]], *,
                  max_new_tokens: int = 128, warmup: Sequence[Prompt] = (), progress: bool = True,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                  meta: Optional[dict] = None) -> BenchResult:
    """Run every method on every prompt, interleaved, rotating the order per prompt; check losslessness.

    ``methods[0]`` must be ``plain`` (the reference). ``warmup`` prompts run every method once, unmeasured.
    """
    if not methods or methods[0].name != PLAIN:
        raise ValueError("the first method must be plain (the reference)")
    names = [m.name for m in methods]

    def ids_of(p: Prompt) -> list[int]:
        return list(p.ids) if p.ids is not None else encode(p.text)

    for w in warmup:
        ids = ids_of(w)
        for m in methods:
            _run_method(m, ids, max_new_tokens, w.text)

    records: list[Record] = []
    bar = _progress(len(prompts), progress)
    try:
        for pi, p in enumerate(prompts):
            ids = ids_of(p)
            k = pi % len(methods)
            order = list(methods[k:]) + list(methods[:k])
            runs: dict[str, tuple[int, Run]] = {}
            for pos, m in enumerate(order):
                runs[m.name] = (pos, _run_method(m, ids, max_new_tokens, p.text))
            ref = runs[PLAIN][1]
            ref_tps = len(ref.tokens) / max(ref.seconds, 1e-9)
            line = []
            for m in methods:
                pos, r = runs[m.name]
                tps = len(r.tokens) / max(r.seconds, 1e-9)
                diff = first_difference(r.tokens, ref.tokens)
                mat = (len(r.tokens) / r.forwards) if r.forwards else None
                rec = Record(pi, p.category, p.subcategory, p.question_id, len(ids), m.name, pos, len(r.tokens),
                             r.seconds, tps, r.forwards, mat, tps / ref_tps if ref_tps > 0 else None,
                             diff is None, diff, r.tokens)
                records.append(rec)
                if m.name != PLAIN:
                    line.append(f"{m.name}={rec.speedup:.2f}x" + ("" if rec.identical else f"(DIFF@{diff})"))
                if diff is not None and m.name.startswith("ours"):
                    log(f"MISMATCH: {m.name} on prompt {pi} ({p.category}/{p.question_id}) differs from plain "
                        f"greedy at new-token position {diff}: ours={r.tokens[diff:diff + 5]} "
                        f"plain={ref.tokens[diff:diff + 5]}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{p.category} " + " ".join(line))
            else:
                log(f"[{pi + 1}/{len(prompts)}] {p.category}: plain {ref_tps:.1f} tok/s " + " ".join(line))
    finally:
        if bar is not None:
            bar.close()
    meta = dict(meta or {})
    counters = drafter_counters(methods)
    if counters:
        meta["drafter_counters"] = counters
    return BenchResult(meta, names, records)


def drafter_counters(methods: Sequence) -> dict:
    """{method: {drafter class: {counter: value}}} over the whole run: the decoder's per-drafter drafting
    seconds and verified / accepted nodes, and the counters of drafters that keep them (``.stats``, e.g.
    the datastore drafter: lookups, hits, failures by gRPC code, prefetches used)."""
    out: dict = {}
    for m in methods:
        dec = getattr(m, "decoder", None)
        for d in getattr(dec, "drafters", ()):
            name = type(d).__name__
            stats = dict(getattr(dec, "drafter_stats", {}).get(name, {}))
            stats.update(dict(getattr(d, "stats", None) or {}))
            if stats:
                out.setdefault(m.name, {})[name] = {
                    k: (round(v, 4) if isinstance(v, float) else int(v)) for k, v in sorted(stats.items())}
    return out


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="spec-bench", unit="prompt", file=sys.stderr, dynamic_ncols=True)


def environment(model=None, device=None, command: Optional[Sequence[str]] = None) -> dict:
    """Model, device, threads, versions, date and command line, for the report."""
    import datetime

    import torch
    import transformers

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": __import__("os").cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "command": " ".join(command) if command is not None else " ".join(sys.argv),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if model is not None:
        p = next(model.parameters())
        env["device"] = str(p.device)
        env["dtype"] = str(p.dtype).replace("torch.", "")
        if p.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(p.device)
    if device is not None:
        env["device"] = str(device)
    return env


def median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
