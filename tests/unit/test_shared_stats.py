"""Shared next-token statistics (datastore/ngram_stats.py) and their write-ahead log (datastore/stats_log.py)."""
import os
import random

import numpy as np
import pytest

from specstore.datastore.ngram_stats import NgramStats
from specstore.datastore.stats_log import SNAPSHOT, StatsLog, StatsLogCorrupt, _segments
from specstore.protos import datastore_pb2 as pb


def _batches(seed: int, n: int = 30, vocab: int = 50):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(rng.randint(0, 3)):
            k = rng.randint(1, 4)
            p = np.asarray([rng.random() for _ in range(k)])
            rows.append((rng.randrange(vocab), [rng.randrange(vocab) for _ in range(k)], (p / p.sum() * 0.9).tolist()))
        runs = [([rng.randrange(vocab) for _ in range(rng.randint(2, 12))], rng.randint(1, 2)) for _ in range(rng.randint(1, 2))]
        out.append((rows, runs))
    return out


def test_merging_is_a_sum_in_any_order():
    batches = _batches(0)
    a, b = NgramStats(keep=64), NgramStats(keep=64)
    for rows, runs in batches:
        a.apply(rows, runs, now=0.0)
    for rows, runs in reversed(batches):
        b.apply(rows, runs, now=0.0)
    assert len(a) > 20 and a.same_as(b)
    c = NgramStats(keep=64)
    c.apply([], [([1, 2, 3], 1)], now=0.0)
    assert not a.same_as(c)


def test_runs_count_ngrams_after_new_from_and_tree_follows_them():
    s = NgramStats(order=3)
    s.apply([], [([5, 6, 7, 8], 1)] * 3, now=0.0)
    s.apply([], [([9, 6, 7, 1], 2)], now=0.0)     # 9 6 is context only: 7 after (9,6)... counted from i=2
    t = s.tree([5, 6], budget=8, min_prob=0.1)
    # after (5, 6) comes 7 three times (p = 3/4), then after (5, 6, 7)[-3:] = (5, 6, 7): 8 three times
    assert t.tokens.tolist()[:2] == [7, 8] and t.parents.tolist()[:2] == [-1, 0]
    assert t.probs[0] == pytest.approx(3 / 4) and t.match_len == 2
    # (6,) was never a key: 6 only appears as context before new_from in the second run... it was a key
    # through the first run; (9,) never: a context-only position adds nothing
    assert s.tree([9], budget=4).tokens.tolist() == []
    assert s.tree([4], budget=4).tokens.tolist() == []


def test_topk_rows_and_warm_start_rows_since():
    s = NgramStats()
    s.apply([(3, [4, 5], [0.6, 0.3])], [], now=0.0)
    rows, version, more = s.rows_since(0, limit=10)
    assert rows == [(3, [4, 5], [pytest.approx(0.3), pytest.approx(0.15)])] and version == 1 and not more
    s.apply([(7, [1], [1.0])], [], now=0.0)
    assert [r[0] for r in s.rows_since(1, 10)[0]] == [7]
    assert s.rows_since(2, 10) == ([], 2, False)


def test_pages_never_split_a_batch():
    s = NgramStats()
    s.apply([(t, [1], [0.5]) for t in range(10)], [], now=0.0)       # version 1: 10 rows
    s.apply([(t, [2], [0.5]) for t in range(20, 23)], [], now=0.0)  # version 2: 3 rows
    rows, version, more = s.rows_since(0, limit=4)
    assert len(rows) == 10 and version == 1 and more
    rows, version, more = s.rows_since(version, limit=4)
    assert [r[0] for r in rows] == [20, 21, 22] and version == 2 and not more


def test_decay_halves_weights_per_half_life():
    s = NgramStats(half_life_s=10.0)
    s.apply([], [([1, 2], 1)] * 4, now=0.0)
    s.apply([], [([1, 3], 1)] * 4, now=10.0)    # the 4 old counts of 2 weigh 2 now
    t = s.tree([1], budget=2, min_prob=0.0)
    assert t.tokens.tolist() == [3, 2]
    assert t.probs.tolist() == pytest.approx([4 / 7, 2 / 7])


