"""FR-Spec: the K most frequent tokens of a corpus, to which a draft model's output layer is cut.

Counts come from an index built by ``index-build`` (free: each shard's bucket table already holds every
token's count) or from text files (tokenised here). A draft limited to them stays lossless: its drafts
are point masses that the target verifies as always; it only proposes fewer distinct tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..datastore.index_format import MANIFEST_NAME, tokenizer_fingerprint

TEXT_SUFFIXES = {".txt", ".md", ".jsonl", ".json"}


def token_counts(sources: Sequence[str | Path], tokenizer, vocab_size: int) -> np.ndarray:
    """[vocab_size] int64 token counts over ``sources``: index folders (their tokenizer must be
    ``tokenizer``) and text files or folders of them (.txt, .md, .json, .jsonl: read as text)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder (FR-Spec token counts)")
        if (path / MANIFEST_NAME).exists():
            counts += _index_counts(path, tokenizer, vocab_size)
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        for f in files:
            ids = tokenizer(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
            ids = np.asarray(ids, dtype=np.int64)
            counts += np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)[:vocab_size]
    if counts.sum() == 0:
        raise ValueError(f"no tokens found in {', '.join(map(str, sources))} (FR-Spec token counts)")
    return counts


def _index_counts(path: Path, tokenizer, vocab_size: int) -> np.ndarray:
    from ..datastore.index import DatastoreIndex

    with DatastoreIndex.open(path, load_faiss=False) as index:
        if tokenizer is not None and index.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{path}: the index was built with another tokenizer than the model's")
        out = np.zeros(vocab_size, dtype=np.int64)
        for shard in index.shards:
            c = np.diff(np.asarray(shard.buckets, dtype=np.int64))
            n = min(len(c), vocab_size)
            out[:n] += c[:n]
    return out


def frequent_token_ids(counts: np.ndarray, k: int, always: Sequence[int] = ()) -> np.ndarray:
    """[<= k + len(always)] sorted ids: the ``k`` most counted tokens (ties to the lower id) plus ``always``
    (e.g. the EOS tokens, which a corpus may never contain but every answer ends with)."""
    if k < 1:
        raise ValueError("the FR-Spec vocabulary needs k >= 1 tokens")
    order = np.argsort(-np.asarray(counts), kind="stable")[: int(k)]
    return np.unique(np.concatenate([order, np.asarray(list(always), dtype=np.int64)])).astype(np.int64)
