"""spec-bench harness end to end on a tiny random Llama (no real model, no tokenizer files)."""
import json

import numpy as np
import pytest

from specstore.bench import cli as bench_cli
from specstore.bench.spec_bench import (OURS_PLAIN, PLAIN, PLD, Prompt, Run, build_methods, run_benchmark)
from tests.helpers import tiny_llama
from tests.unit.test_bench_prompts import write_questions

VOCAB = 96


class FakeTokenizer:
    """Characters -> ids; enough for encode_prompt without a chat template."""

    chat_template = None
    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] + [3 + ord(c) % (VOCAB - 3) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, seed=3)


def repetitive_prompts(n=3, seed=0):
    rng = np.random.default_rng(seed)
    cats = ["qa", "rag", "mt_bench", "summarization"]
    return [Prompt(cats[i % len(cats)], cats[i % len(cats)], i, f"p{i}",
                   ids=[1] + [int(x) for x in rng.integers(3, VOCAB, 12)] * 3) for i in range(n)]


def test_interleaved_run_is_lossless_and_rotates(model):
    methods = build_methods(model, None, ["context,recycling", "context"])
    names = [m.name for m in methods]
    assert names == [PLAIN, PLD, OURS_PLAIN, "ours:context,recycling", "ours:context"]
    # one model object shared by every method; each config keeps its own decoder across prompts
    assert all(m.model is model for m in methods[:2]) and all(m.decoder.model is model for m in methods[2:])
    dec_before = methods[3].decoder
    prompts = repetitive_prompts(3)
    res = run_benchmark(methods, prompts, encode=None, max_new_tokens=10, warmup=[repetitive_prompts(1, 9)[0]],
                        progress=False, log=lambda s: None)
    assert methods[3].decoder is dec_before
    counters = res.meta["drafter_counters"]     # every drafter's time and verified / accepted nodes
    ctx = counters["ours:context"]["ContextDrafter"]
    assert ctx["seconds"] > 0 and 0 <= ctx["accepted"] <= ctx["verified"]
    assert set(counters["ours:context,recycling"]) == {"ContextDrafter", "RecyclingDrafter"}
    assert len(res.records) == 3 * len(names)
    assert not res.mismatches()
    assert all(r.identical for r in res.records if r.method.startswith("ours"))
    for r in res.records:
        assert r.new_tokens == len(r.tokens) > 0 and r.seconds > 0
        if r.method in (PLAIN, OURS_PLAIN):
            assert r.mat == pytest.approx(1.0)
        else:
            assert r.mat is not None and r.mat >= 1.0
    plain = [r for r in res.records if r.method == PLAIN]
    assert all(r.speedup == pytest.approx(1.0) for r in plain)
    # the order rotates: plain runs first on prompt 0, second-to-last... ; every prompt a different start
    firsts = [next(r.method for r in res.records if r.prompt_index == i and r.order == 0) for i in range(3)]
    assert firsts == names[:3]


class WrongMethod:
    """Pretends to be ours but changes one token."""

    name = "ours:broken"

    def __init__(self, plain):
        self.plain = plain

    def run(self, ids, max_new_tokens):
        r = self.plain.run(ids, max_new_tokens)
        toks = list(r.tokens)
        toks[2] = (toks[2] + 1) % VOCAB
        return Run(toks, r.seconds, r.forwards)


def test_mismatch_is_reported_with_position(model):
    methods = build_methods(model, None, [], include_pld=False, include_ours_plain=False)
    methods.append(WrongMethod(methods[0]))
    logs = []
    res = run_benchmark(methods, repetitive_prompts(1), encode=None, max_new_tokens=6, progress=False,
                        log=logs.append)
    bad = res.mismatches()
    assert len(bad) == 1 and bad[0].first_diff == 2
    assert any("MISMATCH" in s and "position 2" in s for s in logs)


def test_plain_must_come_first(model):
    methods = build_methods(model, None, ["context"])
    with pytest.raises(ValueError, match="plain"):
        run_benchmark(methods[1:], repetitive_prompts(1), encode=None, progress=False)


def test_cli_end_to_end(model, tmp_path, monkeypatch, capsys):
    import specstore.client.budget
    import specstore.client.models
    import specstore.datastore.model_files
    from specstore.client.budget import CostProfile

    monkeypatch.setattr(specstore.client.models, "load_model", lambda *a, **k: (model, FakeTokenizer()))
    monkeypatch.setattr(specstore.client.budget, "cached_cost_profile", lambda *a, **k: CostProfile.flat(33))
    monkeypatch.setattr(specstore.datastore.model_files, "resolve_model", lambda spec: type("F", (), {"name": "tiny"})())
    q = write_questions(tmp_path / "q.jsonl", per_sub=1, per_cat=2)
    out = tmp_path / "out"
    argv = ["--questions", str(q), "--categories", "qa,mt_bench", "--n-per-category", "1",
            "--max-new-tokens", "6", "--configs", "context,recycling", "--quiet",
            "--report", str(out / "r.md"), "--plot", str(out / "r.png"), "--json-out", str(out / "r.json")]
    assert bench_cli.main(argv) == 0
    md = (out / "r.md").read_text()
    assert "| qa |" in md and "| mt_bench |" in md and "ours:context,recycling" in md
    raw = json.loads((out / "r.json").read_text())
    assert raw["meta"]["model"] == "tiny" and raw["meta"]["max_new_tokens"] == 6
    assert {"torch", "transformers", "torch_threads", "date", "command", "device"} <= set(raw["meta"])
    assert raw["meta"]["command"].startswith("spec-bench --questions ")
    assert len(raw["records"]) == 2 * 4
    assert (out / "r.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "speedup" in err


def test_cli_sizes_trees_by_a_given_verify_profile(model, tmp_path, monkeypatch):
    import specstore.client.budget
    import specstore.client.models
    import specstore.datastore.model_files
    from specstore.client.budget import CostProfile

    monkeypatch.setattr(specstore.client.models, "load_model", lambda *a, **k: (model, FakeTokenizer()))
    monkeypatch.setattr(specstore.client.budget, "cached_cost_profile", lambda *a, **k: CostProfile.flat(33))
    monkeypatch.setattr(specstore.datastore.model_files, "resolve_model", lambda spec: type("F", (), {"name": "tiny"})())
    prof = tmp_path / "gpu.json"     # a bench/gpu_profile.py report: tree size -> ms
    prof.write_text(json.dumps({"device": "some GPU", "t_n_ms": {"1": 20.0, "4": 20.0, "9": 21.0}}))
    q = write_questions(tmp_path / "q.jsonl", per_sub=1, per_cat=2)
    argv = ["--questions", str(q), "--categories", "qa", "--n-per-category", "1", "--max-new-tokens", "6",
            "--configs", "context", "--quiet", "--no-pld", "--verify-profile", str(prof),
            "--report", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "--json-out", str(tmp_path / "r.json")]
    assert bench_cli.main(argv) == 0
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["cost_profile"]["sizes"] == [1, 4, 9] and meta["cost_profile"]["seconds"][-1] == 0.021
    assert meta["max_budget"] == 8      # the given profile's largest tree, not the machine's (33)


def test_cli_errors(tmp_path, capsys):
    assert bench_cli.main(["--questions", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    q = write_questions(tmp_path / "q.jsonl")
    assert bench_cli.main(["--questions", str(q), "--categories", "poetry"]) == 2
    assert bench_cli.main(["--questions", str(q), "--configs", "context,magic"]) == 2
    assert bench_cli.main(["--questions", str(q), "--configs", "context,datastore"]) == 2
    err = capsys.readouterr().err
    assert "unknown categories" in err and "unknown drafters" in err and "--datastore" in err


def test_configs_add_datastore_variant():
    p = bench_cli.build_parser()
    assert bench_cli._configs(p.parse_args([])) == ["context,recycling", "context"]
    assert bench_cli._configs(p.parse_args(["--index", "/x"]))[-1] == "context,recycling,datastore"
    assert bench_cli._configs(p.parse_args(["--index", "/x", "--configs", "datastore"])) == ["datastore"]
    assert "interleaved" in p.format_help()


def test_datastore_flags_pass_through(model, monkeypatch):
    import specstore.client.datastore_drafter

    monkeypatch.delenv("DATASTORE_AUTH_TOKEN", raising=False)
    from specstore.client.types import Drafter, DraftTree

    calls = []

    class Stub(Drafter):
        def propose(self, ctx, budget):
            return DraftTree.empty(ctx.last_token)

    def fake(address=None, index_path=None, tokenizer=None, **kw):
        calls.append((address, index_path, kw))
        return Stub()

    monkeypatch.setattr(specstore.client.datastore_drafter, "make_datastore_drafter", fake)
    args = bench_cli.build_parser().parse_args(["--index", "/some/index", "--datastore-timeout-ms", "7"])
    factory = bench_cli._drafter_factory(model, None, args)
    assert [type(d).__name__ for d in factory("context,recycling")] == ["ContextDrafter", "RecyclingDrafter"]
    assert not calls  # only configurations that name the datastore open it
    ds = factory("context,recycling,datastore")
    assert isinstance(ds[0], Stub) and len(ds) == 3
    # the write token comes from $DATASTORE_AUTH_TOKEN, as the server's does (none here)
    assert calls == [(None, "/some/index", {"timeout_s": 0.007, "memory": True, "auth_token": None})]
    args = bench_cli.build_parser().parse_args(["--index", "/some/index", "--no-session-memory"])
    bench_cli._drafter_factory(model, None, args)("datastore")
    assert calls[-1] == (None, "/some/index", {"memory": False, "auth_token": None})


def test_drafter_counters_are_recorded(model):
    from collections import Counter

    from specstore.client.drafters import ContextDrafter
    from specstore.client.types import Drafter, DraftTree

    class Counting(Drafter):
        def __init__(self):
            self.stats = Counter()

        def propose(self, ctx, budget):
            self.stats["requests"] += 1
            return DraftTree.empty(ctx.last_token)

    counting = Counting()
    methods = build_methods(model, None, ["context,counting"], include_pld=False, include_ours_plain=False,
                            drafter_factory=lambda names: [ContextDrafter(), counting])
    res = run_benchmark(methods, repetitive_prompts(2), encode=None, max_new_tokens=6, progress=False,
                        log=lambda s: None)
    got = res.meta["drafter_counters"]
    assert list(got) == ["ours:context,counting"]
    c = got["ours:context,counting"]["Counting"]
    assert c["requests"] == counting.stats["requests"] and c["seconds"] >= 0
    assert c["verified"] == c["accepted"] == 0          # its source bit is NONE: nothing is counted as its own
    assert set(got["ours:context,counting"]) == {"ContextDrafter", "Counting"}
    assert counting.stats["requests"] > 0
