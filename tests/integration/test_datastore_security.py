"""Issue 10, promise 6 (security), on real servers at 127.0.0.1: every malformed bearer value is
UNAUTHENTICATED on every write RPC (every RPC with --auth-reads); session ids that are not exactly a
session's find nothing and change nothing; one client's open sessions are capped; neither the token nor a
prompt's tokens or text nor a session id reach the logs, server or client; the health service answers
undecodable bytes with INVALID_ARGUMENT and one log line.

The checks that need no server are tests/unit/test_datastore_security.py; mutual TLS is
tests/integration/test_datastore_tls.py."""
from __future__ import annotations

import base64
import json
import logging
import re

import grpc
import numpy as np
import pytest

from specstore.datastore.servicer import READ_METHODS, WRITE_METHODS, ServiceConfig
from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServeProcess, ServerThread

TOKEN = "tok-Zq8v-4471"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICE = pb.DESCRIPTOR.services_by_name["Datastore"]

# authorization values that are not exactly "Bearer <TOKEN>" (None: no authorization entry at all)
BAD_BEARERS = [
    None, (), (("authorization", ""),), (("authorization", "Bearer"),), (("authorization", "Bearer "),),
    (("authorization", TOKEN),), (("authorization", f"bearer {TOKEN}"),), (("authorization", f"BEARER {TOKEN}"),),
    (("authorization", f"Bearer  {TOKEN}"),), (("authorization", f"Bearer {TOKEN} "),),
    (("authorization", f" Bearer {TOKEN}"),), (("authorization", f"Bearer {TOKEN[:-1]}"),),
    (("authorization", f"Bearer {TOKEN}x"),), (("authorization", f"Bearer {TOKEN.upper()}"),),
    (("authorization", f"Bearer {TOKEN * 100}"),),
    (("authorization", "Basic " + base64.b64encode(f"u:{TOKEN}".encode()).decode()),),
    (("authorization", f"Token {TOKEN}"),), (("authorization", f"Bearer,{TOKEN}"),),
    (("authorization-bin", f"Bearer {TOKEN}".encode()),), (("x-auth-token", TOKEN),), (("bearer", TOKEN),),
    (("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")),   # the first entry counts
]


def _call(ch: grpc.Channel, method, metadata) -> grpc.StatusCode:
    """The status of ``method`` (a Datastore method descriptor) called with an empty request (valid bytes of
    every message: the auth check comes first, the handler then refuses what is missing)."""
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.client_streaming:
            list(ch.stream_stream(path)(iter([b""]), timeout=10, metadata=metadata))
        else:
            ch.unary_unary(path)(b"", timeout=10, metadata=metadata)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    return write_fake_index(tmp_path_factory.mktemp("sec") / "index", [[1, 2, 3, 4, 5], [2, 3, 9, 9]],
                            fingerprint="fp", vocab_size=100)


@pytest.mark.parametrize("auth_reads", [False, True], ids=["writes", "auth-reads"])
def test_every_malformed_bearer_is_unauthenticated(index_path, auth_reads):
    locked = WRITE_METHODS | (READ_METHODS if auth_reads else set())
    cfg = ServiceConfig(auth_token=TOKEN, auth_reads=auth_reads)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as s, grpc.insecure_channel(s.address) as ch:
        for m in SERVICE.methods:
            for md in BAD_BEARERS:
                got = _call(ch, m, md)
                if m.name in locked:
                    assert got == grpc.StatusCode.UNAUTHENTICATED, (m.name, md, got)
                else:
                    assert got != grpc.StatusCode.UNAUTHENTICATED, (m.name, md)
            assert _call(ch, m, AUTH) != grpc.StatusCode.UNAUTHENTICATED, m.name
        assert {m.name for m in SERVICE.methods} & locked == locked   # every locked method was tried


# ----------------------------------------------------------------------------------------- session ids
def _open_memory_session(stub, prompt) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(prompt_ids=prompt, memory=True, skip_documents=True,
                                                  tokenizer_fingerprint="fp"), timeout=10, metadata=AUTH).session_id


