"""bench/proposer_replay.py: replaying recorded greedy outputs must see what a greedy engine sees."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from specstore.bench.proposer_replay import PlainProposer, SimulatedClock, SuffixProposer, replay, summary
from specstore.client.budget import StepCostModel
from specstore.client.vllm_proposer import ProposerOptions, SpecstoreProposer
from tests.helpers import plain_greedy
from tests.unit.test_vllm_proposer import _config, _engine, _prompts, model  # noqa: F401 - fixture


def _fixed_cost(prop):
    """Wall time differs between the two runs: keep the step cost at its prior so that chains can match."""
    prop.step_cost = StepCostModel(prior_token_cost=0.05, warmup=10 ** 9)
    return prop


def test_replay_drafts_and_accepts_exactly_what_the_model_driven_engine_does(model):  # noqa: F811
    prompts = _prompts(4, seed=5)
    real = _fixed_cost(SpecstoreProposer(_config(), ProposerOptions(drafters="context")))
    outputs = _engine(model, prompts, 20, real, batch=1)
    assert outputs == {i: plain_greedy(model, p, 20) for i, p in enumerate(prompts)}
    replayed = _fixed_cost(SpecstoreProposer(_config(), ProposerOptions(drafters="context")))
    t = replay(replayed, prompts, [outputs[i] for i in range(len(prompts))], batch=1)
    for field in ("steps", "proposed_tokens", "accepted_tokens", "requests_started"):
        assert getattr(replayed.stats, field) == getattr(real.stats, field) > 0, field
    assert t["tokens"] == 4 * 20 and t["accepted"] >= replayed.stats.accepted_tokens > 0
    row = summary("ctx", t, [0.05])
    assert row["tokens_per_step"] > 1.0 and 0 < row["accepted_share"] <= 1


def test_the_simulated_clock_charges_drafts_and_the_plain_engine_none():
    rng = np.random.default_rng(0)
    prompts = [[10 + i] + rng.integers(3, 96, 6).tolist() * 3 for i in range(3)]
    outputs = [(p[1:7] * 4)[:20] for p in prompts]        # continues the prompt's own pattern: drafts pay
    plain = replay(PlainProposer(8), prompts, outputs, 2, SimulatedClock(0.05, 0.001, 0.002, noise=0.0))
    assert plain["drafts"] == 0
    # prefill makes each request's first token; then 19 steps of two rows, and 19 of the third alone
    assert plain["steps"] == 38 and abs(plain["seconds"] - 19 * (0.05 + 0.002) - 19 * (0.05 + 0.001)) < 1e-9
    prop = SpecstoreProposer(_config(), ProposerOptions(drafters="context"))
    spec = replay(prop, prompts, outputs, 2, SimulatedClock(0.05, 0.001, 0.002, noise=0.0))
    assert spec["tokens"] == plain["tokens"] and spec["drafts"] > 0
    assert spec["seconds"] < plain["seconds"]           # cheap drafts of a repeating text pay


def test_cohorts_admit_a_batch_only_once_every_row_is_free():
    # outputs of 20, 5 and 3 tokens, two rows: a stream admits the third request when the 5-token one ends
    # (step 4), so the engine runs 19 steps; cohorts wait for the 20-token one: 19 + 2 steps
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    outputs = [list(range(20, 40)), list(range(40, 45)), list(range(50, 53))]
    stream = replay(PlainProposer(8), prompts, outputs, 2)
    cohorts = replay(PlainProposer(8), prompts, outputs, 2, cohorts=True)
    assert stream["tokens"] == cohorts["tokens"] == 28
    assert stream["steps"] == 19 and cohorts["steps"] == 19 + 2


class _RecordingSuffixCache:
    """Stands in for arctic-inference's cache where it is not installed: records the calls, drafts the
    pattern's last token (a real cache's answers are checked in the test after this one, where it exists)."""

    calls: list = []

    def __init__(self, **kw):
        self.kw = kw

    def start_request(self, rid, prompt):
        self.calls.append(("start", rid, list(map(int, prompt))))

    def add_active_response(self, rid, ids):
        self.calls.append(("add", rid, list(ids)))

    def stop_request(self, rid):
        self.calls.append(("stop", rid))

    def speculate(self, rid, pattern, max_spec_tokens, max_spec_factor, min_token_prob):
        return types.SimpleNamespace(token_ids=[int(pattern[-1])] * min(2, max_spec_tokens))


def test_the_suffix_adapter_follows_requests_by_row(monkeypatch):
    mod = types.ModuleType("arctic_inference.suffix_decoding")
    mod.SuffixDecodingCache = _RecordingSuffixCache
    monkeypatch.setitem(sys.modules, "arctic_inference", types.ModuleType("arctic_inference"))
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", mod)
    _RecordingSuffixCache.calls = []
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    outputs = [[10, 10, 10, 11], [12, 13], [14, 14, 14]]
    prop = SuffixProposer(8)
    t = replay(prop, prompts, outputs, batch=2)
    prop.close()                                                 # the last request ends with the run
    calls = _RecordingSuffixCache.calls
    starts = [c for c in calls if c[0] == "start"]
    assert [c[2] for c in starts] == prompts                     # each request once, with its prompt alone
    stops = [c[1] for c in calls if c[0] == "stop"]
    assert sorted(stops) == sorted(c[1] for c in starts)         # every request released once
    for rid, out in zip([c[1] for c in starts], outputs):        # its response so far, in order, at each step
        got = [x for c in calls if c[0] == "add" and c[1] == rid for x in c[2]]
        assert got and got == out[:len(got)]
    assert t["tokens"] == sum(map(len, outputs)) and t["accepted"] > 0   # repeated tokens drafted and accepted


def test_the_suffix_adapter_drafts_what_arctic_inference_finds():
    pytest.importorskip("arctic_inference.suffix_decoding", reason="arctic-inference: .venv-vllm-suffix")
    text = [5, 6, 7, 8, 9, 10, 11, 12]
    prompts = [[1] + text * 2]
    outputs = [text + text[:4]]               # the answer repeats the prompt's pattern: the prompt tree has it
    t = replay(SuffixProposer(8), prompts, outputs, batch=1)
    assert t["accepted"] >= len(outputs[0]) // 2 and t["steps"] < len(outputs[0]) // 2


class _Fixed:
    """Drafts the same tokens every step."""

    def __init__(self, draft):
        self.k, self.draft, self.closed = 8, draft, False

    def propose(self, sampled_token_ids, *_, **__):
        return [list(self.draft) if len(s) else [] for s in sampled_token_ids]

    def close(self):
        self.closed = True


def test_the_oracle_takes_the_draft_accepted_furthest_and_cut_keeps_only_that():
    from specstore.bench.proposer_replay import OracleProposer

    prompts, outputs = [[1, 2]], [[7, 7, 7, 7, 7, 7, 7, 7, 7]]
    right, wrong = _Fixed([7, 7, 9]), _Fixed([5, 5])
    alone = replay(_Fixed([5, 5]), prompts, outputs, batch=1)
    assert alone["accepted"] == 0 and alone["steps"] == 8
    oracle = OracleProposer([wrong, right])
    t = replay(oracle, prompts, outputs, batch=1)
    # each step takes [7, 7, 9]: 2 accepted + the verified token; the last step has 2 tokens left to make
    assert t["accepted"] == 2 + 2 + 1 and t["steps"] == 3 and t["drafts"] == 3 + 3 + 3
    cut = replay(OracleProposer([wrong, right], cut=True), prompts, outputs, batch=1)
    assert cut["accepted"] == cut["drafts"] == t["accepted"] and cut["steps"] == t["steps"]
    oracle.close()
    assert right.closed and wrong.closed
