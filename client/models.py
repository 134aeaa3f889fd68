"""Loading the target model (torch + transformers), offline, with a cached converted copy.

The first load of a GGUF model dequantises it with transformers and caches ``config.json`` +
``model.safetensors`` + tokenizer files under ``ModelFiles.cache_dir``; later loads read the cache in
seconds. A GGUF-loaded model refuses ``save_pretrained``, so the cache is written from its config and
state dict.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ..datastore.durable import atomic_dir
from ..datastore.model_files import ModelFiles, resolve_model, tokenizer_folder
from . import batch_invariant, small_linear

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device: Optional[str] = None) -> torch.device:
    """``auto`` (or None) -> CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available")
    return dev


def cpu_has_fast_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX-BF16 or AVX512-BF16), read from the
    flags of ``/proc/cpuinfo`` (or ``cpuinfo``, its text); False where that cannot be read. Elsewhere bfloat16
    matmuls are emulated and slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def fast_precision(device: torch.device) -> str:
    """``"bfloat16"`` where it computes faster than float32 (CUDA with bf16, CPUs with AMX / AVX512-BF16),
    else ``"float32"``: the precision ``--precision auto`` picks for training and for recording answers."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_fast_bf16() else "float32"


def resolve_precision(precision: str, device: Optional[str]) -> str:
    """``precision`` as given, or for ``auto`` ``fast_precision`` on ``device`` (auto/None: as ``pick_device``
    picks; a device that cannot be used: the CPU's, and the caller reports the device)."""
    if precision != "auto":
        return precision
    try:
        dev = pick_device(device)
    except (ValueError, RuntimeError):
        dev = torch.device("cpu")
    return fast_precision(dev)


def pick_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """``auto`` (or None) -> ``fast_precision``: bfloat16 on CUDA with bf16 and on CPUs that multiply it in
    hardware (AMX / AVX512-BF16: faster than float32 there, and lossless, since ``load_model`` makes a CPU
    bfloat16 model batch-invariant), else float32. On CPU with ``SPECSTORE_BATCH_INVARIANT=0``: float32."""
    if dtype in (None, "", "auto"):
        if device.type == "cpu" and not batch_invariant.enabled():
            return torch.float32
        return _DTYPES[fast_precision(device)]
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES))} or auto")
    return _DTYPES[dtype]


def _converted_folder(files: ModelFiles) -> Path:
    """A plain HF folder for a GGUF model (config + safetensors + tokenizer), converted once."""
    out = files.cache_dir / "hf"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors (once) under %s", files.gguf_file, out)
    model = AutoModelForCausalLM.from_pretrained(str(files.folder), gguf_file=files.gguf_file, dtype=torch.float32,
                                                 local_files_only=True)
    tok_dir = tokenizer_folder(files)
    with atomic_dir(out) as tmp:   # several processes may convert at once: the first to finish wins
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))
        for f in tok_dir.iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
    return out


def model_folder(spec: Optional[str] = None) -> Path:
    """A local HF folder for ``spec`` (converting and caching a GGUF model first)."""
    files = resolve_model(spec)
    return files.folder if files.gguf_file is None else _converted_folder(files)


def load_model(spec: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
               attn_implementation: str = "sdpa"):
    """Returns (model in eval mode, tokenizer). Never touches a model hub.

    ``dtype`` auto (or None): ``pick_dtype``'s choice; where that is bfloat16 on CPU and this machine's GEMMs
    cannot be made batch-invariant for the model (``batch_invariant.install`` refuses), the model is loaded
    again in float32, which is exact here, instead of a half precision the decoder would refuse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    auto = dtype in (None, "", "auto")

    def load(dt):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt, attn_implementation=attn_implementation,
                                                     local_files_only=True)
        model.to(dev).eval()
        # before anything runs it: plain decoding must get the same bits
        return model, batch_invariant.install(model)

    model, invariant = load(dt)
    if auto and dev.type == "cpu" and dt != torch.float32 and not invariant:
        log.warning("--dtype auto: not %s on this CPU (%s); loading float32", str(dt).replace("torch.", ""),
                    getattr(model, "_specstore_refused", "no batch-invariant forwards"))
        del model
        model, _ = load(torch.float32)
    elif auto:
        log.info("--dtype auto: %s", str(dt).replace("torch.", ""))
    small_linear.install(model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer
