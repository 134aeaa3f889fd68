"""Forward time of the target over n new tokens (on a warm 200-token cache) with torch's linear and with
client/small_linear.py's compiled kernel for 1..32 rows (``kernel``, the default), interleaved, medians; and
the largest logit difference from torch's.

    python -m specstore.bench.small_linear [--model PATH] [--sizes 1,2,4,8,16,32,64,128] [--reps 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def forward_ms(model, n: int, reps: int, past: int = 200) -> float:
    from ..client.kv_cache import cache_keyword

    kw = cache_keyword(model)
    g = torch.Generator().manual_seed(n)
    with torch.inference_mode():
        cache = model(torch.randint(100, 30000, (1, past), generator=g), use_cache=True).past_key_values
        times = []
        for _ in range(reps + 1):
            x = torch.randint(100, 30000, (1, n), generator=g)
            t0 = time.perf_counter()
            model(x, use_cache=True, **{kw: cache})
            times.append(time.perf_counter() - t0)
            cache.crop(-n)
    return statistics.median(times[1:]) * 1e3


def main(argv=None) -> None:
    from ..client import small_linear
    from ..client.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (torch, kernel)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model, device="cpu", dtype="float32")
    sizes = [int(s) for s in a.sizes.split(",")]
    modes = ("torch", "kernel")
    res = {m: {n: [] for n in sizes} for m in modes}
    logits = {m: {} for m in modes}
    for _ in range(a.rounds):
        for mode in modes:
            small_linear.uninstall(model)
            if mode == "kernel":
                small_linear.install(model)
            for n in sizes:
                res[mode][n].append(forward_ms(model, n, a.reps))
            with torch.inference_mode():
                for n in (1, 3, 4, 6, 16):  # the kernel's register blocks, the rows left over, its edge
                    ids = torch.randint(100, 30000, (1, n), generator=torch.Generator().manual_seed(n))
                    logits[mode][n] = model(ids).logits
    print(f"threads {torch.get_num_threads()}; forward ms over n new tokens (median of {a.reps}, best of "
          f"{a.rounds} interleaved rounds)")
    print("n       " + " ".join(f"{n:>7}" for n in sizes))
    for mode in res:
        print(f"{mode:<8}" + " ".join(f"{min(res[mode][n]):7.1f}" for n in sizes))
    for mode in ("kernel",):
        print(f"{mode + '/t':<8}" + " ".join(f"{min(res[mode][n]) / min(res['torch'][n]):7.2f}" for n in sizes))
        d = max((logits["torch"][n] - logits[mode][n]).abs().max().item() for n in logits[mode])
        same = min((logits["torch"][n].argmax(-1) == logits[mode][n].argmax(-1)).float().mean().item()
                   for n in logits[mode])
        print(f"  {mode}: max |logit difference| from torch {d:.2e}; argmax agreement {same:.3f}")


if __name__ == "__main__":
    main()
