"""Scale-out figures of issue 11: lookups through 1 and 2 replicas, and lookups fanned out to 1, 2 and 4 shard
groups, each a real ``datastore-serve`` process on 127.0.0.1.

    .venv/bin/python -m specstore.bench.scaleout_bench --index IDX [--seconds 10] [--clients 8] [--json OUT]

Contexts are real: 64-token windows of the index's own shards, one lookup each (budget 16). Replicas: a
closed loop of ``--clients`` threads, each with its own client of the address list (gRPC ``round_robin``
over the replicas), for ``--seconds``; reported lookups/s and p50/p99 latency. Shard groups: one client of
the ``A;B;...`` list (client/sharded_backend.py) looks up the same contexts one after another; reported
p50/p99 latency of a fanned-out lookup and the mean draft nodes per lookup. On one 2-core machine the
processes share the cores: this shows the overhead of replicas and fan-out, not their gain on more machines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .push_crash import Server


def contexts(index: Path, n: int, seed: int = 0) -> list[list[int]]:
    from ..datastore.index import DatastoreIndex

    idx = DatastoreIndex.open(index, load_faiss=False)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = idx.shards[int(rng.integers(len(idx.shards)))]
        if len(s.tokens) < 80:
            continue
        i = int(rng.integers(0, len(s.tokens) - 70))
        w = np.asarray(s.tokens[i:i + 64], dtype=np.int64)
        if (w == s.sep).any():
            continue
        out.append(w.tolist())
    idx.close()
    return out


def pct(xs: list, q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


def replicas_run(index: Path, n: int, ctxs: list, seconds: float, clients: int, work: Path) -> dict:
    from ..client.datastore_client import DatastoreClient

    servers = [Server(index, None, work / f"replica{i}.log", args=[]) for i in range(n)]
    try:
        for s in servers:
            s.wait_ready()
        address = ",".join(s.address for s in servers)
        lat: list = []
        errors = [0]
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def worker(k: int) -> None:
            c = DatastoreClient(address, timeout_s=2.0, stream=False)
            mine, bad, j = [], 0, k
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    c._stub.Retrieve(c._request(ctxs[j % len(ctxs)], 16, None, None)[1], timeout=2.0)
                    mine.append(time.perf_counter() - t0)
                except Exception:  # noqa: BLE001
                    bad += 1
                j += clients
            c.close()
            with lock:
                lat.extend(mine)
                errors[0] += bad

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        return {"replicas": n, "lookups_per_s": round(len(lat) / wall, 1), "p50_ms": round(pct(lat, 50), 2),
                "p99_ms": round(pct(lat, 99), 2), "errors": errors[0]}
    finally:
        for s in servers:
            s.stop()


def shards_run(index: Path, n: int, ctxs: list, work: Path) -> dict:
    from ..client.datastore_client import DatastoreClient
    from ..client.datastore_drafter import RemoteBackend
    from ..client.sharded_backend import ShardedBackend

    servers = [Server(index, None, work / f"group{i}.log", args=["--shard-group", f"{i}/{n}"]) for i in range(n)]
    try:
        for s in servers:
            s.wait_ready()
        clients = [DatastoreClient(s.address, timeout_s=2.0) for s in servers]
        backend = RemoteBackend(clients[0]) if n == 1 else ShardedBackend(clients)
        for c in ctxs[:20]:                       # warm the streams
            backend.retrieve(c, 16)
        lat, nodes = [], []
        for c in ctxs:
            t0 = time.perf_counter()
            tree = backend.retrieve(c, 16)
            lat.append(time.perf_counter() - t0)
            nodes.append(tree.num_drafts)
        backend.close()
        return {"shard_groups": n, "p50_ms": round(pct(lat, 50), 3), "p99_ms": round(pct(lat, 99), 3),
                "mean_draft_nodes": round(statistics.mean(nodes), 2)}
    finally:
        for s in servers:
            s.stop()


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.scaleout_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--lookups", type=int, default=2000, help="fanned-out lookups per shard configuration")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    ctxs = contexts(a.index, max(a.lookups, 500))
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        work = Path(tmp)
        out = {"replicas": [replicas_run(a.index, n, ctxs, a.seconds, a.clients, work) for n in (1, 2)],
               "shards": [shards_run(a.index, n, ctxs[:a.lookups], work) for n in (1, 2, 4)]}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
