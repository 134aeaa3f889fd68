"""Kill campaign for RELIABILITY.md promise 1, "index builds are all-or-nothing".

    .venv/bin/python -m specstore.bench.build_crash --runs 50 [--work DIR] [--seed 0] [--no-embeddings]
        [--json OUT.json]

Every run starts from a known state and SIGKILLs a real ``index-build`` process after a random delay:

  rebuild   an index of inputs A is published; the build of inputs A+B (a new index) over it is killed
  append    the same published index; ``--append`` of inputs B is killed
  first     nothing is published; the first build of A+B is killed

Runs cycle through the three scenarios, and each run's delay is drawn uniformly inside one stage (startup,
tokenize, suffix array, embed, FAISS, publish, cycling) of that scenario's timeline, measured on an
uninterrupted reference build (polling its stage markers). Where the kill really landed is read back from
the staging folder it left. Checked, all of which must hold:

  during    a reader thread opens the published path every few ms while the killed build runs (pinning the
            folder by a file descriptor, the way a reader must) and finds the old complete index or the new
            complete one, never a partial one, never none (``first``: none until the new one);
  after     the path a server opens (``readable_index_dir``) holds the old index byte for byte (every file's
            sha256 as before) or the complete new one, verified against its manifest's checksums, and a real
            gRPC server started on the published path answers Info with that index's id;
  rerun     the same command, run again, exits 0, and its index equals the reference build: byte-identical
            token shards, suffix arrays, document tables and FAISS files, same index id; nothing is left
            next to the index but its lock file.

Corpus: generated text (seeded, ~40k tokens in 8 files), shards of 4,000 tokens; embeddings with a tiny
random 2-layer BERT (the pipeline at a small cost; ``--no-embeddings`` drops the embed and FAISS stages).
Prints a summary (runs, kills per stage, failures) and writes the per-run records with ``--json``. Exit
status 0 when every check held, 1 otherwise. ``tests/integration/test_build_crash_campaign.py`` runs a
reduced form (4 runs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..datastore.durable import sha256_file
from ..datastore.index_format import MANIFEST_NAME, readable_index_dir

SCENARIOS = ("rebuild", "append", "first")
STAGES = ("startup", "tokenize", "suffix_array", "embed", "faiss", "publish")
SHARD_TOKENS = 4000
CHUNK_TOKENS = 64
WORDS = ("ownership borrow lifetime trait generic closure iterator module crate enum struct match pattern "
         "vector string slice reference mutable compiler error result option panic thread channel mutex "
         "async await future macro test cargo package workspace unsafe pointer box heap stack memory").split()


# ------------------------------------------------------------------------------------------ fixtures
def write_corpus(folder: Path, files: int = 8, lines: int = 120, seed: int = 0) -> list:
    """``files`` text files of seeded pseudo-sentences (str paths, sorted)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        text = "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + ".\n"
                       for _ in range(lines))
        p = folder / f"part{i:02d}.txt"
        p.write_text(text)
        paths.append(str(p))
    return paths


