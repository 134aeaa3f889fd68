"""DatastoreClient / DatastoreDrafter against a real server, a dead server, and the embedded backend."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from specstore.client.datastore_client import DatastoreClient
from specstore.client.datastore_drafter import (DatastoreDrafter, DatastoreUnavailableError, RemoteBackend,
                                      TokenizerMismatchError, make_datastore_drafter)
from specstore.client.types import DecodeContext, DraftTree, Source, StepResult
from specstore.datastore.servicer import ServiceConfig
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread

DOCS = [[1, 2, 3, 4, 5, 6, 7], [9, 2, 3, 4, 8, 8], [5, 5, 5, 11, 12]]


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    return write_fake_index(tmp_path_factory.mktemp("cidx") / "index", DOCS, fingerprint="fp-test")


@pytest.fixture(scope="module")
def server(index_path):
    with ServerThread(index_path, ServiceConfig(auth_token="tok"), opener=FakeIndex.open) as s:
        yield s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctx(*toks, session=None):
    return DecodeContext(np.asarray(toks, dtype=np.int64), prompt_len=1, session_id=session)


def test_client_calls(server):
    with DatastoreClient(server.address, timeout_s=2, tokenizer_fingerprint="fp-test", auth_token="tok") as c:
        info = c.info()
        assert info.index_id == "fake-1" and info.vocab_size == 100
        t = c.retrieve([0, 2, 3], 8)
        assert t.root == 3 and t.num_drafts == 6 and set(t.sources[1:]) == {1}
        s = c.open_session(prompt_text="anything")
        assert s is not None and s.document_ids.tolist()
        t = c.retrieve([2, 3], 8, session_id=s.session_id)
        assert set(t.sources[1:]) == {3}
        assert c.close_session(s.session_id)
        trees = c.retrieve_batch([[2, 3], [60, 61]], 4)
        assert trees[0].num_drafts > 0 and trees[1].num_drafts == 0 and trees[1].root == 61
        pend = c.retrieve_async([2, 3], 4)
        assert pend.result().num_drafts > 0 and pend.done()
        assert c.stats["failures"] == 0


def test_client_errors_become_empty_trees(server):
    with DatastoreClient(server.address, timeout_s=2, tokenizer_fingerprint="other") as c:
        t = c.retrieve([2, 3], 4)
        assert t.num_drafts == 0 and t.root == 3
        assert c.stats["failure_FAILED_PRECONDITION"] == 1
        assert c.open_session(prompt_text="x") is None   # no token: UNAUTHENTICATED, swallowed
        assert c.stats["failure_UNAUTHENTICATED"] == 1


def test_server_down_breaker_and_recovery(index_path):
    port = free_port()
    c = DatastoreClient(f"127.0.0.1:{port}", timeout_s=0.005, breaker_failures=3, breaker_cooldown_s=0.3)
    t0 = time.perf_counter()
    for _ in range(20):
        t = c.retrieve([2, 3], 4)
        assert isinstance(t, DraftTree) and t.num_drafts == 0 and t.root == 3
    assert time.perf_counter() - t0 < 1.0
    assert c.stats["failures"] == 3 and c.stats["skipped_breaker_open"] == 17 and c.breaker_open
    assert c.open_session(prompt_text="x") is None and c.close_session("s") is False
    # a drafter over the dead server never raises either
    d = DatastoreDrafter(RemoteBackend(c))
    d.begin_request([1, 2], "prompt")
    d.prefetch(ctx(1, 2, 3), 8)
    assert d.propose(ctx(1, 2, 3), 8).num_drafts == 0
    d.end_request()
    # the server comes up on that port: after the cool-down a probe closes the breaker
    from specstore.datastore.server import ServerOptions

    with ServerThread(index_path, ServiceConfig(), ServerOptions(port=port), opener=FakeIndex.open):
        c.timeout_s = 2.0
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.35)
            if c.retrieve([2, 3], 4).num_drafts > 0:
                break
        assert not c.breaker_open and c.stats["breaker_probes"] >= 1
    c.close()


def test_deadline_is_enforced(index_path):
    with ServerThread(index_path, ServiceConfig(debug_delay_s=0.5), opener=FakeIndex.open) as s:
        c = DatastoreClient(s.address, timeout_s=0.02)
        t0 = time.perf_counter()
        assert c.retrieve([2, 3], 4).num_drafts == 0
        assert time.perf_counter() - t0 < 0.3
        assert c.stats["failure_DEADLINE_EXCEEDED"] == 1
        c.close()


def test_drafter_prefetch_and_sessions(server):
    d = DatastoreDrafter.remote(server.address, timeout_s=2, auth_token="tok")
    d.begin_request([1, 2, 3], "some prompt")
    assert d.session_id
    c = ctx(9, 2, 3)
    d.prefetch(c, 8)
    t = d.propose(c, 3)
    assert t.root == 3 and t.num_drafts == 3
    assert all(s & Source.DATASTORE and s & Source.DOCUMENTS for s in t.sources[1:])
    assert d.stats["prefetch_used"] == 1
    # a prefetch for another context is not used
    d.prefetch(ctx(1, 2), 8)
    t = d.propose(c, 8)
    assert t.num_drafts > 0 and d.stats["prefetch_stale"] == 1
    # no prefetch: blocking call
    assert d.propose(ctx(5, 5), 4).num_drafts > 0
    d.observe(StepResult(t, np.array([0, 1]), np.array([4, 5]), np.zeros((len(t), 1)), np.zeros((len(t), 1))))
    assert d.stats["accepted"] == 1
    sid = d.session_id
    d.end_request()
    assert d.session_id is None
    assert not d.backend.client.close_session(sid)  # already closed by end_request
    d.close()


def test_embedded_backend(index_path):
    d = DatastoreDrafter.embedded(str(index_path), index=FakeIndex.open(index_path))
    d.begin_request([1], "prompt")
    d.prefetch(ctx(0, 2, 3), 8)
    t = d.propose(ctx(0, 2, 3), 8)
    assert t.num_drafts == 6 and all(s == Source.DATASTORE | Source.DOCUMENTS for s in t.sources[1:])
    assert d.propose(ctx(60, 61), 8).num_drafts == 0
    d.end_request()
    assert d.propose(ctx(0, 2, 3), 8).sources[1] == Source.DATASTORE


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab
        self.all_special_tokens = []

    def get_vocab(self):
        return self.vocab


def test_factory_checks_fingerprint_and_reachability(server):
    from specstore.datastore.index_format import tokenizer_fingerprint

    tok = _Tok({"a": 0, "b": 1})
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        make_datastore_drafter(server.address, tokenizer=tok)
    with pytest.raises(DatastoreUnavailableError):
        make_datastore_drafter(f"127.0.0.1:{free_port()}", connect_timeout_s=0.3)
    d = make_datastore_drafter(f"127.0.0.1:{free_port()}", connect_timeout_s=0.2, strict=False)
    assert d.propose(ctx(1, 2), 4).num_drafts == 0
    d.close()
    d = make_datastore_drafter(server.address, timeout_s=2)
    assert d.propose(ctx(2, 3), 4).num_drafts > 0
    d.close()
    with pytest.raises(ValueError):
        make_datastore_drafter()
    assert tokenizer_fingerprint(tok)


def test_an_abandoned_session_open_still_settles_the_breaker_probe():
    """An OpenSession let through as the half-open breaker's probe and abandoned unpolled (a request that
    ended first) must still count: before, the probe stayed 'in flight' and the breaker open for good (a
    proposer run of the fault campaign drafted nothing remotely for 20 s after the server came back)."""
    c = DatastoreClient(f"127.0.0.1:{free_port()}", timeout_s=0.005, breaker_failures=1, breaker_cooldown_s=0.05)
    assert c.retrieve([2, 3], 4).num_drafts == 0 and c.breaker_open
    time.sleep(0.08)
    pending = c.open_session_async([1, 2], memory=True, documents=False)   # the probe
    pending.cancel()
    deadline = time.time() + 5
    while c.stats["failures"] < 2 and time.time() < deadline:   # the probe's call fails (nothing listens)
        time.sleep(0.01)
    time.sleep(0.08)
    c.retrieve([2, 3], 4)
    assert c.stats["breaker_probes"] == 2, c.stats   # the next probe was let through
    c.close()