def test_session_ids_cannot_escape_or_reach_other_sessions(index_path):
    """Variants of a session's id ('../', absolute paths, NUL bytes, case, prefixes, another id appended)
    find no session (INVALID_ARGUMENT), close nothing, and leave both sessions' memories and TTLs as they
    were; the id itself still works."""
    with ServerThread(index_path, ServiceConfig(auth_token=TOKEN), opener=FakeIndex.open) as s, \
            grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        a, b = _open_memory_session(st, [7, 8, 9]), _open_memory_session(st, [11, 12, 13])
        store = s.server.servicer.sessions

        def state():
            return {sid: (store._items[sid].memory.tokens.tolist(), store._items[sid].expires_at) for sid in (a, b)}

        before = state()
        probes = ["../" + a, "/" + a, f"/tmp/{a}", a + "\x00", "\x00" + a, a + "\x00" + b, a.upper(), a[:-1],
                  a + "/", "./" + a, a + "/../" + b, f"../../{b}", a + b, " " + a, "*", "..", "/", "\x00",
                  "w0-" + a, "%2e%2e%2f" + a]
        for sid in probes:
            req = pb.RetrieveRequest(context=[7, 8, 9, 5], budget=4, session_id=sid, context_end=4)
            with pytest.raises(grpc.RpcError) as ei:
                st.Retrieve(req, timeout=10)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(sid)
            assert not st.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=AUTH).closed
        assert state() == before
        r = st.Retrieve(pb.RetrieveRequest(context=[7, 8], budget=4, session_id=a), timeout=10)
        assert 9 in r.tokens   # from a's memory [7, 8, 9] (the corpus has no 7, 8)
        assert st.CloseSession(pb.CloseSessionRequest(session_id=a), timeout=10, metadata=AUTH).closed


