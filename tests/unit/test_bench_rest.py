"""REST's draftretriever wrapped as a drafter (benchmark comparison only)."""
import numpy as np
import pytest

pytest.importorskip("draftretriever")

from specstore.bench.rest_drafter import RestDrafter, build_rest_index  # noqa: E402
from specstore.client.types import DecodeContext  # noqa: E402
from specstore.indexers.build import BuildOptions, build_index  # noqa: E402


def test_rest_drafter_proposes_corpus_continuations(tmp_path):
    docs = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 5, 6, 7, 11, 12], [20, 21, 22]]
    build_index([], tmp_path / "ix", BuildOptions(progress=False), token_docs=docs, vocab_size=64, log=lambda *_: None)
    rest = build_rest_index(tmp_path / "ix", tmp_path / "ix.draftretriever.idx")
    d = RestDrafter(rest)
    tree = d.propose(DecodeContext(np.array([40, 5, 6, 7]), 4), budget=16)
    paths = {tuple(int(tree.tokens[j]) for j in tree.path_to(i)) for i in range(1, len(tree))}
    assert (8,) in paths and (11,) in paths
    assert tree.root == 7
    assert d.propose(DecodeContext(np.array([50, 51]), 2), 16).num_drafts == 0
