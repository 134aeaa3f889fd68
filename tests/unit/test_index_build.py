"""index-build end to end on tiny corpora: manifest, FAISS, crash/resume, --append, checksums, CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from specstore.datastore.index import DatastoreIndex
from specstore.datastore.index_format import IndexFormatError
from specstore.datastore.model_files import load_tokenizer
from specstore.indexers.build import CRASH_ENV, BuildOptions, SimulatedCrash, build_index
from specstore.indexers.cli import main

DOCS = [
    {"instruction": "Write a function that adds two numbers.", "response": "def add(a, b):\n    return a + b"},
    {"instruction": "Write a function that multiplies two numbers.", "response": "def mul(a, b):\n    return a * b"},
    {"instruction": "Explain photosynthesis briefly.", "response": "Plants turn sunlight, water and carbon dioxide "
                    "into sugar and oxygen."},
    {"instruction": "Name the capital of France.", "response": "The capital of France is Paris."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer: exercises the pipeline at a tiny cost."""
    from specstore.bench.build_crash import write_tiny_embedder

    return write_tiny_embedder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def corpus(tmp_path):
    return _make_corpus(tmp_path / "corpus")


def _make_corpus(d):
    (d / "docs").mkdir(parents=True)
    (d / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    (d / "docs" / "rust.md").write_text("# Ownership\n\nEach value in Rust has an owner. There can only be one "
                                        "owner at a time. When the owner goes out of scope, the value is dropped.\n")
    (d / "docs" / "poem.txt").write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more "
                                         "temperate.\n" * 3)
    return d


def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_build_open_retrieve(tok, corpus, tmp_path):
    out = tmp_path / "idx"
    rep = build_index([corpus], out, BuildOptions(embeddings=False, progress=False), tokenizer=tok)
    ix = DatastoreIndex.open(out, verify=True)
    m = ix.manifest
    assert m["format_version"] == 1 and m["token_dtype"] == "uint16" and m["vocab_size"] == len(tok)
    assert ix.num_documents == 6 and m["faiss"] is None and m["shards"][0]["files"]["rsa.npy"]["sha256"]
    assert ix.tokenizer_fingerprint == rep.manifest["tokenizer"]["fingerprint"]
    assert not list(tmp_path.glob(".idx.building"))   # staging folder renamed away
    ctx = _ids(tok, "When the owner goes out of")
    r = ix.retrieve(ctx, 16)
    assert r.match_len >= 4
    assert tok.decode(r.tokens[:1]) == " scope"
    # a context from the poem: the continuation repeats three times
    r = ix.retrieve(_ids(tok, "Thou art more lovely and more"), 8, depth=3)
    assert tok.decode(r.tokens[:1]) == " temperate" and r.probs[0] == 1.0
    text = tok.decode(ix.document_tokens(int(np.argmax([len(ix.document_tokens(i)) for i in range(6)]))))
    assert "Shall I compare" in text
    ix.close()


def test_faiss_matches_exact_search(tok, corpus, tmp_path):
    from specstore.datastore.embedder import NumpyEmbedder

    out = tmp_path / "idx"
    build_index([corpus], out, BuildOptions(chunk_tokens=40, progress=False), tokenizer=tok)
    ix = DatastoreIndex.open(out)
    assert ix.has_faiss and ix.manifest["faiss"]["factory"] == "Flat"
    chunks = np.load(out / "faiss" / "chunks.npy")
    assert ix.manifest["faiss"]["num_vectors"] == len(chunks) == 7 and (chunks[:, 0] == 0).sum() == 2
    # exact search: embed every chunk's text again and take inner products
    emb = NumpyEmbedder()
    T = ix.shards[0].tokens
    X = emb.encode([tok.decode(T[s:e].tolist()) for _, _, s, e in chunks])
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    for q in ["capital city of France", "multiply numbers in python", "sunlight and plants"]:
        scores, rows = ix.search_chunks(q, k=5)
        exact = X @ emb.encode([q])[0]
        assert np.allclose(np.sort(scores)[::-1], np.sort(exact)[::-1][:5], atol=1e-4)
        docs = ix.search_documents(q, k=2)
        assert docs[0] == chunks[np.argmax(exact)][0]
    assert ix.search_documents("capital city of France", 1)[0] == 5  # docs/ (poem 0, rust 1) sorts before tasks.jsonl
    no = DatastoreIndex.open(out, load_faiss=False)
    assert no.search_documents("anything").size == 0


