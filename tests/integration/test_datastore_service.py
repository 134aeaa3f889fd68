"""Every RPC and every error code of the datastore service, on a real gRPC server at 127.0.0.1:0."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specstore.datastore.server import SERVICE_NAME, ServerOptions
from specstore.datastore.servicer import ServiceConfig
from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread, reloading_server

DOCS = [[1, 2, 3, 4, 5, 6, 7], [9, 2, 3, 4, 8, 8], [5, 5, 5, 11, 12]]
FP = "fp-test"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    return write_fake_index(tmp_path_factory.mktemp("idx") / "index", DOCS, fingerprint=FP, vocab_size=100)


@pytest.fixture(scope="module")
def server(index_path):
    cfg = ServiceConfig(max_context=32, max_budget=16, max_batch=4, auth_token=TOKEN)
    with ServerThread(index_path, cfg, ServerOptions(metrics_port=0, reflection=True), opener=FakeIndex.open) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address)
    yield pb_grpc.DatastoreStub(ch)
    ch.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def code_of(fn, *a, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a, timeout=5, **kw)
    return ei.value.code()


def test_info(stub):
    r = stub.Info(pb.InfoRequest(), timeout=5)
    assert r.index_id == "fake-1" and r.tokenizer_fingerprint == FP and r.vocab_size == 100
    assert r.num_documents == 3 and r.max_context == 32 and r.max_budget == 16 and r.max_batch == 4
    assert json.loads(r.manifest_json)["index_id"] == "fake-1"


def test_retrieve_tree(stub):
    r = stub.Retrieve(pb.RetrieveRequest(context=[0, 2, 3], budget=16, tokenizer_fingerprint=FP), timeout=5)
    assert list(r.tokens) == [4, 5, 6, 7, 8, 8]
    assert list(r.parents) == [-1, 0, 1, 2, 0, 4]
    assert np.allclose(r.probs, [1, 0.5, 1, 1, 0.5, 1])
    assert r.sources == bytes([1] * 6) and r.index_id == "fake-1" and r.match_len == 2
    # the budget cuts by path probability
    r = stub.Retrieve(pb.RetrieveRequest(context=[0, 2, 3], budget=2), timeout=5)
    assert list(r.tokens) == [4, 5] or list(r.tokens) == [4, 8]
    assert len(r.tokens) == 2 and list(r.parents) == [-1, 0]


def test_retrieve_miss_is_empty(stub):
    r = stub.Retrieve(pb.RetrieveRequest(context=[50, 51, 52], budget=8), timeout=5)
    assert len(r.tokens) == 0 and r.index_id == "fake-1"


def test_sessions_mark_documents(stub):
    s = stub.OpenSession(pb.OpenSessionRequest(prompt_text="a prompt", top_k=2), timeout=5, metadata=AUTH)
    assert s.session_id and list(s.document_ids) == [0, 1] and s.ttl_s > 0
    r = stub.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=16, session_id=s.session_id), timeout=5)
    assert set(r.sources) == {1 | 2}
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), timeout=5, metadata=AUTH).closed
    assert not stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), timeout=5, metadata=AUTH).closed
    # a closed session is unknown
    assert code_of(stub.Retrieve, pb.RetrieveRequest(context=[2, 3], budget=4, session_id=s.session_id)) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_memory_sessions(stub):
    """A memory-only session remembers prompt_ids plus each Retrieve's tail and drafts from them."""
    s = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[40, 41, 42, 43, 40, 41], memory=True,
                                               skip_documents=True), timeout=5, metadata=AUTH)
    assert s.memory and len(s.document_ids) == 0
    r = stub.Retrieve(pb.RetrieveRequest(context=[40, 41], budget=8, session_id=s.session_id, context_end=6),
                      timeout=5)
    assert list(r.tokens) == [42, 43, 40, 41] and set(r.sources) == {1 | 8}
    # this tail extends the history by 44, 40, 41: now 41 was followed by 42 once and by 44 once
    r = stub.Retrieve(pb.RetrieveRequest(context=[40, 41, 44, 40, 41], budget=8, session_id=s.session_id,
                                         context_end=9), timeout=5)
    first = {t: p for t, p, par in zip(r.tokens, r.probs, r.parents) if par == -1}
    assert first.keys() == {42, 44} and np.allclose(list(first.values()), 0.5)
    assert code_of(stub.Retrieve, pb.RetrieveRequest(context=[40, 41], budget=4, session_id=s.session_id,
                                                     context_end=1)) == grpc.StatusCode.INVALID_ARGUMENT
    stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), timeout=5, metadata=AUTH)
    # a session with neither documents nor memory is refused
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(prompt_ids=[1], skip_documents=True), metadata=AUTH) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(prompt_ids=[1, 500], memory=True, skip_documents=True),
                   metadata=AUTH) == grpc.StatusCode.INVALID_ARGUMENT


