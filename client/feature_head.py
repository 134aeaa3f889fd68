"""A feature-level draft head (EAGLE-style): one decoder layer that reads the target's own last hidden state.

A small draft LM has to predict the target's next token from the tokens alone; a 4-layer cut of SmolLM2
agrees with it on ~30% of positions of its answers (BENCHMARKS.md, "Draft distillation"). The target's last
hidden state already holds most of what decides its next tokens, so a head that reads it needs far less.

Row ``i`` of the head reads ``(f[i-1], x[i])``: the target's final hidden state (after its final norm, the
input of its output layer) at the previous position and the token at this one. It outputs ``h[i]``, its
prediction of ``f[i]``, and the logits of the target's output layer applied to it: the next token after
``x[i]``. Row 0 reads a zero feature. So the head is a causal LM over the same rows as the target (row ``i``
predicts token ``i + 1``), and the draft-model drafter's cache and tree machinery apply unchanged; only the
input embedding differs:

    input_i = fc([f[i-1] ; embed(x[i])])          fc: Linear(2h -> h)
    h_i     = norm(layer(input_i | rows < i))      one Llama-style decoder layer, its own KV cache
    logits  = lm_head(h_i)                         the target's output layer (shared, frozen)

Tree nodes below the root have no target feature yet: a node reads its parent's ``h`` instead (EAGLE's
feature-level autoregression). Once the target has verified them, the accepted rows are fed again with the
target's real features (client/drafters/feature_head.py).

On disk a head is a folder with ``feature_head.json`` (the layer's config, the target's fingerprint and
sizes) and ``feature_head.safetensors`` (fc, the layer, the norm): the embedding and the output layer are
the target's and are not stored. ``draft-model distill --feature-head`` trains one (client/draft_distill.py).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..datastore.index_format import tokenizer_fingerprint
from .draft_build import _sub_config, layer_list
from .draft_compat import DraftIncompatibleError

HEAD_FILE = "feature_head.json"
WEIGHTS_FILE = "feature_head.safetensors"
FORMAT = "specstore-feature-head"


def is_feature_head(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` holds a feature head (else: a draft LM folder, or nothing)."""
    return (Path(folder).expanduser() / HEAD_FILE).exists()


def target_features(target, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    """The target's final hidden state at every position ([B, T, h]: its body's ``last_hidden_state``,
    after the final norm, what its output layer reads)."""
    return target.get_decoder()(input_ids=input_ids, **kw).last_hidden_state


def target_outputs(target, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states [B, T, h], logits [B, T, V]) of the target over ids ``x`` [B, T], no cache."""
    f = target_features(target, x, use_cache=False)
    return f, target.get_output_embeddings()(f)


def previous_features(features: torch.Tensor) -> torch.Tensor:
    """[B, T, h] -> [B, T, h]: row i holds ``features[:, i - 1]`` (row 0: zeros), the head's feature input."""
    return torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], dim=1)


