"""Property-based tests (hypothesis) of the servicer's request validation (issue 10, promise 3).

For any generated request, each handler (run as the RPC wrappers run it, on an event loop, over a real
index built by index-build's code) either answers or raises ``RpcError`` with one of the method's
documented codes and a short detail; never another exception. An independent model of the documented
limits (``expected``) says which: a request within every limit is answered, one beyond any limit is refused.
An answered lookup is a tree within the caps: at most ``budget`` nodes, parents before children, ids inside
the vocabulary, probabilities in [0, 1], no node deeper than ``depth``, and the same tree as a direct
``DatastoreIndex.retrieve`` with the options the request asked for.

The limits are set small here (context 32, budget 64, hints 16, 4096 cells) so that generated requests
reach both sides of each one.
"""
from __future__ import annotations

import asyncio
import inspect
import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from specstore.datastore.servicer import INDEX_DEFAULTS, MAX_ID_CHARS, OPTION_LIMITS, DatastoreServicer, \
    RpcError, ServiceConfig
from specstore.protos import datastore_pb2 as pb

VOCAB = 60
CFG = dict(max_context=32, max_budget=64, max_batch=8, max_hint=16, max_lookup_cells=4096, inline_cells=512,
           max_sessions=64)
INV, PRE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
# the codes a handler may raise for a bad request (UNAVAILABLE, UNAUTHENTICATED and RESOURCE_EXHAUSTED
# come from the wrappers, before the handler runs)
DOCUMENTED = {"Retrieve": {INV, PRE}, "RetrieveStream": {INV, PRE}, "RetrieveBatch": {INV, PRE}, "OpenSession": {INV, PRE},
              "CloseSession": {INV}}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(servicer, index, loop, fingerprint, memory session id, corpus) over a 3-shard token index of 40k
    tokens whose documents repeat short phrases (lookups match and branch); corpus: int32 [n], its tokens."""
    from specstore.datastore.index import DatastoreIndex
    from specstore.indexers.build import BuildOptions, build_index

    rng = np.random.default_rng(1)
    phrases = [rng.integers(0, VOCAB, rng.integers(3, 9)) for _ in range(40)]
    docs = [np.concatenate([phrases[i] for i in rng.integers(0, 40, 40)]) for _ in range(200)]
    out = tmp_path_factory.mktemp("validators") / "index"
    build_index(None, out, BuildOptions(progress=False, shard_tokens=20_000), token_docs=docs, vocab_size=VOCAB,
                log=lambda *_: None)
    index = DatastoreIndex.open(out)
    assert len(index.shards) > 1
    sv = DatastoreServicer(index, ServiceConfig(**CFG))
    loop = asyncio.new_event_loop()
    session = run(loop, sv, "OpenSession", pb.OpenSessionRequest(prompt_ids=[1, 2, 3], memory=True,
                                                                  skip_documents=True)).session_id
    yield sv, index, loop, index.tokenizer_fingerprint, session, np.concatenate(docs).astype(np.int32)
    sv.close()
    loop.close()
    index.close()


def run(loop, sv, method: str, request):
    """The handler of ``method`` on ``request`` as its wrapper runs it: on the event loop, awaiting a
    coroutine or a future (a lookup sent to the pool)."""
    handler = getattr(DatastoreServicer, method).__wrapped__
    # a handler wrapped with_client (OpenSession: per-client session caps) also takes the caller's identity
    extra = ("127.0.0.1",) if "client" in inspect.signature(handler).parameters else ()

    async def call():
        out = handler(sv, sv.index, request, *extra)
        return await out if asyncio.isfuture(out) or asyncio.iscoroutine(out) else out

    return loop.run_until_complete(call())


def outcome(served, method: str, request):
    """(status code, response or the error's details): an RpcError's code is checked to be one of the
    method's documented codes, its details short. Any other exception fails the test."""
    sv, loop = served[0], served[2]
    try:
        return grpc.StatusCode.OK, run(loop, sv, method, request)
    except RpcError as e:
        assert e.code in DOCUMENTED[method], (method, e.code, e.details)
        assert 0 < len(e.details) <= 400, e.details[:500]
        return e.code, e.details


# ---------------------------------------------------------------------------------------- strategies
U32 = st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 1, 2, 8, 63, 64, 65, 1023, 1024, 1025, 4096,
                                                                2 ** 31, 2 ** 32 - 1]))
TOKEN = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB - 1, VOCAB, VOCAB + 1, 2 ** 31 - 1, -2 ** 31]),
                  st.integers(-2 ** 31, 2 ** 31 - 1))
F32 = st.one_of(st.floats(0, 1, width=32), st.floats(width=32), st.sampled_from([0.0, 1e-30, 1.0, -0.0, 1.0000001]))


