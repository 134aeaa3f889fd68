"""Datastore lookup benchmark: in process and over gRPC on loopback (p50/p99), and throughput with N
concurrent clients.

Contexts are real: a held-out slice of the corpus (the last 10% of grade-school-math_train.jsonl, which the
bench index does not contain) is tokenized with the model's tokenizer and a window slides over it; each
query is the 64-token context tail ending at one position.

    python -m specstore.bench.datastore_bench --corpus ../shared/data/corpus --work /tmp/ds_bench \
        --queries 10000 --clients 16 --budget 32 [--workers 2]

Builds the index once into WORK/index (reused on later runs), starts `datastore-serve` (with
`--workers N`) as a separate process on 127.0.0.1, and prints a Markdown table. `--index PATH` serves an
existing index instead (e.g. the synthetic 100M-token one that `bench/index_bench.py --synthetic-tokens`
builds), queried with context tails sampled from its own tokens.

Latency (p50/p99) is one synchronous client on one channel, i.e. one connection, so it always reaches one
worker; four paths are timed interleaved query by query: unary Retrieve and RetrieveStream on a raw stub,
and DatastoreClient -> DraftTree over either.

Throughput runs once per `--transport` (default both): `--clients` concurrent callers, each on its own gRPC
channel with its own TCP connection
(`grpc.use_local_subchannel_pool`; without it all channels of a process share one connection, which the
kernel's SO_REUSEPORT would hand to a single worker), spread over `--client-procs` asyncio load-generator
processes (default: half the CPUs, at least one) so that the client side is not held to one core by its own
GIL; `client_busy_max` is the busiest load process's CPU share, and a warning is printed above 0.9 (add
processes then).

The load generator runs on the same machine as the server: on the 2-core VM client and server share the
2 cores, so the lookups/s measured there is what server + client sustain together, not the server's
capacity alone. The result therefore also reports, for the measured window, the CPU time the server
processes and the load generator each spent per lookup (`server_cpu_us_per_lookup`,
`client_cpu_us_per_lookup`; the server alone on C free cores with >= C workers would sustain about
C * 1e6 / server_cpu_us_per_lookup lookups/s) and how many cores the server, the load generator and all
other processes kept busy (`cores_busy`, from /proc/stat): a non-zero `other` means the machine was shared.
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
    from ..indexers.build import BuildOptions, build_index

    t0 = time.perf_counter()
    # FAISS is not on the lookup path (the server runs --no-faiss here): skip the embedding stage.
    build_index([str(train)], out, BuildOptions(model=model, embeddings=False, progress=False), log=lambda *_: None)
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


def index_queries(index_path: Path, n: int, tail: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` context tails of ``tail`` tokens sampled from the index's own tokens (index_bench's in-corpus
    queries), for an index without a held-out corpus, such as a synthetic one."""
    from .index_bench import incorpus_queries
    from ..datastore.index import DatastoreIndex

    idx = DatastoreIndex.open(str(index_path), load_faiss=False)
    try:
        return incorpus_queries(idx, n, np.random.default_rng(seed), ctx=tail)
    finally:
        idx.close()


def bench_in_process(index_path: Path, queries, budget: int) -> dict:
    from ..datastore.index import DatastoreIndex

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


