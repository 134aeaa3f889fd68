"""Suffix-array lookups and retrieval trees vs a brute-force reference (hypothesis), in memory."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specstore.datastore.index import DatastoreIndex, RetrievalResult, build_tree
from specstore.datastore.suffix_shard import Shard, build_buckets, build_reverse_sa, brute_force_match, sep_for


def make_shard(docs, vocab, dtype, first_id=0, name="s"):
    sep = sep_for(dtype)
    T = [sep]
    starts = []
    for d in docs:
        starts.append(len(T))
        T.extend(d)
        T.append(sep)
    T = np.asarray(T, dtype=dtype)
    starts.append(len(T))
    return Shard(T, build_reverse_sa(T), build_buckets(T, vocab), np.asarray(starts, np.int64),
                 np.arange(first_id, first_id + len(docs), dtype=np.int64), name)


def mem_index(docs, vocab, dtype=np.uint16, split=None):
    """A DatastoreIndex over ``docs`` held in memory (split into shards at the given doc indices)."""
    cuts = [0] + list(split or []) + [len(docs)]
    shards = [make_shard(docs[a:b], vocab, dtype, a, f"s{i}") for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]
    manifest = {"index_id": "mem", "tokenizer": {"fingerprint": "test"}, "vocab_size": vocab, "token_dtype":
                np.dtype(dtype).name, "stats": {"num_tokens": sum(map(len, docs)), "num_documents": len(docs)}}
    return DatastoreIndex(None, manifest, shards)


def reference(docs, context, max_span, min_span, depth):
    """(m, Counter of continuation prefixes, number of occurrences) by brute force."""
    ctx = list(context)[-max_span:]
    for m in range(len(ctx), 0, -1):
        pat = ctx[-m:]
        occ = []
        for d in docs:
            for i in range(len(d) - m + 1):
                if list(d[i:i + m]) == pat:
                    occ.append(list(d[i + m:i + m + depth]))
        if occ:
            if m < min_span:
                return 0, Counter(), 0
            cnt = Counter()
            for c in occ:
                for j in range(1, len(c) + 1):
                    cnt[tuple(c[:j])] += 1
            return m, cnt, len(occ)
    return 0, Counter(), 0


def result_paths(r: RetrievalResult) -> dict:
    paths = {}
    for i in range(len(r.tokens)):
        p = int(r.parents[i])
        assert p < i
        paths[i] = (paths[p] if p >= 0 else ()) + (int(r.tokens[i]),)
    return {paths[i]: float(r.probs[i]) for i in paths}


docs_st = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=40), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=docs_st, ctx=st.lists(st.integers(0, 5), min_size=1, max_size=12), max_span=st.integers(1, 10),
       min_span=st.integers(1, 3), depth=st.integers(1, 6), data=st.data())
def test_retrieve_matches_brute_force(docs, ctx, max_span, min_span, depth, data):
    docs = [d for d in docs if d] or [[0, 1]]
    split = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(docs) - 1)), max_size=2)))) if len(docs) > 1 else []
    ix = mem_index(docs, vocab=6, split=split)
    r = ix.retrieve(ctx, budget=10_000, max_span=max_span, min_span=min_span, max_matches=10_000, depth=depth,
                    min_prob=0.0)
    m, cnt, n = reference(docs, ctx, max_span, min_span, depth)
    assert r.match_len == m
    got = result_paths(r)
    want = {p: c / (n if len(p) == 1 else cnt[p[:-1]]) for p, c in cnt.items()}
    assert got.keys() == want.keys()
    for p in want:
        assert got[p] == pytest.approx(want[p], rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(docs=docs_st, ctx=st.lists(st.integers(0, 4), min_size=1, max_size=10), budget=st.integers(1, 12),
       min_prob=st.sampled_from([0.0, 0.2, 0.5]))
def test_budget_and_pruning(docs, ctx, budget, min_prob):
    docs = [d for d in docs if d] or [[0, 1]]
    ix = mem_index(docs, vocab=5)
    full = ix.retrieve(ctx, 10_000, max_matches=10_000, depth=5, min_prob=0.0, min_span=1)
    r = ix.retrieve(ctx, budget, max_matches=10_000, depth=5, min_prob=min_prob, min_span=1)
    assert len(r) <= budget
    assert np.all(r.parents < np.arange(len(r)))
    fp = result_paths(full)
    gp = result_paths(r)
    # every kept node is in the full tree with the same conditional probability and passes min_prob
    path_prob = {}
    for p, pr in sorted(fp.items(), key=lambda kv: len(kv[0])):
        path_prob[p] = pr * path_prob.get(p[:-1], 1.0)
    eligible = {p for p in fp if all(fp[p[:j]] >= min_prob for j in range(1, len(p) + 1))}
    for p, pr in gp.items():
        assert p in eligible and pr == pytest.approx(fp[p])
    # and they are the best `budget` eligible nodes by path probability
    best = sorted((path_prob[p] for p in eligible), reverse=True)[:budget]
    assert sorted((path_prob[p] for p in gp), reverse=True) == pytest.approx(best)


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=60), min_size=1, max_size=5),
       ctx=st.lists(st.integers(0, 3), min_size=1, max_size=20))
def test_shard_match_vs_brute_force(docs, ctx):
    for dtype, offset in ((np.uint16, 0), (np.uint32, 70_000)):
        d2 = [[t + offset for t in d] for d in docs]
        s = make_shard(d2, vocab=offset + 4, dtype=dtype)
        c2 = [t + offset for t in ctx]
        m, lo, hi = s.match(np.asarray(c2[::-1], dtype=np.int64))
        pos = np.sort(s.rsa[lo:hi].astype(np.int64))
        T = np.asarray(s.tokens)
        bm, ends = brute_force_match(T, c2, len(c2))
        assert m == bm
        if m:
            assert list(pos) == ends


def test_large_ranges_use_sampled_binary_search():
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(0, 3, 3000)) for _ in range(4)]
    ix = mem_index(docs, vocab=3)
    for _ in range(30):
        ctx = list(rng.integers(0, 3, 14))
        r = ix.retrieve(ctx, 10_000, max_span=14, max_matches=10_000, depth=3, min_prob=0.0, min_span=1)
        m, cnt, n = reference(docs, ctx, 14, 1, 3)
        assert r.match_len == m
        assert result_paths(r) == pytest.approx({p: c / (n if len(p) == 1 else cnt[p[:-1]]) for p, c in cnt.items()})


def test_no_match_crosses_documents_and_unknown_ids():
    ix = mem_index([[1, 2, 3], [4, 5, 6]], vocab=7)
    r = ix.retrieve([3, 4], 10, min_span=2)
    assert r.match_len == 0 and len(r) == 0
    r = ix.retrieve([2, 3], 10, min_span=2)   # 3 ends its document: no continuation
    assert r.match_len == 2 and len(r) == 0
    assert ix.retrieve([99, 1_000_000, -5], 10).match_len == 0
    assert ix.retrieve([], 10).match_len == 0
    r = ix.retrieve([0, 1, 2], 10, min_span=2)
    assert r.tokens.tolist() == [3] and r.match_len == 2 and r.probs.tolist() == [1.0]
    assert r.tokens.dtype == np.int32 and r.parents.dtype == np.int32 and r.probs.dtype == np.float32


def test_max_matches_sampling_and_doc_filter():
    docs = [[1, 2, 3]] * 50 + [[1, 2, 4]] * 50 + [[1, 2, 5]]
    ix = mem_index(docs, vocab=6)
    r = ix.retrieve([1, 2], 10, max_matches=20, min_prob=0.0)
    got = dict(zip(r.tokens.tolist(), r.probs.tolist()))
    assert got[3] == pytest.approx(0.5, abs=0.1) and got[4] == pytest.approx(0.5, abs=0.1)
    assert not r.in_documents.any()
    r = ix.retrieve([1, 2], 10, max_matches=4, min_prob=0.0, doc_filter=[100])
    got = dict(zip(r.tokens.tolist(), r.in_documents.tolist()))
    assert got[5] is True and 5 in got                  # the filtered document's continuation comes first
    assert r.probs[r.tokens.tolist().index(5)] == pytest.approx(0.25)


@pytest.mark.parametrize("split", [None, [5]], ids=["one-shard", "two-shards"])
def test_hint_fusion(split):
    docs = [[1, 2, 3]] * 6 + [[1, 2, 4]] * 4
    ix = mem_index(docs, vocab=6, split=split)
    r = ix.retrieve([1, 2], 10, min_prob=0.0, hint_tokens=[4], hint_probs=[0.9])   # confident: 3 vetoed
    assert r.tokens.tolist() == [4] and r.probs[0] == pytest.approx(np.sqrt(0.4 * 0.9))
    r = ix.retrieve([1, 2], 10, min_prob=0.0, hint_tokens=[4], hint_probs=[0.5])   # unsure: 3 kept, reweighted
    got = dict(zip(r.tokens.tolist(), r.probs.tolist()))
    assert got[3] == pytest.approx(np.sqrt(0.6 * 0.5)) and got[4] == pytest.approx(np.sqrt(0.4 * 0.5))


def test_build_tree_empty_inputs():
    assert build_tree(np.zeros((0, 3), np.int64), np.zeros(0, bool), 5, 0.1) is None
    assert build_tree(np.full((2, 3), -1, np.int64), np.zeros(2, bool), 5, 0.1) is None