@st.composite
def retrieve_requests(draw, corpus: np.ndarray, session=None, fingerprint=None):
    """A RetrieveRequest whose every field is, one at a time with probability 1/8, drawn from anything
    its wire type holds (negative, huge, NaN, empty, 100 KB) and else from its documented range (contexts:
    slices of the corpus, so that lookups match and draft)."""
    def either(valid, wild):
        return draw(wild if draw(st.integers(0, 7)) == 0 else valid)

    start = draw(st.integers(0, len(corpus) - 40))
    req = pb.RetrieveRequest(
        context=either(st.integers(1, 12).map(lambda n: corpus[start:start + n].tolist()),
                       st.lists(TOKEN, max_size=40)),
        budget=either(st.integers(1, CFG["max_budget"]), st.one_of(st.integers(0, 70), U32)))
    if draw(st.booleans()):
        n = either(st.integers(1, CFG["max_hint"]), st.integers(0, 20))
        req.hint_tokens.extend(either(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n),
                                      st.lists(TOKEN, min_size=n, max_size=n)))
        m = either(st.just(n), st.integers(0, 20))
        req.hint_probs.extend(either(st.lists(st.floats(0, 1, width=32), min_size=m, max_size=m),
                                     st.lists(F32, min_size=m, max_size=m)))
    elif draw(st.integers(0, 15)) == 0:
        req.hint_probs.extend(draw(st.lists(F32, min_size=1, max_size=3)))
    req.tokenizer_fingerprint = either(st.sampled_from(["", fingerprint]),
                                       st.sampled_from(["not-the-index's", "f" * 20_000]))
    if draw(st.booleans()):
        o = req.options
        for name, hi in (("max_span", 32), ("min_span", 4), ("max_matches", 64), ("depth", 64)):
            if draw(st.booleans()):
                # each field's own range is 1..1024; past a product of 4096 max_matches x depth is refused
                setattr(o, name, either(st.one_of(st.integers(1, hi), st.integers(1, OPTION_LIMITS[name])),
                                        st.one_of(st.integers(0, 70), U32)))
        if draw(st.booleans()):
            o.min_prob = either(st.floats(0, 1, width=32), F32)
        req.options.SetInParent()
    req.session_id = either(st.sampled_from(["", session]),
                            st.sampled_from(["0123abcd" * 4, "w3-" + "a" * 32, "s" * 100_000]))
    if req.session_id and draw(st.booleans()):
        req.context_end = either(st.integers(len(req.context), 200), st.integers(0, 2 ** 64 - 1))
    return req


# ---------------------------------------------------------------------------------------- the model
def expected(req: pb.RetrieveRequest, fingerprint: str, session: str) -> set:
    """The documented outcome of ``req`` (the servicer's limits as the README and Info state them),
    written apart from the servicer: {OK}, or the codes it may be refused with."""
    bad = []
    n = len(req.context)
    bad.append(not 1 <= n <= CFG["max_context"])
    bad.append(not 1 <= req.budget <= CFG["max_budget"])
    bad.append(any(not 0 <= t < VOCAB for t in req.context))
    bad.append(len(req.hint_tokens) > CFG["max_hint"] or len(req.hint_tokens) != len(req.hint_probs))
    bad.append(any(not 0 <= t < VOCAB for t in req.hint_tokens))
    bad.append(any(not 0 <= p <= 1 for p in req.hint_probs))       # NaN is outside too
    o = req.options
    opts = {name: getattr(o, name) or INDEX_DEFAULTS[name] for name in OPTION_LIMITS}
    bad.append(any(v > OPTION_LIMITS[k] for k, v in opts.items()))
    bad.append(o.min_prob != 0 and not 0 <= o.min_prob <= 1)
    bad.append(opts["max_matches"] * opts["depth"] > CFG["max_lookup_cells"])
    if req.session_id:
        bad.append(req.session_id != session)
        bad.append(req.session_id == session and req.context_end != 0 and req.context_end < n)
    wrong_fp = bool(req.tokenizer_fingerprint) and req.tokenizer_fingerprint != fingerprint
    if any(bad):
        return {INV, PRE} if wrong_fp else {INV}
    return {PRE} if wrong_fp else {grpc.StatusCode.OK}


