import numpy as np
import pytest

from specstore.client.fusion import cut_to_budget, fuse
from specstore.client.types import DraftTree, Source
from hypothesis import given, settings, strategies as st


def test_from_paths_merges_prefixes_and_keeps_best_prob():
    t = DraftTree.from_paths(9, [[1, 2, 3], [1, 4], [7]], Source.CONTEXT, probs=[[0.5, 0.4, 0.3], [0.6, 0.2], [0.1]])
    assert t.tokens.tolist() == [9, 1, 2, 3, 4, 7]
    assert t.parents.tolist() == [-1, 0, 1, 2, 1, 0]
    assert t.probs[1] == pytest.approx(0.6)
    assert t.sources.tolist() == [0, 8, 8, 8, 8, 8]
    assert t.depths().tolist() == [0, 1, 2, 3, 2, 1]
    assert t.path_to(3) == [1, 2, 3]


def test_invalid_trees_are_rejected():
    with pytest.raises(ValueError):
        DraftTree(np.array([1, 2], np.int32), np.array([-1, 1], np.int32), np.ones(2, np.float32), np.zeros(2, np.uint8))
    with pytest.raises(ValueError):
        DraftTree(np.array([1], np.int32), np.array([0], np.int32), np.ones(1, np.float32), np.zeros(1, np.uint8))
    with pytest.raises(ValueError):
        DraftTree(np.array([], np.int32), np.array([], np.int32), np.ones(0, np.float32), np.zeros(0, np.uint8))
    # a negative parent below the root, in either integer width, and a forward reference deep in a big tree
    for dtype in (np.int32, np.int64):
        with pytest.raises(ValueError):
            DraftTree(np.arange(3, dtype=np.int32), np.array([-1, 0, -1], dtype), np.ones(3, np.float32),
                      np.zeros(3, np.uint8))
    parents = np.arange(-1, 1999, dtype=np.int32)
    DraftTree(np.zeros(2000, np.int32), parents, np.ones(2000, np.float32), np.zeros(2000, np.uint8))   # a chain
    parents[1500] = 1500
    with pytest.raises(ValueError):
        DraftTree(np.zeros(2000, np.int32), parents, np.ones(2000, np.float32), np.zeros(2000, np.uint8))


def test_fuse_longest_prefix_merge_ors_sources():
    a = DraftTree.from_paths(5, [[1, 2], [3]], Source.CONTEXT, probs=[[0.9, 0.5], [0.2]])
    b = DraftTree.from_paths(5, [[1, 2, 6], [4]], Source.RECYCLED, probs=[[0.3, 0.8, 0.7], [0.6]])
    f = fuse([a, b], budget=10)
    paths = {tuple(f.tokens[j] for j in f.path_to(i)): i for i in range(1, len(f))}
    assert set(paths) == {(1,), (1, 2), (3,), (1, 2, 6), (4,)}
    n12 = paths[(1, 2)]
    assert f.sources[n12] == Source.CONTEXT | Source.RECYCLED
    assert f.probs[n12] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        fuse([a, DraftTree.empty(6)], 3)


def random_tree(rng, n, root=0):
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    return DraftTree(rng.integers(0, 50, n).astype(np.int32), np.array(parents, np.int32),
                     rng.random(n).astype(np.float32), np.full(n, 1, np.uint8))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 45), st.integers(0, 10_000))
def test_cut_to_budget_keeps_best_closed_subtree(n, budget, seed):
    rng = np.random.default_rng(seed)
    t = random_tree(rng, n)
    c = cut_to_budget(t, budget)
    assert c.num_drafts == min(budget, t.num_drafts)
    assert c.root == t.root
    # every kept node's path exists in the original tree
    orig = {tuple(t.tokens[j] for j in t.path_to(i)) for i in range(len(t))}
    kept = [tuple(c.tokens[j] for j in c.path_to(i)) for i in range(len(c))]
    assert set(kept) <= orig
    # the kept nodes carry the largest path probabilities (up to ties)
    if 0 < c.num_drafts < t.num_drafts:
        best = np.sort(t.path_probs()[1:])[::-1][: c.num_drafts].sum()
        assert c.path_probs()[1:].sum() == pytest.approx(best, rel=1e-5)
