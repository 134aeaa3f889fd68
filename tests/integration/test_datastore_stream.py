"""RetrieveStream (one decoder's lookups on one long-lived stream), on a real gRPC server at 127.0.0.1:0:
the same answers as unary Retrieve, errors that end the stream with Retrieve's status codes, draining,
reload, and the client's side (stream replacement, deadlines, late answers, fallback to unary)."""
from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import numpy as np
import pytest

from specstore.client.datastore_client import DatastoreClient
from specstore.datastore.server import ServerOptions
from specstore.datastore.servicer import DatastoreServicer, ServiceConfig
from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread, reloading_server

DOCS = [[1, 2, 3, 4, 5, 6, 7], [9, 2, 3, 4, 8, 8], [5, 5, 5, 11, 12]]
FP = "fp-test"
TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    return write_fake_index(tmp_path_factory.mktemp("sidx") / "index", DOCS, fingerprint=FP, vocab_size=100)


@pytest.fixture(scope="module")
def server(index_path):
    cfg = ServiceConfig(max_context=32, max_budget=16, auth_token=TOKEN)
    with ServerThread(index_path, cfg, ServerOptions(metrics_port=0), opener=FakeIndex.open) as s:
        yield s


class RawStream:
    """A RetrieveStream driven request by request from the test."""

    def __init__(self, stub, metadata=None):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.call = stub.RetrieveStream(iter(self.q.get, None), timeout=30, metadata=metadata)

    def ask(self, req):
        self.q.put(req)
        return next(self.call)

    def close(self):
        self.q.put(None)


def without_seq(resp) -> bytes:
    r = pb.RetrieveResponse()
    r.CopyFrom(resp)
    r.seq = 0
    return r.SerializeToString(deterministic=True)


