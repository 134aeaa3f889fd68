"""Session memory (datastore/memory.py): history sync, suffix match, and retrieval over corpus + memory,
against brute-force references."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specstore.datastore.memory import TokenMemory, match_memory, memory_continuations
from tests.unit.test_index_lookup import mem_index, result_paths


def brute_match(mem, max_span):
    L = len(mem)
    for m in range(min(max_span, L - 1), 0, -1):
        pat = list(mem[L - m:])
        q = [i + m - 1 for i in range(L - m) if list(mem[i:i + m]) == pat]   # ends before L - 1
        if q:
            return m, q
    return 0, []


@settings(max_examples=200, deadline=None)
@given(mem=st.lists(st.integers(0, 3), min_size=0, max_size=60), max_span=st.integers(1, 12))
def test_match_memory_vs_brute_force(mem, max_span):
    m, q = match_memory(np.asarray(mem, dtype=np.int32), max_span)
    bm, bq = brute_match(mem, max_span)
    assert m == bm
    if m:
        assert q.tolist() == bq


def test_memory_continuations_stop_at_the_end():
    mem = np.asarray([5, 6, 7, 5, 6], dtype=np.int32)
    m, q = match_memory(mem, 8)
    assert m == 2 and q.tolist() == [1]
    assert memory_continuations(mem, q, 4).tolist() == [[7, 5, 6, -1]]


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.integers(1, 9), min_size=1, max_size=40), tail=st.integers(1, 12),
       capacity=st.integers(4, 64), prompt=st.integers(0, 20), data=st.data())
def test_sync_rebuilds_the_history_from_tails(steps, tail, capacity, prompt, data):
    seq = data.draw(st.lists(st.integers(0, 50), min_size=prompt + sum(steps), max_size=prompt + sum(steps)))
    mem = TokenMemory(seq[:prompt], capacity=capacity)
    start, end = 0, prompt
    for s in steps:
        end += s
        if s > tail:    # a gap restarts the history from the tail
            start = end - tail
        mem.sync(seq[max(0, end - tail):end], end)
        assert mem.end == end
        # everything since the start is remembered, less the oldest tokens beyond the capacity
        assert mem.tokens.tolist() == seq[mem.base:end]
        assert max(start, end - capacity) <= mem.base <= end - min(end - start, capacity // 2)


def test_sync_restarts_on_disagreement_and_rejects_bad_positions():
    mem = TokenMemory([1, 2, 3, 4])
    mem.sync([3, 4, 5], 5)
    assert mem.tokens.tolist() == [1, 2, 3, 4, 5]
    mem.sync([9, 9, 6], 6)            # the overlap disagrees: another request reused the session
    assert mem.tokens.tolist() == [9, 9, 6] and mem.base == 3
    mem.sync([1, 2], 2)               # a rewind to the start
    assert mem.tokens.tolist() == [1, 2] and mem.base == 0
    with pytest.raises(ValueError):
        mem.sync([1, 2, 3], 2)
    with pytest.raises(ValueError):
        TokenMemory(capacity=1)


def reference(docs, memory, context, max_span, min_span, depth):
    """(m, Counter of continuation prefixes, occurrences): corpus occurrences anywhere, memory ones only
    with a next token; the longest match wins and a tie pools both."""
    ctx = list(context)[-max_span:]
    for m in range(len(ctx), 0, -1):
        pat = ctx[-m:]
        occ = [list(d[i + m:i + m + depth]) for d in docs for i in range(len(d) - m + 1) if list(d[i:i + m]) == pat]
        occ += [list(memory[i + m:i + m + depth]) for i in range(len(memory) - m) if list(memory[i:i + m]) == pat]
        if occ:
            if m < min_span:
                return 0, Counter(), 0
            cnt = Counter(tuple(c[:j]) for c in occ for j in range(1, len(c) + 1))
            return m, cnt, len(occ)
    return 0, Counter(), 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), min_size=1, max_size=5),
       history=st.lists(st.integers(0, 4), min_size=0, max_size=30),
       ctx=st.lists(st.integers(0, 4), min_size=1, max_size=10), max_span=st.integers(1, 8),
       min_span=st.integers(1, 3), depth=st.integers(1, 5), two_shards=st.booleans())
def test_retrieve_with_memory_vs_brute_force(docs, history, ctx, max_span, min_span, depth, two_shards):
    # one shard takes the single compiled call, two shards the general path: both must match the reference
    ix = mem_index(docs, vocab=5, split=[1] if two_shards and len(docs) > 1 else None)
    memory = history + ctx                 # the memory always ends with the context
    r = ix.retrieve(ctx, 10_000, max_span=max_span, min_span=min_span, max_matches=10_000, depth=depth,
                    min_prob=0.0, memory=np.asarray(memory, np.int32), memory_matches=10_000)
    m, cnt, n = reference(docs, memory, ctx, max_span, min_span, depth)
    assert r.match_len == m
    assert result_paths(r) == pytest.approx({p: c / (n if len(p) == 1 else cnt[p[:-1]]) for p, c in cnt.items()})


def test_memory_nodes_are_flagged_and_win_longer_matches():
    ix = mem_index([[1, 2, 3, 4]], vocab=10)
    # the corpus matches [2] only; the memory has [7, 2] followed by 8, 9 (and then the context itself)
    r = ix.retrieve([7, 2], 10, min_span=1, min_prob=0.0, memory=np.asarray([7, 2, 8, 9, 7, 2], np.int32))
    assert r.match_len == 2 and r.tokens.tolist() == [8, 9, 7, 2] and r.in_memory.all() and not r.in_documents.any()
    # a tie pools both: 3 from the corpus, 8 from the memory
    r = ix.retrieve([1, 2], 10, min_span=1, min_prob=0.0, memory=np.asarray([1, 2, 8, 1, 2], np.int32))
    got = dict(zip(r.tokens.tolist(), r.in_memory.tolist()))
    assert got[3] is False and got[8] is True
    # a memory that does not end with the context is ignored
    r = ix.retrieve([1, 2], 10, min_span=1, min_prob=0.0, memory=np.asarray([1, 2, 8, 1], np.int32))
    assert not r.in_memory.any()
