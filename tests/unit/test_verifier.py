"""Tree attention + KV compaction against from-scratch recomputation, on a tiny random Llama."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from specstore.client.tree_attention import ancestor_matrix, build_tree_attention
from specstore.client.types import DraftTree
from specstore.client.verifier import Verifier
from tests.helpers import tiny_llama


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float()


def test_mask_and_positions():
    t = DraftTree.from_paths(7, [[1, 2], [3]], 1)
    ti = build_tree_attention(t, past_len=4, device="cpu")
    assert ti.position_ids.tolist() == [[4, 5, 6, 5]]
    allowed = (ti.attention_mask[0, 0] == 0).numpy()
    assert allowed[:, :4].all()
    assert (allowed[:, 4:] == ancestor_matrix(t)).all()
    assert allowed[2, 4:].tolist() == [True, True, True, False]
    assert allowed[3, 4:].tolist() == [True, False, False, True]
    assert build_tree_attention(DraftTree.empty(3), 4, "cpu").attention_mask is None


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llama(attn=request.param)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 24), plen=st.integers(1, 12))
def test_tree_logits_and_compaction_equal_recomputation(model, seed, n, plen):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, 96, plen).tolist()
    v = Verifier(model)
    v.prefill(np.array(prompt))
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    tokens = [prompt[-1]] + rng.integers(3, 96, n - 1).tolist()
    tree = DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32), np.ones(n, np.float32),
                     np.zeros(n, np.uint8))
    logits = v.verify(tree)
    # each node's logits equal a plain forward over prompt + its root-to-node path
    for i in range(n):
        seq = prompt + [tokens[j] for j in tree.path_to(i)]
        ref = full_logits(model, seq)[-1]
        torch.testing.assert_close(logits[i], ref, atol=2e-4, rtol=1e-4)
    # commit the path to a random node: the compacted cache continues exactly like a fresh one
    leaf = int(rng.integers(0, n))
    path = [0] + tree.path_to(leaf)
    v.commit(path)
    seq = prompt + [tokens[j] for j in path[1:]]
    assert v.past_len == len(seq)
    nxt = int(rng.integers(3, 96))
    out = v.verify(DraftTree.empty(nxt))
    torch.testing.assert_close(out[0], full_logits(model, seq + [nxt])[-1], atol=2e-4, rtol=1e-4)
    v.commit([0])
    with pytest.raises(RuntimeError):
        v.commit([0])


def test_cache_appends_in_place_and_grows_past_its_buffer():
    """kv_cache.BufferedLayer (the verifier's and the draft model's cache): steps append into the same buffer
    (no copy of the cache per step), a tree commit keeps the buffer, growth past the first capacity reallocates
    once, and the logits stay those of a fresh forward over the accepted sequence; with autograd recording,
    torch.cat's path is kept."""
    from specstore.client import kv_cache

    model = tiny_llama(attn="sdpa")
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 96, 200).tolist()
    v = Verifier(model)
    v.prefill(np.array(prompt))
    layer = v.cache.layers[0]
    assert type(layer).__name__ == "BufferedLayer"
    cached, root = prompt[:-1], prompt[-1]    # the cache holds every accepted token but the root
    buffers, first = set(), layer._bk.shape[2]
    while len(cached) < first + 10:
        tokens = [root] + rng.integers(3, 96, 3).tolist()
        tree = DraftTree(np.array(tokens, np.int32), np.array([-1, 0, 0, 2], np.int32), np.ones(4, np.float32),
                         np.zeros(4, np.uint8))
        v.verify(tree)
        v.commit([0, 2, 3])                   # not a prefix run: the in-place gather
        cached += [tokens[0], tokens[2], tokens[3]]
        root = int(rng.integers(3, 96))
        assert layer.keys.data_ptr() == layer._bk.data_ptr() and v.past_len == len(cached)
        buffers.add(layer._bk.data_ptr())
    assert len(buffers) == 2                  # the first buffer, then one reallocation
    out = v.verify(DraftTree.empty(root))
    torch.testing.assert_close(out[0], full_logits(model, cached + [root])[-1], atol=2e-4, rtol=1e-4)
    v.commit([0])

    cache = kv_cache.new_cache()
    x = torch.randn(1, 2, 3, 4, requires_grad=True)
    keys, _ = cache.update(x, x, 0)           # grad enabled: DynamicLayer's own cat, graph kept
    assert keys.requires_grad and cache.layers[0]._bk is None
