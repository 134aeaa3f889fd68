"""Recent shared outputs compacted into suffix-array shards (datastore/output_shards.py): the shard format,
lookups unchanged by a compaction and never blocked by one, crash safety between a shard's rename and the
next snapshot, retention of the newest shards."""
from __future__ import annotations

import random
import threading
import time

import numpy as np

from specstore.datastore.index_format import SHARD_FILES
from specstore.datastore.ngram_stats import NgramStats
from specstore.datastore.output_shards import (OUTPUTS_DIR, OutputCompactor, OutputShard, open_output_shards,
                                               shard_outputs, write_output_shard)
from specstore.datastore.stats_log import StatsLog
from specstore.datastore.suffix_shard import build_buckets, build_reverse_sa, pack_documents
from specstore.protos import datastore_pb2 as pb


def _outputs(seed: int, n: int, vocab: int = 40, length=(6, 30)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*length))] for _ in range(n)]


def _push(log: StatsLog, outs, bid: str):
    return log.submit(pb.PushStatsRequest(batch_id=bid, outputs=[pb.Output(tokens=o) for o in outs])).result(10)


def _tree(stats: NgramStats, ctx):
    t = stats.output_tree(ctx, budget=32, min_prob=0.0)
    return t.tokens.tolist(), t.parents.tolist(), np.round(t.probs, 6).tolist(), t.match_len


def test_a_compacted_shard_is_what_the_index_builders_give(tmp_path):
    outs = _outputs(0, 7)
    path = write_output_shard(tmp_path, 5, outs)
    assert path.name == f"outputs-{5:020d}-{12:020d}"
    vocab = max(map(max, outs)) + 1
    T, starts = pack_documents([np.asarray(o, np.uint16) for o in outs], np.uint16)
    want = {"tokens.npy": T, "rsa.npy": build_reverse_sa(T), "buckets.npy": build_buckets(T, vocab),
            "docs.npy": starts, "doc_ids.npy": np.arange(5, 12)}
    assert sorted(p.name for p in path.iterdir()) == sorted(SHARD_FILES)
    for name, arr in want.items():
        got = np.load(path / name)
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    o = OutputShard.load(path)
    assert (o.first, o.end, o.tokens) == (5, 12, sum(map(len, outs)))


def test_compaction_keeps_every_tree_and_drops_exactly_the_compacted_outputs(tmp_path):
    # a small vocabulary: contexts match in many outputs, at many lengths (each 3-gram fewer than the online
    # index keeps per key, 32, so both sides see every occurrence)
    outs = _outputs(1, 60, vocab=12)
    s = NgramStats(max_output_tokens=100_000)
    s.apply([], [], 0.0, outs)
    rng = random.Random(2)
    contexts = [o[i - rng.randint(3, 8):i] for o in outs if len(o) >= 8 for i in [rng.randint(8, len(o))]]
    contexts += [o[:5] for o in outs[:10]]
    before = [_tree(s, c) for c in contexts]
    assert sum(1 for t in before if t[0]) > 20
    held = len(s.outputs)                     # tokens and one separator per output
    comp = OutputCompactor(s, tmp_path, compact_tokens=400, max_tokens=1 << 20, merge_tokens=0)
    while len(s.outputs) > 400:
        assert comp.compact_once()
    assert comp.compactions >= 2 and len(s.output_shards) == comp.compactions
    assert s.outputs.first_ordinal == s.output_shards[-1].end and s.output_shards[0].first == 0
    assert len(s.outputs) + sum(o.tokens + o.end - o.first for o in s.output_shards) == held
    assert [_tree(s, c) for c in contexts] == before


def test_lookups_go_on_while_a_shard_is_built(tmp_path):
    log = StatsLog(tmp_path, outputs_compact_tokens=200).open()
    release, building = threading.Event(), threading.Event()

    def hold():
        building.set()
        assert release.wait(20)

    log.compactor.build_hook = hold
    try:
        outs = _outputs(3, 30)
        _push(log, outs[:15], "a")
        assert building.wait(10)                         # the build waits on the hook, outside the lock
        ctx = outs[0][:6]
        t0 = time.monotonic()
        t = log.stats.output_tree(ctx, budget=8, min_prob=0.0)
        assert time.monotonic() - t0 < 2 and len(t.tokens)
        assert _push(log, outs[15:], "b") == (True, 2)   # pushes go on too
        assert not log.stats.output_shards
        release.set()
        deadline = time.monotonic() + 20
        while len(log.stats.outputs) > 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.stats.output_shards and len(log.stats.outputs) <= 200
        assert (tmp_path / OUTPUTS_DIR / log.stats.output_shards[0].path.name).is_dir()
        assert log.stats.output_tree(ctx, budget=8, min_prob=0.0).tokens.tolist() == t.tokens.tolist()
    finally:
        release.set()
        log.close()