def test_ivf_probed_exhaustively_equals_flat(tok, corpus, tmp_path, tiny_embedder):
    kw = dict(chunk_tokens=16, embedder=str(tiny_embedder), progress=False)
    build_index([corpus], tmp_path / "flat", BuildOptions(**kw), tokenizer=tok)
    build_index([corpus], tmp_path / "ivf", BuildOptions(faiss_factory="IVF2,Flat", **kw), tokenizer=tok)
    flat, ivf = DatastoreIndex.open(tmp_path / "flat"), DatastoreIndex.open(tmp_path / "ivf")
    assert ivf.manifest["faiss"]["factory"] == "IVF2,Flat" and ivf.manifest["faiss"]["nprobe"] >= 2
    assert flat.manifest["faiss"]["embedder"]["path"] == str(tiny_embedder)
    for q in ["capital city of France", "ownership in Rust", "a poem about summer"]:
        a, b = flat.search_chunks(q, 4), ivf.search_chunks(q, 4)
        assert np.allclose(a[0], b[0], atol=1e-5) and a[1].tolist() == b[1].tolist()


def _shard_files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*.npy"))}


@pytest.fixture(scope="module")
def clean_builds(tok, tmp_path_factory, tiny_embedder):
    """One clean reference build per embeddings setting (shared by the crash/resume cases)."""
    root = tmp_path_factory.mktemp("clean")
    corpus_dir = _make_corpus(root / "corpus")
    out = {}
    for emb in (False, True):
        out[emb] = root / f"clean-{emb}"
        build_index([corpus_dir], out[emb], BuildOptions(embeddings=emb, embedder=str(tiny_embedder) if emb else None,
                                                         **CRASH_KW), tokenizer=tok)
    return corpus_dir, out


CRASH_KW = dict(shard_tokens=60, chunk_tokens=32, progress=False)


@pytest.mark.parametrize("point,emb", [("tokenize:shard-00001", False), ("sa:shard-00001", False),
                                       ("embed:shard-00000", True), ("faiss", True), ("manifest", False)])
def test_crash_then_resume_equals_clean_build(tok, clean_builds, tmp_path, monkeypatch, point, emb, tiny_embedder):
    corpus_dir, clean = clean_builds
    clean = clean[emb]
    opts = BuildOptions(embeddings=emb, embedder=str(tiny_embedder) if emb else None, **CRASH_KW)
    out = tmp_path / "idx"
    monkeypatch.setenv(CRASH_ENV, point)
    with pytest.raises(SimulatedCrash):
        build_index([corpus_dir], out, opts, tokenizer=tok)
    assert not out.exists()                                    # nothing half-published
    assert (tmp_path / ".idx.building" / "stages").is_dir()
    if point != "manifest":
        with pytest.raises(IndexFormatError):
            DatastoreIndex.open(tmp_path / ".idx.building")    # no manifest before the last stage
    monkeypatch.delenv(CRASH_ENV)
    rep = build_index([corpus_dir], out, opts, tokenizer=tok)
    assert "tokenize-00000" in rep.resumed
    if point != "tokenize:shard-00001":
        assert "tokenize" in rep.resumed and "sa-shard-00000" in rep.resumed
    if point == "faiss":
        assert "embed-shard-00000" in rep.resumed
    assert _shard_files(out) == _shard_files(clean)
    a, b = DatastoreIndex.open(out, verify=True), DatastoreIndex.open(clean)
    assert a.index_id == b.index_id and len(a.manifest["shards"]) >= 3
    ctx = _ids(tok, "Each value in Rust has an")
    assert a.retrieve(ctx, 8).tokens.tolist() == b.retrieve(ctx, 8).tokens.tolist()