def start_server(index_path: Path, work: Path, workers: str = "1") -> tuple[subprocess.Popen, str]:
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    exe = shutil.which("datastore-serve", path=str(Path(sys.executable).parent)) or None
    cmd = [exe] if exe else [sys.executable, "-m", "specstore.datastore.cli"]
    cmd += ["--index", str(index_path), "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--no-faiss", "--log-level", "warning", "--max-concurrency", "256", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    from ..datastore.healthcheck import check

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
    """Sequential round trips, four ways, interleaved query by query (the same queries, the same minutes):
    unary ``Retrieve`` and ``RetrieveStream`` on a raw stub (request built beforehand), and
    ``DatastoreClient.retrieve`` -> ``DraftTree`` over either transport."""
    import queue

    import grpc

    from ..client.datastore_client import DatastoreClient
    from ..protos import datastore_pb2 as pb
    from ..protos import datastore_pb2_grpc as pb_grpc

    reqs = [pb.RetrieveRequest(context=q.tolist(), budget=budget) for q in queries]
    lat = {k: [] for k in ("unary", "stream", "client_stream", "client_unary")}
    with grpc.insecure_channel(addr) as ch, DatastoreClient(addr, timeout_s=1.0) as cs, \
            DatastoreClient(addr, timeout_s=1.0, stream=False) as cu:
        stub = pb_grpc.DatastoreStub(ch)
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        stream = stub.RetrieveStream(iter(outbox.get, None))

        def ask(r):
            outbox.put(r)
            return next(stream)

        paths = {"unary": lambda i: stub.Retrieve(reqs[i], timeout=1), "stream": lambda i: ask(reqs[i]),
                 "client_stream": lambda i: cs.retrieve(queries[i], budget),
                 "client_unary": lambda i: cu.retrieve(queries[i], budget)}
        for i in range(300):   # warm-up
            for f in paths.values():
                f(i % len(reqs))
        for i in range(len(reqs)):
            for k, f in paths.items():
                t0 = time.perf_counter()
                f(i)
                lat[k].append(time.perf_counter() - t0)
        outbox.put(None)
        failures = cs.stats["failures"] + cu.stats["failures"]
    out = {"failures": failures}
    for k, v in lat.items():
        pre = "" if k == "unary" else f"{k}_"
        out[f"{pre}p50_ms"], out[f"{pre}p99_ms"] = pct(v, 50) * 1e3, pct(v, 99) * 1e3
    out["mean_ms"] = float(np.mean(lat["unary"])) * 1e3
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its child processes (datastore-serve --workers N: the supervisor and its workers)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return [pid, *kids]


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _server_cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += _cpu_seconds(p)
        except OSError:
            pass
    return total


async def _load(addr: str, contexts: list, budget: int, first: int, step: int, n: int, start_at: float,
                stop_at: float, stream: bool = False) -> dict:
    """``n`` concurrent callers, each on its own channel and connection, querying contexts first, first+step,
    ...; warm-up until ``start_at`` (wall clock, shared by all load processes), counted until ``stop_at``.
    ``stream``: each caller sends its lookups on one RetrieveStream instead of unary Retrieve calls."""
    import resource

    import grpc

    from ..protos import datastore_pb2 as pb
    from ..protos import datastore_pb2_grpc as pb_grpc

    reqs = [pb.RetrieveRequest(context=c, budget=budget) for c in contexts]
    channels = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]
    stubs = [pb_grpc.DatastoreStub(ch) for ch in channels]
    done, errors, lat = 0, 0, []
    late_s = max(0.0, time.time() - start_at)   # > 0: this process was not ready when the window opened

    calls = [stub.RetrieveStream() for stub in stubs] if stream else None

    async def ask(i: int, req):
        if calls is None:
            return await stubs[i].Retrieve(req, timeout=1)
        await calls[i].write(req)
        return await calls[i].read()

    async def caller(i: int, until: float, counted: bool):
        nonlocal done, errors
        j = first + i * step
        while time.time() < until:
            t0 = time.perf_counter()
            try:
                await ask(i, reqs[j % len(reqs)])
                if counted:
                    done += 1
                    lat.append(time.perf_counter() - t0)
            except grpc.RpcError:
                if counted:
                    errors += 1
            j += n * step

    await asyncio.gather(*(caller(i, start_at, False) for i in range(n)))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(caller(i, stop_at, True) for i in range(n)))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for call in calls or ():
        await call.done_writing()
    for ch in channels:
        await ch.close()
    return {"done": done, "errors": errors, "lat": lat, "late_s": late_s,
            "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)}


def _load_process(args, out) -> None:
    out.put(asyncio.run(_load(*args)))


def bench_throughput(addr: str, queries, budget: int, clients: int, seconds: float, procs: int,
                     server_pid: int, warmup_s: float = 1.0, stream: bool = False) -> dict:
    """``clients`` callers over ``procs`` load-generator processes; lookups/s over a common ``seconds`` window."""
    import multiprocessing as mp

    procs = max(1, min(procs, clients))
    contexts = [q.tolist() for q in queries]
    ctx = mp.get_context("spawn")      # this process already holds gRPC channels: no fork
    out = ctx.Queue()
    start_at = time.time() + 4.0 + warmup_s   # spawning a process and importing grpc take a few seconds here
    stop_at = start_at + seconds
    shares = [clients // procs + (k < clients % procs) for k in range(procs)]
    workers = [ctx.Process(target=_load_process, daemon=True,
                           args=((addr, contexts, budget, k, procs, shares[k], start_at, stop_at, stream), out))
               for k in range(procs)]
    for w in workers:
        w.start()
    server_pids = _process_tree(server_pid)
    time.sleep(max(0.0, start_at - time.time()))
    s0, m0 = _server_cpu(server_pids), _machine_busy_seconds()
    time.sleep(max(0.0, stop_at - time.time()))
    s1, m1 = _server_cpu(server_pids), _machine_busy_seconds()
    results = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    done = sum(r["done"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    client_cpu = sum(r["cpu_s"] for r in results)
    server_cores, client_cores = (s1 - s0) / seconds, client_cpu / seconds
    return {"lookups_per_s": done / seconds, "errors": sum(r["errors"] for r in results),
            "p50_ms": pct(lat, 50) * 1e3 if lat else None, "p99_ms": pct(lat, 99) * 1e3 if lat else None,
            "client_procs": procs, "server_processes": len(server_pids),
            "server_cpu_us_per_lookup": (s1 - s0) / max(done, 1) * 1e6,
            "client_cpu_us_per_lookup": client_cpu / max(done, 1) * 1e6,
            "client_busy_max": max(r["cpu_s"] for r in results) / seconds,
            "client_late_s": max(r["late_s"] for r in results),
            "cores_busy": {"server": server_cores, "load_generator": client_cores,
                           "other": max(0.0, (m1 - m0) / seconds - server_cores - client_cores)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    ap.add_argument("--work", default="/tmp/ds_bench")
    ap.add_argument("--model", default=None)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=16, help="concurrent callers, one connection each (default 16)")
    ap.add_argument("--client-procs", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                    help="load-generator processes the callers are spread over (default: half the CPUs, >= 1)")
    ap.add_argument("--workers", default="1", help="datastore-serve --workers (default 1)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--tail", type=int, default=64)
    ap.add_argument("--transport", choices=("unary", "stream", "both"), default="both",
                    help="throughput load over unary Retrieve calls, RetrieveStream streams, or both (default)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--index", default=None,
                    help="serve this existing index instead of building one from --corpus; queries are then "
                         "context tails sampled from the index's own tokens (e.g. index_bench.py's synthetic "
                         "100M-token index: --index /tmp/specstore-index-bench/synthetic)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    build_s = None
    if a.index:
        index_path = Path(a.index)
        queries = index_queries(index_path, a.queries, a.tail)
    else:
        train, held = prepare_corpus(Path(a.corpus), work)
        index_path = work / "index"
        if a.rebuild or not (index_path / "manifest.json").exists():
            build_s = build(train, index_path, a.model)
        from ..datastore.model_files import load_tokenizer

        tok = load_tokenizer(a.model)
        queries = make_queries(held, tok, a.queries, a.tail)
    manifest = json.loads((index_path / "manifest.json").read_text())
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU, no GPU ({platform.machine()})",
           "queries": len(queries), "budget": a.budget, "tail": a.tail, "clients": a.clients, "workers": a.workers,
           "index_tokens": manifest.get("num_tokens") or manifest.get("stats", {}).get("num_tokens"),
           "build_s": build_s}
    res["in_process"] = bench_in_process(index_path, queries, a.budget)
    proc, addr = start_server(index_path, work, a.workers)
    try:
        res["grpc"] = bench_grpc_latency(addr, queries, a.budget)
        for transport in (("unary", "stream") if a.transport == "both" else (a.transport,)):
            key = "throughput" if transport == "unary" else "throughput_stream"
            res[key] = bench_throughput(addr, queries, a.budget, a.clients, a.seconds, a.client_procs, proc.pid,
                                        stream=transport == "stream")
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    ip, g = res["in_process"], res["grpc"]
    rows = [
        f"| in-process lookup p50 / p99 | {ip['p50_us']:.0f} us / {ip['p99_us']:.0f} us | p50 <= 50 us |",
        f"| gRPC loopback p50 / p99, unary Retrieve (raw stub) | {g['p50_ms']:.3f} ms / {g['p99_ms']:.3f} ms "
        "| <= 0.6 ms / <= 2 ms |",
        f"| gRPC loopback p50 / p99, RetrieveStream (raw stub) | {g['stream_p50_ms']:.3f} ms / "
        f"{g['stream_p99_ms']:.3f} ms | <= 0.6 ms / <= 2 ms |",
        f"| DatastoreClient -> DraftTree p50 / p99, stream (default) | {g['client_stream_p50_ms']:.3f} ms / "
        f"{g['client_stream_p99_ms']:.3f} ms | |",
        f"| DatastoreClient -> DraftTree p50 / p99, unary | {g['client_unary_p50_ms']:.3f} ms / "
        f"{g['client_unary_p99_ms']:.3f} ms | |",
    ]
    for key, name in (("throughput", "unary"), ("throughput_stream", "stream")):
        t = res.get(key)
        if t is None:
            continue
        cb = t["cores_busy"]
        if t["client_late_s"] > 0:
            print(f"WARNING ({name}): a load-generator process started {t['client_late_s']:.1f} s into the window",
                  file=sys.stderr)
        if t["client_busy_max"] > 0.9:
            print(f"WARNING ({name}): a load-generator process was {t['client_busy_max']:.0%} busy: the client may "
                  "be the bottleneck; raise --client-procs", file=sys.stderr)
        procs = f"{t['client_procs']} process{'es' if t['client_procs'] != 1 else ''}"
        rows += [
            f"| throughput ({name}), {a.clients} concurrent clients, --workers {a.workers} | "
            f"{t['lookups_per_s']:.0f} lookups/s ({t['errors']} errors) | >= 2,000/s |",
            f"| CPU per lookup ({name}): server / load generator ({procs}) | "
            f"{t['server_cpu_us_per_lookup']:.0f} us / {t['client_cpu_us_per_lookup']:.0f} us | |",
            f"| cores busy ({name}): server / load generator / other processes | {cb['server']:.2f} / "
            f"{cb['load_generator']:.2f} / {cb['other']:.2f} | other = 0: quiet machine |",
        ]
    rows.append(f"| hit rate / mean nodes per tree | {ip['hit_rate']:.2f} / {ip['mean_nodes']:.1f} | |")
    print("\n| measure | value | goal |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