def test_retrieve_batch(stub):
    reqs = [pb.RetrieveRequest(context=c, budget=4) for c in ([2, 3], [50, 51], [5, 5])]
    r = stub.RetrieveBatch(pb.RetrieveBatchRequest(requests=reqs), timeout=5)
    assert len(r.responses) == 3 and len(r.responses[0].tokens) > 0 and len(r.responses[1].tokens) == 0
    too_many = pb.RetrieveBatchRequest(requests=reqs + reqs)
    assert code_of(stub.RetrieveBatch, too_many) == grpc.StatusCode.INVALID_ARGUMENT
    bad = pb.RetrieveBatchRequest(requests=[reqs[0], pb.RetrieveRequest(context=[2, 300], budget=4)])
    with pytest.raises(grpc.RpcError) as ei:
        stub.RetrieveBatch(bad, timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests[1]" in ei.value.details()


@pytest.mark.parametrize("req", [
    pb.RetrieveRequest(context=[1, 100], budget=4),              # id == vocab size
    pb.RetrieveRequest(context=[-1, 2], budget=4),               # negative id
    pb.RetrieveRequest(context=[], budget=4),                    # nothing to root the tree at
    pb.RetrieveRequest(context=list(range(33)), budget=4),       # oversize context
    pb.RetrieveRequest(context=[1, 2], budget=0),                # no budget
    pb.RetrieveRequest(context=[1, 2], budget=17),               # oversize budget
    pb.RetrieveRequest(context=[1, 2], budget=4, session_id="nope"),
    pb.RetrieveRequest(context=[1, 2], budget=4, hint_tokens=[3], hint_probs=[0.5, 0.5]),
    pb.RetrieveRequest(context=[1, 2], budget=4, hint_tokens=[300], hint_probs=[0.5]),
    pb.RetrieveRequest(context=[1, 2], budget=4, options=pb.RetrieveOptions(min_prob=2.0)),
], ids=["id-eq-vocab", "negative", "empty", "big-context", "zero-budget", "big-budget", "session", "hint-len",
        "hint-id", "min-prob"])
def test_invalid_argument(stub, req):
    assert code_of(stub.Retrieve, req) == grpc.StatusCode.INVALID_ARGUMENT


def test_hint_accepted(stub):
    r = stub.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=4, hint_tokens=[4], hint_probs=[0.9]), timeout=5)
    assert len(r.tokens) > 0


def test_failed_precondition_on_tokenizer_mismatch(stub):
    assert code_of(stub.Retrieve, pb.RetrieveRequest(context=[1, 2], budget=4, tokenizer_fingerprint="other")) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(prompt_text="x", tokenizer_fingerprint="other"),
                   metadata=AUTH) == grpc.StatusCode.FAILED_PRECONDITION


def test_unauthenticated_writes(stub):
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(prompt_text="x")) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(prompt_text="x"),
                   metadata=(("authorization", "Bearer wrong"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.CloseSession, pb.CloseSessionRequest(session_id="x")) == grpc.StatusCode.UNAUTHENTICATED
    # reads stay open without --auth-reads
    stub.Info(pb.InfoRequest(), timeout=5)


def test_open_session_needs_a_query(stub):
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(), metadata=AUTH) == grpc.StatusCode.INVALID_ARGUMENT
    # ids without a server-side tokenizer: ask for text
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(prompt_ids=[1, 2]), metadata=AUTH) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_auth_reads(index_path):
    cfg = ServiceConfig(auth_token=TOKEN, auth_reads=True)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as s, grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        assert code_of(st.Info, pb.InfoRequest()) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(st.Retrieve, pb.RetrieveRequest(context=[2, 3], budget=4)) == grpc.StatusCode.UNAUTHENTICATED
        assert st.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=4), timeout=5, metadata=AUTH).tokens