def test_a_crash_between_the_shard_rename_and_the_snapshot_loses_and_duplicates_nothing(tmp_path):
    outs = _outputs(4, 40)
    log = StatsLog(tmp_path, snapshot_every=3).open()
    for i in range(8):
        _push(log, outs[5 * i:5 * i + 5], f"b{i}")        # a snapshot after 6 pushes, 2 records after it
    assert log.stats.outputs.added == 40
    first, copied = log.stats.outputs_to_compact(300)
    log.close()                                            # the shard is written; the store keeps them: "killed"
    write_output_shard(tmp_path / OUTPUTS_DIR, first, copied)
    (tmp_path / OUTPUTS_DIR / "outputs-x.tmp123").mkdir()  # a half-written shard of a killed compaction
    again = StatsLog(tmp_path).open()
    try:
        assert not (tmp_path / OUTPUTS_DIR / "outputs-x.tmp123").exists()
        (sh,) = again.stats.output_shards
        assert (sh.first, sh.end) == (0, len(copied))
        online = again.stats.outputs
        assert online.first_ordinal == len(copied) and online.added == 40
        held = [list(map(int, sh.shard.tokens[a:b - 1])) for a, b in zip(sh.shard.doc_starts, sh.shard.doc_starts[1:])]
        _, rest = online.oldest(1 << 30)
        assert held + rest == outs                         # every output exactly once, in order
    finally:
        again.close()


def test_retention_deletes_the_oldest_shards(tmp_path):
    s = NgramStats()
    s.apply([], [], 0.0, _outputs(5, 50))
    comp = OutputCompactor(s, tmp_path, compact_tokens=150, max_tokens=400, merge_tokens=0)   # no merging
    while len(s.outputs) > 150:
        comp.compact_once()
    kept = s.output_shards
    assert 1 < len(kept) and sum(o.tokens for o in kept) <= 400
    assert [o.end for o in kept[:-1]] == [o.first for o in kept[1:]]   # the newest, contiguous
    assert s.outputs.first_ordinal == kept[-1].end
    on_disk = [o.path.name for o in open_output_shards(tmp_path)]
    assert on_disk == [o.path.name for o in kept] and kept[0].first > 0


def test_small_shards_are_merged_and_a_crash_mid_merge_keeps_the_merged_one(tmp_path):
    outs = _outputs(6, 60)
    s = NgramStats()
    s.apply([], [], 0.0, outs)
    ctxs = [o[i - 5:i] for o in outs[::7] for i in (5, len(o) - 1)]
    before = [_tree(s, c) for c in ctxs]
    comp = OutputCompactor(s, tmp_path, compact_tokens=100, max_tokens=1 << 20, merge_tokens=500)
    while len(s.outputs) > 100:
        comp.compact_once()
    kept = s.output_shards
    assert comp.compactions > len(kept) > 1                           # merged, up to merge_tokens each
    assert all(o.tokens <= 500 for o in kept)
    assert [o.path.name for o in open_output_shards(tmp_path)] == [o.path.name for o in kept]
    held = [a.tolist() for o in kept for a in shard_outputs(o.shard)]
    _, rest = s.outputs.oldest(1 << 30)
    assert held + rest == outs                                        # every output once, in order
    assert [_tree(s, c) for c in ctxs] == before
    # a kill after a merged shard's rename, before the shard it replaces is deleted: both on disk
    newest = kept[-1]
    part = shard_outputs(newest.shard)[:2]
    write_output_shard(tmp_path, newest.first, part)
    assert len(open_output_shards(tmp_path)) == len(kept)            # the contained one is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [o.path.name for o in kept]


def test_shard_matches_equal_a_brute_force_ranking(tmp_path):
    from specstore.datastore.output_shards import shard_matches
    from specstore.datastore.output_store import KEY

    outs = _outputs(7, 80, vocab=6, length=(4, 25))           # a tiny vocabulary: many matches of every length
    sh = OutputShard.load(write_output_shard(tmp_path, 0, outs)).shard
    T = sh.tokens.astype(np.int64)
    rng = random.Random(8)
    for _ in range(60):
        src = outs[rng.randrange(len(outs))]
        ctx = src[:rng.randint(1, len(src))] if rng.random() < 0.7 else [rng.randrange(6) for _ in range(9)]
        cap = rng.choice([1, 5, 16, 1000])
        want = []
        for q in range(1, len(T) - 1):
            if T[q] == sh.sep or T[q + 1] == sh.sep:
                continue
            n = 0
            while n < min(len(ctx), 16) and T[q - n] == ctx[-1 - n]:
                n += 1
            if n >= KEY:
                want.append((n, q))
        want.sort(key=lambda x: (-x[0], -x[1]))
        lens, pos = shard_matches(sh, ctx, cap, 16)
        assert list(zip(lens.tolist(), pos.tolist())) == want[:cap]
