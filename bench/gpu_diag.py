"""Diagnose verify-forward cost on a GPU: mask variants, and a torch.profiler table (device check helper)."""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .gpu_profile import CONFIGS
from ..client.tree_attention import build_tree_attention
from ..client.types import DraftTree
from ..client.verifier import Verifier
from transformers import LlamaConfig, LlamaForCausalLM

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, **{**CONFIGS["llama3-8b"], "num_hidden_layers": layers})
for attn in ("sdpa", "eager"):
    cfg._attn_implementation = attn
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    v = Verifier(model)
    rng = np.random.default_rng(0)
    past = rng.integers(100, 30000, 513)
    v.prefill(past)
    for n in (1, 2, 16, 64):
        tree = DraftTree(np.concatenate([[past[-1]], rng.integers(100, 1000, n - 1)]).astype(np.int32),
                         np.concatenate([[-1], np.arange(n - 1)]).astype(np.int32), np.ones(n, np.float32),
                         np.zeros(n, np.uint8))
        for variant in ("verifier", "nomask", "boolmask"):
            ts = []
            for r in range(8):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if variant == "verifier":
                    v.verify(tree)
                    v._pending = None
                else:
                    ti = build_tree_attention(tree, v.past_len, "cuda", torch.bfloat16)
                    m = None if variant == "nomask" else (ti.attention_mask == 0) if ti.attention_mask is not None else None
                    with torch.inference_mode():
                        model(input_ids=ti.input_ids, position_ids=ti.position_ids, attention_mask=m, use_cache=True,
                              **{v._cache_kw: v.cache})
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
                for layer in v.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, : v.past_len], layer.values[:, :, : v.past_len]
            print(f"{attn} n={n} {variant}: median {1000 * np.median(ts[2:]):.2f} ms  first {1000 * ts[0]:.1f}", flush=True)
    if attn == "sdpa":
        n = 16
        tree = DraftTree(np.concatenate([[past[-1]], rng.integers(100, 1000, n - 1)]).astype(np.int32),
                         np.concatenate([[-1], np.arange(n - 1)]).astype(np.int32), np.ones(n, np.float32),
                         np.zeros(n, np.uint8))
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for r in range(3):
                v.verify(tree)
                v._pending = None
                torch.cuda.synchronize()
                for layer in v.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, : v.past_len], layer.values[:, :, : v.past_len]
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=50))
    del model, v
    torch.cuda.empty_cache()
