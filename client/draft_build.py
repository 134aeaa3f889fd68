"""A small draft cut from the target itself: the same config with fewer layers, initialised from chosen
target layers, keeping the target's embedding, final norm and output layer (so it shares the tokenizer
and the token space). The embedding and the output layer stay frozen during distillation: they are the
biggest tensors (49,152 x 576 for SmolLM2, tied), already right for the target's tokens, and leaving them
out of the backward pass skips their weight gradient, the most expensive matrix product of a step.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch


def layer_list(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder layers (``model.model.layers`` in Llama, Mistral,
    Qwen2, ...); ValueError for models laid out otherwise."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no model.layers list; only decoder-only transformers laid out "
                         "like Llama (Mistral, Qwen2, ...) can be cut into a draft")
    for name, mod in model.named_modules():
        if mod is layers:
            return name, layers
    raise ValueError(f"{type(model).__name__}: its layer list is not one of its modules")


def default_init_layers(n: int) -> list[int]:
    """The first ``n`` target layers: each then reads the residual stream its own predecessor wrote, as in
    the target. Measured on SmolLM2-135M (BENCHMARKS.md, "Draft distillation"): 4.4% held-out top-1
    agreement before training (mixes that include the last layer: ~0%), and after the same 40 steps
    2-3 points more than the first three plus the last (which reaches a lower KL)."""
    return list(range(n))


def check_init_layers(init_layers: Sequence[int], n_target: int) -> list[int]:
    """``init_layers`` as a list of strictly increasing target layer numbers in [0, n_target); else
    ValueError naming the flag."""
    out = [int(i) for i in init_layers]
    if not out:
        raise ValueError("--init-layers: give at least one layer")
    bad = [i for i in out if not 0 <= i < n_target]
    if bad:
        raise ValueError(f"--init-layers {bad}: the target has layers 0..{n_target - 1}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"--init-layers {out}: give distinct layer numbers in increasing order")
    return out


def _sub_config(config, init_layers: list[int]):
    """The target's config with ``len(init_layers)`` layers (per-layer lists, e.g. ``layer_types``, cut
    to the chosen layers)."""
    cfg = copy.deepcopy(config)
    n = int(config.num_hidden_layers)
    cfg.num_hidden_layers = len(init_layers)
    for key, val in list(vars(cfg).items()):
        if isinstance(val, list) and len(val) == n and "layer" in key:
            setattr(cfg, key, [val[i] for i in init_layers])
    return cfg


def build_draft(target, init_layers: Sequence[int]):
    """A draft LM (same class as ``target``, float32 on its device) whose layer i is a copy of target layer
    ``init_layers[i]``; every other weight (embedding, final norm, output layer) is a copy of the target's.
    Returns the draft in train mode with only its layers and final norm trainable (``freeze_shared``)."""
    from transformers import AutoModelForCausalLM

    cfg = target.config
    init_layers = check_init_layers(init_layers, int(cfg.num_hidden_layers))
    prefix, _ = layer_list(target)
    prefix += "."
    dcfg = _sub_config(cfg, init_layers)
    draft = AutoModelForCausalLM.from_config(dcfg, attn_implementation="sdpa", dtype=torch.float32)
    where = {src: i for i, src in enumerate(init_layers)}
    state = {}
    for k, v in target.state_dict().items():
        if k.startswith(prefix):
            num, rest = k[len(prefix):].split(".", 1)
            if int(num) in where:
                state[f"{prefix}{where[int(num)]}.{rest}"] = v
        else:
            state[k] = v
    draft.load_state_dict(state, strict=True)
    if target.generation_config is not None:
        draft.generation_config = copy.deepcopy(target.generation_config)
    draft.to(device=next(target.parameters()).device, dtype=torch.float32)
    freeze_shared(draft)
    return draft.train()


def load_draft(folder, device: Optional[torch.device] = None):
    """An existing draft folder (``--init-from``) as a float32 model in train mode, shared parts frozen."""
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True)
    layer_list(draft)
    if device is not None:
        draft.to(device)
    freeze_shared(draft)
    return draft.train()


def freeze_shared(draft) -> list[torch.nn.Parameter]:
    """Freeze the input embedding and the output layer (tied or not); returns the trainable parameters
    (the layers and the final norm), in ``named_parameters`` order."""
    frozen = {id(draft.get_input_embeddings().weight)}
    out = draft.get_output_embeddings()
    if out is not None:
        frozen.add(id(out.weight))
    params = []
    for _, p in draft.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params.append(p)
    return params


def trainable_state(draft) -> dict:
    """name -> detached copy of each trainable parameter (what a checkpoint must keep)."""
    return {n: p.detach().clone() for n, p in draft.named_parameters() if p.requires_grad}


def load_trainable_state(draft, state: dict) -> None:
    """Copy a ``trainable_state`` back into ``draft`` (names and shapes must match: ValueError otherwise)."""
    params = dict(draft.named_parameters())
    for n, v in state.items():
        if n not in params or params[n].shape != v.shape:
            raise ValueError(f"checkpoint parameter {n} {tuple(v.shape)} does not fit this draft")
        with torch.no_grad():
            params[n].copy_(v)
