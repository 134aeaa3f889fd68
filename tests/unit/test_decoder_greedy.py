"""Lossless greedy: the speculative decoder's output equals plain greedy decoding, whatever the drafts."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from specstore.client.budget import BudgetController, CostProfile
from specstore.client.decoder import SpeculativeDecoder, StreamState
from specstore.client.drafters import ContextDrafter, RecyclingDrafter
from tests.helpers import RandomTreeDrafter, plain_greedy, tiny_llama

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 100_000), budget=st.integers(0, 24), plen=st.integers(1, 20),
       max_new=st.integers(1, 40), p_true=st.floats(0.0, 1.0))
def test_random_trees_give_plain_greedy_output(model, seed, budget, plen, max_new, p_true):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, plen).tolist()
    ref = plain_greedy(model, prompt, max_new, eos=None)
    drafter = RandomTreeDrafter(ref, plen, VOCAB, seed, p_true=p_true)
    dec = SpeculativeDecoder(model, None, [drafter], profile=CostProfile.flat(max(budget, 1) + 1),
                             max_budget=budget)
    res = dec.generate(prompt, max_new, eos_token_id=[])
    assert res.new_tokens == ref
    assert sum(res.tokens_per_step) == len(ref)
    assert res.steps <= len(ref)


def test_training_free_drafters_are_lossless_and_accept_drafts(model):
    rng = np.random.default_rng(1)
    drafters = [ContextDrafter(), RecyclingDrafter(VOCAB)]
    dec = SpeculativeDecoder(model, None, drafters, profile=CostProfile.flat(33), max_budget=16)
    total_steps = total_new = 0
    for r in range(4):
        prompt = rng.integers(3, VOCAB, 12).tolist() * 2  # repetition gives the context drafter matches
        ref = plain_greedy(model, prompt, 48, eos=None)
        res = dec.generate(prompt, 48, eos_token_id=[])
        assert res.new_tokens == ref
        total_steps += res.steps
        total_new += len(res.new_tokens)
    assert total_new / total_steps > 1.2  # speculation really happened


def test_no_speculation_path_equals_plain(model):
    prompt = [5, 6, 7, 8]
    dec = SpeculativeDecoder(model, None, [ContextDrafter()], speculate=False)
    res = dec.generate(prompt, 20, eos_token_id=[])
    assert res.new_tokens == plain_greedy(model, prompt, 20, eos=None)
    assert res.steps == 20 and max(res.drafted_per_step) == 0


def test_eos_stops_and_is_included(model):
    prompt = [5, 6, 7, 8, 9, 10]
    ref = plain_greedy(model, prompt, 30, eos=None)
    eos = ref[7]
    first = ref.index(eos)
    dec = SpeculativeDecoder(model, None, [RandomTreeDrafter(ref, len(prompt), VOCAB, 0, 0.9)],
                             profile=CostProfile.flat(17), max_budget=16)
    res = dec.generate(prompt, 30, eos_token_id=eos)
    assert res.new_tokens == ref[: first + 1]
    assert res.finish_reason == "eos"


def test_max_context_is_respected():
    m = tiny_llama(vocab=VOCAB, max_pos=24)
    prompt = list(range(3, 23))
    ref = plain_greedy(m, prompt, 4, eos=None)
    dec = SpeculativeDecoder(m, None, [RandomTreeDrafter(ref, 20, VOCAB, 0, 1.0)], profile=CostProfile.flat(17),
                             max_budget=16)
    res = dec.generate(prompt, 50, eos_token_id=[])
    assert len(prompt) + len(res.new_tokens) == 24
    assert res.new_tokens == ref


class CharTokenizer:
    """id i <-> chr(ord('a') + i % 26): enough to test stop strings without a real vocabulary."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_string_truncates(model):
    prompt = [5, 6, 7, 8, 9, 10]
    ref = plain_greedy(model, prompt, 30, eos=None)
    tok = CharTokenizer()
    text = tok.decode(ref)
    stop = text[10:12]
    dec = SpeculativeDecoder(model, tok, [RandomTreeDrafter(ref, len(prompt), VOCAB, 0, 0.9)],
                             profile=CostProfile.flat(17), max_budget=16)
    res = dec.generate(prompt, 30, stop=[stop], eos_token_id=[])
    at = text.find(stop)
    assert res.text == text[:at]
    assert res.finish_reason == "stop"
    assert tok.decode(res.new_tokens).startswith(text[:at]) and stop in tok.decode(res.new_tokens)
    assert stop not in tok.decode(res.new_tokens[:-1])


def test_budget_controller_skips_speculation_when_it_does_not_pay(model):
    # steep CPU-like cost: a 2-node forward costs 3x a plain step; random drafts never pay
    prof = CostProfile([1, 2, 64], [1.0, 3.0, 4.0])
    ctrl = BudgetController(prof, max_budget=16, thompson=False)
    prompt = [5, 6, 7, 8]
    ref = plain_greedy(model, prompt, 20, eos=None)
    dec = SpeculativeDecoder(model, None, [RandomTreeDrafter(ref, 4, VOCAB, 0, 0.0)], profile=prof,
                             max_budget=16, controller=ctrl)
    res = dec.generate(prompt, 20, eos_token_id=[])
    assert res.new_tokens == ref
    assert max(res.drafted_per_step) == 0


def test_stream_yields_what_generate_returns_and_reports_its_state(model):
    prompt = [5, 6, 7, 8, 9, 10]
    ref = plain_greedy(model, prompt, 30, eos=None)
    tok = CharTokenizer()
    stop = tok.decode(ref)[12:14]

    def decoder():
        return SpeculativeDecoder(model, tok, [RandomTreeDrafter(ref, len(prompt), VOCAB, 0, 0.9)],
                                  profile=CostProfile.flat(17), max_budget=16)

    res = decoder().generate(prompt, 30, stop=[stop], eos_token_id=[])
    state = StreamState()
    chunks = list(decoder().stream(prompt, 30, stop=[stop], eos_token_id=[], state=state))
    assert [t for c in chunks for t in c] == res.new_tokens
    assert state.prompt == prompt and state.finish == "stop" == res.finish_reason
    assert state.text == res.text
    assert state.steps == res.steps and state.tokens_per_step == res.tokens_per_step
    assert state.drafted_per_step == res.drafted_per_step
    assert 0 < state.prefill <= state.seconds


def test_the_modules_number_the_decode_loop_steps_as_the_decoder_does():
    import re

    from specstore.client import acceptance, decoder, fusion, tree_attention, verifier

    steps = dict(re.findall(r"^\s+(\d)\. (\w+)", decoder.__doc__, re.M))
    assert steps == {"1": "propose", "2": "fuse", "3": "verify", "4": "accept", "5": "commit", "6": "observe"}
    named = re.compile(r"(\d) \((\w+)\)")
    for module in (fusion, verifier, acceptance):
        found = named.findall(module.__doc__.split("\n\n")[0])
        assert found and all(steps[n] == name for n, name in found), module.__name__
    assert "(step 3, verify, of the decode loop)" in " ".join(tree_attention.__doc__.split())