def test_embed_checkpoints_resume_mid_shard(tok, clean_builds, tmp_path, monkeypatch, tiny_embedder):
    import specstore.indexers.build as B

    corpus_dir, clean = clean_builds
    opts = BuildOptions(embeddings=True, embedder=str(tiny_embedder), **CRASH_KW)
    monkeypatch.setattr(B, "EMBED_PART_CHUNKS", 1)
    monkeypatch.setenv(CRASH_ENV, "embed-part:shard-00000:0")
    with pytest.raises(SimulatedCrash):
        build_index([corpus_dir], tmp_path / "idx", opts, tokenizer=tok)
    monkeypatch.delenv(CRASH_ENV)
    rep = build_index([corpus_dir], tmp_path / "idx", opts, tokenizer=tok)
    assert "embed-shard-00000-part00000" in rep.resumed
    assert {k: v for k, v in _shard_files(tmp_path / "idx").items() if not k.startswith("faiss")} == \
        {k: v for k, v in _shard_files(clean[True]).items() if not k.startswith("faiss")}
    assert (np.load(tmp_path / "idx" / "faiss" / "chunks.npy") == np.load(clean[True] / "faiss" / "chunks.npy")).all()
    # vectors equal up to float rounding (batches of 1 chunk here, one batch in the clean build)
    import faiss

    a, b = (faiss.read_index(str(p / "faiss" / "index.faiss")) for p in (tmp_path / "idx", clean[True]))
    assert a.ntotal == b.ntotal > 1
    assert np.allclose(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal), atol=1e-5)


def test_changed_inputs_discard_stale_staging(tok, corpus, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    monkeypatch.setenv(CRASH_ENV, "sa:shard-00000")
    with pytest.raises(SimulatedCrash):
        build_index([corpus], out, BuildOptions(embeddings=False, progress=False), tokenizer=tok)
    monkeypatch.delenv(CRASH_ENV)
    (corpus / "extra.txt").write_text("a brand new document about zebras")
    rep = build_index([corpus], out, BuildOptions(embeddings=False, progress=False), tokenizer=tok)
    assert rep.resumed == [] and DatastoreIndex.open(out).num_documents == 7


def test_append_adds_a_shard(tok, corpus, tmp_path, tiny_embedder):
    out = tmp_path / "idx"
    build_index([corpus / "tasks.jsonl"], out,
                BuildOptions(chunk_tokens=32, embedder=str(tiny_embedder), progress=False), tokenizer=tok)
    before = DatastoreIndex.open(out)
    old_files = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (out / "shards" / "shard-00000").iterdir()}
    nvec = before.manifest["faiss"]["num_vectors"]
    rep = build_index([corpus / "docs"], out, BuildOptions(append=True, progress=False), tokenizer=tok)
    ix = DatastoreIndex.open(out, verify=True)
    assert [s["name"] for s in ix.manifest["shards"]] == ["shard-00000", "shard-00001"]
    assert ix.num_documents == 6 and ix.manifest["stats"]["appended_from"] == before.index_id
    assert ix.manifest["shards"][1]["doc_id_min"] == 4  # poem.txt, then rust.md = 5
    for p in (out / "shards" / "shard-00000").iterdir():     # old shard untouched (same inode, same bytes)
        assert (p.stat().st_ino, p.read_bytes()) == old_files[p.name]
    assert ix.manifest["faiss"]["num_vectors"] > nvec
    # the appended chunks are searchable: a chunk's own text finds that chunk's document first
    chunks = np.load(out / "faiss" / "chunks.npy")
    assert chunks[:, 0].max() == 5 and (chunks[:, 1] == 1).sum() == ix.manifest["faiss"]["num_vectors"] - nvec
    sh = ix.shards[1]
    doc5 = chunks[chunks[:, 0] == 5][0]
    assert ix.search_documents(tok.decode(sh.tokens[doc5[2]:doc5[3]].tolist()), 1).tolist() == [5]
    r = ix.retrieve(_ids(tok, "When the owner goes out of"), 4)
    assert tok.decode(r.tokens[:1]) == " scope"
    r = ix.retrieve(_ids(tok, "def add(a, b):\n    return"), 4)
    assert r.match_len >= 5
    # a tokenizer mismatch is refused
    from specstore.indexers.build import BuildError
    with pytest.raises(BuildError, match="fingerprint"):
        build_index(None, out, BuildOptions(append=True, progress=False), token_docs=[[1, 2, 3]])


