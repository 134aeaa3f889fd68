"""Kill campaign for RELIABILITY.md promise 2, "acknowledged writes survive" (the shared statistics' pushes).

    .venv/bin/python -m specstore.bench.push_crash --runs 50 [--work DIR] [--seed 0] [--pushers 4] [--json OUT]

One statistics folder lives through the whole campaign. Every run starts a real ``datastore-serve`` on it
(``--stats-dir``, a write token, snapshots every 50 pushes so that runs also kill around snapshots), lets
``--pushers`` threads push batches as fast as they are answered, each batch with its own id, and SIGKILLs the
server after a random delay (0.2-2 s). Then:

  restart   a new server on the same folder starts (replaying the snapshot and the log);
  survive   every batch whose push was acknowledged is pushed again: the answer must be "applied before"
            (applied=false). Batches that were sent but not acknowledged are pushed again too: either
            answer is allowed (the kill may have come after the record was on disk);
  once      the server is stopped, the folder is opened offline: its table must equal the sum of every
            batch sent so far, each counted once (weights equal to 1e-9, the same rows), and its version
            must equal the number of distinct batches.

Batches draw their next tokens from 12 ids, so that no row ever holds more next tokens than the table keeps
(16): the table is then a plain sum, independent of the order in which concurrent pushes were applied,
and comparable to a reference computed here. Decay is off (a half-life of 1e15 s).
Prints a summary; exit status 0 when every check held. ``tests/integration/test_push_crash_campaign.py``
runs a reduced form (3 runs).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..datastore.ngram_stats import NgramStats
from ..datastore.stats_log import StatsLog
from ..protos import datastore_pb2 as pb
from .serve_process import ServeProcess

TOKEN = "push-crash-token"
NEXT_IDS = list(range(100, 112))      # every next token (and run token) comes from these 12 ids


@dataclass
class RunRecord:
    run: int
    kill_after_s: float
    acknowledged: int = 0
    unacknowledged: int = 0
    unacked_found_applied: int = 0
    lost: int = 0                     # acknowledged but applied again after the restart: must be 0
    replay_s: float = 0.0
    table_equal: bool = False
    version_ok: bool = False
    errors: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.table_equal and self.version_ok and not self.errors


def make_batch(rng: random.Random, batch_id: str) -> "pb.PushStatsRequest":
    rows = []
    for _ in range(rng.randint(0, 4)):
        k = rng.randint(1, 4)
        nxt = rng.sample(NEXT_IDS, k)
        rows.append(pb.TopkRow(token=rng.randrange(2000), next_tokens=nxt, probs=[round(0.8 / k, 4)] * k))
    runs = [pb.TokenRun(tokens=[rng.choice(NEXT_IDS) for _ in range(rng.randint(2, 10))], new_from=1)
            for _ in range(rng.randint(1, 2))]
    return pb.PushStatsRequest(batch_id=batch_id, rows=rows, runs=runs)


def reference(batches) -> NgramStats:
    s = NgramStats()
    for b in batches:
        s.apply([(r.token, r.next_tokens, r.probs) for r in b.rows], [(r.tokens, r.new_from) for r in b.runs], now=0.0)
    return s


class Server(ServeProcess):
    """``datastore-serve`` on 127.0.0.1 and a free port, keeping its shared statistics in ``stats_dir`` (None:
    none), its log appended to ``log_path``; ``args`` replace this campaign's settings (decay off, frequent
    snapshots, a token). Returns once the port is bound: ``wait_ready()`` times the load."""

    def __init__(self, index: Path, stats_dir: Optional[Path], log_path: Path, args: Optional[list] = None):
        super().__init__(
            index, "--no-faiss", *(["--stats-dir", str(stats_dir)] if stats_dir is not None else []),
            "--log-level", "warning",
            *(args if args is not None else ["--stats-half-life", "1e15", "--stats-snapshot-every", "50",
                                             "--auth-token", TOKEN]),
            log_path=log_path, append_log=True, ready=False, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

    def stop(self, grace_s: float = 60.0) -> int:
        return super().stop(grace_s)


def push_until_killed(address: str, pushers: int, rng: random.Random, run: int, stop: threading.Event):
    """Pushers push fresh batches until ``stop``; returns (acknowledged batches, unacknowledged batches)."""
    from ..client.datastore_client import DatastoreClient

    acked, unacked, lock = [], [], threading.Lock()
    seeds = [rng.randrange(1 << 30) for _ in range(pushers)]

    def pusher(i: int) -> None:
        r = random.Random(seeds[i])
        c = DatastoreClient(address, auth_token=TOKEN)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                b = make_batch(r, f"r{run}-p{i}-{n}")
                try:
                    applied, _ = c.push_stats(b, timeout_s=5.0)
                    ok = applied
                except Exception:  # noqa: BLE001 - the kill: this batch is unacknowledged
                    ok = False
                with lock:
                    (acked if ok else unacked).append(b)
                if not ok:
                    return
        finally:
            c.close()

    threads = [threading.Thread(target=pusher, args=(i,), daemon=True) for i in range(pushers)]
    for t in threads:
        t.start()
    return threads, acked, unacked


def one_run(run: int, rng: random.Random, index: Path, stats_dir: Path, work: Path, pushers: int,
            history: list) -> RunRecord:
    from ..client.datastore_client import DatastoreClient

    rec = RunRecord(run, round(rng.uniform(0.2, 2.0), 3))
    srv = Server(index, stats_dir, work / "serve.log")
    rec.replay_s = round(srv.wait_ready(), 3)
    stop = threading.Event()
    threads, acked, unacked = push_until_killed(srv.address, pushers, rng, run, stop)
    time.sleep(rec.kill_after_s)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(30)
    rec.acknowledged, rec.unacknowledged = len(acked), len(unacked)
    srv = Server(index, stats_dir, work / "serve.log")
    try:
        srv.wait_ready()
        c = DatastoreClient(srv.address, auth_token=TOKEN)
        try:
            for b in acked:
                applied, _ = c.push_stats(b, timeout_s=10.0)
                rec.lost += int(applied)
            for b in unacked:
                applied, _ = c.push_stats(b, timeout_s=10.0)
                rec.unacked_found_applied += int(not applied)
        finally:
            c.close()
    except Exception as e:  # noqa: BLE001
        rec.errors.append(f"{type(e).__name__}: {e}")
    finally:
        srv.stop()
    history.extend(acked)
    history.extend(unacked)
    try:
        log = StatsLog(stats_dir, stats=NgramStats(half_life_s=1e15)).open()   # the server's settings
        try:
            rec.table_equal = log.stats.same_as(reference(history))
            rec.version_ok = log.stats.version == len({b.batch_id for b in history})
        finally:
            log.close()
    except Exception as e:  # noqa: BLE001
        rec.errors.append(f"offline open: {type(e).__name__}: {e}")
    return rec


def build_index(work: Path) -> Path:
    from .build_crash import builder_env, write_corpus

    files = write_corpus(work / "corpus", files=2, lines=40)
    out = work / "index"
    p = subprocess.run([sys.executable, "-m", "specstore.indexers.cli", *map(str, files), "--no-embeddings",
                        "--out", str(out), "-q"], env=builder_env(), capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"index-build failed: {p.stderr}")
    return out


def run_campaign(runs: int, work: Path, seed: int = 0, pushers: int = 4, log=print) -> tuple[list, dict]:
    rng = random.Random(seed)
    index = build_index(work)
    stats_dir = work / "stats"
    history: list = []
    records = []
    for i in range(runs):
        rec = one_run(i, rng, index, stats_dir, work, pushers, history)
        records.append(rec)
        log(f"run {i + 1}/{runs}: killed after {rec.kill_after_s:.2f}s, {rec.acknowledged} acknowledged, "
            f"{rec.unacknowledged} unacknowledged ({rec.unacked_found_applied} found applied), lost {rec.lost}, "
            f"table {'equal' if rec.table_equal else 'DIFFERENT'}, restart {rec.replay_s:.2f}s"
            + (f", errors {rec.errors}" if rec.errors else ""))
    summary = {
        "runs": runs, "kills": runs,
        "acknowledged_pushes": sum(r.acknowledged for r in records),
        "unacknowledged_pushes": sum(r.unacknowledged for r in records),
        "unacknowledged_found_applied": sum(r.unacked_found_applied for r in records),
        "lost": sum(r.lost for r in records),
        "tables_equal": sum(r.table_equal for r in records),
        "versions_ok": sum(r.version_ok for r in records),
        "batches_total": len({b.batch_id for b in history}),
        "max_restart_s": max(r.replay_s for r in records),
        "failures": sum(not r.ok for r in records),
    }
    return records, summary


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.push_crash", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pushers", type=int, default=4, help="concurrent pushing threads")
    ap.add_argument("--json", type=Path, default=None, help="write the per-run records and the summary here")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.pushers < 1:
        ap.error("--runs and --pushers must be >= 1")
    with tempfile.TemporaryDirectory(prefix="push-crash-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        records, summary = run_campaign(a.runs, work, a.seed, a.pushers)
        summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary, indent=2))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "runs": [asdict(r) for r in records]}, indent=2))
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
