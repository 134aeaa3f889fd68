"""A drafter that raises is counted and logged (rate-limited), and the output does not change."""
import logging

import pytest

from specstore.client.budget import CostProfile
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.drafter_errors import DrafterErrors
from specstore.client.types import Drafter, DraftTree
from tests.helpers import RandomTreeDrafter, plain_greedy, tiny_llama

VOCAB = 96
HOOKS = ("begin_request", "prefetch", "propose", "observe", "end_request")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB)


class Broken(Drafter):
    """Raises in the hooks named in ``fail``; elsewhere drafts the reference continuation (when it has one)."""

    def __init__(self, fail, ref=None, prompt_len=0):
        self.fail, self.ref, self.prompt_len = set(fail), ref, prompt_len
        self.calls = dict.fromkeys(HOOKS, 0)

    def _hook(self, name):
        self.calls[name] += 1
        if name in self.fail:
            raise RuntimeError(f"broken {name}")

    def begin_request(self, prompt_ids, prompt_text):
        self._hook("begin_request")

    def prefetch(self, ctx, budget):
        self._hook("prefetch")

    def propose(self, ctx, budget):
        self._hook("propose")
        pos = len(ctx.tokens) - self.prompt_len
        path = (self.ref or [])[pos: pos + 3]
        return DraftTree.from_paths(ctx.last_token, [path] if path else [], self.source)

    def observe(self, step):
        self._hook("observe")

    def end_request(self):
        self._hook("end_request")


def test_a_drafter_raising_in_every_hook_changes_nothing_and_is_counted(model, caplog):
    prompt = [5, 6, 7, 8, 9, 10]
    ref = plain_greedy(model, prompt, 24, eos=None)
    broken = Broken(HOOKS)
    good = RandomTreeDrafter(ref, len(prompt), VOCAB, seed=3, p_true=0.9)
    dec = SpeculativeDecoder(model, None, [broken, good], profile=CostProfile.flat(17), max_budget=16)
    with caplog.at_level(logging.WARNING, logger="specstore.client.drafter_errors"):
        res = dec.generate(prompt, 24, eos_token_id=[])
    assert res.new_tokens == ref
    assert res.accepted_per_step > 1  # the good drafter's trees were still verified
    steps = res.steps
    assert broken.calls == {"begin_request": 1, "prefetch": steps, "propose": steps, "observe": steps,
                            "end_request": 1}
    assert dec.drafter_errors.counts == {("Broken", h): broken.calls[h] for h in HOOKS}
    assert dec.drafter_errors.total == 2 + 3 * steps
    lines = [r for r in caplog.records if r.name == "specstore.client.drafter_errors"]
    assert len(lines) == 1  # one line per drafter per minute, however many steps fail
    assert "Broken" in lines[0].getMessage() and "begin_request" in lines[0].getMessage()
    assert lines[0].exc_info is not None


@pytest.mark.parametrize("hook", ["propose", "observe", "prefetch"])
def test_a_drafter_raising_in_one_hook_gives_plain_greedy_output(model, hook):
    prompt = [11, 12, 13, 11, 12]
    ref = plain_greedy(model, prompt, 20, eos=None)
    broken = Broken([hook], ref, len(prompt))
    dec = SpeculativeDecoder(model, None, [broken], profile=CostProfile.flat(17), max_budget=16)
    res = dec.generate(prompt, 20, eos_token_id=[])
    assert res.new_tokens == ref
    assert dec.drafter_errors.counts == {("Broken", hook): res.steps}
    if hook == "propose":
        assert max(res.drafted_per_step) == 0  # the step went on without that drafter's tree
    else:
        assert res.accepted_per_step > 1  # only that hook failed: the drafts still count


def test_sampling_with_a_drafter_that_cannot_propose_equals_plain_sampling(model):
    prompt = [20, 21, 22]
    dec = SpeculativeDecoder(model, None, [Broken(["propose"])], profile=CostProfile.flat(17), max_budget=16)
    drafted = dec.generate(prompt, 16, temperature=1.0, seed=7, eos_token_id=[])
    dec.speculate = False
    plain = dec.generate(prompt, 16, temperature=1.0, seed=7, eos_token_id=[])
    assert drafted.new_tokens == plain.new_tokens
    assert dec.drafter_errors.counts == {("Broken", "propose"): drafted.steps}


def test_the_log_is_rate_limited_per_drafter(caplog):
    now = [100.0]
    errors = DrafterErrors(log_every_s=10.0, clock=lambda: now[0])
    a, b = Broken([]), RandomTreeDrafter([], 0, VOCAB, 0)
    with caplog.at_level(logging.WARNING, logger="specstore.client.drafter_errors"):
        for _ in range(5):
            errors.record(a, "propose", RuntimeError("x"))
        errors.record(b, "observe", ValueError("y"))  # another drafter has its own allowance
        now[0] += 10.0
        errors.record(a, "observe", RuntimeError("z"))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3
    assert "Broken raised in propose()" in msgs[0] and "more failures" not in msgs[0]
    assert "RandomTreeDrafter raised in observe()" in msgs[1]
    assert "Broken raised in observe()" in msgs[2] and "4 more failures" in msgs[2]
    assert errors.counts == {("Broken", "propose"): 5, ("RandomTreeDrafter", "observe"): 1,
                             ("Broken", "observe"): 1}
    assert errors.total == 7


def test_drafters_subclass_the_base_and_inherit_no_op_hooks(model):
    class OnlyProposes(Drafter):
        def propose(self, ctx, budget):
            return DraftTree.empty(ctx.last_token)

    d = OnlyProposes()
    assert d.needs_target_topk is False
    assert d.prefetch(None, 4) is None and d.observe(None) is None
    assert d.begin_request([1], None) is None and d.end_request() is None
    with pytest.raises(TypeError):
        Drafter()  # propose is the one hook without a default

    class DuckTyped:
        def propose(self, ctx, budget):
            return DraftTree.empty(ctx.last_token)

    with pytest.raises(TypeError, match="DuckTyped"):
        SpeculativeDecoder(model, None, [DuckTyped()])
