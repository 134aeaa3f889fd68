"""The vLLM proposer's logic without vLLM: a small engine loop with vLLM's call shape and chain verification.

The real engine runs in tests/vllm/ (its own environment); here the engine is simulated: rows of a
``token_ids_cpu`` array, ``num_tokens_no_spec``, and greedy verification of each row's chain by the target's
argmax, with requests finishing and new ones taking over their rows.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specstore.client.types import DraftTree, Source
from specstore.client.vllm_proposer import ProposerOptions, SpecstoreProposer
from tests.helpers import plain_greedy, tiny_llama

MAX_LEN = 256


def _config(k: int = 6):
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           model_config=SimpleNamespace(max_model_len=MAX_LEN, model="unused", tokenizer=None))


class ReferenceBackend:
    """Answers every lookup with the true continuation (from a table of plain outputs), records sessions."""

    remote = True

    def __init__(self, refs: dict[int, list[int]], fail: bool = False):
        self.refs = refs          # prompt first token -> full reference sequence (prompt + output)
        self.fail = fail
        self.opened, self.closed, self.calls = [], [], 0

    def open_session(self, prompt_ids, prompt_text=None, top_k=0, *, memory=False, documents=True):
        sid = f"s{len(self.opened)}"
        self.opened.append(sid)
        return sid

    def close_session(self, sid):
        self.closed.append(sid)

    def retrieve_many(self, contexts, budget, session_ids):
        self.calls += 1
        if self.fail:
            raise ConnectionError("datastore down")
        out = []
        for c in contexts:
            ref = self.refs[int(c[0])]
            nxt = ref[len(c): len(c) + 4]
            out.append(DraftTree.from_paths(int(c[-1]), [nxt], Source.DATASTORE, [[0.9] * len(nxt)])
                       if nxt else DraftTree.empty(int(c[-1])))
        return out

    def close(self):
        pass


def _engine(model, prompts: list[list[int]], max_new: int, proposer, batch: int) -> dict[int, list[int]]:
    """Greedy decoding of ``prompts`` with at most ``batch`` running at once; returns outputs by prompt index."""
    rows = np.zeros((batch, MAX_LEN), dtype=np.int32)
    ntok = np.zeros(batch, dtype=np.int32)
    owner = [-1] * batch
    waiting = list(range(len(prompts)))
    outputs: dict[int, list[int]] = {}
    sampled: list[list[int]] = [[] for _ in range(batch)]

    def argmax_after(seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0].argmax(-1).tolist()

    while waiting or any(o >= 0 for o in owner):
        for r in range(batch):       # admit: prefill gives the first token
            if owner[r] < 0 and waiting:
                i = waiting.pop(0)
                p = prompts[i]
                first = argmax_after(p)[-1]
                rows[r, :len(p)] = p
                rows[r, len(p)] = first
                ntok[r] = len(p) + 1
                owner[r], sampled[r] = i, [first]
        drafts = proposer.propose(sampled, ntok, rows)
        assert len(drafts) == batch and all(len(d) <= proposer.k for d in drafts)
        for r in range(batch):
            if owner[r] < 0:
                sampled[r] = []
                continue
            seq = rows[r, :ntok[r]].tolist()
            am = argmax_after(seq + list(drafts[r]))[len(seq) - 1:]
            acc = 0
            while acc < len(drafts[r]) and drafts[r][acc] == am[acc]:
                acc += 1
            new = list(drafts[r][:acc]) + [am[acc]]
            rows[r, ntok[r]: ntok[r] + len(new)] = new
            ntok[r] += len(new)
            sampled[r] = new
            p = prompts[owner[r]]
            if ntok[r] - len(p) >= max_new:
                outputs[owner[r]] = rows[r, len(p): len(p) + max_new].tolist()
                owner[r], sampled[r] = -1, []
                rows[r] = 0
                ntok[r] = 0
    return outputs


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=96, seed=3)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # distinct first tokens: the reference backend keys on them; repetition gives the context drafter matches
    return [[10 + i] + (rng.integers(3, 96, size=6).tolist() * 3) for i in range(n)]


def test_context_chains_are_lossless_and_rows_change_hands(model):
    prompts = _prompts(5)
    want = {i: plain_greedy(model, p, 24) for i, p in enumerate(prompts)}
    prop = SpecstoreProposer(_config(), ProposerOptions(drafters="context"))
    got = _engine(model, prompts, 24, prop, batch=2)
    assert got == want
    assert prop.stats.proposed_tokens > 0 and prop.stats.accepted_tokens > 0
    # 5 requests went through 2 rows: each was followed from start to end, then released
    assert prop.stats.requests_started == 5
    prop.propose([], np.zeros(0, np.int32), np.zeros((0, MAX_LEN), np.int32))   # an empty step ends the rest
    assert prop.stats.requests_released == 5 and not prop._requests


def test_datastore_trees_are_fused_and_sessions_follow_requests(model):
    prompts = _prompts(4, seed=1)
    want = {i: plain_greedy(model, p, 20) for i, p in enumerate(prompts)}
    refs = {p[0]: p + want[i] for i, p in enumerate(prompts)}
    backend = ReferenceBackend(refs)
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1", drafters="context,datastore"),
                             backend=backend)
    got = _engine(model, prompts, 20, prop, batch=3)
    assert got == want
    # the true continuation was offered every step, so most drafts were accepted
    assert prop.stats.accepted_tokens >= 0.5 * prop.stats.proposed_tokens > 0
    prop.close()
    assert sorted(backend.opened) == sorted(backend.closed) and len(backend.opened) == 4


def test_sessions_search_documents_with_the_engine_tokenizers_text(monkeypatch):
    """The proposer opens its own datastore: the engine's tokenizer turns each prompt into the search text."""
    import specstore.client.datastore_drafter as dd
    import specstore.datastore.model_files as mf

    backend = ReferenceBackend({})
    texts = []
    backend.open_session = lambda ids, text=None, top_k=0, **kw: texts.append(text) or "s"

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    monkeypatch.setattr(mf, "load_tokenizer", lambda spec: Tok())
    monkeypatch.setattr(dd, "make_datastore_drafter",
                        lambda **kw: SimpleNamespace(documents=True, backend=backend))
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1", memory=False))
    rows = np.zeros((1, MAX_LEN), dtype=np.int32)
    rows[0, :3] = [7, 8, 9]
    prop.propose([[9]], np.array([3], np.int32), rows)
    assert texts == ["7 8 9"]