def test_stream_messages_queued_are_bounded_by_their_wait(index_path):
    """RetrieveStream messages that carry the client's clock: one that waited past ``max_queue_wait_s`` ends
    its stream with RESOURCE_EXHAUSTED, and so does the first message of a new stream from the same client
    clock (measured against that clock's baseline); a stream that names no clock measures from its own first
    message; once the loop is free, the same clock's new stream is served. (The unary calls' side:
    test_datastore_service.py.)"""
    from specstore.datastore.call_wait import CLOCK_METADATA

    def message():
        return pb.RetrieveRequest(context=[2, 3], budget=4, sent_us=time.monotonic_ns() // 1000)

    def code_of_next(stream):
        try:
            next(stream.call)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    with ServerThread(index_path, ServiceConfig(max_queue_wait_s=0.25), opener=FakeIndex.open) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        first = RawStream(st, (CLOCK_METADATA,))
        assert first.ask(message()).tokens                       # the clock's baseline: a quick message
        srv.loop.call_soon_threadsafe(time.sleep, 0.8)           # the event loop saturated for 0.8 s
        time.sleep(0.05)
        same_clock, no_clock = RawStream(st, (CLOCK_METADATA,)), RawStream(st)
        for s in (first, same_clock, no_clock):
            s.q.put(message())
        with pytest.raises(grpc.RpcError) as ei:
            next(first.call)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waited" in ei.value.details()
        assert code_of_next(same_clock) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of_next(no_clock) == grpc.StatusCode.OK
        again = RawStream(st, (CLOCK_METADATA,))
        assert again.ask(message()).tokens                       # the loop is free again
        for s in (first, same_clock, no_clock, again):
            s.close()


def test_stream_answers_like_retrieve(server):
    with grpc.insecure_channel(server.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        sess = st.OpenSession(pb.OpenSessionRequest(prompt_text="p", top_k=2), timeout=5, metadata=AUTH)
        mem = st.OpenSession(pb.OpenSessionRequest(prompt_ids=[40, 41, 42, 43, 40, 41], memory=True,
                                                   skip_documents=True), timeout=5, metadata=AUTH)
        reqs = [
            pb.RetrieveRequest(context=[0, 2, 3], budget=16, tokenizer_fingerprint=FP),
            pb.RetrieveRequest(context=[0, 2, 3], budget=2),
            pb.RetrieveRequest(context=[50, 51, 52], budget=8),                       # a miss
            pb.RetrieveRequest(context=[2, 3], budget=16, session_id=sess.session_id),
            pb.RetrieveRequest(context=[2, 3], budget=4, hint_tokens=[4], hint_probs=[0.9]),
            pb.RetrieveRequest(context=[40, 41], budget=8, session_id=mem.session_id, context_end=6),
        ]
        s = RawStream(st)
        streamed = []
        for i, r in enumerate(reqs):
            q = pb.RetrieveRequest()
            q.CopyFrom(r)
            q.seq = 100 + i
            resp = s.ask(q)
            assert resp.seq == 100 + i
            streamed.append(resp)
        s.close()
        # the memory session has seen that tail; a unary call with the same context_end adds nothing new
        unary = [st.Retrieve(r, timeout=5) for r in reqs]
        assert [without_seq(a) for a in streamed] == [without_seq(b) for b in unary]
        assert list(streamed[0].tokens) == [4, 5, 6, 7, 8, 8] and len(streamed[2].tokens) == 0
        assert set(streamed[3].sources) == {1 | 2} and set(streamed[5].sources) == {1 | 8}


@pytest.mark.parametrize("bad, code", [
    (pb.RetrieveRequest(context=[1, 100], budget=4), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RetrieveRequest(context=[1, 2], budget=17), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RetrieveRequest(context=[1, 2], budget=4, session_id="nope"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RetrieveRequest(context=[1, 2], budget=4, tokenizer_fingerprint="other"), grpc.StatusCode.FAILED_PRECONDITION),
], ids=["id-eq-vocab", "big-budget", "session", "fingerprint"])
def test_rejected_request_ends_the_stream_with_its_code(server, bad, code):
    with grpc.insecure_channel(server.address) as ch:
        s = RawStream(pb_grpc.DatastoreStub(ch))
        assert len(s.ask(pb.RetrieveRequest(context=[2, 3], budget=4, seq=1)).tokens) > 0
        with pytest.raises(grpc.RpcError) as ei:
            s.ask(bad)
        assert ei.value.code() == code


def test_auth_reads_checked_once_per_stream(index_path):
    cfg = ServiceConfig(auth_token=TOKEN, auth_reads=True)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as srv, grpc.insecure_channel(srv.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            RawStream(st).ask(pb.RetrieveRequest(context=[2, 3], budget=4))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        s = RawStream(st, metadata=AUTH)
        assert all(len(s.ask(pb.RetrieveRequest(context=[2, 3], budget=4, seq=i)).tokens) for i in range(3))
        s.close()


def test_resource_exhausted_ends_the_stream_at_once(index_path):
    cfg = ServiceConfig(max_concurrency=1, debug_delay_s=0.5)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as srv, grpc.insecure_channel(srv.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        req = pb.RetrieveRequest(context=[2, 3], budget=4)
        slow = [st.Retrieve.future(req, timeout=5) for _ in range(1)]
        time.sleep(0.2)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as ei:
            RawStream(st).ask(req)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - t0 < 0.25, "overload must be refused at once, not queued"
        assert all(len(f.result().tokens) > 0 for f in slow)


def test_metrics_count_stream_lookups(server):
    import urllib.request

    with grpc.insecure_channel(server.address) as ch:
        s = RawStream(pb_grpc.DatastoreStub(ch))
        for i in range(3):
            s.ask(pb.RetrieveRequest(context=[2, 3], budget=4, seq=i))
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
        body = body.decode()
        assert 'datastore_requests_total{code="OK",method="RetrieveStream"}' in body
        assert "datastore_streams 1.0" in body
        s.close()



def test_in_flight_gauge_counts_calls_and_stream_messages_being_handled(index_path):
    import re
    import urllib.request

    cfg = ServiceConfig(debug_delay_s=0.5)
    with ServerThread(index_path, cfg, ServerOptions(metrics_port=0), opener=FakeIndex.open) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        def in_flight() -> float:
            url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            return float(re.search(r"^datastore_in_flight (\S+)$", body, re.M).group(1))

        st = pb_grpc.DatastoreStub(ch)
        req = pb.RetrieveRequest(context=[2, 3], budget=4, seq=3)
        s = RawStream(st)
        assert in_flight() == 0                      # an open stream waiting for its next request is not
        slow = [st.Retrieve.future(req, timeout=5) for _ in range(2)]
        s.q.put(req)
        time.sleep(0.25)
        assert in_flight() == 3                      # two unary calls and one stream message
        assert all(len(f.result().tokens) > 0 for f in slow) and next(s.call).seq == 3
        # a unary call is uncounted by its done callback, which the server's loop may run just after the
        # client has its answer: back to 0 soon, and for good (a leaked count would stay up)
        deadline = time.time() + 5
        while in_flight() != 0 and time.time() < deadline:
            time.sleep(0.02)
        assert in_flight() == 0
        s.close()

def test_drain_ends_idle_streams_without_waiting_out_the_grace(index_path):
    srv = ServerThread(index_path, ServiceConfig(), ServerOptions(shutdown_grace_s=20), opener=FakeIndex.open)
    ch = grpc.insecure_channel(srv.address)
    try:
        s = RawStream(pb_grpc.DatastoreStub(ch))
        assert len(s.ask(pb.RetrieveRequest(context=[2, 3], budget=4)).tokens) > 0
        t0 = time.perf_counter()
        srv.call(srv.server.stop(None), timeout=30)   # the configured 20 s grace
        assert time.perf_counter() - t0 < 5, "an idle stream held the shutdown"
        with pytest.raises(StopIteration):             # ended with status OK, not cancelled
            s.ask(pb.RetrieveRequest(context=[2, 3], budget=4))
        assert s.call.code() == grpc.StatusCode.OK
    finally:
        ch.close()
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_drain_lets_a_busy_stream_answer_then_ends_it(index_path):
    srv = ServerThread(index_path, ServiceConfig(debug_delay_s=0.3), ServerOptions(shutdown_grace_s=20),
                       opener=FakeIndex.open)
    ch = grpc.insecure_channel(srv.address)
    try:
        s = RawStream(pb_grpc.DatastoreStub(ch))
        s.q.put(pb.RetrieveRequest(context=[2, 3], budget=4, seq=7))
        time.sleep(0.1)                                 # the lookup is under way when the drain starts
        t0 = time.perf_counter()
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(None), srv.loop)
        answer = next(s.call)
        assert answer.seq == 7 and len(answer.tokens) > 0
        with pytest.raises(StopIteration):             # then the stream ends with status OK
            next(s.call)
        assert s.call.code() == grpc.StatusCode.OK
        stopping.result(30)
        assert time.perf_counter() - t0 < 5
    finally:
        ch.close()
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_reload_under_a_stream(tmp_path):
    """Swap the snapshot while one stream keeps asking: no lookup fails, answers move to the new index."""
    server, publish_b = reloading_server(tmp_path, DOCS, FP)
    with server as srv, grpc.insecure_channel(srv.address) as ch:
        s = RawStream(pb_grpc.DatastoreStub(ch))
        assert s.ask(pb.RetrieveRequest(context=[2, 3], budget=8, seq=1)).index_id == "snap-a"
        seen, i = [], 1
        publish_b()
        deadline = time.time() + 10
        while time.time() < deadline and (not seen or seen[-1] != "snap-b"):
            i += 1
            r = s.ask(pb.RetrieveRequest(context=[2, 3], budget=8, seq=i))
            assert r.seq == i and len(r.tokens) > 0
            seen.append(r.index_id)
            time.sleep(0.01)
        assert seen[-1] == "snap-b" and 42 in list(r.tokens)
        s.close()


# ---------------------------------------------------------------------------------------------- the client
def test_client_replaces_a_stream_the_server_ended(server):
    with DatastoreClient(server.address, timeout_s=2) as c:
        good = c.retrieve([0, 2, 3], 8)
        assert good.num_drafts == 6 and c.stats["streams_opened"] == 1
        assert c.retrieve([2, 300], 4).num_drafts == 0          # rejected: INVALID_ARGUMENT ends the stream
        assert c.stats["failure_INVALID_ARGUMENT"] == 1
        again = c.retrieve([0, 2, 3], 8)
        assert c.stats["streams_opened"] == 2
        assert np.array_equal(again.tokens, good.tokens) and np.array_equal(again.parents, good.parents)


def test_late_answers_are_dropped(index_path):
    """A lookup that times out must not hand its late answer to the next lookup on the stream."""
    with ServerThread(index_path, ServiceConfig(debug_delay_s=0.2), opener=FakeIndex.open) as srv:
        with DatastoreClient(srv.address, timeout_s=5, stream=False) as ref:
            want = ref.retrieve([5, 5, 5], 8)
            assert want.num_drafts > 0 and not np.array_equal(want.tokens, ref.retrieve([0, 2, 3], 8).tokens)
        c = DatastoreClient(srv.address, timeout_s=0.05)
        assert c.retrieve([0, 2, 3], 8).num_drafts == 0
        assert c.stats["failure_DEADLINE_EXCEEDED"] == 1
        c.timeout_s = 5.0
        got = c.retrieve([5, 5, 5], 8)   # queued behind the late one on the same stream
        assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.parents, want.parents)
        assert c.stats["streams_opened"] == 1
        c.close()


def test_cancelled_prefetch_does_not_leak_into_the_next_lookup(server):
    with DatastoreClient(server.address, timeout_s=2) as c:
        p = c.retrieve_async([0, 2, 3], 8)
        p.cancel()
        t = c.retrieve([5, 5, 5], 8)
        assert t.root == 5 and 4 not in t.tokens.tolist()
        assert c.retrieve_async([0, 2, 3], 8).result().num_drafts == 6


def _old_server(index_path):
    """A server of an earlier version: the Datastore service without RetrieveStream."""
    servicer = DatastoreServicer(FakeIndex.open(index_path), ServiceConfig())
    handlers = {"Retrieve": grpc.unary_unary_rpc_method_handler(
        servicer.Retrieve, request_deserializer=pb.RetrieveRequest.FromString,
        response_serializer=pb.RetrieveResponse.SerializeToString)}
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start():
        s = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("specstore.datastore.v1.Datastore",
                                                                         handlers),))
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        return s, port

    s, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    return loop, s, port


def test_client_falls_back_to_unary_without_retrieve_stream(index_path):
    loop, s, port = _old_server(index_path)
    try:
        with DatastoreClient(f"127.0.0.1:{port}", timeout_s=2) as c:
            # The refusal reaches the first lookup, or ends the stream before that lookup is sent (the
            # lookup then goes unary at once): either way the client turns to unary Retrieve for good.
            first = c.retrieve([0, 2, 3], 8).num_drafts
            second = c.retrieve([0, 2, 3], 8).num_drafts
            assert c.stats["stream_unsupported"] == 1 and not c.stream
            assert first in (0, 6) and second == 6 and c.stats["streams_opened"] <= 2
            assert c.retrieve_async([0, 2, 3], 8).result().num_drafts == 6
    finally:
        asyncio.run_coroutine_threadsafe(s.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_client_paths_give_the_same_trees(server, stream):
    with DatastoreClient(server.address, timeout_s=2, stream=stream) as c, \
            DatastoreClient(server.address, timeout_s=2, stream=not stream) as other:
        for ctx in ([0, 2, 3], [9, 2, 3, 4], [5, 5], [50, 51]):
            a, b = c.retrieve(ctx, 8), other.retrieve_async(ctx, 8).result()
            for f in ("tokens", "parents", "probs", "sources"):
                assert np.array_equal(getattr(a, f), getattr(b, f)), (ctx, f)
        assert c.stats["failures"] == 0 and other.stats["failures"] == 0
        assert (c.stats["streams_opened"] > 0) == stream


def test_threads_sharing_one_client_get_their_own_answers(server):
    """Several threads' lookups interleave on the one stream; each answer reaches the lookup it belongs to."""
    contexts = [[0, 2, 3], [9, 2, 3, 4], [5, 5], [5, 5, 5], [1, 2], [50, 51]]
    with DatastoreClient(server.address, timeout_s=5, stream=False) as ref:
        want = [ref.retrieve(c, 8) for c in contexts]
    assert len({tuple(t.tokens) for t in want}) > 3   # the answers differ, so a mix-up would show
    errors: list = []
    with DatastoreClient(server.address, timeout_s=5) as c:
        def worker(k: int):
            for i in range(60):
                j = (k + i) % len(contexts)
                got = c.retrieve_async(contexts[j], 8).result() if i % 2 else c.retrieve(contexts[j], 8)
                if not (np.array_equal(got.tokens, want[j].tokens) and np.array_equal(got.parents, want[j].parents)):
                    errors.append((k, i, contexts[j]))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert c.stats["failures"] == 0 and c.stats["streams_opened"] == 1
