"""Shared statistics in a real Redis (datastore/stats_redis.py): replicas that serve the same state, a balanced
client over two real gRPC replicas on 127.0.0.1, and decoding that survives a replica's death unchanged."""
from __future__ import annotations

import time

import numpy as np
import pytest

from specstore.client.datastore_client import DatastoreClient
from specstore.datastore.ngram_stats import NgramStats
from specstore.datastore.servicer import ServiceConfig
from specstore.datastore.stats_redis import RedisStats
from specstore.protos import datastore_pb2 as pb
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread, stop_at_step
from tests.redis_support import RedisServer


@pytest.fixture()
def redis_server(tmp_path):
    with RedisServer(tmp_path / "redis") as srv:
        yield srv


def _req(i: int, bid=None) -> pb.PushStatsRequest:
    return pb.PushStatsRequest(batch_id=bid or f"b{i}", runs=[pb.TokenRun(tokens=[i % 7, 1 + i % 5, 2, i % 3], new_from=1)],
                               rows=[pb.TopkRow(token=i % 11, next_tokens=[3, 4], probs=[0.5, 0.25])])


def _replica(url, **kw) -> RedisStats:
    return RedisStats(url, stats=NgramStats(half_life_s=1e12), **kw).open()


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_replicas_hold_the_same_table_and_apply_a_batch_once(redis_server):
    a, b = _replica(redis_server.url), _replica(redis_server.url)
    try:
        out = [(a if i % 2 else b).submit(_req(i)).result(10) for i in range(40)]
        assert sorted(v for _, v in out) == list(range(1, 41)) and all(ok for ok, _ in out)
        assert b.submit(_req(3)).result(10) == (False, 40)            # a retry through the other replica
        assert a.submit(_req(3)).result(10)[0] is False
        _wait(lambda: a.stats.version == b.stats.version == 40)
        assert a.stats.same_as(b.stats) and len(a.stats) > 10
        t = a.stats.tree([1, 2], 8, min_prob=0.0)
        assert t.tokens.tolist() == b.stats.tree([1, 2], 8, min_prob=0.0).tokens.tolist() and len(t.tokens)
    finally:
        a.close(); b.close()


def test_snapshots_trim_the_log_and_new_or_late_replicas_catch_up(redis_server):
    a = _replica(redis_server.url, snapshot_every=10)
    late = _replica(redis_server.url, snapshot_every=10)
    try:
        late._stop.set(); late._tail.join(5)       # this replica stops reading: it falls behind the trims
        for i in range(35):
            a.submit(_req(i)).result(10)
        _wait(lambda: a.r.xlen(a.keys["log"]) < 35)   # trimmed to the last snapshot
        fresh = _replica(redis_server.url, snapshot_every=10)
        try:
            _wait(lambda: fresh.stats.version == 35)
            assert fresh.stats.same_as(a.stats)
        finally:
            fresh.close()
        late._stop.clear()                          # it reads again: the next entry does not follow its table
        import threading

        late._tail = threading.Thread(target=late._tail_loop, daemon=True)
        late._tail.start()
        a.submit(_req(99)).result(10)
        _wait(lambda: late.stats.version == 36)
        assert late.reloads >= 1 and late.stats.same_as(a.stats)
    finally:
        a.close(); late.close()


