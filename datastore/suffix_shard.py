"""One token shard and its *reverse* suffix array: build (indexer side) and longest-suffix lookup (read side).

Layout of a shard's token array ``T`` (uint16 or uint32)::

    SEP d0 ... SEP d1 ... SEP ... SEP        (SEP = the dtype's max value; never a real token id)

``rsa`` (int32) lists the positions ``q`` of all tokens sorted by the *backward* string
``T[q], T[q-1], T[q-2], ...`` (the suffix array of the reversed token string, stored as positions in the
forward string). The rows whose backward string starts with a context's last ``k`` tokens reversed form
one contiguous range, so the longest context suffix is found by narrowing one range token by token
(k = 1, 2, ...), and its continuation starts at ``T[q + 1]``. ``buckets[c] .. buckets[c+1]`` is the
range for the one-token pattern ``c`` (so the first step is free). Separators stop every match and every
continuation, so nothing crosses a document boundary.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .index_format import SHARD_BUCKETS, SHARD_DOC_IDS, SHARD_DOCS, SHARD_RSA, SHARD_TOKENS
from .kernels import backward_range, corpus_rows

def sep_for(dtype) -> int:
    return int(np.iinfo(np.dtype(dtype)).max)


def token_dtype_for(vocab_size: int):
    """uint16 when every id (and the separator 65535) fits, else uint32."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def pack_documents(docs, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(T [sum(len) + len(docs) + 1] of ``dtype``, starts int64 [len(docs) + 1]): the documents (token arrays)
    in one array, a separator before each and one at the end; ``starts`` = each document's first token, then
    ``len(T)`` (a shard's ``tokens.npy`` and ``docs.npy``)."""
    sep = sep_for(dtype)
    lens = np.fromiter((len(a) for a in docs), dtype=np.int64, count=len(docs))
    T = np.empty(int(lens.sum()) + len(docs) + 1, dtype=dtype)
    starts = np.empty(len(docs) + 1, dtype=np.int64)
    pos = 0
    for j, a in enumerate(docs):
        T[pos] = sep
        starts[j] = pos + 1
        T[pos + 1:pos + 1 + len(a)] = a
        pos += 1 + len(a)
    T[pos] = sep
    starts[-1] = len(T)
    return T, starts


def build_reverse_sa(tokens: np.ndarray) -> np.ndarray:
    """Positions sorted by the backward string from each position (int32), built with pydivsufsort."""
    import pydivsufsort

    n = len(tokens)
    if n >= 2**31 - 1:
        raise ValueError("a shard must hold fewer than 2**31 tokens; lower --shard-tokens")
    rev = np.ascontiguousarray(tokens[::-1])
    sa = pydivsufsort.divsufsort(rev)
    q = (n - 1) - sa.astype(np.int64)
    return q.astype(np.int32)


def build_buckets(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size + 1]: rsa rows whose position holds token c are buckets[c]:buckets[c+1]."""
    sep = sep_for(tokens.dtype)
    counts = np.zeros(vocab_size, dtype=np.int64)
    step = 1 << 24
    for i in range(0, len(tokens), step):
        t = tokens[i:i + step]
        t = t[t != sep]
        counts += np.bincount(t, minlength=vocab_size)[:vocab_size]
    out = np.zeros(vocab_size + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class Shard:
    """Read side of one shard (all arrays memory-mapped)."""

    def __init__(self, tokens: np.ndarray, rsa: np.ndarray, buckets: np.ndarray, doc_starts: np.ndarray,
                 doc_ids: np.ndarray, name: str = ""):
        self.tokens = tokens
        self.rsa = rsa
        self.buckets = buckets
        self.doc_starts = doc_starts  # int64 [d + 1]: first token of each document, then len(tokens)
        self.doc_ids = doc_ids        # int64 [d]: global document id of each document in this shard
        self.name = name
        self.n = len(tokens)
        self.sep = sep_for(tokens.dtype)
        self.vocab = len(buckets) - 1

    @classmethod
    def load(cls, folder: Path, name: str = "") -> "Shard":
        # plain ndarray views of the memory maps: np.memmap's Python-level __getitem__ costs microseconds
        return cls(
            np.load(folder / SHARD_TOKENS, mmap_mode="r").view(np.ndarray),
            np.load(folder / SHARD_RSA, mmap_mode="r").view(np.ndarray),
            np.load(folder / SHARD_BUCKETS),
            np.load(folder / SHARD_DOCS),
            np.load(folder / SHARD_DOC_IDS),
            name,
        )

    # --------------------------------------------------------------------------------- lookup
    def match(self, rev: np.ndarray):
        """Longest prefix of ``rev`` (the context reversed, int64) found backward in this shard.

        Returns ``(m, lo, hi)``: ``m`` matched tokens (0 = none); the occurrences are ``rsa[lo:hi]``
        (positions of the last matched token). Compiled binary searches (datastore/kernels.py).
        """
        return backward_range(self.tokens, self.rsa, self.buckets, np.ascontiguousarray(rev, dtype=np.int64),
                              self.vocab)

    def continuations(self, pos: np.ndarray, depth: int) -> np.ndarray:
        """[len(pos), depth] int64 tokens following each position, -1 from the first separator on."""
        c = np.full((len(pos), depth), -1, np.int64)
        corpus_rows(self.tokens, self.sep, np.ascontiguousarray(pos, dtype=np.int64), c, 0)
        return c

    def doc_of(self, pos: np.ndarray) -> np.ndarray:
        """Global document id of each position."""
        i = np.searchsorted(self.doc_starts, pos, "right") - 1
        return self.doc_ids[np.clip(i, 0, len(self.doc_ids) - 1)]


def brute_force_match(tokens: np.ndarray, context, max_span: int):
    """Reference: (longest m <= max_span such that context[-m:] occurs in ``tokens``, sorted end positions)."""
    t = [int(x) for x in tokens]
    ctx = [int(x) for x in context][-max_span:]
    for m in range(len(ctx), 0, -1):
        pat = ctx[-m:]
        ends = [i + m - 1 for i in range(len(t) - m + 1) if t[i:i + m] == pat]
        if ends:
            return m, ends
    return 0, []
