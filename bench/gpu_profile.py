"""Verify-cost profile t(n) and decoder overhead on a GPU, with a randomly initialised model of real size.

The real checkpoint does not travel to the GPU machine, so the weights are random: speeds are real,
acceptance is not (a random model's drafts are rarely accepted). What this measures:
  * t(n): one verify forward over an n-node tree on a warm cache (client.budget.measure_cost_profile);
  * decoder overhead per step: wall time of a decode step minus its verify forward (drafting, fusion,
    budget choice, acceptance, KV compaction), with the context and recycling drafters on;
  * plain tokens/s: transformers' generate vs our decoder with speculation off (same code path);
  * greedy agreement of our speculative decoder with transformers' generate on this model and dtype.

usage: python -m specstore.bench.gpu_profile --config llama3-8b --dtype bfloat16 --out profile.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


import numpy as np
import torch

CONFIGS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
}


def build(name: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, **CONFIGS[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama3-8b", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1,2,4,8,16,24,32,48,64,96,128")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from ..client.budget import MAX_BUDGET_CUDA, measure_cost_profile
    from ..client.decoder import SpeculativeDecoder
    from ..client.drafters import ContextDrafter, RecyclingDrafter
    from ..client.models import pick_dtype

    dtype = pick_dtype(args.dtype, torch.device(args.device))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t0 = time.time()
    model = build(args.config, dtype, args.device)
    res: dict = {"config": args.config, "dtype": str(dtype), "device": torch.cuda.get_device_name(0)
                 if args.device.startswith("cuda") else platform.processor(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "build_seconds": round(time.time() - t0, 1)}
    import transformers

    res["transformers"] = transformers.__version__
    sizes = [int(s) for s in args.sizes.split(",")]
    prof = measure_cost_profile(model, sizes=sizes, past_len=512, reps=10)
    res["t_n_ms"] = {n: round(s * 1000, 3) for n, s in zip(prof.sizes, prof.seconds)}
    print("t(n) ms:", res["t_n_ms"], flush=True)

    # a prompt with repeats, so that the context drafter has matches every step
    rng = np.random.default_rng(0)
    base = rng.integers(100, 20000, 64).tolist()
    prompt = (base * 5)[:300]
    vocab = model.config.vocab_size
    dec = SpeculativeDecoder(model, None, [ContextDrafter(), RecyclingDrafter(vocab)], profile=prof,
                             max_budget=MAX_BUDGET_CUDA)
    verify_times: list[float] = []
    orig_verify = dec.verifier.verify

    def timed_verify(tree):
        sync()
        t = time.perf_counter()
        out = orig_verify(tree)
        sync()
        verify_times.append(time.perf_counter() - t)
        return out

    dec.verifier.verify = timed_verify

    eos: list[int] = []
    dec.generate(prompt, 16, eos_token_id=eos)  # warm-up
    runs = {}
    for mode in ("ours-spec", "ours-plain", "hf-generate"):
        verify_times.clear()
        sync()
        t = time.perf_counter()
        if mode == "hf-generate":
            out = model.generate(torch.tensor([prompt], device=args.device), max_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=args.new_tokens)
            toks = out[0, len(prompt):].tolist()
            steps, prefill = len(toks), 0.0
        else:
            dec.speculate = mode == "ours-spec"
            r = dec.generate(prompt, args.new_tokens, eos_token_id=eos)
            toks, steps, prefill = r.new_tokens, r.steps, r.prefill_seconds
        sync()
        wall = time.perf_counter() - t
        entry = {"tokens": len(toks), "steps": steps, "seconds": round(wall, 4),
                 "tokens_per_second": round(len(toks) / wall, 2)}
        if verify_times:
            entry["verify_ms_median"] = round(1000 * float(np.median(verify_times)), 3)
            entry["prefill_ms"] = round(1000 * prefill, 3)
            entry["overhead_ms_per_step"] = round(1000 * (wall - prefill - sum(verify_times)) / max(steps, 1), 3)
        runs[mode] = (entry, toks)
        print(mode, entry, flush=True)
    res["runs"] = {k: v[0] for k, v in runs.items()}
    ref = runs["hf-generate"][1]
    for mode in ("ours-spec", "ours-plain"):
        toks = runs[mode][1]
        same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref)))
        res["runs"][mode]["identical_prefix_vs_hf"] = same
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
