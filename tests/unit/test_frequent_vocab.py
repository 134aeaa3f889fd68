"""FR-Spec token counts: from an index's bucket tables and from text files."""
import numpy as np
import pytest

from specstore.client.frequent_vocab import frequent_token_ids, token_counts
from specstore.indexers.build import BuildOptions, build_index


def test_index_counts_equal_the_corpus_counts(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 40, rng.integers(1, 60)).tolist() for _ in range(30)]
    build_index(None, tmp_path / "i", BuildOptions(progress=False, shard_tokens=300), token_docs=docs, vocab_size=50)
    counts = token_counts([tmp_path / "i"], None, 50)
    assert counts.tolist() == np.bincount(np.concatenate(docs), minlength=50).tolist()


def test_text_counts_and_top_k(tmp_path):
    from tests.unit.test_index_build import _big_vocab_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_big_vocab_tokenizer(tmp_path / "tok", n=20)))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("w3 w3 w3 w5 w5 w7")
    (tmp_path / "t" / "b.md").write_text("w5 w9")
    counts = token_counts([tmp_path / "t"], tok, 20)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("w3", "w5", "w7", "w9")}
    assert counts[ids["w3"]] == 3 and counts[ids["w5"]] == 3 and counts[ids["w9"]] == 1
    top = frequent_token_ids(counts, 2, always=[0])
    assert set(top.tolist()) == {ids["w3"], ids["w5"], 0}
    with pytest.raises(ValueError, match="no such file"):
        token_counts([tmp_path / "missing"], tok, 20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokens"):
        token_counts([tmp_path / "empty"], tok, 20)
    with pytest.raises(ValueError, match="k >= 1"):
        frequent_token_ids(counts, 0)
