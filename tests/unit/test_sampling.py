"""Lossless sampling: the speculative sampler draws from exactly the plain sampling distribution."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specstore.client.acceptance import sample_accept
from specstore.client.budget import CostProfile
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.sampling import SamplingParams, warp
from specstore.client.types import Drafter, DraftTree, Source
from tests.helpers import assert_two_token_distribution, tiny_llama

VOCAB = 10


def test_warp_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = warp(logits, SamplingParams(1.0))
    assert p.sum() == pytest.approx(1.0) and np.argmax(p) == 0
    pk = warp(logits, SamplingParams(1.0, top_k=2))
    assert (pk[2:] == 0).all() and pk.sum() == pytest.approx(1.0)
    pp = warp(logits, SamplingParams(1.0, top_p=0.7))
    assert pp[0] > 0 and pp[1] > 0 and (pp[2:] == 0).all()  # 0.665 < 0.7 needs the second token
    hot = warp(logits, SamplingParams(0.1))
    assert hot[0] > 0.99
    for bad in [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan"))]:
        with pytest.raises(ValueError):
            SamplingParams(**{"temperature": 1.0, **bad})


def test_sibling_rejection_is_exact_for_point_masses():
    """One step, many draft siblings: the accepted-or-bonus token has distribution p exactly."""
    p = np.array([0.4, 0.3, 0.2, 0.1])
    tree = DraftTree.from_paths(0, [[2], [0], [3]], Source.CONTEXT)
    children = tree.children_lists()
    rng = np.random.default_rng(0)
    n = 40_000
    counts = np.zeros(4)
    for _ in range(n):
        path, bonus = sample_accept(tree, lambda i: p, children, rng)
        tok = int(tree.tokens[path[1]]) if len(path) > 1 else bonus
        counts[tok] += 1
    assert chisquare(counts, p * n).pvalue > 1e-3


class FixedTreeDrafter(Drafter):
    """The same draft tree at every step: any bias of the acceptance rule then shows up systematically."""

    source = Source.CONTEXT

    def __init__(self, paths):
        self.paths = paths

    def propose(self, ctx, budget):
        return DraftTree.from_paths(ctx.last_token, self.paths, self.source, [[0.5] * len(p) for p in self.paths])


def exact_pair_distribution(model, prompt, params):
    """P(first two generated tokens) computed from the model's warped distributions."""
    with torch.no_grad():
        l1 = model(torch.tensor([prompt], device=model.device)).logits[0, -1]
        p1 = warp(l1, params)
        probs = np.zeros((VOCAB, VOCAB))
        for a in range(VOCAB):
            if p1[a] == 0:
                continue
            l2 = model(torch.tensor([prompt + [a]], device=model.device)).logits[0, -1]
            probs[a] = p1[a] * warp(l2, params)
    return probs


@pytest.mark.parametrize("params,drafts", [(dict(temperature=1.0), False), (dict(temperature=1.0), True),
                                           (dict(temperature=0.8, top_k=6, top_p=0.9), True)])
def test_generated_pairs_follow_the_plain_distribution(params, drafts):
    model = tiny_llama(vocab=VOCAB, seed=3)
    with torch.no_grad():  # sharpen the random model a little so that the test has power
        model.lm_head.weight.mul_(8.0)
    prompt = [3, 4, 5]
    sp = SamplingParams(**params)
    exact = exact_pair_distribution(model, prompt, sp).ravel()
    drafters = [FixedTreeDrafter([[2, 4], [4, 2], [4, 1], [9]])] if drafts else []
    dec = SpeculativeDecoder(model, None, drafters, profile=CostProfile.flat(9), max_budget=8)
    n = 1500
    counts, drafted = sample_pairs(dec, prompt, n, params, VOCAB)
    assert (drafted > 0) == drafts
    assert_two_token_distribution(counts, exact, n, VOCAB)


def test_bfloat16_sampling_follows_the_plain_distribution():
    """Sampling with drafts on a CPU bfloat16 model (batch-invariant forwards, client/batch_invariant.py)."""
    from specstore.client import batch_invariant

    model = tiny_llama(vocab=VOCAB, seed=3, hidden=128).to(torch.bfloat16)
    if not batch_invariant.install(model):
        pytest.skip("bfloat16 GEMMs on this machine are not row-invariant: the decoder refuses bfloat16")
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    prompt, params = [3, 4, 5], dict(temperature=1.0)
    exact = exact_pair_distribution(model, prompt, SamplingParams(**params)).ravel()
    dec = SpeculativeDecoder(model, None, [FixedTreeDrafter([[2, 4], [4, 2], [4, 1], [9]])],
                             profile=CostProfile.flat(9), max_budget=8)
    counts, drafted = sample_pairs(dec, prompt, 1500, params, VOCAB)
    assert drafted > 0
    assert_two_token_distribution(counts, exact, 1500, VOCAB)


def sample_pairs(dec, prompt, n: int, params: dict, vocab: int) -> tuple[np.ndarray, int]:
    """([vocab * vocab] counts of the first two generated tokens over n seeded generations, drafts verified)."""
    counts = np.zeros(vocab * vocab)
    drafted = 0
    for s in range(n):
        res = dec.generate(prompt, 2, seed=s, eos_token_id=[], **params)
        counts[res.new_tokens[0] * vocab + res.new_tokens[1]] += 1
        drafted += sum(res.drafted_per_step)
    return counts, drafted


def assert_model_drafter_samples_exactly(make_drafter) -> None:
    """``make_drafter(target) -> Drafter`` (a model drafter for a 10-token target with sharp logits): the first two
    tokens its decoder samples at temperature 1 follow the target's exact distribution (chi-square), with drafts
    verified along the way."""
    vocab = 10
    target = tiny_llama(vocab=vocab, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    dec = SpeculativeDecoder(target, None, [make_drafter(target)], profile=CostProfile.flat(9), max_budget=8)
    prompt = [3, 4, 5]
    params = dict(temperature=1.0)
    exact = exact_pair_distribution(target, prompt, SamplingParams(**params)).ravel()
    n = 1200
    counts, drafted = sample_pairs(dec, prompt, n, params, vocab)
    assert drafted > 0
    assert_two_token_distribution(counts, exact, n, vocab)