def test_bounded_rows_and_next_tokens():
    s = NgramStats(order=1, keep=2, max_rows=3)
    s.apply([], [([1, 2], 1), ([1, 3], 1), ([1, 3], 1), ([1, 4], 1)], now=0.0)
    assert sorted(s._rows[(1,)].weights) == [3, 4] or sorted(s._rows[(1,)].weights) == [2, 3]
    assert s._rows[(1,)].total == 4                # dropped mass still counts
    s.apply([], [([5, 6], 1), ([7, 8], 1), ([9, 1], 1)], now=0.0)
    assert len(s) == 3 and s.evicted == 1 and (1,) not in s._rows


def test_snapshot_arrays_roundtrip():
    s = NgramStats(keep=64)
    for rows, runs in _batches(1):
        s.apply(rows, runs, now=5.0)
    t = NgramStats.from_arrays(s.to_arrays())
    assert t.same_as(s) and t.version == s.version
    assert t.tree([1, 2], 16).tokens.tolist() == s.tree([1, 2], 16).tokens.tolist()


def _req(i: int, batch_id=None) -> pb.PushStatsRequest:
    return pb.PushStatsRequest(batch_id=batch_id or f"b{i}", runs=[pb.TokenRun(tokens=[i % 7, 1 + i % 5, 2], new_from=1)],
                               rows=[pb.TopkRow(token=i % 11, next_tokens=[3, 4], probs=[0.5, 0.25])])


def _reference(reqs) -> NgramStats:
    s = NgramStats()
    seen = set()
    for r in reqs:
        if r.batch_id in seen:
            continue
        seen.add(r.batch_id)
        s.apply([(x.token, x.next_tokens, x.probs) for x in r.rows], [(x.tokens, x.new_from) for x in r.runs], now=0.0)
    return s


def test_log_replays_acknowledged_batches_once(tmp_path):
    log = StatsLog(tmp_path, clock=lambda: 0.0).open()
    reqs = [_req(i) for i in range(50)] + [_req(3), _req(7)]       # two retries
    results = [log.submit(r).result() for r in reqs]
    assert [a for a, _ in results] == [True] * 50 + [False, False]
    assert results[-1][1] == 50
    log.close()
    again = StatsLog(tmp_path, clock=lambda: 0.0).open()
    assert again.replayed == 50 and again.stats.same_as(_reference(reqs))
    assert again.submit(_req(9)).result() == (False, 50)            # the retry after a restart
    again.close()


def test_snapshot_bounds_replay_and_keeps_ids(tmp_path):
    log = StatsLog(tmp_path, snapshot_every=20, clock=lambda: 0.0).open()
    reqs = [_req(i) for i in range(45)]
    for r in reqs:
        log.submit(r).result()
    log.close()
    assert (tmp_path / SNAPSHOT).exists() and len(_segments(tmp_path)) <= 2
    again = StatsLog(tmp_path, snapshot_every=20, clock=lambda: 0.0).open()
    assert again.replayed == 5 and again.stats.same_as(_reference(reqs))
    assert again.submit(_req(1)).result()[0] is False
    again.close()


def test_a_cut_tail_is_dropped_and_corruption_elsewhere_refused(tmp_path):
    log = StatsLog(tmp_path, clock=lambda: 0.0).open()
    for i in range(10):
        log.submit(_req(i)).result()
    log.close()
    seg = _segments(tmp_path)[0]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:          # a crash in the middle of the last record's write
        f.truncate(size - 7)
    again = StatsLog(tmp_path, clock=lambda: 0.0).open()
    assert again.replayed == 9 and again.cut_tail_bytes > 0
    assert again.submit(_req(9)).result() == (True, 10)     # never acknowledged, so not a duplicate
    again.close()
    first = _segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[20] ^= 0xFF                     # a flipped byte in a sealed segment
    first.write_bytes(bytes(data))
    with pytest.raises(StatsLogCorrupt, match="crc mismatch"):
        StatsLog(tmp_path).open()


