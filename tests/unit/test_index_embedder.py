"""The numpy BERT encoder equals transformers' torch BertModel (+ mean pooling, L2) to ~1e-4."""
from __future__ import annotations

import numpy as np
import pytest

from specstore.datastore.embedder import NumpyEmbedder, default_embedder_path, embedder_id, get_embedder

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. " * 40,        # longer than 256 word pieces: truncated
    "def add(a, b):\n    return a + b",
    "a",
    "Ünïcödé and emoji 🚀 text, with punctuation!?",
]


def test_numpy_encoder_matches_torch():
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    path = default_embedder_path()
    emb = get_embedder(path)
    got = emb.encode(TEXTS, batch_size=2)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    b = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_encoder_basics():
    emb = get_embedder()
    assert emb is get_embedder(default_embedder_path())       # cached per folder
    assert emb.encode([]).shape == (0, 384)
    a = emb.encode(["same text", "other words entirely"], batch_size=1)
    b = emb.encode(["other words entirely", "same text"], batch_size=2)
    assert np.allclose(a[::-1], b, atol=1e-5)                  # batching/padding does not change results
    assert embedder_id(default_embedder_path()).startswith("all-MiniLM-L6-v2-")


def test_rejects_non_bert_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_act": "silu"}')
    with pytest.raises(ValueError, match="BERT"):
        NumpyEmbedder(tmp_path)
