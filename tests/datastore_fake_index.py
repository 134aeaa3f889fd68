"""A tiny stand-in for datastore.index.DatastoreIndex (same interface, brute-force numpy).

Used by the datastore unit tests so they don't depend on the real index; integration tests use the real
index built by index-build. Folder layout: manifest.json + tokens.npy (int32, -1 separates documents).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RetrievalResult:
    tokens: np.ndarray
    parents: np.ndarray
    probs: np.ndarray
    in_documents: np.ndarray
    in_memory: np.ndarray
    match_len: int


def write_fake_index(path, docs, *, index_id="fake-1", fingerprint="fp-test", vocab_size=100) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = []
    for d in docs:
        flat += list(d) + [-1]
    np.save(path / "tokens.npy", np.asarray(flat, dtype=np.int32))
    manifest = {"index_id": index_id, "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size,
                "num_tokens": len(flat) - len(docs), "num_documents": len(docs)}
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path / "manifest.json")
    return path


class FakeIndex:
    has_faiss = True

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.index_id = self.manifest["index_id"]
        self.tokenizer_fingerprint = self.manifest["tokenizer_fingerprint"]
        self.vocab_size = self.manifest["vocab_size"]
        self.num_tokens = self.manifest["num_tokens"]
        self.num_documents = self.manifest["num_documents"]
        self.tokens = np.load(self.path / "tokens.npy")
        self.doc_of = np.cumsum(self.tokens == -1) - (self.tokens == -1)
        self.closed = False

    @classmethod
    def open(cls, path, *, load_faiss=True):
        return cls(path)

    def retrieve(self, context, budget, *, max_span=16, min_span=2, max_matches=64, depth=8, min_prob=0.1,
                 doc_filter=None, hint_tokens=None, hint_probs=None, memory=None, memory_matches=16):
        assert not self.closed, "retrieve on a closed index"
        ctx = np.asarray(context)
        t = self.tokens
        n_corpus = len(t)
        if memory is not None and len(memory):   # the memory as one more document after the corpus
            t = np.concatenate([t, np.asarray(memory, dtype=np.int32), [-1]])
        empty = RetrievalResult(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32),
                                np.zeros(0, bool), np.zeros(0, bool), 0)
        for span in range(min(max_span, len(ctx)), min_span - 1, -1):
            pat = ctx[-span:]
            # the memory's own end (the context itself) is no occurrence
            starts = [i for i in range(len(t) - span) if np.array_equal(t[i:i + span], pat)
                      and (i + span < n_corpus or t[i + span] >= 0)][:max_matches]
            if starts:
                break
        else:
            return empty
        trie = {}  # (parent_node, tok) -> node
        counts, toks, pars, indoc, inmem = [], [], [], [], []
        for s in starts:
            cur = -1
            for j in range(s + span, min(s + span + depth, len(t))):
                tok = int(t[j])
                if tok < 0:
                    break
                node = trie.get((cur, tok))
                if node is None:
                    node = len(toks)
                    trie[(cur, tok)] = node
                    toks.append(tok); pars.append(cur); counts.append(0); indoc.append(False)
                    inmem.append(False)
                counts[node] += 1
                inmem[node] = inmem[node] or j >= n_corpus
                if doc_filter is not None and j < n_corpus \
                        and int(self.doc_of[j]) in set(np.asarray(doc_filter).tolist()):
                    indoc[node] = True
                cur = node
        if not toks:
            return empty
        counts = np.asarray(counts, np.float64)
        pars = np.asarray(pars)
        parent_count = np.where(pars >= 0, counts[np.maximum(pars, 0)], len(starts))
        probs = counts / parent_count
        keep, pp = [], {}
        for i in range(len(toks)):
            p = probs[i] * (pp[pars[i]] if pars[i] >= 0 else 1.0)
            if probs[i] >= min_prob and (pars[i] < 0 or pars[i] in pp):
                pp[i] = p
                keep.append(i)
        keep = sorted(sorted(keep, key=lambda i: -pp[i])[:budget])
        remap = {old: new for new, old in enumerate(keep)}
        return RetrievalResult(
            np.asarray([toks[i] for i in keep], np.int32),
            np.asarray([remap[pars[i]] if pars[i] >= 0 else -1 for i in keep], np.int32),
            np.asarray([probs[i] for i in keep], np.float32),
            np.asarray([indoc[i] for i in keep], bool),
            np.asarray([inmem[i] for i in keep], bool),
            span,
        )

    def search_documents(self, query, k=8):
        return np.arange(min(k, self.num_documents), dtype=np.int64)

    def close(self):
        self.closed = True