def test_checksums_and_half_indexes(tok, corpus, tmp_path):
    out = tmp_path / "idx"
    build_index([corpus], out, BuildOptions(embeddings=False, progress=False), tokenizer=tok)
    rsa = out / "shards" / "shard-00000" / "rsa.npy"
    data = bytearray(rsa.read_bytes())
    data[-1] ^= 0xFF
    rsa.write_bytes(bytes(data))
    DatastoreIndex.open(out)  # sizes still agree: cheap open succeeds ...
    with pytest.raises(IndexFormatError, match="sha256"):
        DatastoreIndex.open(out, verify=True)          # ... the checksum does not
    assert main(["inspect", str(out), "--verify"]) == 2
    rsa.write_bytes(bytes(data[:-4]))
    with pytest.raises(IndexFormatError, match="size"):
        DatastoreIndex.open(out)
    (out / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="no manifest"):
        DatastoreIndex.open(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError):
        DatastoreIndex.open(out)


def test_token_docs_and_uint32(tmp_path):
    docs = [[70_000, 1, 65_535, 80_000], [1, 65_535, 80_000, 5], [9, 9, 9]]
    build_index(None, tmp_path / "i", BuildOptions(shard_tokens=16, progress=False), token_docs=docs,
                vocab_size=100_000)
    ix = DatastoreIndex.open(tmp_path / "i")
    assert ix.token_dtype == "uint32" and ix.manifest["separator"] == 2**32 - 1
    r = ix.retrieve([1, 65_535], 8, min_prob=0.0)
    assert r.match_len == 2 and r.tokens.tolist() == [80_000, 5] and r.parents.tolist() == [-1, 0]
    assert ix.manifest["stats"]["bytes_per_token"] > 0
    from specstore.indexers.build import BuildError
    with pytest.raises(BuildError, match="outside the vocabulary"):
        build_index(None, tmp_path / "j", BuildOptions(progress=False), token_docs=[[5, 100]], vocab_size=50)


def _big_vocab_tokenizer(folder, n=70_000):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(n - 1)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(str(folder))
    return folder


