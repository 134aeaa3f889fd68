"""The on-disk index format (datastore/index_format.py): the manifest dataclass, file checks, ids, fingerprints."""
from __future__ import annotations

import copy
import json
import re

import pytest

from specstore.datastore.index import DatastoreIndex
from specstore.datastore.index_format import (FAISS_FILES, MANIFEST_NAME, SHARD_FILES, IndexFormatError,
                                              IndexManifest, check_files, file_entry, index_id_of, shard_path,
                                              tokenizer_fingerprint)
from specstore.indexers.build import BuildOptions, build_index


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt") / "idx"
    docs = [[1, 2, 3, 4, 5, 6], [2, 3, 5, 6, 7], [7, 7, 7, 1, 2, 3], [4, 5, 6, 7, 8, 9]]   # 2 shards
    build_index(None, out, BuildOptions(shard_tokens=16, progress=False), token_docs=docs, vocab_size=10,
                log=lambda *_: None)
    return out


def _raw(index):
    return json.loads((index / MANIFEST_NAME).read_text())


def test_round_trip(index, tmp_path):
    raw = _raw(index)
    m = IndexManifest.load(index)
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)          # same content, same key order
    assert m.fingerprint == "tokens-only" and m.num_documents == 4 and m.num_tokens == 23
    assert m.token_dtype == "uint16" and m.faiss is None and len(m.shards) == 2
    assert list(m.shards[0]["files"]) == list(SHARD_FILES)
    m.dump(tmp_path)
    assert IndexManifest.load(tmp_path) == m
    assert (tmp_path / MANIFEST_NAME).read_text() == (index / MANIFEST_NAME).read_text()   # byte for byte
    # the reader serves the same dict
    assert DatastoreIndex.open(index).manifest == raw


def test_unknown_keys_survive_a_round_trip(index):
    raw = dict(_raw(index), written_by_a_newer_builder={"x": 1})
    m = IndexManifest.from_dict(raw)
    assert m.extra == {"written_by_a_newer_builder": {"x": 1}} and m.to_dict() == raw


def _broken(index, edit):
    d = copy.deepcopy(_raw(index))
    edit(d)
    return d


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="something-else"), "not a specstore index manifest"),
    (lambda d: d.update(format_version=99), "unsupported format version 99"),
    (lambda d: d.pop("shards"), "manifest lacks 'shards'"),
    (lambda d: d.pop("index_id"), "manifest lacks 'index_id'"),
    (lambda d: d["tokenizer"].pop("fingerprint"), "manifest lacks 'tokenizer.fingerprint'"),
    (lambda d: d["stats"].pop("num_tokens"), "manifest lacks 'stats.num_tokens'"),
    (lambda d: d["shards"][1].pop("files"), r"manifest lacks 'shards\[1\].files'"),
    (lambda d: d["shards"][0]["files"]["rsa.npy"].pop("sha256"), r"lacks 'shards\[0\].files.rsa.npy.sha256'"),
    (lambda d: d.update(faiss={"factory": "Flat"}), "manifest lacks 'faiss.files'"),
    (lambda d: d.update(token_dtype="int8"), "unknown token dtype 'int8'"),
])
def test_validation_errors(index, edit, message):
    with pytest.raises(IndexFormatError, match=message):
        IndexManifest.from_dict(_broken(index, edit), "idx/manifest.json")


def test_load_errors(index, tmp_path):
    with pytest.raises(IndexFormatError, match="no manifest"):
        IndexManifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable manifest"):
        IndexManifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match="not a specstore index manifest"):
        IndexManifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(_broken(index, lambda d: d.pop("vocab_size"))))
    with pytest.raises(IndexFormatError, match=re.escape(f"{tmp_path / MANIFEST_NAME}: manifest lacks 'vocab_size'")):
        DatastoreIndex.open(tmp_path)                               # the reader reports the same


def test_check_files(index):
    sh = IndexManifest.load(index).shards[0]
    folder = shard_path(index, sh["name"])
    check_files(folder, sh["files"], verify=True)
    assert file_entry(folder / "rsa.npy") == sh["files"]["rsa.npy"]
    with pytest.raises(IndexFormatError, match="missing"):
        check_files(folder, dict(sh["files"], **{"extra.npy": {"bytes": 1, "sha256": "0"}}), verify=False)
    bad_size = {"rsa.npy": dict(sh["files"]["rsa.npy"], bytes=1)}
    with pytest.raises(IndexFormatError, match="size"):
        check_files(folder, bad_size, verify=False)
    bad_sum = {"rsa.npy": dict(sh["files"]["rsa.npy"], sha256="0" * 64)}
    check_files(folder, bad_sum, verify=False)                    # sizes only: cheap
    with pytest.raises(IndexFormatError, match="sha256"):
        check_files(folder, bad_sum, verify=True)


def test_index_id_follows_the_files(index):
    m = IndexManifest.load(index)
    assert index_id_of(m.shards, None) == m.index_id
    changed = copy.deepcopy(m.shards)
    changed[0]["files"]["tokens.npy"]["sha256"] = "0" * 64
    assert index_id_of(changed, None) != m.index_id
    faiss_files = {f: {"bytes": 1, "sha256": "a"} for f in FAISS_FILES}
    assert index_id_of(m.shards, faiss_files) != m.index_id


class _Tok:
    def __init__(self, vocab, special):
        self._vocab, self.all_special_tokens = vocab, special

    def get_vocab(self):
        return dict(self._vocab)


def test_tokenizer_fingerprint():
    a = _Tok({"a": 0, "b": 1, "<s>": 2}, ["<s>"])
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(_Tok({"<s>": 2, "b": 1, "a": 0}, ["<s>"]))
    assert len(tokenizer_fingerprint(a)) == 16
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(_Tok({"a": 1, "b": 0, "<s>": 2}, ["<s>"]))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(_Tok({"a": 0, "b": 1, "<s>": 2}, []))
