"""Do heavy lookups stall other callers? Small lookups timed on one connection while heavy RetrieveBatch
calls run on others, against a real `datastore-serve` process.

    python -m specstore.bench.stall_probe --index /tmp/rb/index --seconds 20 [--heavy-callers 2]

The heavy request is the one of issue 10: a RetrieveBatch of 64 requests whose context is the index's most
frequent token, with options max_span=1024, min_span=1, max_matches=1024, depth=1024, min_prob=1e-30
(``--matches``/``--depth`` change the last two, e.g. to the largest cost the server accepts). The probe
client sends one default Retrieve (the tail of a real document, budget 32) after another on its own
connection and reports their latency (p50, p99, max) and the heavy calls' codes and durations. The
server is started with the given extra flags (``--serve-args``) and stopped with SIGTERM at the end.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time

import grpc
import numpy as np

from ..protos import datastore_pb2 as pb
from ..protos import datastore_pb2_grpc as pb_grpc
from .serve_process import ServeProcess


def _channel(address: str) -> grpc.Channel:
    # its own TCP connection (without it the channels of one process share one)
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--heavy-callers", type=int, default=2)
    ap.add_argument("--matches", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=1024)
    ap.add_argument("--serve-args", default="", help="extra datastore-serve flags, one string")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from ..datastore.index import DatastoreIndex

    ix = DatastoreIndex.open(a.index, load_faiss=False)
    sh = ix.shards[0]
    frequent = int(np.argmax(np.diff(sh.buckets)))
    doc = np.asarray(sh.tokens[1:200], dtype=np.int64)
    ix.close()
    heavy = pb.RetrieveBatchRequest(requests=[pb.RetrieveRequest(
        context=[frequent], budget=32,
        options=pb.RetrieveOptions(max_span=1024, min_span=1, max_matches=a.matches, depth=a.depth,
                                   min_prob=1e-30)) for _ in range(64)])
    small = pb.RetrieveRequest(context=doc[-64:].tolist(), budget=32)
    server = ServeProcess(a.index, "--log-level", "warning", *shlex.split(a.serve_args))
    address = server.address
    stop = threading.Event()
    heavy_codes: dict[str, int] = {}
    heavy_s: list[float] = []
    lock = threading.Lock()

    def heavy_caller():
        with _channel(address) as ch:
            st = pb_grpc.DatastoreStub(ch)
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    st.RetrieveBatch(heavy, timeout=120)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    heavy_codes[code] = heavy_codes.get(code, 0) + 1
                    heavy_s.append(time.perf_counter() - t0)

    lat: list[float] = []
    small_errors: dict[str, int] = {}
    try:
        with _channel(address) as ch:
            st = pb_grpc.DatastoreStub(ch)
            st.Retrieve(small, timeout=30)
            threads = [threading.Thread(target=heavy_caller, daemon=True) for _ in range(a.heavy_callers)]
            for t in threads:
                t.start()
            end = time.time() + a.seconds
            while time.time() < end:
                t0 = time.perf_counter()
                try:
                    st.Retrieve(small, timeout=60)
                    lat.append(time.perf_counter() - t0)
                except grpc.RpcError as e:
                    small_errors[e.code().name] = small_errors.get(e.code().name, 0) + 1
                time.sleep(0.002)
            stop.set()
            for t in threads:
                t.join(180)
    finally:
        server.stop()
    ms = np.asarray(lat) * 1e3
    out = {
        "small_lookups": len(lat), "small_errors": small_errors,
        "small_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                     "max": float(ms.max())} if len(ms) else None,
        "heavy_calls": heavy_codes,
        "heavy_s": {"p50": float(np.median(heavy_s)), "max": float(max(heavy_s))} if heavy_s else None,
        "options": {"max_matches": a.matches, "depth": a.depth}, "serve_args": a.serve_args,
    }
    print(json.dumps(out, indent=None if not a.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
