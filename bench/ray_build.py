"""Ray build vs local build: one corpus through ``index-build`` with ``--engine local`` and ``--engine ray``.

    .venv/bin/python -m specstore.bench.ray_build [--corpus ../shared/data/corpus/rust-book] [--runs 3]
        [--shard-tokens 65536] [--workers N] [--address ADDR] [--json OUT.json]

Each run is a fresh ``index-build`` process, as a user runs it (a local Ray instance's start is part of the
ray time; with ``--address`` the cluster is already up), alternating local and ray. ``--no-embeddings``: the
embed and FAISS stages run in the driver under both engines, so they would only add the same time to both.
Prints the median wall time and the build's own stage seconds (manifest ``build_seconds``) per engine, and
checks that every ray index equals the local one byte for byte (every file but the manifest). Exit status 0
when they all do, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "rust-book"


def index_files(root: Path) -> dict:
    """relative path -> bytes of every file of an index but its manifest."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def one_build(corpus: Path, out: Path, engine: str, args) -> dict:
    """One ``index-build`` process: {"engine", "wall_s", "stages": build_seconds, "tokens", "shards"}."""
    cmd = [sys.executable, "-m", "specstore.indexers.cli", "build", str(corpus), "--out", str(out), "-q",
           "--no-embeddings", "--shard-tokens", str(args.shard_tokens), "--engine", engine]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if engine == "ray" and args.address:
        cmd += ["--address", args.address]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"index-build --engine {engine} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    m = json.loads((out / "manifest.json").read_text())
    return {"engine": engine, "wall_s": wall, "stages": m["build_seconds"], "tokens": m["stats"]["num_tokens"],
            "shards": len(m["shards"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--runs", type=int, default=3, help="builds per engine (default 3; the median is reported)")
    ap.add_argument("--shard-tokens", type=int, default=65536,
                    help="tokens per shard (default 65,536: several suffix array tasks on a small corpus)")
    ap.add_argument("--workers", type=int, default=0, help="--workers for both engines (default: each one's own)")
    ap.add_argument("--address", default=None, help="a Ray cluster for the ray builds (default: a local instance)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the indexes (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="ray-build-bench-"))
    runs, identical = [], True
    for k in range(args.runs):
        local = one_build(args.corpus, work / f"local-{k}", "local", args)
        ray = one_build(args.corpus, work / f"ray-{k}", "ray", args)
        same = index_files(work / f"local-{k}") == index_files(work / f"ray-{k}")
        identical &= same
        runs += [local, ray]
        print(f"run {k + 1}: local {local['wall_s']:.2f} s, ray {ray['wall_s']:.2f} s, "
              f"{'identical' if same else 'DIFFERENT'} files", flush=True)
    summary = {}
    for engine in ("local", "ray"):
        rs = [r for r in runs if r["engine"] == engine]
        summary[engine] = {"wall_s": statistics.median(r["wall_s"] for r in rs),
                           **{f"{s}_s": statistics.median(r["stages"].get(s, 0.0) for r in rs)
                              for s in ("ray_start", "tokenize", "suffix_array", "total")}}
    print(f"corpus {args.corpus}: {runs[0]['tokens']:,} tokens, {runs[0]['shards']} shards of <= "
          f"{args.shard_tokens:,} tokens; median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"{'engine':8} {'wall s':>8} {'build s':>8} {'ray start s':>12} {'tokenize s':>11} {'suffix arrays s':>16}")
    for engine, s in summary.items():
        print(f"{engine:8} {s['wall_s']:8.2f} {s['total_s']:8.2f} {s['ray_start_s']:12.2f} {s['tokenize_s']:11.2f} "
              f"{s['suffix_array_s']:16.2f}")
    print("every ray index equals the local one byte for byte" if identical else "RAY AND LOCAL INDEXES DIFFER")
    if args.json:
        args.json.write_text(json.dumps({"corpus": str(args.corpus), "shard_tokens": args.shard_tokens,
                                         "machine": platform.platform(), "cpus": os.cpu_count(), "runs": runs,
                                         "median": summary, "identical": identical}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
