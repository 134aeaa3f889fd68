"""The service and the drafters over a real index (index-build on a tiny corpus, SmolLM2's tokenizer)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("specstore.datastore.index")
pytest.importorskip("specstore.indexers.build")

from specstore.client.datastore_client import DatastoreClient  # noqa: E402
from specstore.client.datastore_drafter import TokenizerMismatchError, make_datastore_drafter  # noqa: E402
from specstore.client.types import DecodeContext, Source  # noqa: E402
from specstore.datastore.servicer import ServiceConfig  # noqa: E402
from tests.integration.datastore_support import ServerThread  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox runs into the forest.",
    "Rust ownership rules: each value in Rust has an owner. There can only be one owner at a time.",
    "To compute the area of a circle, multiply pi by the square of the radius.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from specstore.datastore.model_files import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def real_index(tmp_path_factory, tokenizer):
    from specstore.indexers.build import BuildOptions, build_index

    d = tmp_path_factory.mktemp("real")
    corpus = d / "corpus"
    corpus.mkdir()
    for i, t in enumerate(TEXTS):
        (corpus / f"doc{i}.txt").write_text(t + "\n")
    out = d / "index"
    build_index([str(corpus)], out, BuildOptions(progress=False, chunk_tokens=16), tokenizer=tokenizer,
                log=lambda *_: None)
    return out


def ids(tokenizer, text):
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def test_service_over_real_index(real_index, tokenizer):
    from specstore.datastore.index_format import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tokenizer)
    with ServerThread(real_index, ServiceConfig()) as s:
        c = DatastoreClient(s.address, timeout_s=5, session_timeout_s=30, tokenizer_fingerprint=fp)
        info = c.info()
        assert info.tokenizer_fingerprint == fp and info.vocab_size == len(tokenizer)
        ctx = ids(tokenizer, "I saw that the quick brown")
        t = c.retrieve(ctx, 16)
        assert t.num_drafts > 0 and t.root == ctx[-1]
        first = tokenizer.decode(t.tokens[t.children_lists()[0]][:1].tolist())
        assert "fox" in first
        sess = c.open_session(prompt_text="How many owners can a Rust value have?")
        assert sess is not None and len(sess.document_ids) > 0
        t = c.retrieve(ids(tokenizer, "each value in Rust"), 8, session_id=sess.session_id)
        assert t.num_drafts > 0
        assert c.close_session(sess.session_id)
        assert c.stats["failures"] == 0
        c.close()
        d = make_datastore_drafter(s.address, tokenizer=tokenizer, timeout_s=5, session_timeout_s=30)
        d.begin_request(None, "area of a circle")
        dc = DecodeContext(ids(tokenizer, "multiply pi by the"), prompt_len=2)
        d.prefetch(dc, 8)
        t = d.propose(dc, 8)
        assert t.num_drafts > 0 and all(int(x) & Source.DATASTORE for x in t.sources[1:])
        d.close()


def test_embedded_drafter(real_index, tokenizer):
    d = make_datastore_drafter(index_path=str(real_index), tokenizer=tokenizer)
    d.begin_request(None, "quick brown fox")
    t = d.propose(DecodeContext(ids(tokenizer, "the quick brown"), prompt_len=1), 8)
    assert t.num_drafts > 0
    d.close()

    class Other:
        all_special_tokens = []

        def get_vocab(self):
            return {"x": 0}

    with pytest.raises(TokenizerMismatchError):
        make_datastore_drafter(index_path=str(real_index), tokenizer=Other())


def test_memory_session_remote_and_embedded_agree(real_index, tokenizer):
    """A memory session drafts from the request's own tokens (text the corpus never saw), over gRPC from
    per-step context tails exactly as in process from the whole context."""
    prompt = ids(tokenizer, "Zebra quartz violin paper. Repeat: Zebra quartz violin paper. Again: Zebra")
    with ServerThread(real_index, ServiceConfig()) as s:
        remote = make_datastore_drafter(s.address, tokenizer=tokenizer, timeout_s=5, session_timeout_s=30)
        remote.backend.client.context_tail = 4    # small tails: the server must stitch its memory together
        local = make_datastore_drafter(index_path=str(real_index), tokenizer=tokenizer)
        off = make_datastore_drafter(index_path=str(real_index), tokenizer=tokenizer, memory=False)
        for d in (remote, local, off):
            d.begin_request(prompt.tolist(), None)
        seq = prompt.copy()
        for step in range(3):
            dc = DecodeContext(seq, prompt_len=len(prompt))
            tr, tl, to = (d.propose(dc, 8) for d in (remote, local, off))
            assert tr.tokens.tolist() == tl.tokens.tolist() and tr.sources.tolist() == tl.sources.tolist()
            assert tr.num_drafts > 0 and all(int(x) & Source.CONTEXT for x in tr.sources[1:])
            assert not any(int(x) & Source.CONTEXT for x in to.sources[1:])
            seq = np.concatenate([seq, tr.tokens[1:2]])   # accept the first drafted token
        for d in (remote, local, off):
            d.close()
