"""The token corpus a draft is distilled on: an index's token shards or text files, cut into equal windows,
split into training and held-out windows, and served in a seeded order that a resumed run replays exactly.

Documents are joined into one stream with the target's end-of-sequence token after each (the boundary the
target itself knows) and cut into ``seq_len``-token windows, so no padding is needed; the target sees the
same windows, so a window that crosses a boundary still teaches the draft what the target does there.

Text inputs (``--text``): ``.txt``/``.md`` files (one document each) and JSON lines files with a ``"text"``
field (one document per line); folders are read recursively (other files are skipped and counted). Other
formats (JSON arrays, Parquet, datasets folders, templates) go through ``index-build`` first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..datastore.index_format import IndexFormatError, tokenizer_fingerprint
from .cli_support import iter_jsonl

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


@dataclass
class Corpus:
    """stream: int32 [n_tokens] documents joined by EOS; source: what it was read from (recipe key);
    documents: count; skipped_files: unreadable kinds found in folders."""

    stream: np.ndarray
    source: dict
    documents: int
    skipped_files: list = field(default_factory=list)


def index_corpus(path, tokenizer, vocab_size: int, eos_id: int) -> Corpus:
    """Every document of the index at ``path`` (its token shards, in order), joined by ``eos_id``.

    ValueError when the index is unreadable, was built with another tokenizer, or its token space does not
    fit the target's ``vocab_size``.
    """
    from ..datastore.index import DatastoreIndex

    try:
        ix = DatastoreIndex.open(path, load_faiss=False)
    except IndexFormatError as e:
        raise ValueError(f"--index {path}: {e}") from None
    try:
        want = tokenizer_fingerprint(tokenizer)
        if ix.tokenizer_fingerprint != want:
            raise ValueError(f"--index {path}: built with another tokenizer (fingerprint {ix.tokenizer_fingerprint}, "
                             f"the target's is {want}); rebuild it with index-build --model <target>")
        if ix.vocab_size > vocab_size:
            raise ValueError(f"--index {path}: vocabulary of {ix.vocab_size} tokens, more than the target's {vocab_size}")
        parts = []
        for sh in ix.shards:
            t = np.asarray(sh.tokens)
            # a shard is SEP d0 SEP d1 ... SEP: drop the first SEP, turn the others into EOS after each document
            body = t[1:].astype(np.int32)
            body[t[1:] == sh.sep] = eos_id
            parts.append(body)
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return Corpus(stream, {"kind": "index", "path": str(Path(path).resolve()), "index_id": ix.index_id},
                      ix.num_documents)
    finally:
        ix.close()


def _expand(inputs: Iterable, skipped: list) -> list[Path]:
    """Files to read, in a stable order: given files as they are, folders' known files sorted."""
    files = []
    for inp in inputs:
        p = Path(inp).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"--text {inp}: no such file or folder")
        if p.is_file():
            files.append(p)
            continue
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            if f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES:
                files.append(f)
            else:
                skipped.append(str(f))
    return files


def _documents(path: Path) -> Iterator[str]:
    if path.suffix.lower() not in JSONL_SUFFIXES:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--text {path}: not UTF-8 text") from None
        return
    try:
        for i, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{i}: no string \"text\" field (for other layouts build an index with "
                                 "index-build --text-field/--template and pass --index)")
            yield rec["text"]
    except UnicodeDecodeError:
        raise ValueError(f"--text {path}: not UTF-8 text") from None


def text_corpus(inputs: list, tokenizer, eos_id: int, batch_docs: int = 256) -> Corpus:
    """The documents of ``inputs`` (files and folders) tokenised with ``tokenizer``, joined by ``eos_id``."""
    skipped: list = []
    files = _expand(inputs, skipped)
    parts, docs, batch = [], 0, []

    def flush():
        nonlocal batch
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos_id], np.int32))
        batch = []

    for f in files:
        for text in _documents(f):
            if not text.strip():
                continue
            batch.append(text)
            docs += 1
            if len(batch) >= batch_docs:
                flush()
    if batch:
        flush()
    sig = [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return Corpus(stream, {"kind": "text", "files": sig}, docs, skipped)


@dataclass
class Windows:
    """train: int32 [n_train, seq_len]; held_out: int32 [n_held, seq_len] (never trained on)."""

    train: np.ndarray
    held_out: np.ndarray


def split_windows(stream: np.ndarray, seq_len: int, holdout: float, seed: int) -> Windows:
    """Cut ``stream`` into ``seq_len`` windows; a seeded ``holdout`` share (at least one) is held out.

    ValueError when there are fewer than two windows (nothing to train on, or nothing to measure)."""
    n = len(stream) // seq_len
    if len(stream) == 0:
        raise ValueError("the corpus is empty: no documents with text")
    if n < 2:
        raise ValueError(f"the corpus holds {len(stream)} tokens: too few for two windows of --seq-len {seq_len} "
                         "(one to train on, one held out); give more text or a smaller --seq-len")
    w = stream[: n * seq_len].reshape(n, seq_len)
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, int(round(holdout * n))))
    held = np.sort(order[:k])
    train = np.sort(order[k:])
    return Windows(np.ascontiguousarray(w[train]), np.ascontiguousarray(w[held]))


def batch_rows(n_train: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Row numbers (into ``Windows.train``) of the 0-based training step ``step``: epoch after epoch, each
    a fresh seeded permutation, so a resumed run needs only the step to find its place in the data."""
    first = step * batch
    rows = []
    perm_epoch, perm = -1, None
    for pos in range(first, first + batch):
        epoch, i = divmod(pos, n_train)
        if epoch != perm_epoch:
            perm = np.random.default_rng([seed, epoch]).permutation(n_train)
            perm_epoch = epoch
        rows.append(perm[i])
    return np.asarray(rows, np.int64)


def data_position(n_train: int, batch: int, step: int) -> dict:
    """Where ``step`` steps leave the data: windows consumed, epoch, row within the epoch (for reports)."""
    seen = step * batch
    return {"windows_seen": seen, "epoch": seen // max(1, n_train), "row_in_epoch": seen % max(1, n_train)}


def eos_token_id(tokenizer, config) -> int:
    """The token that ends a document: the tokenizer's EOS, else the config's, else ValueError."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("the target has no end-of-sequence token (tokenizer or config): cannot join documents")
    return int(eos)


def load_corpus(index: Optional[str], texts: Optional[list], tokenizer, config) -> Corpus:
    """The corpus from ``--index``, ``--text`` or both (the index's documents first); ValueError on bad input."""
    if not index and not texts:
        raise ValueError("no corpus: give --index DIR (built by index-build) or --text FILE_OR_FOLDER...")
    eos = eos_token_id(tokenizer, config)
    parts = []
    if index:
        parts.append(index_corpus(index, tokenizer, int(config.vocab_size), eos))
    if texts:
        parts.append(text_corpus(texts, tokenizer, eos))
    if len(parts) == 1:
        return parts[0]
    a, b = parts
    return Corpus(np.concatenate([a.stream, b.stream]), {"index": a.source, "text": b.source},
                  a.documents + b.documents, a.skipped_files + b.skipped_files)
