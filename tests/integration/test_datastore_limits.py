"""Issue 10's defects of the datastore service, each on a real server at 127.0.0.1: work per request is
bounded and heavy lookups don't stall other callers; --max-concurrency refuses; undecodable bytes get
INVALID_ARGUMENT (UNAUTHENTICATED first) and one log line; long ids are not echoed; unauthenticated Info
does not show the build's input paths."""
from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest

from specstore.datastore.servicer import ServiceConfig
from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServeProcess, ServerThread

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
FREQUENT = 7          # every other token of the corpus below
# a cheap lookup that drafts (FREQUENT, 500, FREQUENT occurs ~100 times, each followed by a random token)
SMALL = pb.RetrieveRequest(context=[FREQUENT, 500, FREQUENT], budget=8, options=pb.RetrieveOptions(min_prob=1e-3))


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    """A token-only index (index-build's own code) of 200k tokens over a 1000-token vocabulary in which
    every other token is FREQUENT, followed by a random one: lookups of FREQUENT have ~100k occurrences
    and wide tries (the most expensive shape for the trie kernel)."""
    from specstore.indexers.build import BuildOptions, build_index

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(20):
        d = rng.integers(10, 1000, 10_000)
        d[::2] = FREQUENT
        docs.append(d)
    out = tmp_path_factory.mktemp("limits") / "index"
    build_index(None, out, BuildOptions(progress=False), token_docs=docs, vocab_size=1000, log=lambda *_: None)
    return out


def _channel(address):
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def code_of(fn, *a, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a, timeout=10, **kw)
    return ei.value.code()


def heavy_batch(max_matches=1024, depth=64) -> pb.RetrieveBatchRequest:
    o = pb.RetrieveOptions(max_span=1024, min_span=1, max_matches=max_matches, depth=depth, min_prob=1e-30)
    return pb.RetrieveBatchRequest(requests=[pb.RetrieveRequest(context=[FREQUENT], budget=32, options=o)] * 64)


# ----------------------------------------------------------------------------------------- bounded work
def test_costly_options_and_hints_are_refused(real_index, tmp_path):
    with ServeProcess(real_index, log_path=tmp_path / "log") as s, _channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        # the request: 1024 x 1024 continuation cells per lookup
        t0 = time.perf_counter()
        assert code_of(st.RetrieveBatch, heavy_batch(1024, 1024)) == grpc.StatusCode.INVALID_ARGUMENT
        assert time.perf_counter() - t0 < 1.0
        with pytest.raises(grpc.RpcError) as ei:
            st.Retrieve(heavy_batch(1024, 1024).requests[0], timeout=10)
        assert "max_matches" in ei.value.details() and "65536" in ei.value.details()
        for name, v in (("max_span", 1025), ("min_span", 1025), ("max_matches", 1025), ("depth", 1025)):
            req = pb.RetrieveRequest(context=[1, 2], budget=4, options=pb.RetrieveOptions(**{name: v}))
            assert code_of(st.Retrieve, req) == grpc.StatusCode.INVALID_ARGUMENT, name
        n = 1025
        big_hint = pb.RetrieveRequest(context=[FREQUENT], budget=4, hint_tokens=[10 + i % 990 for i in range(n)],
                                      hint_probs=[1.0 / n] * n)
        assert code_of(st.Retrieve, big_hint) == grpc.StatusCode.INVALID_ARGUMENT
        ok_hint = pb.RetrieveRequest(context=[FREQUENT], budget=4, hint_tokens=[10 + i % 990 for i in range(1024)],
                                     hint_probs=[1 / 1024] * 1024)
        st.Retrieve(ok_hint, timeout=10)
        # the largest accepted cost answers
        r = st.RetrieveBatch(heavy_batch(1024, 64), timeout=60)
        assert len(r.responses) == 64 and all(len(x.tokens) == 32 for x in r.responses)