def test_a_dead_datastore_changes_nothing_but_speed(model):
    prompts = _prompts(3, seed=2)
    want = {i: plain_greedy(model, p, 16) for i, p in enumerate(prompts)}
    backend = ReferenceBackend({}, fail=True)
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1"), backend=backend)
    assert _engine(model, prompts, 16, prop, batch=2) == want
    assert prop.stats.errors == backend.calls > 0


def test_chains_shrink_when_the_batch_grows():
    prop = SpecstoreProposer(_config(k=8), ProposerOptions(drafters="context", token_cost=0.05))
    tree = DraftTree.from_paths(5, [[1, 2, 3, 4, 5, 6, 7, 8]], Source.CONTEXT, [[0.6] * 8])
    one, _ = prop.controller.choose_chain(tree, 8, token_cost=0.05)
    many, _ = prop.controller.choose_chain(tree, 8, token_cost=0.05 * 32)
    assert one.num_drafts > many.num_drafts


def test_options_from_environment(tmp_path):
    cfg = tmp_path / "spec.json"
    cfg.write_text('{"index": "/idx", "timeout_ms": 7}')
    o = ProposerOptions.from_env({"SPECSTORE_VLLM_CONFIG": str(cfg), "SPECSTORE_TOKEN_COST": "0.1",
                                  "SPECSTORE_MEMORY": "0"})
    assert (o.index, o.timeout_ms, o.token_cost, o.memory) == ("/idx", 7.0, 0.1, False)
    assert o.drafter_names() == {"context", "datastore"}
    assert ProposerOptions.from_env({}).drafter_names() == {"context"}
    with pytest.raises(ValueError, match="not both"):
        ProposerOptions.from_env({"SPECSTORE_INDEX": "/a", "SPECSTORE_DATASTORE": "h:1"})
    with pytest.raises(ValueError, match="unknown drafter"):
        ProposerOptions.from_env({"SPECSTORE_DRAFTERS": "context,magic"})
    with pytest.raises(ValueError, match="neither"):
        ProposerOptions.from_env({"SPECSTORE_DRAFTERS": "datastore"})


