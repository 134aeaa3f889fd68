"""Shared test fixtures: a tiny random Llama and drafters that make trees of random shapes."""
from __future__ import annotations

import os

import numpy as np
import torch

from specstore.client.types import DecodeContext, Drafter, DraftTree, Source

TEST_DEVICE = os.environ.get("SPECSTORE_TEST_DEVICE", "cpu")


def tiny_llama(vocab: int = 96, seed: int = 0, layers: int = 2, attn: str = "sdpa", max_pos: int = 512,
               hidden: int = 32):
    from specstore.bench.tiny_llama import tiny_llama as build

    # SPECSTORE_TEST_DEVICE=cuda runs the same tests on a GPU (the device check script sets it)
    return build(vocab, seed, layers, attn, max_pos, hidden, device=TEST_DEVICE)


def plain_greedy(model, prompt: list[int], max_new: int, eos=None) -> list[int]:
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, min_new_tokens=0)
    return out[0, len(prompt):].tolist()


class RandomTreeDrafter(Drafter):
    """Random trees that contain the true continuation with some probability (so paths get accepted)."""

    source = Source.DRAFT_MODEL

    def __init__(self, reference: list[int], prompt_len: int, vocab: int, seed: int, p_true: float = 0.6):
        self.ref = reference
        self.prompt_len = prompt_len
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.p_true = p_true

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        rng = self.rng
        n = int(rng.integers(0, budget + 1))
        pos = len(ctx.tokens) - self.prompt_len  # index into the reference of the next token
        tokens, parents, probs = [ctx.last_token], [-1], [1.0]
        depth_of = [0]
        for _ in range(n):
            i = len(tokens)
            par = int(rng.integers(0, i))
            d = depth_of[par] + 1
            # follow the reference along the first chain with probability p_true
            on_ref = all(tokens[j] == self._ref(pos + depth_of[j] - 1) for j in self._path(parents, par)[1:])
            if on_ref and rng.random() < self.p_true:
                tok = self._ref(pos + d - 1)
            else:
                tok = int(rng.integers(0, self.vocab))
            if any(tokens[c] == tok and parents[c] == par for c in range(1, i)):
                tok = (tok + 1 + int(rng.integers(0, self.vocab - 1))) % self.vocab
                if any(tokens[c] == tok and parents[c] == par for c in range(1, i)):
                    continue
            tokens.append(tok); parents.append(par); probs.append(float(rng.random())); depth_of.append(d)
        return DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32), np.array(probs, np.float32),
                         np.array([0] + [int(self.source)] * (len(tokens) - 1), np.uint8))

    def _ref(self, i: int) -> int:
        return self.ref[i] if 0 <= i < len(self.ref) else 0

    @staticmethod
    def _path(parents, node):
        out = []
        while node >= 0:
            out.append(node)
            node = parents[node]
        return out[::-1]


def assert_two_token_distribution(counts: np.ndarray, exact: np.ndarray, n: int, vocab: int) -> None:
    """Chi-square checks of ``n`` sampled first-two-token pairs against their exact distribution.

    counts, exact: [vocab * vocab] observed counts and probabilities of the pair (a, b) at a * vocab + b.
    Never a pair of probability 0; the joint (rare cells pooled) and the first token's marginal (far more
    samples per cell: the sharper check) both pass at p > 1e-3.
    """
    from scipy.stats import chisquare

    assert counts[exact == 0].sum() == 0  # never a token the sampling rules out
    keep = exact * n >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(exact[keep], exact[~keep].sum()) * n
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert chisquare(obs, exp).pvalue > 1e-3
    first = counts.reshape(vocab, vocab).sum(1)
    exp1 = exact.reshape(vocab, vocab).sum(1) * n
    assert chisquare(first[exp1 > 0], exp1[exp1 > 0]).pvalue > 1e-3


def assert_same_kv(cache, ref) -> None:
    """Two transformers caches hold the same keys and values, layer by layer (float tolerance)."""
    for ours, want in zip(cache.layers, ref.layers):
        assert ours.keys.shape == want.keys.shape
        torch.testing.assert_close(ours.keys, want.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.values, want.values, rtol=1e-4, atol=1e-5)
