"""Lookup cost of the shared recent outputs (datastore/output_store.py online, datastore/output_shards.py
compacted): ``NgramStats.output_tree`` latency for contexts taken from the outputs themselves, with all outputs
online vs compacted into 1, 4, 16 or 64 shards of equal size; and the time to build one shard.

    python -m specstore.bench.output_lookup [--tokens 1000000] [--lookups 2000]

Outputs are synthetic: random 200..800-token documents over a 49,152-token vocabulary with 30% of their
16-token spans copied from earlier ones (so that contexts match several outputs, as shared answers do).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _outputs(total: int, rng) -> list[list[int]]:
    outs, n = [], 0
    while n < total:
        k = int(rng.integers(200, 800))
        o = rng.integers(0, 49152, k)
        if outs:
            for s in range(0, k - 16, 16):
                if rng.random() < 0.3:
                    src = outs[int(rng.integers(len(outs)))]
                    j = int(rng.integers(0, len(src) - 16))
                    o[s:s + 16] = src[j:j + 16]
        outs.append(o.tolist())
        n += k
    return outs


def main(argv=None) -> None:
    from ..datastore.ngram_stats import NgramStats
    from ..datastore.output_shards import OutputShard, write_output_shard

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=2000)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    outs = _outputs(a.tokens, rng)
    ctxs = []
    for _ in range(a.lookups):
        o = outs[int(rng.integers(len(outs)))]
        j = int(rng.integers(16, len(o) - 1))
        ctxs.append(o[j - 16:j])
    print(f"{len(outs)} outputs, {sum(map(len, outs))} tokens; {a.lookups} lookups (16-token contexts from them)")
    print("layout | p50 us | p99 us | mean tree nodes")
    for shards in (0, 1, 4, 16, 64):
        s = NgramStats(max_output_tokens=max(a.tokens * 2, 16))
        with tempfile.TemporaryDirectory() as d:
            build_s = None
            if shards == 0:
                for o in outs:
                    s.outputs.add(o)
            else:
                per = -(-len(outs) // shards)
                installed = []
                for i in range(0, len(outs), per):
                    t0 = time.perf_counter()
                    p = write_output_shard(Path(d), i, outs[i:i + per])
                    build_s = time.perf_counter() - t0
                    installed.append(OutputShard.load(p))
                s.output_shards = tuple(installed)
            times, nodes = [], []
            for c in ctxs:
                t0 = time.perf_counter()
                t = s.output_tree(c, 32)
                times.append(time.perf_counter() - t0)
                nodes.append(len(t.tokens))
            q = np.percentile(np.asarray(times) * 1e6, [50, 99])
            name = "online store" if shards == 0 else f"{shards} shard(s)"
            extra = f" | one shard built in {build_s:.2f} s" if build_s is not None else ""
            print(f"{name} | {q[0]:.0f} | {q[1]:.0f} | {statistics.mean(nodes):.1f}{extra}")


if __name__ == "__main__":
    main()
