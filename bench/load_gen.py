"""Load generator for RELIABILITY.md promise 4, "Load": decoder-like clients against a real ``datastore-serve``.

    python -m specstore.bench.load_gen --index DIR [--phase-seconds 20] [--mix stream=2,unary=1,batch=1]
        [--serve-args "--max-concurrency 64"] [--procs 1] [--json OUT.json]
    python -m specstore.bench.load_gen --index DIR --soak-minutes 30
    python -m specstore.bench.load_gen --index DIR --target HOST:PORT [--server-pid PID]

Without ``--target`` a ``datastore-serve`` process is started on 127.0.0.1 (``--serve-args`` adds flags)
and stopped with SIGTERM at the end; with ``--target`` the running server at HOST:PORT is loaded (its RSS and
open files are sampled only when ``--server-pid`` names its process on this machine).

Clients are decoders: each walks along a real token window drawn from the index's own token shards; a step
sends the tail (``--tail`` tokens) ending at its position, then advances 1-4 tokens (what a decoder accepts
per step) and looks up again. A decoder uses one transport, drawn by ``--mix``: ``stream`` (one
RetrieveStream, one request per step; a refusal ends the stream and the next step opens a new one, as
DatastoreClient does), ``unary`` (Retrieve) or ``batch`` (RetrieveBatch of ``--batch`` decoders' steps at
once, a batched decoder). Calls have a deadline (``--timeout``).

Run:
  capacity  closed loop, 1, 2, 4, ... decoders (``--ramp-seconds`` each) until OK lookups/s stop growing
            (< 5% over the best so far, twice in a row): the capacity C is the best OK lookups/s (a
            RetrieveBatch call holds ``--batch`` lookups; the offered rates below are the calls/s that carry
            C x load lookups/s under the mix);
  phases    open loop (Poisson arrivals, each a step of an idle decoder, a new one when none is idle) at
            1x, 2x and 4x C for ``--phase-seconds`` each, then 0.5x C (recovery);
  soak      (``--soak-minutes M``, instead of the phases) open loop at ``--soak-load`` (0.8) x C for M minutes.

Reported per phase: offered and sent calls/s (sent < offered: the generator could not keep up, see
``send_late_p99_ms``), OK calls/s and lookups/s, p50/p99/max latency of OK answers and of refusals
(RESOURCE_EXHAUSTED), calls by status code, the error rate, the server's RSS and open files (/proc/PID,
sampled every 0.25 s, the process and its children), calls unanswered when the phase ended, and whether
OK answers queued (``queue_growing``: the p99 of OK latency in the phase's last third > 3x its first third
and > 50 ms), and ``generator_saturated`` (sends > 100 ms behind schedule at p99: the generator, not
the server, set the pace). Latency counts from the arrival's scheduled time, so a late send is not hidden (no
coordinated omission). Soak: per minute RSS, open files, OK p50/p99 and error rate; slopes of RSS (MB/min)
and open files (per min) and the p99 drift (last minute / first).

``tests/integration/test_load_gen.py`` runs a reduced form. The load generator and the server share the
machine's cores when run on one machine: the capacity is then what both sustain together.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shlex
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..datastore.call_wait import CLOCK_METADATA, timeout_metadata
from .serve_process import ServeProcess

TRANSPORTS = ("stream", "unary", "batch")
# status codes as small ints in the per-call records (the rest of grpc.StatusCode by name at the end)
OK, REFUSED = "OK", "RESOURCE_EXHAUSTED"


# ------------------------------------------------------------------------------------------ contexts
def token_windows(index_path: str, n: int = 256, length: int = 2048, seed: int = 0) -> list[np.ndarray]:
    """``n`` runs of consecutive tokens (int32 [<= length], at least 80 each) from the index's own token
    shards, none crossing a document separator: the texts the decoders "generate"."""
    from ..datastore.index import DatastoreIndex

    rng = np.random.default_rng(seed)
    ix = DatastoreIndex.open(index_path, load_faiss=False)
    try:
        out: list[np.ndarray] = []
        tries = 0
        while len(out) < n and tries < 50 * n:
            tries += 1
            sh = ix.shards[int(rng.integers(len(ix.shards)))]
            if sh.n < 100:
                continue
            p = int(rng.integers(0, max(1, sh.n - 80)))
            w = np.asarray(sh.tokens[p:p + length], dtype=np.int64)
            cut = np.flatnonzero(w == sh.sep)
            if len(cut):
                w = w[:cut[0]]
            if len(w) >= 80:
                out.append(w.astype(np.int32))
        if not out:
            raise ValueError(f"{index_path}: no run of 80 tokens without a separator in its shards")
        return out
    finally:
        ix.close()


class Cursor:
    """A decoder's position in its text: ``context()`` is the tail ending here, ``advance()`` moves 1-4 tokens
    on (to another text at the end)."""

    def __init__(self, windows: list[np.ndarray], rng: random.Random, tail: int):
        self.windows, self.rng, self.tail = windows, rng, tail
        self._jump()

    def _jump(self) -> None:
        self.w = self.windows[self.rng.randrange(len(self.windows))]
        self.pos = self.rng.randrange(16, len(self.w) // 2)

    def context(self) -> list[int]:
        return self.w[max(0, self.pos - self.tail):self.pos].tolist()

    def advance(self) -> None:
        self.pos += self.rng.randint(1, 4)
        if self.pos >= len(self.w):
            self._jump()


# ------------------------------------------------------------------------------------------ one phase
@dataclass
class PhaseSpec:
    """What one load-generator process runs: ``clients`` decoders in a closed loop (``rate`` == 0), or open-loop
    arrivals at ``rate`` calls/s; for ``seconds`` from the wall-clock time ``start_at``."""
    address: str
    windows: list
    seconds: float
    start_at: float
    clients: int = 0
    rate: float = 0.0
    mix: dict = field(default_factory=lambda: {"stream": 2, "unary": 1, "batch": 1})
    batch: int = 4
    budget: int = 32
    tail: int = 64
    options: dict = field(default_factory=dict)     # RetrieveOptions fields sent with every lookup
    timeout_s: float = 5.0
    channels: int = 16
    seed: int = 0
    poisson: bool = True


class _Decoder:
    """One decoder-like client: its cursor(s), its transport and, for ``stream``, its open RetrieveStream."""

    def __init__(self, transport: str, stub, cursors: list[Cursor], spec: PhaseSpec, pb):
        self.transport, self.stub, self.cursors, self.spec, self.pb = transport, stub, cursors, spec, pb
        self.call = None
        self.seq = 0
        self.details: dict[str, str] = {}   # status code -> the first error details seen (for the report)
        self.opts = pb.RetrieveOptions(**spec.options) if spec.options else None
        # unary calls state their timeout, as DatastoreClient's do, so the server can refuse queued calls
        self.metadata = (timeout_metadata(spec.timeout_s),)

    def _request(self, cur: Cursor):
        r = self.pb.RetrieveRequest(context=cur.context(), budget=self.spec.budget, seq=self.seq)
        if self.opts is not None:
            r.options.CopyFrom(self.opts)
        return r

    async def step(self) -> tuple[str, int]:
        """One lookup step (a batch: one per cursor): (status code name, lookups answered)."""
        import grpc

        self.seq += 1
        try:
            if self.transport == "unary":
                await self.stub.Retrieve(self._request(self.cursors[0]), timeout=self.spec.timeout_s,
                                         metadata=self.metadata)
            elif self.transport == "batch":
                await self.stub.RetrieveBatch(self.pb.RetrieveBatchRequest(
                    requests=[self._request(c) for c in self.cursors]), timeout=self.spec.timeout_s,
                    metadata=self.metadata)
            else:
                if self.call is None:
                    self.call = self.stub.RetrieveStream(metadata=(CLOCK_METADATA,))
                call = self.call        # close() may drop self.call meanwhile (the phase ended)
                req = self._request(self.cursors[0])
                req.sent_us = time.monotonic_ns() // 1000
                await call.write(req)
                try:
                    resp = await asyncio.wait_for(call.read(), self.spec.timeout_s)
                except asyncio.TimeoutError:
                    self.close()
                    return "DEADLINE_EXCEEDED", 0
                if resp is grpc.aio.EOF:
                    code = await call.code()
                    self.call = None
                    return (code.name if code != grpc.StatusCode.OK else "STREAM_ENDED"), 0
            code, n = OK, len(self.cursors)
        except grpc.aio.AioRpcError as e:
            self.call = None            # a failed stream is over; the next step opens a new one
            code, n = e.code().name, 0
            self.details.setdefault(code, (e.details() or "")[:200])
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            self.call = None            # wrote to a stream the server had just ended
            code, n = "STREAM_ENDED", 0
        for c in self.cursors:
            c.advance()
        return code, n

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


class _Records:
    """Per call: scheduled start (s from the phase start), latency from it, send lateness, code, lookups."""

    def __init__(self):
        self.t, self.lat, self.late, self.code, self.lookups = [], [], [], [], []

    def add(self, t: float, lat: float, late: float, code: str, n: int) -> None:
        self.t.append(t)
        self.lat.append(lat)
        self.late.append(late)
        self.code.append(code)
        self.lookups.append(n)


async def _run(spec: PhaseSpec) -> dict:
    import grpc

    from ..protos import datastore_pb2 as pb
    from ..protos import datastore_pb2_grpc as pb_grpc

    rng = random.Random(spec.seed)
    n_ch = max(1, spec.channels if spec.rate else min(spec.channels, spec.clients))
    # each channel its own TCP connection (grpc.use_local_subchannel_pool), as separate decoder nodes have
    channels = [grpc.aio.insecure_channel(spec.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_ch)]
    stubs = [pb_grpc.DatastoreStub(ch) for ch in channels]
    names, weights = zip(*[(k, v) for k, v in spec.mix.items() if v > 0])
    made = 0

    def new_decoder(transport: Optional[str] = None) -> _Decoder:
        nonlocal made
        transport = transport or rng.choices(names, weights)[0]
        k = spec.batch if transport == "batch" else 1
        made += 1
        d = _Decoder(transport, stubs[made % n_ch], [Cursor(spec.windows, rng, spec.tail) for _ in range(k)],
                     spec, pb)
        decoders.append(d)
        return d

    rec = _Records()
    loop = asyncio.get_running_loop()
    t0 = spec.start_at
    decoders: list[_Decoder] = []
    outstanding: set = set()
    unanswered = 0
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, t0 - time.time()))
    base = loop.time() - (time.time() - t0)     # loop clock at the phase start

    if not spec.rate:   # closed loop: each decoder steps as soon as its previous step is answered
        async def run_decoder(d: _Decoder) -> None:
            while (now := loop.time()) < base + spec.seconds:
                code, n = await d.step()
                rec.add(now - base, loop.time() - now, 0.0, code, n)

        for _ in range(spec.clients):
            new_decoder()
        await asyncio.gather(*(run_decoder(d) for d in list(decoders)))
    else:               # open loop: arrivals on a schedule, each a step of an idle decoder
        idle: dict[str, list[_Decoder]] = {t: [] for t in TRANSPORTS}

        async def arrival(t_sched: float) -> None:
            transport = rng.choices(names, weights)[0]
            pool = idle[transport]
            d = pool.pop() if pool else new_decoder(transport)
            sent = loop.time()
            code, n = await d.step()
            rec.add(t_sched - base, loop.time() - t_sched, sent - t_sched, code, n)
            pool.append(d)

        next_t = base
        while next_t < base + spec.seconds:
            now = loop.time()
            while next_t <= now and next_t < base + spec.seconds:
                task = loop.create_task(arrival(next_t))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
                next_t += rng.expovariate(spec.rate) if spec.poisson else 1.0 / spec.rate
            await asyncio.sleep(max(0.0, min(next_t, base + spec.seconds) - loop.time()))
        unanswered = len(outstanding)
        if outstanding:   # they end by their deadline at the latest
            await asyncio.wait(list(outstanding), timeout=spec.timeout_s + 5)
        for task in list(outstanding):    # a generator too late even for that: not counted
            task.cancel()
        await asyncio.gather(*outstanding, return_exceptions=True)
    cpu = time.process_time() - cpu0
    details: dict[str, str] = {}
    for d in decoders:
        for k, v in d.details.items():
            details.setdefault(k, v)
        d.close()
    for ch in channels:
        await ch.close()
    return {"t": np.asarray(rec.t, np.float32), "lat": np.asarray(rec.lat, np.float32),
            "late": np.asarray(rec.late, np.float32), "code": rec.code, "lookups": np.asarray(rec.lookups, np.int32),
            "unanswered_at_end": unanswered, "decoders": len(decoders), "cpu_s": cpu, "details": details}


_LOOP: Optional[asyncio.AbstractEventLoop] = None


def run_phase(spec: PhaseSpec) -> dict:
    """Run ``spec`` in this process; the raw per-call records (see ``_Records``). Every phase of a process runs
    on one event loop, kept open: gRPC's poller thread still hands completions of cancelled calls to the loop
    after a phase ends, and a closed loop turns each into a logged traceback."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(_run(spec))