class FixedStepCost:
    """A stand-in for the proposer's StepCostModel: fixed costs; records the step times it is shown."""

    def __init__(self, token_cost: float = 0.01, overhead: float = 0.0):
        self.seconds: list = []
        self._token_cost, self._overhead = token_cost, overhead

    def observe(self, tokens, seconds, speculated=False):
        self.seconds.append(seconds)

    def token_cost(self, rows):
        return self._token_cost

    def overhead(self, rows):
        return self._overhead


def test_step_cost_is_learned_from_step_times_and_idle_gaps_are_ignored():
    from specstore.client.budget import StepCostModel

    m = StepCostModel(prior_token_cost=0.02, warmup=10)
    assert m.token_cost(4) == pytest.approx(0.08)   # the prior, per running request
    assert m.overhead(4) == 0.0
    rng = np.random.default_rng(0)
    for i in range(400):
        tokens = int(rng.integers(1, 40))
        spec = bool(rng.integers(0, 2))
        m.observe(tokens, 0.05 + 0.01 * tokens + 0.02 * spec, spec)
        if i % 50 == 7:
            m.observe(tokens, 30.0, spec)              # the engine sat idle between two calls
    a, b, s = m.fit()
    # the prior (10 pseudo-steps at b = 0.02 * a) pulls a little against ~170 steps of weight
    assert a == pytest.approx(0.05, rel=0.2) and b == pytest.approx(0.01, rel=0.05)
    assert s == pytest.approx(0.02, rel=0.15)
    assert m.token_cost(8) == pytest.approx(0.08 / 0.13, rel=0.1)
    assert m.token_cost(1) == pytest.approx(b / (a + b), rel=1e-6)
    assert m.token_cost(8) == pytest.approx(8 * b / (a + 8 * b), rel=1e-6)   # every request waits for it
    assert m.overhead(8) == pytest.approx(8 * s / (a + 8 * b), rel=1e-6)     # the whole batch pays it once


def test_a_slow_propose_is_not_learned_as_a_step(model):
    """A propose() that stalls (here its datastore lookup, as a kernel compiling on a cold cache does) is no
    engine step: the step after it is not observed, so the learned step cost is not inflated by the stall."""
    import time as _time

    prompts = _prompts(2, seed=5)
    refs = {p[0]: p + plain_greedy(model, p, 12) for p in prompts}
    want = {i: plain_greedy(model, p, 12) for i, p in enumerate(prompts)}

    class FirstCallStalls(ReferenceBackend):
        def retrieve_many(self, contexts, budget, session_ids):
            if self.calls == 0:
                _time.sleep(0.3)
            return super().retrieve_many(contexts, budget, session_ids)

    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1"), backend=FirstCallStalls(refs))
    prop.step_cost = FixedStepCost()
    assert _engine(model, prompts, 12, prop, batch=2) == want
    assert prop.stats.extra["slow_proposes"] == 1
    assert len(prop.step_cost.seconds) == prop.stats.steps - 2    # neither the first step nor the stalled one
    assert max(prop.step_cost.seconds) < 0.25


def test_step_cost_stays_near_its_prior_without_spread():
    """Steps that all verify the same number of tokens cannot tell a from b: the prior holds, no swing."""
    from specstore.client.budget import StepCostModel

    m = StepCostModel(prior_token_cost=0.05, warmup=10)
    rng = np.random.default_rng(1)
    for _ in range(300):
        m.observe(1, 0.06 * (1 + 0.2 * rng.standard_normal()))
    assert m.token_cost(1) == pytest.approx(0.05 / 1.05, rel=0.1)
    assert m.overhead(1) == pytest.approx(0.0, abs=0.02)