def write_tiny_embedder(folder: Path) -> Path:
    """A 2-layer, 32-wide random BERT with all-MiniLM-L6-v2's tokenizer (the embed/FAISS stages at a tiny
    cost; the tests' ``tiny_embedder`` fixture too)."""
    from safetensors.numpy import save_file

    from ..datastore.embedder import default_embedder_path

    folder.mkdir(parents=True, exist_ok=True)
    src = default_embedder_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, folder / f)
    H, inter, V, P, layers = 32, 64, 30522, 512, 2
    cfg = {"model_type": "bert", "hidden_size": H, "num_attention_heads": 2, "num_hidden_layers": layers,
           "intermediate_size": inter, "vocab_size": V, "max_position_embeddings": P, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "type_vocab_size": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    ones, zeros = np.ones(H, np.float32), np.zeros(H, np.float32)
    w = {"embeddings.word_embeddings.weight": r(V, H), "embeddings.position_embeddings.weight": r(P, H),
         "embeddings.token_type_embeddings.weight": r(2, H), "embeddings.LayerNorm.weight": ones,
         "embeddings.LayerNorm.bias": zeros}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"], w[p + f"attention.self.{n}.bias"] = r(H, H), r(H)
        w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = r(H, H), r(H)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(inter, H), r(inter)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(H, inter), r(H)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = ones, zeros
    save_file(w, str(folder / "model.safetensors"))
    return folder


def index_files(path: Path) -> dict:
    """relative path -> sha256 of every file of the index at ``path`` (manifest aside: it holds times)."""
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def index_id_at(path: Path) -> Optional[str]:
    try:
        return json.loads((path / MANIFEST_NAME).read_text())["index_id"]
    except (OSError, ValueError, KeyError):
        return None


def builder_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECSTORE_INDEX_CRASH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# ------------------------------------------------------------------------------------------ observers
class PublishedPathReader(threading.Thread):
    """Opens the published path every ``interval`` s until stopped and classifies what it finds.

    The folder is pinned by a descriptor and every file is read relative to it, as a reader that must not
    mix two snapshots does. A find is "old" / "new" (that index's id, manifest readable, every listed file
    present with its size), "none" (no index: allowed only where nothing was published before), or "bad".
    """

    def __init__(self, out: Path, old_id: Optional[str], new_id: str, interval: float = 0.003):
        super().__init__(daemon=True)
        self.out, self.old_id, self.new_id, self.interval = out, old_id, new_id, interval
        self.counts = {"old": 0, "new": 0, "none": 0, "bad": 0}
        self.bad: list = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        while not self._halt.is_set():
            kind, why = self.look()
            self.counts[kind] += 1
            if kind == "bad" and len(self.bad) < 5:
                self.bad.append(why)
            time.sleep(self.interval)

    def look(self) -> tuple:
        try:
            fd = os.open(readable_index_dir(self.out), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return ("none", "") if self.old_id is None else ("bad", "no index at the published path")
        try:
            try:
                with open(os.open(MANIFEST_NAME, os.O_RDONLY, dir_fd=fd), "rb") as f:
                    m = json.loads(f.read())
            except FileNotFoundError:
                return ("none", "") if self.old_id is None else ("bad", "a folder without manifest.json")
            entries = [(f"shards/{s['name']}/{n}", e) for s in m["shards"] for n, e in s["files"].items()]
            if m.get("faiss"):
                entries += [(f"faiss/{n}", e) for n, e in m["faiss"]["files"].items()]
            for rel, e in entries:
                if os.stat(rel, dir_fd=fd).st_size != e["bytes"]:
                    return "bad", f"{rel}: size differs from the manifest"
            kind = {self.old_id: "old", self.new_id: "new"}.get(m["index_id"])
            return (kind, "") if kind else ("bad", f"unknown index id {m['index_id']}")
        except (OSError, ValueError, KeyError) as e:
            return "bad", f"{type(e).__name__}: {e}"
        finally:
            os.close(fd)


def served_index_id(path: Path) -> str:
    """Start a real datastore server (default opener, 127.0.0.1, any port) on ``path``; its Info's index id."""
    import grpc

    from ..datastore.server import DatastoreServer, ServerOptions
    from ..datastore.servicer import ServiceConfig
    from ..protos import datastore_pb2 as pb
    from ..protos import datastore_pb2_grpc as pb_grpc

    async def main() -> str:
        server = DatastoreServer(str(path), ServiceConfig(), ServerOptions())
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return (await pb_grpc.DatastoreStub(ch).Info(pb.InfoRequest(), timeout=10)).index_id
        finally:
            await server.stop(0)

    return asyncio.run(main())


# ------------------------------------------------------------------------------------------ the campaign
@dataclass
class Scenario:
    name: str
    args: list                    # index-build arguments, --out excluded
    start: Optional[Path]         # the published index a run starts from (None: nothing published)
    reference: Path = None        # the uninterrupted result
    timeline: dict = field(default_factory=dict)   # stage -> (start s, end s) of the reference run
    seconds: float = 0.0


@dataclass
class RunRecord:
    run: int
    scenario: str
    target_stage: str
    delay_s: float
    killed: bool                  # False: the build finished before the delay ran out
    stage_hit: str                # where the kill landed, read from the staging folder
    after_kill: str               # "old" | "new" | "none" at the path a server opens
    served_id: Optional[str]
    reads: dict
    rerun_rc: int
    rerun_equal: bool
    leftovers: list
    failures: list


class Campaign:
    def __init__(self, work: Path, embeddings: bool = True, log=print):
        self.work, self.embeddings, self.log = work, embeddings, log
        self.python = sys.executable

    def index_build(self, args: list, out: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen([self.python, "-m", "specstore.indexers.cli", *args, "--out", str(out), "-q"],
                                env=builder_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                **kw)

    def run_build(self, args: list, out: Path) -> None:
        p = self.index_build(args, out)
        _, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"index-build {' '.join(args)} failed: {err}")

    def setup(self) -> list:
        """Corpus, encoder, the published start index, and per scenario a timed reference build."""
        w = self.work
        files = write_corpus(w / "corpus")
        flags = ["--shard-tokens", str(SHARD_TOKENS)]
        if self.embeddings:
            flags += ["--embedder", str(write_tiny_embedder(w / "tiny-bert")), "--chunk-tokens", str(CHUNK_TOKENS)]
        else:
            flags += ["--no-embeddings"]
        a, b = files[:4], files[4:]
        start = w / "start" / "idx"
        self.run_build([*a, *flags], start)
        scenarios = [Scenario("rebuild", [*files, *flags], start),
                     Scenario("append", [*b, "--append", "--shard-tokens", str(SHARD_TOKENS)], start),
                     Scenario("first", [*files, *flags], None)]
        for sc in scenarios:
            ref = w / "reference" / sc.name / "idx"
            if sc.start is not None:
                shutil.copytree(sc.start, ref)
            sc.reference = ref
            sc.timeline, sc.seconds = self.timed_build(sc.args, ref)
            self.log(f"reference {sc.name}: {sc.seconds:.1f} s, stages "
                     + ", ".join(f"{k} {b - a:.2f}s" for k, (a, b) in sc.timeline.items()))
        return scenarios

    def timed_build(self, args: list, out: Path) -> tuple:
        """Run a build to the end, polling its staging folder: ({stage: (start, end)}, total seconds)."""
        staging = out.parent / f".{out.name}.building"
        seen: dict = {}
        t0 = time.monotonic()
        p = self.index_build(args, out)
        while p.poll() is None:
            t = time.monotonic() - t0
            if staging.exists():
                stage = stage_of(staging, out, None, None)
            else:   # before the staging folder appears, or after it was swapped in
                stage = "publish" if set(seen) - {"startup"} else "startup"
            seen.setdefault(stage, [t, t])[1] = t
            time.sleep(0.002)
        total = time.monotonic() - t0
        if p.returncode:
            raise RuntimeError(f"reference build failed: {p.stderr.read()}")
        seen.setdefault("publish", [total, total])[1] = total
        order = [s for s in STAGES if s in seen]
        timeline = {}
        for i, s in enumerate(order):   # a stage lasts until the next one is first seen
            end = seen[order[i + 1]][0] if i + 1 < len(order) else total
            timeline[s] = (seen[s][0], end)
        return timeline, total

    def one_run(self, i: int, sc: Scenario, rng: random.Random) -> RunRecord:
        stages = [s for s in STAGES if s in sc.timeline and sc.timeline[s][1] > sc.timeline[s][0]]
        target = stages[(i + i // len(SCENARIOS)) % len(stages)]   # every scenario meets every stage
        lo, hi = sc.timeline[target]
        delay = rng.uniform(lo, hi)
        root = self.work / "runs" / f"run-{i:03d}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        out = root / "idx"
        old_id, old_files = None, None
        if sc.start is not None:
            shutil.copytree(sc.start, out)
            old_id, old_files = index_id_at(out), index_files(out)
        new_id = index_id_at(sc.reference)
        reader = PublishedPathReader(out, old_id, new_id)
        reader.start()
        p = self.index_build(sc.args, out)
        killed = False
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed = True
        reader.stop()
        failures = [f"reader: {why}" for why in reader.bad]
        if not killed and p.returncode != 0:
            failures.append(f"build exited {p.returncode} before the kill: {p.stderr.read()[-500:]}")
        stage_hit = stage_of(root / ".idx.building", out, old_id, new_id) if killed else "finished"
        # after the kill: what a server opens
        where = readable_index_dir(out)
        now_id = index_id_at(where)
        after = {old_id: "old", new_id: "new"}.get(now_id, "none") if now_id else "none"
        served = None
        if now_id is None:
            if old_id is not None:
                failures.append("no index at the published path after the kill")
        else:
            try:
                from ..datastore.index import DatastoreIndex

                DatastoreIndex.open(where, verify=True).close()
            except Exception as e:  # noqa: BLE001 - any failure to open is a finding
                failures.append(f"index at the published path does not verify: {e}")
            expect = old_files if after == "old" else index_files(sc.reference) if after == "new" else None
            if expect is None:
                failures.append(f"unknown index {now_id} at the published path")
            elif index_files(where) != expect:
                failures.append(f"the {after} index at the published path differs from its original bytes")
            try:
                served = served_index_id(out)
                if served != now_id:
                    failures.append(f"the server serves {served}, not {now_id}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"the server could not serve the published path: {type(e).__name__}: {e}")
        # rerun: completes and equals the reference
        r = subprocess.run([self.python, "-m", "specstore.indexers.cli", *sc.args, "--out", str(out), "-q"],
                           env=builder_env(), capture_output=True, text=True, timeout=900)
        equal = r.returncode == 0 and index_id_at(out) == new_id and index_files(out) == index_files(sc.reference)
        if r.returncode:
            failures.append(f"rerun exited {r.returncode}: {r.stderr[-500:]}")
        elif not equal:
            failures.append("rerun result differs from the reference build")
        leftovers = sorted(p.name for p in root.iterdir() if p.name not in ("idx", ".idx.lock"))
        if leftovers:
            failures.append(f"left next to the index: {leftovers}")
        if not failures:
            shutil.rmtree(root, ignore_errors=True)
        return RunRecord(i, sc.name, target, round(delay, 3), killed, stage_hit, after, served, reader.counts,
                         r.returncode, equal, leftovers, failures)


def stage_of(staging: Path, out: Path, old_id: Optional[str], new_id: Optional[str]) -> str:
    """The stage a build was in, read from what it left: its staging folder's stage markers, or the
    published index (swapped in: "publish")."""
    if not staging.exists():
        return "publish" if new_id is not None and index_id_at(out) == new_id != old_id else "startup"
    if (staging / MANIFEST_NAME).exists() or not (staging / "stages").exists():
        return "publish"
    marks = {p.stem for p in (staging / "stages").glob("*.json")}
    shards = {m.split("-", 1)[1] for m in marks if m.startswith("tokenize-")}
    if "tokenize" not in marks:
        return "tokenize"
    if "faiss" in marks:
        return "publish"
    if len([m for m in marks if m.startswith("sa-")]) < len(shards):
        return "suffix_array"
    embeds = [m for m in marks if m.startswith("embed-") and "-part" not in m]
    if (staging / "embed").exists() or embeds:
        return "embed" if len(embeds) < len(shards) else "faiss"
    return "publish"


def summarize(records: list) -> dict:
    by_stage: dict = {}
    for r in records:
        by_stage.setdefault(r.stage_hit, 0)
        by_stage[r.stage_hit] += 1
    reads = {k: sum(r.reads[k] for r in records) for k in ("old", "new", "none", "bad")}
    return {"runs": len(records), "killed": sum(r.killed for r in records),
            "by_scenario": {s: sum(r.scenario == s for r in records) for s in SCENARIOS},
            "kills_by_stage": {s: by_stage.get(s, 0) for s in (*STAGES, "finished") if by_stage.get(s)},
            "after_kill": {k: sum(r.after_kill == k for r in records) for k in ("old", "new", "none")},
            "reads_during_runs": reads, "reruns_ok": sum(r.rerun_equal for r in records),
            "failures": sum(bool(r.failures) for r in records)}


def run_campaign(runs: int, work: Path, seed: int = 0, embeddings: bool = True, log=print) -> tuple:
    """(summary dict, [RunRecord]) of ``runs`` killed builds under ``work``."""
    camp = Campaign(work, embeddings, log)
    scenarios = camp.setup()
    rng = random.Random(seed)
    records = []
    for i in range(runs):
        rec = camp.one_run(i, scenarios[i % len(scenarios)], rng)
        records.append(rec)
        log(f"run {i:3d} {rec.scenario:7s} target {rec.target_stage:12s} delay {rec.delay_s:6.2f}s "
            f"hit {rec.stage_hit:12s} after {rec.after_kill:4s} reads {rec.reads} "
            + ("OK" if not rec.failures else f"FAILED {rec.failures}"))
    return summarize(records), records


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.build_crash", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-embeddings", action="store_true", help="drop the embed and FAISS stages")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and every run's record here")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="build-crash-"))
    t0 = time.time()
    try:
        summary, records = run_campaign(a.runs, work, a.seed, not a.no_embeddings)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "runs": [asdict(r) for r in records]}, indent=2) + "\n")
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
