"""bench/proposer_replay.py: replaying recorded greedy outputs must see what a greedy engine sees."""
from __future__ import annotations

import numpy as np

from specstore.bench.proposer_replay import PlainProposer, SimulatedClock, replay, summary
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