def test_acknowledged_pushes_survive_a_redis_kill_9(redis_server, tmp_path):
    import signal

    a = _replica(redis_server.url)
    for i in range(20):
        a.submit(_req(i)).result(10)
    a.close()
    redis_server.proc.send_signal(signal.SIGKILL)
    redis_server.proc.wait()
    again = RedisServer.__new__(RedisServer)
    # the same folder and port: the append-only file is replayed
    import shutil
    import subprocess

    again.folder, again.port, again.url = redis_server.folder, redis_server.port, redis_server.url
    again.proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(again.port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                   "--dir", str(again.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        b = None
        end = time.monotonic() + 20
        while b is None:
            try:
                b = _replica(again.url)
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < end
                time.sleep(0.1)
        try:
            assert b.stats.version == 20
            ref = NgramStats(half_life_s=1e12)
            for i in range(20):
                r = _req(i)
                ref.apply([(x.token, x.next_tokens, x.probs) for x in r.rows], [(x.tokens, x.new_from) for x in r.runs],
                          now=0.0)
            assert b.stats.same_as(ref, rel=1e-6)
            assert b.submit(_req(5)).result(10) == (False, 20)
        finally:
            b.close()
    finally:
        again.stop()


def test_a_balanced_client_over_two_replicas(redis_server, tmp_path):
    """Two real gRPC replicas (one Redis) behind one client address list (round_robin): pushes through either
    reach both; a dead replica costs at most a failed call, and the other serves on."""
    idx = write_fake_index(tmp_path / "idx", [[1, 2, 3, 4]], fingerprint="fp-test")
    a = ServerThread(idx, ServiceConfig(), opener=FakeIndex.open, stats=_replica(redis_server.url))
    b = ServerThread(idx, ServiceConfig(), opener=FakeIndex.open, stats=_replica(redis_server.url))
    c = DatastoreClient(f"{a.address},{b.address}", timeout_s=2.0)
    try:
        for i in range(10):
            assert c.push_stats(_req(i))[0]
        _wait(lambda: a.server.servicer.stats.stats.version == b.server.servicer.stats.stats.version == 10)
        for addr in (a.address, b.address):
            one = DatastoreClient(addr, timeout_s=2.0)
            assert one.pull_stats(0)[1] == 10
            one.close()
        a.stop()
        ok = 0
        for i in range(10, 20):          # one call may still meet the dead replica
            try:
                ok += int(c.push_stats(_req(i))[0])
            except Exception:  # noqa: BLE001
                pass
        assert ok >= 9
        assert np.asarray(c.retrieve([5, 6], budget=4).tokens).size >= 1
    finally:
        c.close()
        b.stop()


def test_decoding_over_replicas_survives_a_replica_death(redis_server, tmp_path):
    import torch

    from specstore.client.budget import CostProfile
    from specstore.client.datastore_drafter import DatastoreDrafter, RemoteBackend
    from specstore.client.decoder import SpeculativeDecoder
    from specstore.client.drafters import ContextDrafter
    from tests.helpers import plain_greedy, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab=96, seed=4)
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13, 14, 11, 12, 13]]
    want = [plain_greedy(model, p, 48) for p in prompts]
    docs = [p + w for p, w in zip(prompts, want)]             # the corpus holds the true continuations
    idx = write_fake_index(tmp_path / "idx", docs, fingerprint="fp-test")
    a = ServerThread(idx, ServiceConfig(), opener=FakeIndex.open, stats=_replica(redis_server.url))
    b = ServerThread(idx, ServiceConfig(), opener=FakeIndex.open, stats=_replica(redis_server.url))
    client = DatastoreClient(f"{a.address},{b.address}", timeout_s=1.0, stream=False)
    ds = DatastoreDrafter(RemoteBackend(client), documents=False, memory=False)
    stopper = stop_at_step(a, at=4)                               # replica a dies at the 4th step of the first request
    dec = SpeculativeDecoder(model, None, [ds, ContextDrafter(), stopper], profile=CostProfile.flat(5), max_budget=4)
    try:
        res = dec.generate(prompts[0], max_new_tokens=48)
        assert res.new_tokens == want[0] and stopper.n > 4    # the request went on after the death
        before = client.stats.copy()
        res = dec.generate(prompts[1], max_new_tokens=48)
        assert res.new_tokens == want[1]
        lookups = client.stats["requests"] - before["requests"]
        failed = client.stats["failures"] - before["failures"]
        assert lookups >= 5 and failed <= 2          # a retry's worth, then the live replica answers
        assert len(res.drafted_per_step) <= 16       # the corpus drafts held: the true continuation, long chains
    finally:
        ds.close()
        b.stop()