def merge(parts: list[dict]) -> dict:
    return {"t": np.concatenate([p["t"] for p in parts]), "lat": np.concatenate([p["lat"] for p in parts]),
            "late": np.concatenate([p["late"] for p in parts]), "code": [c for p in parts for c in p["code"]],
            "lookups": np.concatenate([p["lookups"] for p in parts]),
            "unanswered_at_end": sum(p["unanswered_at_end"] for p in parts),
            "decoders": sum(p["decoders"] for p in parts), "cpu_s": sum(p["cpu_s"] for p in parts),
            "details": {k: v for p in parts for k, v in p["details"].items()}}


# ------------------------------------------------------------------------------------------ the server
def _children(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                out += _children(int(c))
    except OSError:
        pass
    return out


def proc_sample(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of ``pid`` and its descendants (/proc)."""
    rss = fds = 0
    for p in _children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return rss, fds


class Sampler:
    """Samples ``proc_sample(pid)`` every ``interval_s`` in a thread: ``samples`` [(unix time, rss, fds)]."""

    def __init__(self, pid: Optional[int], interval_s: float = 0.25):
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if pid:
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, fds = proc_sample(self.pid)
            if rss:
                self.samples.append((time.time(), rss, fds))
            self._stop.wait(self.interval_s)

    def between(self, a: float, b: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if a <= s[0] <= b]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


# ------------------------------------------------------------------------------------------ summaries
def _ms(x: np.ndarray) -> Optional[dict]:
    if not len(x):
        return None
    x = np.asarray(x, dtype=np.float64) * 1e3
    return {"p50": round(float(np.percentile(x, 50)), 3), "p99": round(float(np.percentile(x, 99)), 3),
            "max": round(float(x.max()), 3)}


def summarize(name: str, raw: dict, seconds: float, offered: Optional[float], samples: list) -> dict:
    """One phase's figures from its merged records and the server samples taken during it."""
    codes = np.asarray(raw["code"], dtype=object)
    ok = codes == OK
    refused = codes == REFUSED
    t, lat = raw["t"], raw["lat"]
    by_code: dict[str, int] = {}
    for c in raw["code"]:
        by_code[c] = by_code.get(c, 0) + 1
    n = len(codes)
    thirds = [ok & (t >= seconds * k / 3) & (t < seconds * (k + 1) / 3) for k in range(3)]
    p99_thirds = [round(float(np.percentile(lat[m], 99)) * 1e3, 3) if m.any() else None for m in thirds]
    growing = bool(p99_thirds[0] and p99_thirds[2] and p99_thirds[2] > 3 * p99_thirds[0] and p99_thirds[2] > 50)
    out = {"phase": name, "seconds": seconds, "offered_per_s": None if offered is None else round(offered, 1),
           "sent_per_s": round(n / seconds, 1), "ok_per_s": round(int(ok.sum()) / seconds, 1),
           "lookups_ok_per_s": round(int(raw["lookups"].sum()) / seconds, 1),
           "ok_ms": _ms(lat[ok]), "refused_ms": _ms(lat[refused]),
           "ok_rtt_ms": _ms((lat - raw["late"])[ok]), "refused_rtt_ms": _ms((lat - raw["late"])[refused]),
           "codes": by_code,
           "error_rate": round(1 - float(ok.mean()), 4) if n else None,
           "ok_p99_ms_by_third": p99_thirds, "queue_growing": growing,
           "send_late_p99_ms": round(float(np.percentile(raw["late"], 99)) * 1e3, 3) if n else None,
           "unanswered_at_end": raw["unanswered_at_end"], "decoders": raw["decoders"],
           "generator_cpu_s": round(raw["cpu_s"], 2), "error_details": raw["details"]}
    # sends more than 100 ms behind schedule: the generator, not the server, set the pace (add --procs)
    out["generator_saturated"] = bool(n and out["send_late_p99_ms"] > 100)
    if samples:
        rss = np.asarray([s[1] for s in samples]) / 2**20
        fds = np.asarray([s[2] for s in samples])
        out["server_rss_mb"] = {"start": round(float(rss[0]), 1), "max": round(float(rss.max()), 1),
                                "end": round(float(rss[-1]), 1)}
        out["server_fds"] = {"start": int(fds[0]), "max": int(fds.max()), "end": int(fds[-1])}
    return out


def soak_minutes(raw: dict, samples: list, t0: float, minutes: int) -> dict:
    """Per-minute figures of a soak and the slopes of RSS and open files (least squares over the samples after
    the first minute, the warm-up) and the p99 drift (last minute / first)."""
    codes = np.asarray(raw["code"], dtype=object)
    rows = []
    for k in range(minutes):
        m = (raw["t"] >= 60 * k) & (raw["t"] < 60 * (k + 1))
        ok = m & (codes == OK)
        ss = [s for s in samples if t0 + 60 * k <= s[0] < t0 + 60 * (k + 1)]
        rows.append({"minute": k + 1, "calls": int(m.sum()), "ok_ms": _ms(raw["lat"][ok]),
                     "error_rate": round(1 - int(ok.sum()) / max(1, int(m.sum())), 4),
                     "rss_mb": round(float(np.mean([s[1] for s in ss])) / 2**20, 1) if ss else None,
                     "fds": round(float(np.mean([s[2] for s in ss])), 1) if ss else None})
    late = [s for s in samples if s[0] >= t0 + 60]
    slope = {}
    if len(late) > 2:
        x = (np.asarray([s[0] for s in late]) - t0) / 60
        slope = {"rss_mb_per_min": round(float(np.polyfit(x, np.asarray([s[1] for s in late]) / 2**20, 1)[0]), 3),
                 "fds_per_min": round(float(np.polyfit(x, np.asarray([s[2] for s in late], float), 1)[0]), 3)}
    p99 = [r["ok_ms"]["p99"] for r in rows if r["ok_ms"]]
    return {"minutes": rows, **slope, "p99_drift": round(p99[-1] / p99[0], 3) if len(p99) > 1 else None}


# ------------------------------------------------------------------------------------------ the run
class Generator:
    """Runs phases over ``procs`` load-generator processes (spawned once; 0: in this process)."""

    def __init__(self, base: PhaseSpec, procs: int, sampler: Sampler):
        self.base, self.procs, self.sampler = base, procs, sampler
        self.pool = mp.get_context("spawn").Pool(procs) if procs > 0 else None

    def run(self, name: str, seconds: float, *, clients: int = 0, rate: float = 0.0, lead_s: float = 0.5) -> dict:
        k = max(1, self.procs)
        # spawned processes need a moment to receive the spec: every process starts at the same instant
        start_at = time.time() + (lead_s if self.pool is None else 2.0)
        specs = [replace(self.base, seconds=seconds, start_at=start_at, clients=clients // k + (i < clients % k),
                         rate=rate / k, seed=self.base.seed * 1000 + i + zlib.crc32(name.encode()) % 997)
                 for i in range(k)]
        specs = [s for s in specs if s.clients or s.rate]
        parts = self.pool.map(run_phase, specs) if self.pool is not None else [run_phase(s) for s in specs]
        raw = merge(parts)
        samples = self.sampler.between(start_at, start_at + seconds)
        out = summarize(name, raw, seconds, rate or None, samples)
        out["raw"], out["start_at"] = raw, start_at
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def lookups_per_call(mix: dict, batch: int) -> float:
    """Mean lookups of a call under ``mix`` (a RetrieveBatch call holds ``batch``)."""
    total = sum(mix.values())
    return sum(w * (batch if t == "batch" else 1) for t, w in mix.items()) / total


def measure_capacity(gen: Generator, ramp_seconds: float, max_clients: int, log=print) -> tuple[float, list]:
    """Closed loop with 1, 2, 4, ... decoders until OK lookups/s grew less than 5% over the best so far twice
    in a row (once may be a neighbour's burst on a shared machine): (the best OK lookups/s, the ramp's phase
    summaries). Capacity counts lookups, not calls: a few decoders do not follow the transport mix (one
    RetrieveBatch call holds ``batch`` lookups)."""
    best, steps, clients, flat = 0.0, [], 1, 0
    while clients <= max_clients and flat < 2:
        s = gen.run(f"closed-{clients}", ramp_seconds, clients=clients)
        s.pop("raw")
        steps.append(s)
        log(f"  closed loop, {clients:4d} decoders: {s['lookups_ok_per_s']:8.1f} OK lookups/s, codes {s['codes']}")
        flat = flat + 1 if s["lookups_ok_per_s"] < 1.05 * best else 0
        best = max(best, s["lookups_ok_per_s"])
        clients *= 2
    return best, steps


def _parse_kv(text: str, cast) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        out[k.strip()] = cast(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="the index served (its token shards give the contexts)")
    ap.add_argument("--target", default=None, help="HOST:PORT of a running server (default: start one)")
    ap.add_argument("--server-pid", type=int, default=None, help="with --target: its process, for RSS/open files")
    ap.add_argument("--serve-args", default="", help="extra datastore-serve flags, one string")
    ap.add_argument("--mix", default="stream=2,unary=1,batch=1", help="transport weights (default %(default)s)")
    ap.add_argument("--batch", type=int, default=4, help="lookups per RetrieveBatch call (default 4)")
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--tail", type=int, default=64, help="context tokens per lookup (default 64)")
    ap.add_argument("--options", default="",
                    help="RetrieveOptions sent with every lookup, e.g. max_matches=1024,depth=64")
    ap.add_argument("--timeout", type=float, default=5.0, help="deadline of a call, s (default 5)")
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes (0: in this process)")
    ap.add_argument("--channels", type=int, default=16, help="connections per load-generator process (default 16)")
    ap.add_argument("--ramp-seconds", type=float, default=5.0)
    ap.add_argument("--max-clients", type=int, default=256)
    ap.add_argument("--capacity", type=float, default=None, help="skip the ramp: this is the capacity (lookups/s)")
    ap.add_argument("--phase-seconds", type=float, default=20.0)
    ap.add_argument("--loads", default="1,2,4,0.5", help="open-loop phases as multiples of capacity")
    ap.add_argument("--soak-minutes", type=int, default=0, help="soak instead of the phases (documented: 30)")
    ap.add_argument("--soak-load", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    mix = _parse_kv(a.mix, float)
    if not mix or set(mix) - set(TRANSPORTS) or sum(mix.values()) <= 0:
        raise SystemExit(f"--mix: weights of {', '.join(TRANSPORTS)} (got {a.mix!r})")
    windows = token_windows(a.index, seed=a.seed)
    server = None
    if a.target:
        address, pid = a.target, a.server_pid
    else:
        server = ServeProcess(a.index, "--no-faiss", "--log-level", "warning", *shlex.split(a.serve_args))
        address, pid = server.address, server.proc.pid
    sampler = Sampler(pid)
    base = PhaseSpec(address=address, windows=windows, seconds=0, start_at=0, mix=mix, batch=a.batch,
                     budget=a.budget, tail=a.tail, options=_parse_kv(a.options, float), timeout_s=a.timeout,
                     channels=a.channels, seed=a.seed)
    base.options = {k: (v if k == "min_prob" else int(v)) for k, v in base.options.items()}
    gen = Generator(base, a.procs, sampler)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "address": address,
                 "serve_args": a.serve_args if server else None, "mix": mix, "batch": a.batch, "options": base.options,
                 "procs": a.procs, "cpus": os.cpu_count()}
    try:
        if a.capacity:
            cap, ramp = a.capacity, []
        else:
            print("capacity (closed loop):", file=sys.stderr)
            cap, ramp = measure_capacity(gen, a.ramp_seconds, a.max_clients,
                                         log=lambda s: print(s, file=sys.stderr))
        per_call = lookups_per_call(mix, a.batch)
        res["capacity_lookups_per_s"], res["capacity_calls_per_s"], res["ramp"] = cap, cap / per_call, ramp
        if a.soak_minutes:
            s = gen.run("soak", 60.0 * a.soak_minutes, rate=a.soak_load * cap / per_call)
            raw = s.pop("raw")
            s["soak"] = soak_minutes(raw, sampler.samples, s["start_at"], a.soak_minutes)
            print(f"  soak: {json.dumps(s['soak'])}", file=sys.stderr)
            res["phases"] = [s]
        else:
            res["phases"] = []
            for x in (float(v) for v in a.loads.split(",")):
                s = gen.run(f"{x:g}x", a.phase_seconds, rate=x * cap / per_call)
                s.pop("raw")
                res["phases"].append(s)
                print(f"  {x:g}x: {s['ok_per_s']:.0f} OK/s, ok {s['ok_ms']}, refused {s['refused_ms']}, "
                      f"codes {s['codes']}", file=sys.stderr)
                if s["generator_saturated"]:
                    print(f"WARNING ({x:g}x): sends were {s['send_late_p99_ms']:.0f} ms late (p99): the load "
                          "generator could not offer this load; add --procs or a machine", file=sys.stderr)
    finally:
        gen.close()
        sampler.stop()
        if server is not None:
            server.stop()
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


def table(res: dict) -> str:
    rows = ["| phase | offered calls/s | sent/s | OK/s | OK lookups/s | OK p50 / p99 / max ms | refused p50 / p99 / "
            "max ms (from send) | error rate | codes | RSS MB start/max/end | open files max | queue growing | "
            "generator saturated |",
            "|---|---:|---:|---:|---:|---|---|---:|---|---|---:|---|---|"]
    for s in res.get("phases", []):
        f = lambda d: "-" if not d else f"{d['p50']:.1f} / {d['p99']:.1f} / {d['max']:.1f}"  # noqa: E731
        rss = s.get("server_rss_mb")
        rss_text = "-" if not rss else f"{rss['start']:.0f}/{rss['max']:.0f}/{rss['end']:.0f}"
        rows.append(f"| {s['phase']} | {s['offered_per_s'] or '-'} | {s['sent_per_s']} | {s['ok_per_s']} | "
                    f"{s['lookups_ok_per_s']} | {f(s['ok_ms'])} | {f(s['refused_rtt_ms'])} | {s['error_rate']} | "
                    f"{', '.join(f'{k} {v}' for k, v in sorted(s['codes'].items()))} | {rss_text} | "
                    f"{s.get('server_fds', {}).get('max', '-')} | {s['queue_growing']} | {s['generator_saturated']} |")
    return (f"\ncapacity: {res.get('capacity_lookups_per_s', 0):.0f} OK lookups/s "
            f"({res.get('capacity_calls_per_s', 0):.0f} calls/s under the mix)\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