def test_resource_exhausted_is_fast(index_path):
    cfg = ServiceConfig(max_concurrency=2, debug_delay_s=0.5)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as s, grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        req = pb.RetrieveRequest(context=[2, 3], budget=4)
        slow = [st.Retrieve.future(req, timeout=5) for _ in range(2)]
        time.sleep(0.2)
        t0 = time.perf_counter()
        assert code_of(st.Retrieve, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - t0 < 0.25, "overload must be refused at once, not queued"
        assert all(len(f.result().tokens) > 0 for f in slow)


def test_calls_queued_in_grpc_are_bounded_by_their_wait(index_path):
    """While the server's event loop is busy, calls wait in gRPC's queue where no in-flight count sees them.
    A call whose client stated its timeout and that waited longer than ``max_queue_wait_s`` is refused with
    RESOURCE_EXHAUSTED; one whose deadline passed meanwhile is not looked up (gRPC cancels it, or the
    wrapper drops it); a call without the stated timeout is served as before, and so is every call once the
    loop is free again."""
    from specstore.datastore.call_wait import timeout_metadata

    cfg = ServiceConfig(max_queue_wait_s=0.25)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as s, grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        req = pb.RetrieveRequest(context=[2, 3], budget=4)
        assert st.Retrieve(req, timeout=5, metadata=(timeout_metadata(5),)).tokens   # connected, loop free
        served = s.server.servicer.metrics.ok_by_method["Retrieve"]
        before = served._value.get()

        s.loop.call_soon_threadsafe(time.sleep, 0.8)   # the event loop saturated for 0.8 s
        time.sleep(0.05)
        stated = st.Retrieve.future(req, timeout=5, metadata=(timeout_metadata(5),))
        unstated = st.Retrieve.future(req, timeout=5)
        expiring = st.Retrieve.future(req, timeout=0.3, metadata=(timeout_metadata(0.3),))
        with pytest.raises(grpc.RpcError) as ei:
            stated.result()
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waited" in ei.value.details()
        assert unstated.result().tokens
        with pytest.raises(grpc.RpcError) as ei:
            expiring.result()
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.2)
        assert served._value.get() == before + 1   # the unstated call only

        assert st.Retrieve(req, timeout=5, metadata=(timeout_metadata(5),)).tokens   # the loop is free again


def test_a_loop_that_fell_behind_runs_wide_lookups_in_the_pool(index_path, monkeypatch):
    """Refusing a queued call takes a loop turn too, so while calls are seen waiting long, lookups wider than a
    default one leave the loop (else refusals queue behind them): for ``BEHIND_FOR_S`` after a long wait a
    4,096-cell lookup runs in the lookup pool, a default 512-cell one still on the loop; before and after, both
    inline."""
    from specstore.datastore import servicer as servicer_module
    from specstore.datastore.call_wait import timeout_metadata

    monkeypatch.setattr(servicer_module, "BEHIND_FOR_S", 3.0)   # room for two calls on a loaded machine
    cfg = ServiceConfig(max_queue_wait_s=0.25, inline_cells=1 << 20)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as s, grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        index = s.server.servicer.index
        threads = []
        real = index.retrieve

        def retrieve(*a, **kw):
            threads.append(threading.current_thread() is s.thread)
            return real(*a, **kw)

        index.retrieve = retrieve
        wide = pb.RetrieveRequest(context=[2, 3], budget=4, options=pb.RetrieveOptions(max_matches=512, depth=8))
        narrow = pb.RetrieveRequest(context=[2, 3], budget=4)
        md = (timeout_metadata(5),)
        behind = s.server.servicer.metrics.loop_behind

        def on_loop():
            threads.clear()
            assert st.Retrieve(wide, timeout=5, metadata=md).tokens and st.Retrieve(narrow, timeout=5, metadata=md).tokens
            return list(threads)

        assert on_loop() == [True, True]
        assert behind._value.get() == 0
        blocked = threading.Event()
        s.loop.call_soon_threadsafe(blocked.wait, 5)   # the event loop held until the call has waited
        queued = st.Retrieve.future(narrow, timeout=5, metadata=md)
        time.sleep(0.15)                                # over a quarter of the bound
        blocked.set()
        try:
            queued.result()                             # served, or refused if the machine stalled past the bound
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert behind._value.get() >= 1
        assert on_loop() == [False, True]
        time.sleep(servicer_module.BEHIND_FOR_S + 0.1)
        assert on_loop() == [True, True]