def test_group_commit_from_many_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    log = StatsLog(tmp_path, clock=lambda: 0.0).open()
    reqs = [_req(i) for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda r: log.submit(r).result(), reqs))
    assert all(a for a, _ in out) and sorted(v for _, v in out)[-1] == 200
    log.close()
    again = StatsLog(tmp_path, clock=lambda: 0.0).open()
    assert again.stats.same_as(_reference(reqs))
    again.close()


def test_failed_write_is_not_acknowledged_nor_applied(tmp_path, monkeypatch):
    log = StatsLog(tmp_path, clock=lambda: 0.0).open()
    log.submit(_req(0)).result()
    real = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        log.submit(_req(1)).result()
    monkeypatch.setattr(os, "fsync", real)
    assert log.stats.version == 1
    assert log.submit(_req(1)).result() == (True, 2)     # the retry applies it
    log.close()
    again = StatsLog(tmp_path, clock=lambda: 0.0).open()
    assert again.stats.same_as(_reference([_req(0), _req(1)]))
    again.close()


# ------------------------------------------------------------------ recent shared outputs
from specstore.datastore.output_store import OutputStore  # noqa: E402


def test_outputs_match_the_longest_and_newest_and_stop_at_an_output_end():
    s = OutputStore(max_tokens=1000)
    s.add([1, 2, 3, 4, 5, 6])
    s.add([9, 2, 3, 4, 7, 8])
    s.add([0, 0, 2, 3, 4, 5])
    rows, n = s.continuations([1, 2, 3, 4], depth=4)
    # the match [1 2 3 4] (length 4) ranks first; then the two of length 3, newest first; a row stops at its end
    assert n == 4 and rows.tolist() == [[5, 6, -1, -1], [5, -1, -1, -1], [7, 8, -1, -1]]
    assert s.continuations([7, 7, 7], depth=2)[0].shape == (0, 2)


def test_outputs_are_bounded_fifo_and_snapshot_roundtrip():
    s = OutputStore(max_tokens=20)
    for i in range(10):
        s.add([50 + i, 1, 2, 3, 60 + i])
    assert len(s) <= 20 and s.outputs <= 3
    rows, _ = s.continuations([1, 2, 3], depth=1)
    assert sorted(rows[:, 0].tolist()) == [60 + i for i in range(10 - s.outputs, 10)]   # the oldest went first
    for i in range(1000):                  # distinct 3-grams: the index drops evicted outputs' keys as it goes
        s.add([100 + i, 200 + i, 300 + i, 400 + i])
    assert len(s._index) <= 2 * 20 and len(s._tokens) <= 2 * 20 + 5
    t = OutputStore.from_arrays(s.to_arrays())
    assert t.continuations([100 + 999, 200 + 999, 300 + 999], depth=1)[0].tolist() == [[400 + 999]]
    assert t.continuations([1, 2, 3], depth=1)[0].shape[0] == 0


def test_outputs_travel_in_the_log_and_draft_a_tree(tmp_path):
    log = StatsLog(tmp_path, clock=lambda: 0.0).open()
    req = pb.PushStatsRequest(batch_id="o1", outputs=[pb.Output(tokens=[10, 11, 12, 13, 14, 15])])
    assert log.submit(req).result() == (True, 1)
    log.close()
    again = StatsLog(tmp_path).open()
    t = again.stats.output_tree([3, 11, 12, 13], budget=4, min_prob=0.0)
    assert t.tokens.tolist() == [14, 15] and t.parents.tolist() == [-1, 0] and t.match_len == 3
    again.snapshot()
    again.close()
    third = StatsLog(tmp_path).open()
    assert third.replayed == 0 and third.stats.output_tree([11, 12, 13], 4, min_prob=0.0).tokens.tolist() == [14, 15]
    third.close()
