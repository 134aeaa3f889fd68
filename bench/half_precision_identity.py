"""Does a tree verify give each node the bits that plain decoding gives the same token, on this device and dtype?

Random prompts and random trees; every node's logits from one verify forward (client/verifier.py, as the
decoder runs it) against plain incremental decoding along the node's path (the prompt in one forward, then
one token per forward, as transformers' ``generate`` does). Counts the nodes whose logits have other bits and
those whose greedy token differs. Zero and zero is what lossless speculative decoding needs: on CPU in half
precision, client/batch_invariant.py enforces it; on CUDA nothing does, and this measures it (scripts/gpu_check.sh).

    python -m specstore.bench.half_precision_identity [--device cuda] [--dtype bfloat16] [--model PATH]
        [--trials 12] [--nodes 16] [--json-out FILE]

Without ``--model``: a tiny random Llama (2 layers, width 128). On the 2-core Intel VM (2026-12-01): bfloat16
with client/batch_invariant.py 0 of 118 nodes with other bits; with ``SPECSTORE_BATCH_INVARIANT=0`` 42 of 118
(none with another greedy token in so few: the Spec-Bench run of BENCHMARKS.md §9 shows what they do over
128-token answers); float32 118 of 118, all within 4e-7 (float32 is not made bit-identical: its differences
are far below the gaps between top logits that greedy decoding meets, and every float32 lossless test checks
the tokens).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def tiny_model(device: str, dtype: torch.dtype, vocab: int = 256, seed: int = 0):
    """bench/tiny_llama.py's model at width 128 (half-precision GEMMs are checked from width 96 on)."""
    from .tiny_llama import tiny_llama

    return tiny_llama(vocab, seed, max_pos=1024, hidden=128, device=device, dtype=dtype)


def _plain_logits(model, prompt: list[int], path: list[int]) -> torch.Tensor:
    """Logits [V] after ``path`` (tokens after the prompt's last), decoded one token per forward."""
    from ..client.kv_cache import cache_keyword

    dev = model.device
    with torch.inference_mode():
        out = model(torch.tensor([prompt], device=dev), use_cache=True)
        cache, last = out.past_key_values, out.logits[0, -1]
        for t in path:
            out = model(torch.tensor([[t]], device=dev), use_cache=True, **{cache_keyword(model): cache})
            cache, last = out.past_key_values, out.logits[0, -1]
    return last.float()


def measure(model, trials: int = 12, nodes: int = 16, seed: int = 0, prompt_len=(8, 200)) -> dict:
    """{'nodes': compared, 'other_bits': nodes whose logits differ in any bit, 'other_argmax': nodes whose
    greedy token differs, 'max_abs_diff': largest logit difference}."""
    from ..client.types import DraftTree
    from ..client.verifier import Verifier

    rng = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    res = {"nodes": 0, "other_bits": 0, "other_argmax": 0, "max_abs_diff": 0.0}
    for _ in range(trials):
        prompt = rng.integers(3, vocab, int(rng.integers(*prompt_len))).tolist()
        n = int(rng.integers(2, nodes + 1))
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        tokens = [prompt[-1]] + rng.integers(3, vocab, n - 1).tolist()
        tree = DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32), np.ones(n, np.float32),
                         np.zeros(n, np.uint8))
        v = Verifier(model)
        v.prefill(np.array(prompt))
        logits = v.verify(tree).float()
        for i in range(n):
            ref = _plain_logits(model, prompt, [tokens[j] for j in tree.path_to(i)]).to(logits.device)
            res["nodes"] += 1
            res["other_bits"] += int(not torch.equal(logits[i], ref))
            res["other_argmax"] += int(int(logits[i].argmax()) != int(ref.argmax()))
            res["max_abs_diff"] = max(res["max_abs_diff"], float((logits[i] - ref).abs().max()))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--model", help="a local HF folder or .gguf (default: a tiny random Llama)")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--nodes", type=int, default=16, help="largest tree (nodes, root included)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    if a.model:
        from ..client.models import load_model

        model, _ = load_model(a.model, device=a.device, dtype=a.dtype)
    else:
        model = tiny_model(a.device, dtype)
        from ..client import batch_invariant

        batch_invariant.install(model)        # what load_model does: CPU half precision only
    res = measure(model, a.trials, a.nodes, a.seed)
    res.update(device=a.device, dtype=a.dtype, model=a.model or "tiny random Llama (width 128)",
               device_name=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
    print(f"{res['device_name']} {a.dtype}: {res['other_bits']} of {res['nodes']} tree nodes with other logits "
          f"bits than plain decoding, {res['other_argmax']} with another greedy token "
          f"(largest difference {res['max_abs_diff']:.3g})")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
