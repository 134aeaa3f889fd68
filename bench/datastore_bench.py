"""Datastore lookup benchmark: in process and over gRPC on loopback (p50/p99), and throughput with N
concurrent clients.

Contexts are real: a held-out slice of the corpus (the last 10% of grade-school-math_train.jsonl, which the
bench index does not contain) is tokenized with the model's tokenizer and a window slides over it; each
query is the 64-token context tail ending at one position.

    python bench/datastore_bench.py --corpus ../shared/data/corpus --work /tmp/ds_bench \
        --queries 10000 --clients 16 --budget 32

Builds the index once into WORK/index (reused on later runs), starts `datastore-serve` as a separate
process on 127.0.0.1, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = "grade-school-math_train.jsonl"


def prepare_corpus(corpus: Path, work: Path, held_fraction: float = 0.1) -> tuple[Path, list[str]]:
    train = work / "corpus"
    if train.exists():
        shutil.rmtree(train)
    train.mkdir(parents=True)
    held: list[str] = []
    for p in sorted(corpus.iterdir()):
        if p.name == HELD_OUT:
            lines = p.read_text().splitlines()
            cut = int(len(lines) * (1 - held_fraction))
            (train / p.name).write_text("\n".join(lines[:cut]) + "\n")
            for ln in lines[cut:]:
                r = json.loads(ln)
                held.append(f"{r['question']}\n{r['answer']}")
        elif p.is_dir():
            shutil.copytree(p, train / p.name)
        else:
            (train / p.name).symlink_to(p.resolve())
    return train, held


def build(train: Path, out: Path, model: str | None) -> float:
    from indexers.build import build_index

    t0 = time.perf_counter()
    # FAISS is not on the lookup path (the server runs --no-faiss here): skip the embedding stage.
    build_index([str(train)], out, model=model, embeddings=False, progress=False, log=lambda *_: None)
    return time.perf_counter() - t0


def make_queries(held: list[str], tokenizer, n: int, tail: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = []
    for text in held:
        ids.append(np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32))
    stream = np.concatenate(ids)
    positions = np.sort(rng.choice(np.arange(8, len(stream)), size=min(n, len(stream) - 8), replace=False))
    return [stream[max(0, p - tail):p] for p in positions]


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_in_process(index_path: Path, queries, budget: int) -> dict:
    from datastore.index import DatastoreIndex

    idx = DatastoreIndex.open(str(index_path), load_faiss=False)
    for q in queries[:200]:
        idx.retrieve(q, budget)
    lat, sizes = [], []
    for q in queries:
        t0 = time.perf_counter()
        r = idx.retrieve(q, budget)
        lat.append(time.perf_counter() - t0)
        sizes.append(len(r.tokens))
    idx.close()
    return {"p50_us": pct(lat, 50) * 1e6, "p99_us": pct(lat, 99) * 1e6, "hit_rate": float(np.mean(np.asarray(sizes) > 0)),
            "mean_nodes": float(np.mean(sizes))}


def start_server(index_path: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    exe = shutil.which("datastore-serve", path=str(Path(sys.executable).parent)) or None
    cmd = [exe] if exe else [sys.executable, "-m", "datastore.cli"]
    cmd += ["--index", str(index_path), "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--no-faiss", "--log-level", "warning", "--max-concurrency", "256"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    from datastore.healthcheck import check

    deadline = time.time() + 120
    while time.time() < deadline:
        if port_file.exists():
            addr = f"127.0.0.1:{port_file.read_text().strip()}"
            if check(addr, timeout=1.0):
                return proc, addr
        if proc.poll() is not None:
            raise RuntimeError("datastore-serve exited")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("datastore-serve did not become healthy")


def bench_grpc_latency(addr: str, queries, budget: int) -> dict:
    import grpc

    from protos import datastore_pb2 as pb
    from protos import datastore_pb2_grpc as pb_grpc

    reqs = [pb.RetrieveRequest(context=q.tolist(), budget=budget) for q in queries]
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.DatastoreStub(ch)
        for r in reqs[:300]:
            stub.Retrieve(r, timeout=1)
        lat = []
        for r in reqs:
            t0 = time.perf_counter()
            stub.Retrieve(r, timeout=1)
            lat.append(time.perf_counter() - t0)
    # the end-to-end client path (DatastoreClient: request building + DraftTree conversion)
    from client.datastore_client import DatastoreClient

    c = DatastoreClient(addr, timeout_s=1.0)
    lat_c = []
    for q in queries:
        t0 = time.perf_counter()
        c.retrieve(q, budget)
        lat_c.append(time.perf_counter() - t0)
    c.close()
    return {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "mean_ms": float(np.mean(lat)) * 1e3,
            "client_p50_ms": pct(lat_c, 50) * 1e3, "client_p99_ms": pct(lat_c, 99) * 1e3,
            "failures": c.stats["failures"]}


async def _throughput(addr: str, queries, budget: int, clients: int, seconds: float) -> dict:
    import grpc

    from protos import datastore_pb2 as pb
    from protos import datastore_pb2_grpc as pb_grpc

    reqs = [pb.RetrieveRequest(context=q.tolist(), budget=budget) for q in queries]
    channels = [grpc.aio.insecure_channel(addr) for _ in range(clients)]
    stubs = [pb_grpc.DatastoreStub(ch) for ch in channels]
    done, errors, lat = 0, 0, []
    stop_at = 0.0

    async def worker(i: int):
        nonlocal done, errors
        j = i
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await stubs[i].Retrieve(reqs[j % len(reqs)], timeout=1)
                done += 1
                lat.append(time.perf_counter() - t0)
            except grpc.RpcError:
                errors += 1
            j += clients

    stop_at = time.perf_counter() + 1.0  # warm-up
    await asyncio.gather(*(worker(i) for i in range(clients)))
    done, errors, lat = 0, 0, []
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return {"lookups_per_s": done / wall, "errors": errors, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    ap.add_argument("--work", default="/tmp/ds_bench")
    ap.add_argument("--model", default=None)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--tail", type=int, default=64)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train, held = prepare_corpus(Path(a.corpus), work)
    index_path = work / "index"
    build_s = None
    if a.rebuild or not (index_path / "manifest.json").exists():
        build_s = build(train, index_path, a.model)
    from client.model_files import load_tokenizer

    tok = load_tokenizer(a.model)
    queries = make_queries(held, tok, a.queries, a.tail)
    manifest = json.loads((index_path / "manifest.json").read_text())
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU, no GPU ({platform.machine()})",
           "queries": len(queries), "budget": a.budget, "tail": a.tail, "clients": a.clients,
           "index_tokens": manifest.get("num_tokens") or manifest.get("stats", {}).get("num_tokens"),
           "build_s": build_s}
    res["in_process"] = bench_in_process(index_path, queries, a.budget)
    proc, addr = start_server(index_path, work)
    try:
        res["grpc"] = bench_grpc_latency(addr, queries, a.budget)
        res["throughput"] = asyncio.run(_throughput(addr, queries, a.budget, a.clients, a.seconds))
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    ip, g, t = res["in_process"], res["grpc"], res["throughput"]
    print(f"""
| measure | value | goal |
|---|---|---|
| in-process lookup p50 / p99 | {ip['p50_us']:.0f} us / {ip['p99_us']:.0f} us | p50 <= 50 us |
| gRPC loopback p50 / p99 (raw stub) | {g['p50_ms']:.3f} ms / {g['p99_ms']:.3f} ms | <= 0.6 ms / <= 2 ms |
| gRPC loopback p50 / p99 (DatastoreClient -> DraftTree) | {g['client_p50_ms']:.3f} ms / {g['client_p99_ms']:.3f} ms | |
| throughput, {a.clients} concurrent clients | {t['lookups_per_s']:.0f} lookups/s ({t['errors']} errors) | >= 2,000/s |
| hit rate / mean nodes per tree | {ip['hit_rate']:.2f} / {ip['mean_nodes']:.1f} | |
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