# ----------------------------------------------------------------------------------------- per-client caps
def test_open_sessions_per_client_are_capped(index_path):
    cfg = ServiceConfig(auth_token=TOKEN, max_sessions_per_client=3)
    with ServerThread(index_path, cfg, opener=FakeIndex.open) as s, grpc.insecure_channel(s.address) as ch:
        st = pb_grpc.DatastoreStub(ch)
        ids = [_open_memory_session(st, [1, 2]) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as ei:
            _open_memory_session(st, [1, 2])
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 open sessions" in ei.value.details() and "CloseSession" in ei.value.details()
        # the sessions held keep working, and closing one gives its slot back
        assert st.Retrieve(pb.RetrieveRequest(context=[1, 2], budget=4, session_id=ids[0]), timeout=10).tokens
        assert st.CloseSession(pb.CloseSessionRequest(session_id=ids[0]), timeout=10, metadata=AUTH).closed
        assert _open_memory_session(st, [1, 2])
        assert s.server.servicer.sessions.owned("ipv4:127.0.0.1") == 3


# ----------------------------------------------------------------------------------------- logs
CTX = [41_307, 58_219, 73_041, 86_593, 97_155]      # the prompt's token ids (distinctive numbers)
PROMPT_TEXT = "zebra quokka marmalade 41307"


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    """A token-only index (index-build's own code) over a 100k vocabulary that holds the prompt's ids."""
    from specstore.indexers.build import BuildOptions, build_index

    rng = np.random.default_rng(1)
    docs = [np.concatenate([rng.integers(10, 1000, 500), CTX, [12, 13, 14], rng.integers(10, 1000, 500)])
            for _ in range(4)]
    out = tmp_path_factory.mktemp("seclog") / "index"
    build_index(None, out, BuildOptions(progress=False), token_docs=docs, vocab_size=100_000, log=lambda *_: None)
    return out


def _leaks(text: str, secrets: dict) -> list[str]:
    """Which of ``secrets`` (name -> regex) occur in ``text``."""
    return [name for name, rx in secrets.items() if re.search(rx, text)]


def test_tokens_prompts_and_session_ids_never_reach_the_logs(real_index, tmp_path, caplog):
    """datastore-serve at its most verbose (--log-level debug, gRPC core at debug) and a client with the
    token: sessions, lookups, refused calls (wrong token, bad requests, undecodable bytes, a document
    session on an index without FAISS, an unknown session): neither the token, nor the prompt's token ids
    (as a run of two or more, in any separator) or text, nor a session id appear in the server's log or
    the client process's log records."""
    from specstore.client.datastore_client import DatastoreClient

    caplog.set_level(logging.DEBUG)
    with ServeProcess(real_index, "--auth-token", TOKEN, "--log-level", "debug", "--log-format", "json", "--no-faiss",
                      log_path=tmp_path / "log", env={"GRPC_VERBOSITY": "debug"}) as s:
        with DatastoreClient(s.address, timeout_s=5, session_timeout_s=10, auth_token=TOKEN) as c:
            sess = c.open_session(prompt_ids=CTX, memory=True, documents=False)
            assert sess is not None
            assert c.retrieve(CTX, 8).tokens.tolist()[:4] == [CTX[-1], 12, 13, 14]   # the root, then the corpus
            assert c.open_session(prompt_text=PROMPT_TEXT) is None        # no FAISS: FAILED_PRECONDITION
            c.close_session(sess.session_id)
        with grpc.insecure_channel(s.address) as ch:
            st = pb_grpc.DatastoreStub(ch)
            bad = [(st.OpenSession, pb.OpenSessionRequest(prompt_ids=CTX, memory=True, skip_documents=True),
                    (("authorization", f"Bearer {TOKEN}-wrong"),)),
                   (st.OpenSession, pb.OpenSessionRequest(prompt_ids=[*CTX, 10**9], memory=True, skip_documents=True),
                    AUTH),
                   (st.Retrieve, pb.RetrieveRequest(context=[*CTX, 10**9], budget=4), AUTH),
                   (st.Retrieve, pb.RetrieveRequest(context=CTX, budget=4, session_id=sess.session_id), AUTH),
                   (st.Retrieve, pb.RetrieveRequest(context=CTX, budget=4, tokenizer_fingerprint=PROMPT_TEXT), AUTH)]
            for fn, req, md in bad:
                with pytest.raises(grpc.RpcError):
                    fn(req, timeout=10, metadata=md)
            with pytest.raises(grpc.RpcError):   # undecodable bytes: the one request that logs
                ch.unary_unary(f"/{SERVICE.full_name}/Retrieve")(b"\xff" + bytes(CTX[0] % 256 for _ in range(9)),
                                                                 timeout=10, metadata=AUTH)
        log = s.log()
    assert '"undecodable request"' in log and '"index loaded"' in log, log[-3000:]   # the log was written
    ids = [str(t) for t in CTX]
    secrets = {"token": re.escape(TOKEN), "prompt text": re.escape(PROMPT_TEXT),
               "session id": re.escape(sess.session_id),
               "context ids": "|".join(rf"{a}\D{{1,3}}{b}" for a, b in zip(ids, ids[1:]))}
    assert _leaks(log, secrets) == [], log[-3000:]
    client_log = "\n".join(f"{r.name} {r.getMessage()} {json.dumps(vars(r), default=str)}" for r in caplog.records)
    assert _leaks(client_log, secrets) == [], client_log[-3000:]


# ----------------------------------------------------------------------------------------- health
def test_health_answers_garbage_with_invalid_argument_and_one_line(real_index, tmp_path):
    with ServeProcess(real_index, "--auth-token", TOKEN, "--auth-reads", log_path=tmp_path / "log") as s, \
            grpc.insecure_channel(s.address) as ch:
        for method in ("Check", "Watch"):
            path = f"/grpc.health.v1.Health/{method}"
            for _ in range(50):
                with pytest.raises(grpc.RpcError) as ei:
                    if method == "Check":
                        ch.unary_unary(path)(b"\xff\xff\xff", timeout=10)
                    else:
                        list(ch.unary_stream(path)(b"\xff\xff\xff", timeout=10))
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, ei.value.details())
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING   # no token needed, still serving
        log = s.log()
    assert "Traceback" not in log and "Unexpected" not in log, log[-2000:]
    assert len([ln for ln in log.splitlines() if "undecodable" in ln]) == 1, log[-2000:]


def test_security_probe_small_run(capsys):
    """The full run's command (bench/security_probe.py, RELIABILITY.md §6) at a CI size: all zeros."""
    from specstore.bench.security_probe import main

    assert main(["--bearers", "60", "--ids", "60", "--garbage", "60", "--sessions", "4", "--cap", "8",
                 "--timing-calls", "2000"]) == 0, capsys.readouterr().out[-3000:]
