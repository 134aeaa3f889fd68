"""Whether a draft model folder can draft for a target: same token ids, same vocabulary, and (for drafts
that reuse the target's embedding) the same hidden size. Called by the draft-model drafter before it
loads a draft, and by ``draft-model distill`` before it resumes or starts from an existing draft.

A draft made by ``draft-model distill`` says in its ``distill.json`` that it shares the target's embedding
(``"shares_target_embedding": true``); for such a draft a different hidden size means it was made for
another model. Other drafts (any small HF causal LM with the target's tokenizer) may have any width.

Reads only config and tokenizer files: no weights are loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..datastore.index_format import tokenizer_fingerprint

#: what ``draft-model distill`` writes next to the weights: the recipe, the figures, the sharing flag
DISTILL_FILE = "distill.json"


class DraftIncompatibleError(ValueError):
    """The draft folder cannot draft for this target (tokenizer, vocabulary or hidden size differ), or is
    not a model folder. A ValueError, so every CLI reports it as bad input (one line, exit status 2)."""


@dataclass(frozen=True)
class DraftInfo:
    """What the check learnt: the draft's config (a transformers PretrainedConfig), its tokenizer
    fingerprint, and whether it shares (was built around) the target's embedding."""

    folder: Path
    config: object
    fingerprint: str
    shares_embedding: bool


def read_distill_info(folder: Union[str, Path]) -> Optional[dict]:
    """The folder's ``distill.json`` as a dict, or None when there is none (not made by distill)."""
    p = Path(folder) / DISTILL_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DraftIncompatibleError(f"{p}: unreadable ({e})") from None


def _config_of(target_model_or_config):
    """A model's ``.config``, or the config itself."""
    return getattr(target_model_or_config, "config", target_model_or_config)


def check_draft_compatible(target_model_or_config, target_tokenizer, draft_folder: Union[str, Path], *,
                           shared_embedding: Optional[bool] = None) -> DraftInfo:
    """Raise DraftIncompatibleError unless ``draft_folder`` can draft for the target; return DraftInfo.

    target_model_or_config: the target (a transformers model) or its config; target_tokenizer: the
    target's tokenizer (compared by ``tokenizer_fingerprint``: equal fingerprints <=> same token ids).
    shared_embedding: whether the draft must have the target's hidden size (it reuses the target's
    embedding); None = as the draft's ``distill.json`` says (False for a folder without one).
    """
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(draft_folder).expanduser()
    if not folder.is_dir():
        raise DraftIncompatibleError(f"draft model {folder}: not a folder (give a Hugging Face model folder)")
    if not (folder / "config.json").exists():
        raise DraftIncompatibleError(f"draft model {folder}: no config.json (not a Hugging Face model folder, or "
                                     "a distill run that has not written its draft yet)")
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DraftIncompatibleError(f"draft model {folder}: unreadable config.json ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise DraftIncompatibleError(f"draft model {folder}: no usable tokenizer files ({type(e).__name__}); a "
                                     "draft folder must carry the target's tokenizer") from None
    fp, want_fp = tokenizer_fingerprint(tok), tokenizer_fingerprint(target_tokenizer)
    if fp != want_fp:
        raise DraftIncompatibleError(
            f"draft model {folder}: its tokenizer (fingerprint {fp}, {len(tok):,} tokens) differs from the "
            f"target's (fingerprint {want_fp}, {len(target_tokenizer):,} tokens): its token ids mean other "
            "text; use a draft made for this target (draft-model distill --model <target>)")
    tcfg = _config_of(target_model_or_config)
    tv, dv = getattr(tcfg, "vocab_size", None), getattr(cfg, "vocab_size", None)
    if tv is not None and dv != tv:
        raise DraftIncompatibleError(f"draft model {folder}: vocabulary size {dv} differs from the target's {tv} "
                                     "(their logits would not line up)")
    info = read_distill_info(folder)
    shares = bool(info and info.get("shares_target_embedding")) if shared_embedding is None else shared_embedding
    th, dh = getattr(tcfg, "hidden_size", None), getattr(cfg, "hidden_size", None)
    if shares and th is not None and dh != th:
        raise DraftIncompatibleError(
            f"draft model {folder}: hidden size {dh} differs from the target's {th}, but the draft is meant to "
            "share the target's embedding: it was made for another model")
    return DraftInfo(folder, cfg, fp, shares)
