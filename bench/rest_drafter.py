"""REST's ``draftretriever`` as a drafter, for side-by-side benchmarks only (not used by the product).

REST answers the longest context suffix (tried from ``max_span`` down to ``min_span`` tokens) with up to
``choices`` continuation paths and no probabilities; every node gets the same estimate, and our budget
controller calibrates it like any other source. draftretriever inserts every query into its index, so
its answers depend on earlier queries: make one ``RestDrafter`` (one Reader) per workload.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..client.types import DecodeContext, Drafter, DraftTree, Source


def build_rest_index(index_dir: str | Path, out_file: str | Path) -> Path:
    """A draftretriever index over the same token documents as one of our indexes (cached by path)."""
    import draftretriever

    from ..datastore.durable import atomic_path
    from ..datastore.index import DatastoreIndex

    out = Path(out_file)
    if out.exists():
        return out
    ix = DatastoreIndex.open(index_dir, load_faiss=False)
    with atomic_path(out) as tmp:
        w = draftretriever.Writer(str(tmp), vocab_size=ix.vocab_size)
        for s in ix.shards:
            toks = np.asarray(s.tokens)
            for j in range(len(s.doc_ids)):
                a, b = int(s.doc_starts[j]), int(s.doc_starts[j + 1]) - 1  # drop the document separator
                w.add_entry(toks[a:b].astype(np.int64).tolist())
        w.finalize()
    return out


class RestDrafter(Drafter):
    source = Source.DATASTORE

    def __init__(self, rest_index_file: str | Path, max_span: int = 16, min_span: int = 2, choices: int = 64,
                 prob: float = 0.5):
        import draftretriever

        self.reader = draftretriever.Reader(str(rest_index_file))
        self.max_span, self.min_span, self.choices, self.prob = max_span, min_span, choices, prob

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        root = ctx.last_token
        tail = ctx.tokens[-self.max_span:].tolist()
        for span in range(len(tail), self.min_span - 1, -1):
            found = self.reader.search(tail[-span:], choices=min(self.choices, max(budget, 1)))
            paths = [[t for t in p if t >= 0] for p in found[0]]
            paths = [p for p in paths if p]
            if paths:
                return DraftTree.from_paths(root, paths, Source.DATASTORE, [[self.prob] * len(p) for p in paths])
        return DraftTree.empty(root)