def test_cli_uint32_tokenizer_inspect_and_bad_input(tmp_path, capsys):
    tokdir = _big_vocab_tokenizer(tmp_path / "bigtok")
    (tmp_path / "c.jsonl").write_text('{"text": "w69000 w1 w66000 w5"}\n{"text": "w1 w66000 w7"}\n')
    out = tmp_path / "idx"
    assert main(["build", str(tmp_path / "c.jsonl"), "--out", str(out), "--model", str(tokdir), "--no-embeddings",
                 "-q"]) == 0
    ix = DatastoreIndex.open(out)
    assert ix.token_dtype == "uint32" and ix.vocab_size == 70_000
    r = ix.retrieve([2, 66_001], 4, min_prob=0.0)
    assert r.match_len == 2 and sorted(r.tokens.tolist()) == [6, 8]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    o = capsys.readouterr().out
    assert ix.index_id in o and "uint32" in o and "70,000" in o
    assert main(["inspect", str(out), "--json"]) == 0 and json.loads(capsys.readouterr().out)["vocab_size"] == 70_000
    # bad input: file:line, exit 1, no traceback; --skip-bad-records goes on and reports the count
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"text": w3}\n{"body": "w4"}\n')
    assert main([str(bad), "--out", str(tmp_path / "b"), "--model", str(tokdir), "--no-embeddings", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err and "Traceback" not in err
    assert main([str(bad), "--out", str(tmp_path / "b"), "--model", str(tokdir), "--no-embeddings", "-q",
                 "--text-field", "text", "--skip-bad-records"]) == 0
    o = capsys.readouterr().out
    assert "skipped 2 bad records" in o
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m"), "--no-embeddings", "-q",
                 "--model", str(tokdir)]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    h = capsys.readouterr().out
    for flag in ["--out", "--model", "--text-field", "--template", "--shard-tokens", "--workers", "--no-embeddings",
                 "--embedder", "--faiss-factory", "--chunk-tokens", "--append", "--skip-bad-records", "--quiet", "--engine",
                 "--address"]:
        assert flag in h


def test_workers_give_identical_shards(tok, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_index([corpus], a, BuildOptions(embeddings=False, progress=False, batch_docs=2), tokenizer=tok)
    build_index([corpus], b, BuildOptions(embeddings=False, progress=False, batch_docs=2, workers=2), tokenizer=tok)
    assert _shard_files(a) == _shard_files(b)


class _FakeGpuFaiss:
    """The real faiss-cpu module dressed up as a GPU build with one GPU: 'moving' an index to the GPU
    clones it (so train/add must happen on the moved copy to count), and refuses HNSW like FAISS does."""

    def __init__(self, real):
        self._real = real
        self.moves = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 1

    def index_cpu_to_all_gpus(self, index):
        if "HNSW" in type(index).__name__:
            raise RuntimeError("Error: 'false' failed: this index type is not implemented on GPU")
        self.moves.append("to_gpu")
        return self._real.clone_index(index)

    def index_gpu_to_cpu(self, index):
        self.moves.append("to_cpu")
        return self._real.clone_index(index)


def test_faiss_gpu_path_builds_the_same_index(tok, corpus, tmp_path, tiny_embedder, monkeypatch):
    """The build path a FAISS GPU build (the 'gpu' extra) takes, exercised on the CPU with a stand-in module:
    train/add on the moved index, bring it back, same search results as the CPU build."""
    import sys

    import faiss

    from specstore.indexers.build import BuildError

    kw = dict(chunk_tokens=16, embedder=str(tiny_embedder), progress=False)
    quiet = dict(tokenizer=tok, log=lambda *_: None)
    with pytest.raises(BuildError, match="sees no GPU"):
        build_index([corpus], tmp_path / "nogpu", BuildOptions(faiss_device="gpu", **kw), **quiet)
    with pytest.raises(BuildError, match="faiss-device"):
        build_index([corpus], tmp_path / "bad", BuildOptions(faiss_device="tpu", **kw), **quiet)
    build_index([corpus], tmp_path / "cpu", BuildOptions(faiss_factory="IVF2,Flat", **kw), **quiet)
    fake = _FakeGpuFaiss(faiss)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    build_index([corpus], tmp_path / "gpu", BuildOptions(faiss_factory="IVF2,Flat", faiss_device="gpu", **kw), **quiet)
    assert fake.moves == ["to_gpu", "to_cpu"]
    logs = []
    build_index([corpus], tmp_path / "hnsw", BuildOptions(faiss_factory="HNSW8,Flat", **kw), tokenizer=tok,
                log=logs.append)
    assert any("building on the CPU" in line for line in logs)   # auto falls back for index types without GPU
    monkeypatch.setitem(sys.modules, "faiss", faiss)
    cpu, gpu = DatastoreIndex.open(tmp_path / "cpu"), DatastoreIndex.open(tmp_path / "gpu")
    assert gpu.manifest["faiss"]["built_on"] == "gpu" and cpu.manifest["faiss"]["built_on"] == "cpu"
    assert DatastoreIndex.open(tmp_path / "hnsw").manifest["faiss"]["built_on"] == "cpu"
    for q in ["capital city of France", "ownership in Rust"]:
        a, b = cpu.search_chunks(q, 4), gpu.search_chunks(q, 4)
        assert np.allclose(a[0], b[0], atol=1e-5) and a[1].tolist() == b[1].tolist()


def test_a_second_build_of_the_same_index_is_refused(tmp_path):
    """Two builds of one index would share its staging folder: the second is refused while the first holds
    ``.<name>.lock`` (the kernel drops it when the holder dies, even by SIGKILL)."""
    from specstore.datastore.durable import exclusive_lock
    from specstore.indexers.build import BuildError

    with exclusive_lock(tmp_path / ".i.lock"):
        with pytest.raises(BuildError, match="another index-build is writing"):
            build_index(None, tmp_path / "i", BuildOptions(progress=False), token_docs=[[1, 2, 3]])
    assert not (tmp_path / "i").exists()
    build_index(None, tmp_path / "i", BuildOptions(progress=False), token_docs=[[1, 2, 3]])
    assert DatastoreIndex.open(tmp_path / "i").num_documents == 1


def test_rerun_of_a_published_append_adds_nothing(tmp_path):
    """An --append killed after its publish (before it could report) is rerun by its operator: the same
    inputs must not be added a second time; a different append still goes through."""
    out = tmp_path / "i"
    build_index(None, out, BuildOptions(progress=False), token_docs=[[1, 2, 3]], vocab_size=50)
    first = build_index(None, out, BuildOptions(append=True, progress=False), token_docs=[[4, 5]], vocab_size=50)
    logs = []
    again = build_index(None, out, BuildOptions(append=True, progress=False), token_docs=[[4, 5]], vocab_size=50,
                        log=logs.append)
    ix = DatastoreIndex.open(out, verify=True)
    assert again.manifest["index_id"] == first.manifest["index_id"] == ix.index_id and ix.num_documents == 2
    assert any("nothing to do" in line for line in logs)
    build_index(None, out, BuildOptions(append=True, progress=False), token_docs=[[6, 7]], vocab_size=50)
    assert DatastoreIndex.open(out).num_documents == 3


def test_open_during_a_publish_never_mixes_two_snapshots(tmp_path, monkeypatch):
    """A new index swapped in while a reader maps the old one's files (between reading the manifest and
    opening the shards): the reader ends with one whole snapshot, the new one, not old metadata over new files."""
    from specstore.datastore import index as index_module
    from specstore.datastore.durable import replace_dir

    out, new = tmp_path / "i", tmp_path / "j"
    build_index(None, out, BuildOptions(progress=False), token_docs=[[1, 2, 3]], vocab_size=50)
    build_index(None, new, BuildOptions(progress=False), token_docs=[[1, 2, 3, 4, 5, 6, 7], [8]], vocab_size=50)
    new_id = DatastoreIndex.open(new).index_id
    real_load, calls = index_module.Shard.load, []

    def load_while_publishing(folder, name):
        calls.append(name)
        if len(calls) == 1:
            replace_dir(new, out)        # the publish lands after the old manifest was read
        return real_load(folder, name)

    monkeypatch.setattr(index_module.Shard, "load", staticmethod(load_while_publishing))
    ix = DatastoreIndex.open(out)
    assert ix.index_id == new_id and ix.num_documents == 2 and len(calls) == 2
    assert ix.retrieve([1, 2, 3, 4, 5], 4, min_prob=0.0).tokens.tolist()[:1] == [6]
