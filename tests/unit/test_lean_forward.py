"""client/lean_forward.py: the verifier's Llama forward without the module machinery gives the model's own
logits bit for bit, and falls back to the model's forward wherever it might not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from specstore.bench.tiny_llama import tiny_llama
from specstore.client import lean_forward
from specstore.client.types import DraftTree
from specstore.client.verifier import Verifier


def _random_tree(rng, n: int, vocab: int, root: int) -> DraftTree:
    parents = np.concatenate([[-1], [rng.integers(0, i) for i in range(1, n)]]).astype(np.int32)
    tokens = np.concatenate([[root], rng.integers(3, vocab, n - 1)]).astype(np.int32)
    return DraftTree(tokens, parents, np.ones(n, np.float32), np.zeros(n, np.uint8))


def _verify_both_ways(model, monkeypatch, steps: int = 12, seed: int = 0, features: bool = False):
    """Two verifiers on the same model and the same trees, one the lean way and one the model's own way; returns
    the lean one's use count and asserts every step's logits (and features) equal."""
    rng = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    prompt = rng.integers(3, vocab, 20)
    lean, own = Verifier(model, keep_features=features), Verifier(model, keep_features=features)
    lean.prefill(prompt)
    own.prefill(prompt)
    assert lean_forward.usable(model)          # the probe, before the count starts
    calls = []
    real = lean_forward.forward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lean_forward, "forward", counted)
    root = int(prompt[-1])
    for step in range(steps):
        tree = _random_tree(rng, int(rng.integers(1, 9)), vocab, root)
        monkeypatch.delenv("SPECSTORE_LEAN_FORWARD", raising=False)
        a = lean.verify(tree)
        fa = lean.features
        monkeypatch.setenv("SPECSTORE_LEAN_FORWARD", "0")
        b = own.verify(tree)
        assert torch.equal(a, b), f"step {step}: logits differ"
        if features:
            assert torch.equal(fa, own.features), f"step {step}: features differ"
        # accept a random root-to-node path, as a decoder would
        node = int(rng.integers(0, len(tree)))
        path = [0, *tree.path_to(node)] if node else [0]
        lean.commit(path)
        own.commit(path)
        root = int(tree.tokens[path[-1]])
    monkeypatch.delenv("SPECSTORE_LEAN_FORWARD", raising=False)
    return len(calls)


@pytest.mark.parametrize("attn,dtype,hidden", [("sdpa", None, 32), ("eager", None, 32),
                                               ("sdpa", torch.bfloat16, 128)])
def test_lean_forward_gives_the_models_own_logits(attn, dtype, hidden, monkeypatch):
    model = tiny_llama(attn=attn, dtype=dtype, hidden=hidden)
    used = _verify_both_ways(model, monkeypatch)
    assert used > 0, "the lean forward was never used"


def test_lean_forward_keeps_the_features_a_head_reads(monkeypatch):
    model = tiny_llama()
    assert _verify_both_ways(model, monkeypatch, steps=6, features=True) > 0


def test_a_model_of_other_classes_goes_its_own_way():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    model = tiny_llama()
    model.__class__ = MyLlama
    assert not lean_forward.usable(model)


def test_a_forward_hook_sends_the_verify_the_models_way():
    model = tiny_llama()
    assert lean_forward.usable(model)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not lean_forward.usable(model)
    handle.remove()
    assert lean_forward.usable(model)


def test_a_forward_that_differs_from_the_models_is_refused_by_the_probe(monkeypatch):
    real = lean_forward.forward

    def off_by_a_bit(*a, **k):
        logits, h = real(*a, **k)
        return logits + 1e-6, h

    monkeypatch.setattr(lean_forward, "forward", off_by_a_bit)
    model = tiny_llama()
    assert not lean_forward.usable(model)
    assert model._specstore_lean[1] is False


def test_switched_off_by_the_environment(monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("SPECSTORE_LEAN_FORWARD", "0")
    assert not lean_forward.usable(model)