def test_a_step_that_cannot_pay_the_speculation_overhead_drafts_nothing(model):
    """When what every row expects to gain is below the step's speculation overhead, no row drafts, except
    on one in eight such steps, which keep measuring the overhead and the acceptance."""
    prompts = _prompts(2, seed=4)
    refs = {p[0]: p + plain_greedy(model, p, 16) for p in prompts}
    want = {i: plain_greedy(model, p, 16) for i, p in enumerate(prompts)}

    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1"), backend=ReferenceBackend(refs))
    prop.step_cost = FixedStepCost(overhead=1e6)
    assert _engine(model, prompts, 16, prop, batch=2) == want
    declined = prop.stats.extra["declined_steps"]
    explored = prop._would_decline - declined
    assert declined > 0 and explored == prop._would_decline // 8
    assert prop.stats.proposed_tokens <= explored * prop.k
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1"), backend=ReferenceBackend(refs))
    prop.step_cost = FixedStepCost(overhead=0.0)
    assert _engine(model, prompts, 16, prop, batch=2) == want
    assert prop.stats.proposed_tokens > 0


def test_the_same_prompt_again_in_the_same_row_is_a_new_request(model):
    """Requests that share their first tokens (a system prompt, or the same prompt twice) get their own state."""
    p = _prompts(1, seed=6)[0]
    want = plain_greedy(model, p, 12)
    backend = ReferenceBackend({p[0]: p + want})
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1"), backend=backend)
    assert _engine(model, [p, list(p), list(p)], 12, prop, batch=1) == {0: want, 1: want, 2: want}
    assert prop.stats.requests_started == 3 and backend.opened == ["s0", "s1", "s2"]
    assert backend.closed == ["s0", "s1"] and prop.stats.requests_released == 2


def test_a_request_moved_to_another_row_keeps_its_state():
    """vLLM compacts its batch when requests finish: a request seen at another row is the same request."""
    a = [11] + list(range(20, 60))
    b = [12] + list(range(60, 100))
    backend = ReferenceBackend({11: a + [1, 2, 3], 12: b + [4, 5, 6]})
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="x:1"), backend=backend)

    def step(rows):
        ids = np.zeros((len(rows), MAX_LEN), dtype=np.int32)
        for r, seq in enumerate(rows):
            ids[r, :len(seq)] = seq
        return prop.propose([[seq[-1]] for seq in rows], np.array([len(s) for s in rows], np.int32), ids)

    step([a, b])
    before = {row: prop._requests[row] for row in (0, 1)}
    step([b + [4], a + [1]])                       # swapped rows, one token more each
    assert prop._requests[0] is before[1] and prop._requests[1] is before[0]
    assert prop.stats.requests_started == 2 and backend.closed == []
    step([a + [1, 2]])                             # b finished, a compacted to row 0
    assert prop._requests[0] is before[0] and backend.closed == ["s1"]
    assert prop.stats.requests_started == 2 and prop.stats.requests_released == 1


@contextlib.contextmanager
def _sharing_proposer(tmp_path, **opts):
    """(a proposer pushing to a real service on 127.0.0.1 with opts, the service's statistics log)."""
    from specstore.client.datastore_client import DatastoreClient
    from specstore.client.datastore_drafter import RemoteBackend
    from specstore.datastore.ngram_stats import NgramStats
    from specstore.datastore.servicer import ServiceConfig
    from specstore.datastore.stats_log import StatsLog
    from tests.datastore_fake_index import FakeIndex, write_fake_index
    from tests.integration.datastore_support import ServerThread

    idx = write_fake_index(tmp_path / "idx", [[1, 2, 3]], fingerprint="fp-test")
    log = StatsLog(tmp_path / "stats", stats=NgramStats(half_life_s=1e12)).open()
    try:
        with ServerThread(idx, ServiceConfig(auth_token="t"), opener=FakeIndex.open, stats=log) as srv:
            backend = RemoteBackend(DatastoreClient(srv.address, timeout_s=1.0, auth_token="t"))
            yield SpecstoreProposer(_config(), ProposerOptions(drafters="context", datastore=srv.address, **opts),
                                    backend=backend), log
    finally:
        log.close()