def test_heavy_lookups_do_not_stall_other_callers(real_index, tmp_path):
    """Two callers send the costliest legal RetrieveBatch (64 x 1024 matches x depth 64) back to back while
    a third times small lookups on its own connection: those stay fast (before the fix each heavy batch
    ran on the event loop and the small lookups waited for it)."""
    with ServeProcess(real_index, log_path=tmp_path / "log") as s:
        small = SMALL
        stop = threading.Event()
        heavy_s, errors = [], []

        def heavy():
            with _channel(s.address) as ch:
                st = pb_grpc.DatastoreStub(ch)
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        st.RetrieveBatch(heavy_batch(), timeout=60)
                        heavy_s.append(time.perf_counter() - t0)
                    except grpc.RpcError as e:
                        errors.append(e.code())

        with _channel(s.address) as ch:
            st = pb_grpc.DatastoreStub(ch)
            st.Retrieve(small, timeout=10)
            threads = [threading.Thread(target=heavy) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            lat = []
            end = time.time() + 4
            while time.time() < end:
                t0 = time.perf_counter()
                st.Retrieve(small, timeout=30)
                lat.append(time.perf_counter() - t0)
                time.sleep(0.005)
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors and len(heavy_s) >= 2
        worst = max(lat)
        # the heavy batch takes a few hundred ms of CPU; a small lookup waits for none of it
        assert worst < min(0.15, np.median(heavy_s) / 2), (worst, np.median(heavy_s), len(lat))


# ----------------------------------------------------------------------------------------- overload
def test_max_concurrency_refuses_at_once(real_index, tmp_path):
    """--max-concurrency 1 and 32 concurrent callers: some calls are refused with RESOURCE_EXHAUSTED
    (before the fix: none, every call queued inside gRPC) and every answered one is right."""
    from specstore.datastore.index import DatastoreIndex

    req = SMALL
    with DatastoreIndex.open(real_index) as ix:
        want = ix.retrieve(np.array(req.context), req.budget, min_prob=req.options.min_prob)
    assert len(want) == req.budget
    with ServeProcess(real_index, "--max-concurrency", "1", log_path=tmp_path / "log") as s:
        codes: dict = {}
        wrong = []
        lock = threading.Lock()
        start = threading.Barrier(32)

        def caller():
            with _channel(s.address) as ch:
                st = pb_grpc.DatastoreStub(ch)
                start.wait()
                end = time.time() + 2
                while time.time() < end:
                    try:
                        r = st.Retrieve(req, timeout=10)
                        code = "OK"
                        if list(r.tokens) != want.tokens.tolist() or list(r.parents) != want.parents.tolist():
                            wrong.append(r)
                    except grpc.RpcError as e:
                        code = e.code().name
                    with lock:
                        codes[code] = codes.get(code, 0) + 1

        threads = [threading.Thread(target=caller) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not wrong
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= 50 and codes["RESOURCE_EXHAUSTED"] >= 10, codes


# ----------------------------------------------------------------------------------------- bad bytes
METHODS = {"Info": False, "Retrieve": False, "RetrieveBatch": False, "OpenSession": True, "CloseSession": True}
GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")


def _raw_unary(ch, method):
    return ch.unary_unary(f"/specstore.datastore.v1.Datastore/{method}")   # bytes in, bytes out


def test_undecodable_bytes_get_invalid_argument_and_one_log_line(real_index, tmp_path):
    with ServeProcess(real_index, "--auth-token", TOKEN, log_path=tmp_path / "log") as s, \
            _channel(s.address) as ch:
        for method, write in METHODS.items():
            for g in GARBAGE:
                want = grpc.StatusCode.UNAUTHENTICATED if write else grpc.StatusCode.INVALID_ARGUMENT
                assert code_of(_raw_unary(ch, method), g) == want, (method, g)
                assert code_of(_raw_unary(ch, method), g, metadata=AUTH) == grpc.StatusCode.INVALID_ARGUMENT
        stream = ch.stream_stream("/specstore.datastore.v1.Datastore/RetrieveStream")
        with pytest.raises(grpc.RpcError) as ei:
            list(stream(iter([GARBAGE[0]]), timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(200):
            code_of(_raw_unary(ch, "Retrieve"), GARBAGE[0])
        # the server still answers properly
        st = pb_grpc.DatastoreStub(ch)
        assert st.Retrieve(SMALL, timeout=10).tokens
        log = s.log()
    assert "Traceback" not in log and "Unexpected" not in log
    lines = [ln for ln in log.splitlines() if "undecodable" in ln]
    assert len(lines) == 1, lines
    assert len(log) < 4000, log[-2000:]


def test_auth_reads_refuses_garbage_before_decoding(real_index, tmp_path):
    with ServeProcess(real_index, "--auth-token", TOKEN, "--auth-reads", log_path=tmp_path / "log") as s, \
            _channel(s.address) as ch:
        for _ in range(100):
            for method in METHODS:
                assert code_of(_raw_unary(ch, method), GARBAGE[0]) == grpc.StatusCode.UNAUTHENTICATED, method
        stream = ch.stream_stream("/specstore.datastore.v1.Datastore/RetrieveStream")
        with pytest.raises(grpc.RpcError) as ei:
            list(stream(iter([GARBAGE[0]]), timeout=10))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(_raw_unary(ch, "Retrieve"), GARBAGE[0], metadata=AUTH) == grpc.StatusCode.INVALID_ARGUMENT
        log = s.log()
    assert "Traceback" not in log and len(log) < 4000, log[-2000:]


# ----------------------------------------------------------------------------------------- long ids
@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    path = write_fake_index(tmp_path_factory.mktemp("idx") / "index", [[1, 2, 3, 4, 5]], fingerprint="fp",
                            vocab_size=100)
    m = json.loads((path / "manifest.json").read_text())
    m["stats"] = {"num_tokens": 5, "inputs": ["/home/alice/private-corpus"], "previous_inputs": ["/srv/x/old"],
                  "read": {"files": 1, "skipped_files": ["/home/alice/private-corpus/a.bin"],
                           "bad_examples": ["/home/alice/private-corpus/b.jsonl:3: bad JSON"]}}
    m["tokenizer"] = {"fingerprint": "fp", "name_or_path": "/home/alice/models/tok", "spec": "/home/alice/models"}
    m["faiss"] = {"factory": "Flat", "embedder": {"id": "e1", "path": "/home/alice/emb"}}
    (path / "manifest.json").write_text(json.dumps(m))
    with ServerThread(path, ServiceConfig(auth_token=TOKEN), opener=FakeIndex.open) as s:
        yield s


def test_long_ids_are_refused_not_echoed(fake_server):
    with grpc.insecure_channel(fake_server.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        cases = [
            (st.Retrieve, pb.RetrieveRequest(context=[1, 2], budget=4, session_id="s" * 100_000), (),
             grpc.StatusCode.INVALID_ARGUMENT),
            (st.Retrieve, pb.RetrieveRequest(context=[1, 2], budget=4, tokenizer_fingerprint="f" * 20_000), (),
             grpc.StatusCode.FAILED_PRECONDITION),
            (st.RetrieveBatch, pb.RetrieveBatchRequest(requests=[pb.RetrieveRequest(
                context=[1, 2], budget=4, session_id="s" * 100_000)]), (), grpc.StatusCode.INVALID_ARGUMENT),
            (st.OpenSession, pb.OpenSessionRequest(prompt_text="x", tokenizer_fingerprint="f" * 20_000), AUTH,
             grpc.StatusCode.FAILED_PRECONDITION),
            (st.CloseSession, pb.CloseSessionRequest(session_id="s" * 100_000), AUTH,
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for fn, req, md, want in cases:
            with pytest.raises(grpc.RpcError) as ei:
                fn(req, timeout=10, metadata=md)
            assert ei.value.code() == want, (req.DESCRIPTOR.name, ei.value.code(), ei.value.details()[:200])
            assert len(ei.value.details()) < 400


# ----------------------------------------------------------------------------------------- what reads see
def test_unauthenticated_info_hides_paths(fake_server):
    with grpc.insecure_channel(fake_server.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        public = st.Info(pb.InfoRequest(), timeout=10)
        assert "/home/alice" not in public.manifest_json and "/srv/x" not in public.manifest_json
        m = json.loads(public.manifest_json)
        assert m["index_id"] == "fake-1" and m["stats"]["num_tokens"] == 5 and m["stats"]["read"]["files"] == 1
        assert m["tokenizer"]["fingerprint"] == "fp" and m["faiss"]["embedder"]["id"] == "e1"
        wrong = st.Info(pb.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer nope"),))
        assert "/home/alice" not in wrong.manifest_json
        full = st.Info(pb.InfoRequest(), timeout=10, metadata=AUTH)
        assert json.loads(full.manifest_json)["stats"]["inputs"] == ["/home/alice/private-corpus"]
        assert public.index_id == full.index_id and public.vocab_size == full.vocab_size


def test_in_flight_count_returns_to_zero(fake_server):
    """Every way a call can end (answer, error, undecodable bytes, client deadline, a stream) uncounts it."""
    sv = fake_server.server.servicer
    with grpc.insecure_channel(fake_server.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        for _ in range(20):
            st.Retrieve(pb.RetrieveRequest(context=[1, 2], budget=4), timeout=10)
            code_of(st.Retrieve, pb.RetrieveRequest(context=[], budget=4))
            code_of(_raw_unary(ch, "Retrieve"), GARBAGE[0])
            st.Info(pb.InfoRequest(), timeout=10)
        try:
            st.RetrieveBatch(heavy_batch(64, 64), timeout=0.0001)    # may end before or after the answer
        except grpc.RpcError:
            pass
        out = list(st.RetrieveStream(iter([pb.RetrieveRequest(context=[1, 2], budget=4, seq=i) for i in range(5)]),
                                     timeout=10))
        assert [r.seq for r in out] == list(range(5))
    deadline = time.time() + 5
    while sv._in_flight and time.time() < deadline:
        time.sleep(0.01)
    assert sv._in_flight == 0
