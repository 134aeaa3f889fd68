"""The read side of an index built by ``index-build``: memory-mapped shards, retrieval trees, FAISS search.

``DatastoreIndex.open(path)`` maps every shard (tokens, reverse suffix array, buckets, document table) and,
optionally, the FAISS index. ``retrieve(context, budget)`` returns the probability-pruned continuation tree
of the longest context suffix found in the corpus or in the session memory (REST + RASD pruning; the loops
are compiled, datastore/kernels.py); ``search_documents(query)`` returns
the documents whose chunks are nearest to a query (dense retrieval, for sessions).
No torch here: the query embedder is the numpy encoder of ``datastore/embedder.py``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .index_format import (FAISS_CHUNKS, FAISS_INDEX, MANIFEST_NAME, IndexFormatError, IndexManifest, check_files,
                           faiss_path, shard_path)
from .kernels import count_and_cut, lookup_one_shard
from .memory import match_memory, memory_continuations
from .suffix_shard import Shard
from .tree_fusion import hint_args


@dataclass(frozen=True)
class RetrievalResult:
    tokens: np.ndarray        # [n] int32 drafted tokens (the root = last context token is NOT included)
    parents: np.ndarray       # [n] int32 parent index into these arrays, -1 = child of the root; parents[i] < i
    probs: np.ndarray         # [n] float32 conditional probability P(node | parent)
    in_documents: np.ndarray  # [n] bool: node supported by a match inside the session's documents
    in_memory: np.ndarray     # [n] bool: node supported by a match inside the session memory (own tokens)
    match_len: int            # length of the context suffix that matched (0 = no match)

    @classmethod
    def empty(cls, match_len: int = 0) -> "RetrievalResult":
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, bool),
                   np.zeros(0, bool), match_len)

    def __len__(self) -> int:
        return int(len(self.tokens))


_EMPTY = RetrievalResult.empty()
_NO_TOKENS = np.zeros(0, np.int64)


def _usable_memory(memory, ctx: np.ndarray) -> Optional[np.ndarray]:
    """The session memory as a flat array, or None when there is none or it does not end with the
    context (then it is some other history: matching in it would draft for the wrong place)."""
    if memory is None or not len(ctx):
        return None
    mem = np.asarray(memory).ravel()
    return mem if len(mem) >= 2 and int(mem[-1]) == int(ctx[-1]) else None


def _as_filter(doc_filter) -> Optional[np.ndarray]:
    if doc_filter is None:
        return None
    arr = np.unique(np.asarray(list(doc_filter) if not isinstance(doc_filter, np.ndarray) else doc_filter,
                               dtype=np.int64))
    return arr


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    i = np.searchsorted(sorted_set, values)
    i = np.minimum(i, len(sorted_set) - 1)
    return sorted_set[i] == values


def build_tree(conts: np.ndarray, in_doc: np.ndarray, budget: int, min_prob: float,
               hint_tokens=None, hint_probs=None, hint_confident: float = 0.8, in_mem: Optional[np.ndarray] = None):
    """Count continuation rows into a trie and cut it (see ``DatastoreIndex.retrieve``).

    conts: [M, D] int64 tokens, -1 after the end of a row; in_doc, in_mem: [M] bool row flags (None = all
    False for in_mem). P(node | parent) = rows through the node / rows through the parent (the root's
    count is M). With a hint, first-level probabilities become sqrt(freq * hint) (a token the hint lacks
    gets the hint's leftover mass, and is dropped when the hint's top probability >= ``hint_confident``).
    Nodes below ``min_prob`` go with their subtrees; then the ``budget`` nodes with the highest path
    probability stay (ties to the older node, so the result is closed under parents).
    Returns (tokens int32, parents int32, probs float32, in_documents, in_memory) with parents[i] < i
    (-1 = child of the root), a node's flag being the OR over the rows through it; or None if empty.
    The loops are compiled (datastore/kernels.py).
    """
    M, D = conts.shape
    if M == 0 or D == 0 or budget <= 0:
        return None
    hint = hint_args(hint_tokens, hint_probs, hint_confident)
    fdoc = np.ascontiguousarray(in_doc, dtype=np.bool_)
    fmem = np.zeros(M, np.bool_) if in_mem is None else np.ascontiguousarray(in_mem, dtype=np.bool_)
    out = count_and_cut(np.ascontiguousarray(conts, dtype=np.int64), fdoc, fmem, int(budget), float(min_prob),
                        *hint)
    return out if len(out[0]) else None


def _manifest_stamp(path: Path) -> tuple:
    """(inode, mtime ns) of ``path``'s manifest: a published snapshot's manifest is a new file."""
    try:
        st = (path / MANIFEST_NAME).stat()
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None, None


class DatastoreIndex:
    path: Path
    manifest: dict
    index_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    num_tokens: int
    num_documents: int

    def __init__(self, path: Path, manifest: dict, shards: list, faiss_index=None, chunks=None):
        self.path = path
        self.manifest = manifest
        self.index_id = manifest["index_id"]
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]
        self.vocab_size = int(manifest["vocab_size"])
        self.num_tokens = int(manifest["stats"]["num_tokens"])
        self.num_documents = int(manifest["stats"]["num_documents"])
        self.token_dtype = manifest["token_dtype"]
        self.shards: list[Shard] = shards
        self._faiss = faiss_index
        self._chunks = chunks
        self._embedder = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, path, *, load_faiss: bool = True, verify: bool = False,
             shard_group: Optional[tuple[int, int]] = None) -> "DatastoreIndex":
        """Map an index. ``verify=True`` also checks every file's sha256 (reads everything once).
        ``shard_group=(i, n)`` maps only the shards whose position p has ``p % n == i``: one of n processes
        (or machines) that serve an index together, each a share of the corpus (``datastore-serve
        --shard-group i/n``; clients fan a lookup out to all n and fuse the trees).

        The files are opened by path, so a new index published at ``path`` meanwhile (index-build swaps the
        folder) could mix its files with the old manifest's: the manifest's inode is compared before and
        after, and a changed one means open again (the snapshot that is there now)."""
        path = Path(path)
        for _ in range(3):
            before = _manifest_stamp(path)
            index = cls._open_once(path, load_faiss, verify, shard_group)
            if _manifest_stamp(path) == before:
                return index
            index.close()
        raise IndexFormatError(f"{path}: replaced by new snapshots three times while being opened")

    @classmethod
    def _open_once(cls, path: Path, load_faiss: bool, verify: bool,
                   shard_group: Optional[tuple[int, int]] = None) -> "DatastoreIndex":
        m = IndexManifest.load(path)
        mine = m.shards
        if shard_group is not None:
            i, n = shard_group
            mine = [sh for p, sh in enumerate(m.shards) if p % n == i]
            if not mine:
                raise IndexFormatError(f"{path}: shard group {i}/{n} holds none of the index's {len(m.shards)} shards")
        try:
            for sh in mine:
                check_files(shard_path(path, sh["name"]), sh["files"], verify)
            if load_faiss and m.faiss:
                check_files(faiss_path(path), m.faiss["files"], verify)
            shards = []
            for sh in mine:
                s = Shard.load(shard_path(path, sh["name"]), sh["name"])
                if s.tokens.dtype.name != m.token_dtype or len(s.rsa) != len(s.tokens):
                    raise IndexFormatError(f"{shard_path(path, sh['name'])}: arrays disagree with the manifest")
                shards.append(s)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{path}: unreadable index file: {e}") from None
        faiss_index = chunks = None
        if load_faiss and m.faiss:
            import faiss

            fdir = faiss_path(path)
            try:
                faiss_index = faiss.read_index(str(fdir / FAISS_INDEX), faiss.IO_FLAG_MMAP)
            except RuntimeError:
                faiss_index = faiss.read_index(str(fdir / FAISS_INDEX))
            nprobe = int(m.faiss.get("nprobe") or 0)
            if nprobe:
                try:
                    faiss.extract_index_ivf(faiss_index).nprobe = nprobe
                except RuntimeError:
                    pass
            chunks = np.load(fdir / FAISS_CHUNKS, mmap_mode="r")
        return cls(path, m.to_dict(), shards, faiss_index, chunks)

    def close(self) -> None:
        self.shards = []
        self._faiss = None
        self._chunks = None
        self._embedder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def verify(self) -> None:
        """Check every file against the manifest's sha256 (IndexFormatError on the first mismatch)."""
        for sh in self.manifest["shards"]:
            check_files(shard_path(self.path, sh["name"]), sh["files"], True)
        if self.manifest.get("faiss"):
            check_files(faiss_path(self.path), self.manifest["faiss"]["files"], True)

    # ------------------------------------------------------------------------------------ lookups
    @property
    def has_faiss(self) -> bool:
        return self._faiss is not None

    def document_ids_for(self, shard: int, positions) -> np.ndarray:
        """Global document ids of token positions inside shard number ``shard``."""
        return self.shards[shard].doc_of(np.asarray(positions, dtype=np.int64))

    def document_tokens(self, doc_id: int) -> np.ndarray:
        """The tokens of one document (int32), or an empty array for an unknown id."""
        for s in self.shards:
            j = np.searchsorted(s.doc_ids, doc_id)
            if j < len(s.doc_ids) and s.doc_ids[j] == doc_id:
                return np.asarray(s.tokens[s.doc_starts[j]:s.doc_starts[j + 1] - 1], dtype=np.int32)
        return np.zeros(0, np.int32)

    def longest_match(self, context, max_span: int = 16):
        """(match length, [(shard number, lo, hi)]) of the longest context suffix (<= max_span tokens);
        the occurrences in a shard are the positions ``shard.rsa[lo:hi]``."""
        max_span = min(int(max_span), 4000)
        ctx = np.asarray(context, dtype=np.int64).ravel()[-max_span:] if max_span > 0 else np.zeros(0, np.int64)
        rev = ctx[::-1].copy()
        best = 0
        found = []
        for si, s in enumerate(self.shards):
            m, lo, hi = s.match(rev)
            if m == 0 or m < best:
                continue
            if m > best:
                best, found = m, []
            found.append((si, lo, hi))
        return best, found

    def retrieve(self, context, budget: int, *, max_span: int = 16, min_span: int = 2, max_matches: int = 64,
                 depth: int = 8, min_prob: float = 0.1, doc_filter=None, hint_tokens=None,
                 hint_probs=None, memory=None, memory_matches: int = 16) -> RetrievalResult:
        """Probability-pruned continuation tree of the longest context suffix found in the corpus (or in
        the session memory).

        1. longest suffix of ``context`` (at most ``max_span`` tokens, at least ``min_span``) occurring in
           any shard, and, with ``memory`` (the session's own token history, ending with the context),
           earlier in that history; the longer match wins, both are used on a tie;
        2. up to ``max_matches`` of its corpus occurrences (evenly spread over all of them; with
           ``doc_filter`` those inside the filter documents come first) and the ``memory_matches`` most
           recent memory occurrences; 3. up to ``depth`` following tokens of each, stopping at the end of
           its document; 4. a trie with P(child | parent) = count ratio (the root's count is the number of
           matches used); 5. first-level probabilities fused with a draft-model hint as sqrt(freq * hint)
           (absent tokens get the hint's leftover mass; when the hint's top probability >= 0.8 absent
           tokens are dropped); 6. nodes below ``min_prob`` are dropped with their subtrees; 7. the
           ``budget`` nodes with the highest path probability are kept (closed under parents, preorder so
           parents[i] < i).
        """
        if budget <= 0 or depth <= 0 or max_matches <= 0:
            return _EMPTY
        depth = min(int(depth), 4000)
        if len(self.shards) == 1 and doc_filter is None:
            return self._retrieve_one_shard(context, int(budget), max_span, min_span, max_matches, depth,
                                            float(min_prob), memory, memory_matches,
                                            hint_args(hint_tokens, hint_probs))
        m, found = self.longest_match(context, max_span)
        m_mem, q_mem = 0, None
        ctx = np.asarray(context).ravel()
        mem = _usable_memory(memory, ctx)
        if mem is not None and memory_matches > 0:
            m_mem, q_mem = match_memory(mem, min(int(max_span), len(ctx)))
        best = max(m, m_mem)
        if best == 0 or best < max(1, min_span):
            return _EMPTY
        rows, doc_flags, mem_flags = [], [], []
        if m == best:
            for si, pos, fl in self._corpus_picks(found, doc_filter, max_matches):
                if len(pos):
                    rows.append(self.shards[si].continuations(pos, depth))
                    doc_flags.append(fl)
                    mem_flags.append(np.zeros(len(pos), bool))
        if m_mem == best:
            q = q_mem[-int(memory_matches):]
            rows.append(memory_continuations(mem, q, depth))
            doc_flags.append(np.zeros(len(q), bool))
            mem_flags.append(np.ones(len(q), bool))
        if not rows:
            return RetrievalResult.empty(best)
        one = len(rows) == 1
        C = rows[0] if one else np.concatenate(rows)
        Fd = doc_flags[0] if one else np.concatenate(doc_flags)
        Fm = (mem_flags[0] if one else np.concatenate(mem_flags)) if m_mem == best else None
        tree = build_tree(C, Fd, budget, min_prob, hint_tokens, hint_probs, in_mem=Fm)
        if tree is None:
            return RetrievalResult.empty(best)
        return RetrievalResult(*tree, match_len=best)

    def _retrieve_one_shard(self, context, budget, max_span, min_span, max_matches, depth, min_prob, memory,
                            memory_matches, hint) -> RetrievalResult:
        """``retrieve`` for one shard without document filter: one compiled call (the service's usual
        request; a lookup is dominated by per-call overhead, not by its work)."""
        max_span = min(int(max_span), 4000)
        ctx = np.asarray(context).ravel()
        rev = ctx[len(ctx) - min(max_span, len(ctx)):][::-1].astype(np.int64) if max_span > 0 else _NO_TOKENS
        mem = _usable_memory(memory, ctx)
        s = self.shards[0]
        best, tok, par, prob, ind, inm = lookup_one_shard(
            s.tokens, s.rsa, s.buckets, rev, s.vocab, s.sep, _NO_TOKENS if mem is None else mem,
            min(max_span, len(ctx)), int(memory_matches),
            int(max_matches), depth, int(min_span), budget, min_prob, *hint)
        if best == 0:
            return _EMPTY
        return RetrievalResult(tok, par, prob, ind, inm, int(best))

    def _corpus_picks(self, found, doc_filter, max_matches: int) -> list:
        """[(shard, positions int64, in_filter bool)] of at most ~``max_matches`` corpus occurrences, spread
        evenly over each shard's range (and over shards in proportion to their counts)."""
        filt = _as_filter(doc_filter)
        total = sum(hi - lo for _, lo, hi in found)
        picks = []
        if filt is None or len(filt) == 0:
            for si, lo, hi in found:
                cnt = hi - lo
                if total <= max_matches:
                    pos = self.shards[si].rsa[lo:hi].astype(np.int64)
                else:
                    take = min(cnt, max(1, round(max_matches * cnt / total)))
                    pos = self.shards[si].rsa[lo + (np.arange(take, dtype=np.int64) * cnt) // take].astype(np.int64)
                picks.append((si, pos, np.zeros(len(pos), bool)))
            return picks
        scan = max(4096, 16 * max_matches)
        inside, outside = [], []
        for si, lo, hi in found:
            cnt = hi - lo
            k = min(cnt, scan)
            pos = self.shards[si].rsa[lo + (np.arange(k, dtype=np.int64) * cnt) // k].astype(np.int64)
            ok = _in_sorted(self.shards[si].doc_of(pos), filt)
            inside.append((si, pos[ok]))
            outside.append((si, pos[~ok]))
        n_in = sum(len(p) for _, p in inside)
        room = max_matches - min(n_in, max_matches)
        for si, pos in inside:
            if n_in > max_matches:
                take = max(1, round(max_matches * len(pos) / n_in)) if len(pos) else 0
                pos = pos[(np.arange(take) * len(pos)) // max(take, 1)] if take else pos[:0]
            picks.append((si, pos, np.ones(len(pos), bool)))
        n_out = sum(len(p) for _, p in outside)
        for si, pos in outside:
            if room <= 0 or len(pos) == 0:
                continue
            take = min(len(pos), max(1, round(room * len(pos) / n_out)))
            pos = pos[(np.arange(take) * len(pos)) // take]
            picks.append((si, pos, np.zeros(len(pos), bool)))
        return picks

    # ------------------------------------------------------------------------------------ dense search
    def _get_embedder(self):
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    from .embedder import default_embedder_path, get_embedder

                    f = self.manifest["faiss"]["embedder"]
                    p = Path(f.get("path") or "")
                    if not (p / "model.safetensors").exists():
                        p = default_embedder_path()
                    self._embedder = get_embedder(p)
        return self._embedder

    def embed(self, texts) -> np.ndarray:
        return self._get_embedder().encode(list(texts))

    def search_chunks(self, query: str, k: int = 8):
        """(scores float32 [k'], chunk rows int64 [k', 4] = doc id, shard, start, end) of the nearest chunks."""
        if self._faiss is None or self._faiss.ntotal == 0:
            return np.zeros(0, np.float32), np.zeros((0, 4), np.int64)
        q = self.embed([query])
        D, I = self._faiss.search(q, int(min(k, self._faiss.ntotal)))
        ok = I[0] >= 0
        return D[0][ok], np.asarray(self._chunks[I[0][ok]], dtype=np.int64)

    def search_documents(self, query: str, k: int = 8) -> np.ndarray:
        """int64 ids of up to ``k`` distinct documents whose chunks are nearest to ``query`` (FAISS, inner
        product on normalised embeddings); empty when the index has no FAISS part."""
        if self._faiss is None or k <= 0:
            return np.zeros(0, np.int64)
        _, rows = self.search_chunks(query, k * 4)
        docs = rows[:, 0]
        _, first = np.unique(docs, return_index=True)
        return docs[np.sort(first)][:k].astype(np.int64)

    def stats(self) -> dict:
        return dict(self.manifest["stats"], index_id=self.index_id, token_dtype=self.token_dtype,
                    vocab_size=self.vocab_size, faiss=bool(self._faiss))