def test_accepted_tokens_reach_the_shared_statistics(model, tmp_path):
    """SPECSTORE_SHARE_STATS: generated tokens (not prompts) go to a real service's statistics as n-gram runs;
    outputs stay plain."""
    prompts = _prompts(4, seed=5)
    want = {i: plain_greedy(model, p, 40) for i, p in enumerate(prompts)}
    with _sharing_proposer(tmp_path, share_stats=True) as (prop, log):
        assert _engine(model, prompts, 40, prop, batch=2) == want
        prop.propose([], np.zeros(0, np.int32), np.zeros((0, MAX_LEN), np.int32))
        prop.close()
        assert prop.pusher.stats["pushed"] >= 1 and prop.pusher.stats["failed"] == 0
        order1 = {k[0]: r for k, r in log.stats._rows.items() if len(k) == 1}
        # every request shares at least 16 of its 40 tokens, at most all 40 but the prefill token
        mass = sum(r.total for r in order1.values())
        assert 16 * len(prompts) <= mass <= 39 * len(prompts)
        bigrams = {(a, b) for out in want.values() for a, b in zip(out, out[1:])}
        # only generated tokens count (a run's prompt tokens are context before new_from): each pair is a
        # bigram of an output
        assert order1 and all((key, nxt) in bigrams for key, row in order1.items() for nxt in row.weights)


def test_finished_requests_reach_the_shared_outputs(model, tmp_path):
    """SPECSTORE_SHARE_OUTPUTS: each request's generated tokens (not its prompt; the last engine step's tokens
    are not seen) go to the service's recent outputs when the request ends, once; outputs stay plain."""
    prompts = _prompts(3, seed=7)
    want = {i: plain_greedy(model, p, 30) for i, p in enumerate(prompts)}
    with _sharing_proposer(tmp_path, share_outputs=True) as (prop, log):
        assert _engine(model, prompts, 30, prop, batch=2) == want
        prop.propose([], np.zeros(0, np.int32), np.zeros((0, MAX_LEN), np.int32))
        prop.close()
        assert prop.pusher.stats["failed"] == 0
        _, shared = log.stats.outputs.oldest(1 << 30)
        assert len(shared) == len(prompts) and not log.stats._rows      # outputs only, no statistics
        for out in shared:                 # a stretch of one request's generated tokens, from its 2nd token on
            assert any(len(out) >= 20 and w[1:1 + len(out)] == out for w in want.values())
    with pytest.raises(ValueError, match="SPECSTORE_SHARE_OUTPUTS needs SPECSTORE_DATASTORE"):
        ProposerOptions(share_outputs=True, index="x").validate()


def test_the_stats_file_shows_an_unreachable_datastore(model, tmp_path):
    """A real DatastoreClient swallows a dead service's errors (drafts from the other sources go on), so the
    proposer's own ``errors`` stays 0: its stats file carries the client's counts, which show the failures."""
    import json

    from specstore.client.datastore_client import DatastoreClient
    from specstore.client.datastore_drafter import RemoteBackend

    stats = tmp_path / "stats.json"
    client = DatastoreClient("127.0.0.1:1", timeout_s=0.05, stream=False)
    prompts = _prompts(2, seed=3)
    want = {i: plain_greedy(model, p, 12) for i, p in enumerate(prompts)}
    prop = SpecstoreProposer(_config(), ProposerOptions(datastore="127.0.0.1:1", memory=False, documents=False,
                                                        stats_file=str(stats)), backend=RemoteBackend(client))
    try:
        assert _engine(model, prompts, 12, prop, batch=1) == want
    finally:
        client.close()
    written = json.loads(stats.read_text())
    assert written["errors"] == 0
    ds = written["extra"]["datastore"]
    assert ds["failures"] >= 1 and ds["requests"] > ds["failures"]   # the breaker skips calls after failures
