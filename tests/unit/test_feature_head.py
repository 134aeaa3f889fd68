"""The feature head (client/feature_head.py) and its drafter: the target's hidden states reach it, its KV cache
equals recomputation with the target's real features, it is lossless, and it saves and loads."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from specstore.client.budget import CostProfile
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.draft_compat import DraftIncompatibleError
from specstore.client.drafters import ContextDrafter, RecyclingDrafter
from specstore.client.drafters.feature_head import FeatureHeadDrafter
from specstore.client.feature_head import (build_feature_head, is_feature_head, load_feature_head,
                                           previous_features, save_feature_head, target_features)
from specstore.client.kv_cache import new_cache
from specstore.client.types import Drafter, DraftTree
from tests.helpers import assert_same_kv, plain_greedy, tiny_llama

VOCAB = 96


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab=VOCAB, seed=0, layers=2)


def head_for(target, seed: int = 0, sharpen: float = 1.0):
    torch.manual_seed(seed)
    head = build_feature_head(target).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            head.fc.weight.mul_(sharpen)
    return head


class FeatureSpy(Drafter):
    """Records what the decoder hands a drafter that needs the target's features."""

    needs_target_features = True

    def __init__(self):
        self.seen = []

    def propose(self, ctx, budget):
        self.seen.append((ctx.tokens.copy(), ctx.target_features.clone()))
        return DraftTree.empty(ctx.last_token)


def test_the_decoder_hands_drafters_the_targets_features_of_every_position_but_the_root(target):
    spy = FeatureSpy()
    head = FeatureHeadDrafter(head_for(target, sharpen=4.0), width=3, max_depth=3, min_layer_gain=0)
    dec = SpeculativeDecoder(target, None, [ContextDrafter(), head, spy], profile=CostProfile.flat(17), max_budget=12)
    prompt = np.random.default_rng(1).integers(3, VOCAB, 7).tolist()
    dec.generate(prompt, 25, eos_token_id=[])
    assert len(spy.seen) > 3
    for toks, feats in spy.seen:
        with torch.no_grad():
            want = target_features(target, torch.tensor([toks[:-1].tolist()]), use_cache=False)[0]
        assert feats.shape == want.shape
        torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)


def test_head_kv_after_each_step_equals_recomputation_with_the_targets_features(target):
    head = head_for(target, sharpen=4.0)
    fh = FeatureHeadDrafter(head, width=3, max_depth=4, min_layer_gain=0)
    dec = SpeculativeDecoder(target, None, [ContextDrafter(), fh], profile=CostProfile.flat(17), max_budget=12)
    prompt = np.random.default_rng(5).integers(3, VOCAB, 9).tolist()
    checked = 0
    for _ in dec.stream(prompt, 30, eos_token_id=[]):
        if fh.cache is None:
            continue
        seen = torch.tensor([fh.seen])
        fresh = new_cache()
        with torch.no_grad():
            prev = previous_features(target_features(target, seen, use_cache=False))
            head.body(inputs_embeds=head.inputs(seen, prev), use_cache=True, cache=fresh)
        assert_same_kv(fh.cache, fresh)
        checked += 1
    assert checked > 3 and fh.stats["forwards"] > fh.stats["drafted"]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), width=st.integers(1, 5), depth=st.integers(1, 5), budget=st.integers(0, 20),
       plen=st.integers(1, 16), max_new=st.integers(1, 30), sharpen=st.sampled_from([1.0, 6.0]))
def test_feature_head_is_lossless_greedy(target, seed, width, depth, budget, plen, max_new, sharpen):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, plen).tolist()
    fh = FeatureHeadDrafter(head_for(target, seed % 3, sharpen), width=width, max_depth=depth, min_layer_gain=0)
    dec = SpeculativeDecoder(target, None, [ContextDrafter(), fh, RecyclingDrafter(VOCAB)],
                             profile=CostProfile.flat(max(budget, 1) + 1), max_budget=budget)
    assert dec.generate(prompt, max_new, eos_token_id=[]).new_tokens == plain_greedy(target, prompt, max_new)
    assert not dec.drafter_errors.counts


def test_feature_head_sampling_follows_the_plain_distribution():
    from tests.unit.test_sampling import assert_model_drafter_samples_exactly

    assert_model_drafter_samples_exactly(
        lambda target: FeatureHeadDrafter(head_for(target), width=3, max_depth=2, min_layer_gain=0))


def test_a_saved_head_loads_with_the_same_outputs_and_refuses_another_target(target, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t0")))
    head = head_for(target, sharpen=2.0)
    save_feature_head(head, tmp_path / "h", target, tok)
    assert is_feature_head(tmp_path / "h") and not is_feature_head(tmp_path)
    again = load_feature_head(tmp_path / "h", target, tok)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        f = previous_features(target_features(target, x, use_cache=False))
        torch.testing.assert_close(again(x, f)[1], head(x, f)[1])
    assert not any(k.startswith("body.embed_tokens") for k in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                       str(tmp_path / "h" / "feature_head.safetensors")))
    other = tiny_llama(vocab=VOCAB + 4, seed=1)
    with pytest.raises(DraftIncompatibleError, match="vocabulary"):
        load_feature_head(tmp_path / "h", other)
    tok2 = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"u{i}": i for i in range(VOCAB)},
                                                                               unk_token="u0")))
    with pytest.raises(DraftIncompatibleError, match="tokenizer"):
        load_feature_head(tmp_path / "h", target, tok2)