def test_health_and_reflection_and_metrics(server, index_path):
    with grpc.insecure_channel(server.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        rs = reflection_pb2_grpc.ServerReflectionStub(ch)
        out = list(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
        names = {s.name for s in out[0].list_services_response.service}
        assert SERVICE_NAME in names
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'datastore_request_seconds_bucket{le="0.0005",method="Retrieve"}' in body
    assert 'datastore_lookups_total{outcome="hit"}' in body
    assert 'datastore_nodes_total{source="documents"}' in body
    assert "datastore_tree_nodes_bucket" in body and 'index_id="fake-1"' in body
    assert 'datastore_requests_total{code="INVALID_ARGUMENT",method="Retrieve"}' in body


def test_health_transitions(index_path):
    """NOT_SERVING before the index is loaded, SERVING after, NOT_SERVING while draining."""
    gate = threading.Event()

    def slow_open(p):
        gate.wait(10)
        return FakeIndex.open(p)

    s = ServerThread(index_path, opener=slow_open, load=False)
    ch = grpc.insecure_channel(s.address)
    h = health_pb2_grpc.HealthStub(ch)
    st = pb_grpc.DatastoreStub(ch)
    try:
        def status():
            return h.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert code_of(st.Retrieve, pb.RetrieveRequest(context=[2, 3], budget=4)) == grpc.StatusCode.UNAVAILABLE
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(s.server.load(), s.loop)
        gate.set()
        fut.result(10)
        assert status() == health_pb2.HealthCheckResponse.SERVING
        s.server.options.drain_delay_s = 0.6
        stopping = asyncio.run_coroutine_threadsafe(s.server.stop(1.0), s.loop)
        time.sleep(0.3)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.result(10)
    finally:
        ch.close()
        s.loop.call_soon_threadsafe(s.loop.stop)


def test_reload_under_load(tmp_path):
    """Swap the snapshot behind a symlink while clients hammer Retrieve: no request fails."""
    server, publish_b = reloading_server(tmp_path, DOCS, FP)
    with server as s, grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        seen, errors, stop = set(), [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    r = st.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=8), timeout=5)
                    seen.add(r.index_id)
                    assert len(r.tokens) > 0
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        publish_b()
        deadline = time.time() + 10
        while "snap-b" not in seen and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.8)  # past retire_after_s: the old index is closed by now
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert seen == {"snap-a", "snap-b"}
        assert st.Info(pb.InfoRequest(), timeout=5).index_id == "snap-b"
        r = st.Retrieve(pb.RetrieveRequest(context=[2, 3], budget=8), timeout=5)
        assert 42 in list(r.tokens)


def test_broken_snapshot_keeps_serving(tmp_path):
    a = write_fake_index(tmp_path / "snap-a", DOCS, index_id="snap-a", fingerprint=FP)
    with ServerThread(a, ServiceConfig(), ServerOptions(), opener=FakeIndex.open) as s, \
            grpc.insecure_channel(s.address) as ch:
        (a / "manifest.json").write_text("{broken")
        assert s.call(s.server.reload(force=True)) is False
        st = pb_grpc.DatastoreStub(ch)
        assert st.Info(pb.InfoRequest(), timeout=5).index_id == "snap-a"