def check_tree(req: pb.RetrieveRequest, r: pb.RetrieveResponse, index, direct: bool) -> None:
    """The caps every answered tree respects; with ``direct`` (no session: no memory to change), the tree
    equals a direct lookup with the request's options."""
    k = len(r.tokens)
    assert k <= req.budget and len(r.parents) == len(r.probs) == len(r.sources) == k
    depth = req.options.depth or INDEX_DEFAULTS["depth"]
    level = []
    for i, (t, p, pr, s) in enumerate(zip(r.tokens, r.parents, r.probs, r.sources)):
        assert 0 <= t < VOCAB and -1 <= p < i and math.isfinite(pr) and 0 <= pr <= 1
        assert s & pb.SOURCE_DATASTORE and not s & ~(pb.SOURCE_DATASTORE | pb.SOURCE_DOCUMENTS | pb.SOURCE_CONTEXT)
        level.append(1 if p < 0 else level[p] + 1)
    assert max(level, default=0) <= depth
    assert r.index_id == str(index.index_id)
    if direct:
        kw = {name: getattr(req.options, name) for name in (*OPTION_LIMITS, "min_prob") if getattr(req.options, name)}
        if req.hint_tokens:
            kw.update(hint_tokens=np.asarray(req.hint_tokens, np.int32), hint_probs=np.asarray(req.hint_probs, np.float32))
        want = index.retrieve(np.asarray(req.context, np.int32), req.budget, **kw)
        assert list(r.tokens) == want.tokens.tolist() and list(r.parents) == want.parents.tolist()
        assert np.allclose(r.probs, want.probs, rtol=1e-6)


# ---------------------------------------------------------------------------------------- properties
@SETTINGS
@given(data=st.data())
def test_retrieve_accepts_exactly_the_documented_requests(served, data):
    _, index, _, fp, session, corpus = served
    req = data.draw(retrieve_requests(corpus, session, fp))
    code, resp = outcome(served, "Retrieve", req)
    event(code.name if code != grpc.StatusCode.OK else "OK, a tree" if resp.tokens else "OK, no match")
    assert code in expected(req, fp, session), (code, resp)
    if code == grpc.StatusCode.OK:
        check_tree(req, resp, index, direct=not req.session_id)


@SETTINGS
@given(data=st.data())
def test_retrieve_stream_message_answers_as_retrieve_with_its_seq(served, data):
    _, index, _, fp, session, corpus = served
    req = data.draw(retrieve_requests(corpus, session, fp))
    req.seq = data.draw(st.integers(0, 2 ** 64 - 1))
    code, resp = outcome(served, "RetrieveStream", req)
    assert code in expected(req, fp, session), (code, resp)
    if code == grpc.StatusCode.OK:
        assert resp.seq == req.seq
        check_tree(req, resp, index, direct=not req.session_id)


@settings(SETTINGS, max_examples=150)
@given(data=st.data())
def test_retrieve_batch(served, data):
    _, index, _, fp, session, corpus = served
    reqs = data.draw(st.lists(retrieve_requests(corpus, session, fp), max_size=CFG["max_batch"] + 2))
    code, resp = outcome(served, "RetrieveBatch", pb.RetrieveBatchRequest(requests=reqs))
    if len(reqs) > CFG["max_batch"]:
        assert code == INV
        return
    each = [expected(r, fp, session) for r in reqs]
    if code == grpc.StatusCode.OK:
        assert all(grpc.StatusCode.OK in e for e in each) and len(resp.responses) == len(reqs)
        for r, x in zip(reqs, resp.responses):
            check_tree(r, x, index, direct=not r.session_id)
    else:
        # refused for its first bad request, named in the details
        i, first_bad = next((i, e) for i, e in enumerate(each) if grpc.StatusCode.OK not in e)
        assert code in first_bad and resp.startswith(f"requests[{i}]: "), (code, resp, i)


@SETTINGS
@given(prompt_ids=st.lists(TOKEN, max_size=40), top_k=U32, memory=st.booleans(), skip=st.booleans(),
       text=st.sampled_from(["", "a question", "\x00\ud7ff" * 3]), fp=st.sampled_from(["", "wrong", "f" * 20_000]))
def test_open_and_close_session(served, prompt_ids, top_k, memory, skip, text, fp):
    """This index has no FAISS part: a session is a memory-only one (memory, skip_documents) or refused."""
    req = pb.OpenSessionRequest(prompt_ids=prompt_ids, top_k=top_k, memory=memory, skip_documents=skip,
                                prompt_text=text, tokenizer_fingerprint=fp)
    code, resp = outcome(served, "OpenSession", req)
    valid = memory and skip and all(0 <= t < VOCAB for t in prompt_ids)
    if fp:
        assert code in ({PRE} if valid else {INV, PRE})
    elif valid:
        assert code == grpc.StatusCode.OK and resp.memory and len(resp.session_id) <= MAX_ID_CHARS
        closed = outcome(served, "CloseSession", pb.CloseSessionRequest(session_id=resp.session_id))
        assert closed[0] == grpc.StatusCode.OK and closed[1].closed
    else:
        assert code in {INV, PRE}


@SETTINGS
@given(sid=st.one_of(st.text(max_size=200), st.sampled_from(["", "s" * 100_000])))
def test_close_session_any_id(served, sid):
    code, resp = outcome(served, "CloseSession", pb.CloseSessionRequest(session_id=sid))
    assert (code == grpc.StatusCode.OK) == (0 < len(sid) <= MAX_ID_CHARS)
    if code == grpc.StatusCode.OK:
        assert resp.closed is False    # no generated id names an open session