class FeatureHead(torch.nn.Module):
    """fc + one decoder layer + final norm; embedding and output layer borrowed from the target.

    ``body`` is a one-layer model of the target's class (``LlamaModel`` for SmolLM2) whose input embedding is
    the target's: it is called with ``inputs_embeds`` and keeps its KV cache like any HF model.
    """

    def __init__(self, target, body):
        super().__init__()
        h = int(target.config.hidden_size)
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        self.body = body
        # borrowed, not owned: kept out of state_dict() and parameters()
        object.__setattr__(self, "_embed", target.get_input_embeddings())
        object.__setattr__(self, "_lm_head", target.get_output_embeddings())
        self.config = body.config

    def get_decoder(self):
        return self.body

    def set_attn_implementation(self, name: str) -> None:
        """As a transformers model's (client/gqa_attention.py switches the body's attention)."""
        self.body.set_attn_implementation(name)

    def get_output_embeddings(self):
        return self._lm_head

    def inputs(self, input_ids: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        """[B, T] ids, [B, T, h] features of the previous rows -> [B, T, h] the layer's input."""
        e = self._embed(input_ids).to(prev_features.dtype)
        return self.fc(torch.cat([prev_features, e], dim=-1))

    def forward(self, input_ids: torch.Tensor, prev_features: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [B, T, h], logits [B, T, V]); ``kw`` go to the body (position_ids, attention_mask, cache)."""
        hidden = self.body(inputs_embeds=self.inputs(input_ids, prev_features), **kw).last_hidden_state
        return hidden, self._lm_head(hidden)


def _new_body(cfg, dtype):
    from transformers import AutoModel

    return AutoModel.from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def _share_embedding(body, target) -> None:
    """The body's own (freshly allocated) embedding gives way to the target's."""
    body.set_input_embeddings(target.get_input_embeddings())


def build_feature_head(target, init_layer: int = -1) -> FeatureHead:
    """A new head for ``target`` (float32 on its device): its layer and norm copied from target layer
    ``init_layer`` (default: the last, which already maps a deep state to the output layer's space) and the
    target's final norm; fc random (torch's default init). Returns it in train mode."""
    prefix, layers = layer_list(target)
    n = len(layers)
    i = init_layer % n
    cfg = _sub_config(target.config, [i])
    body = _new_body(cfg, torch.float32)
    body.layers[0].load_state_dict(layers[i].state_dict())
    norm = getattr(target.get_decoder(), "norm", None)
    if norm is not None and hasattr(body, "norm"):
        body.norm.load_state_dict(norm.state_dict())
    _share_embedding(body, target)
    head = FeatureHead(target, body).to(device=next(target.parameters()).device, dtype=torch.float32)
    return head.train()


def save_feature_head(head: FeatureHead, folder: Union[str, Path], target, tokenizer, extra: Optional[dict] = None) -> None:
    """Write ``feature_head.safetensors`` and then ``feature_head.json`` (which marks the folder complete)."""
    from safetensors.torch import save_file

    from ..datastore.durable import atomic_open, fsync_dir

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()
             if not k.startswith("body.embed_tokens")}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    cfg = head.body.config.to_dict()
    meta = {"format": FORMAT, "format_version": 1, "config": cfg,
            "target": {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                       "hidden_size": int(target.config.hidden_size), "vocab_size": int(target.config.vocab_size),
                       "model_type": str(target.config.model_type)}}
    if extra:
        meta.update(extra)
    with atomic_open(folder / HEAD_FILE, "w") as f:
        json.dump(meta, f, indent=2)
    fsync_dir(folder)


def read_head_info(folder: Union[str, Path]) -> dict:
    p = Path(folder).expanduser() / HEAD_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DraftIncompatibleError(f"{p}: unreadable ({e})") from None


def check_head_compatible(target, tokenizer, folder: Union[str, Path]) -> dict:
    """Raise DraftIncompatibleError unless the head in ``folder`` was made for this target; returns its
    ``feature_head.json``."""
    folder = Path(folder).expanduser()
    info = read_head_info(folder)
    if info.get("format") != FORMAT:
        raise DraftIncompatibleError(f"{folder}: not a feature head ({HEAD_FILE} has format {info.get('format')!r})")
    want = info.get("target", {})
    tc = target.config
    if int(want.get("hidden_size", -1)) != int(tc.hidden_size) or int(want.get("vocab_size", -1)) != int(tc.vocab_size):
        raise DraftIncompatibleError(
            f"feature head {folder}: made for a target of hidden size {want.get('hidden_size')} and vocabulary "
            f"{want.get('vocab_size')}, this target has {tc.hidden_size} and {tc.vocab_size}")
    if tokenizer is not None and want.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise DraftIncompatibleError(
            f"feature head {folder}: made for a target with another tokenizer (fingerprint "
            f"{want.get('tokenizer_fingerprint')}, this one {tokenizer_fingerprint(tokenizer)})")
    if not (folder / WEIGHTS_FILE).exists():
        raise DraftIncompatibleError(f"feature head {folder}: {WEIGHTS_FILE} is missing")
    return info


def load_feature_head(folder: Union[str, Path], target, tokenizer=None, train: bool = False) -> FeatureHead:
    """The head in ``folder`` on the target's device and dtype (float32 when ``train``), sharing the target's
    embedding and output layer; eval mode unless ``train``. DraftIncompatibleError if made for another target."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    info = check_head_compatible(target, tokenizer, folder)
    cfg_dict = copy.deepcopy(info["config"])
    model_type = cfg_dict.pop("model_type", target.config.model_type)
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    p = next(target.parameters())
    dtype = torch.float32 if train else p.dtype
    body = _new_body(cfg, dtype)
    _share_embedding(body, target)
    head = FeatureHead(target, body)
    state = load_file(str(Path(folder).expanduser() / WEIGHTS_FILE))
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("body.embed_tokens")]
    if missing or unexpected:
        raise DraftIncompatibleError(f"feature head {folder}: weights do not fit its config "
                                     f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head = head.to(device=p.device, dtype=dtype)
    return head.train(train)
