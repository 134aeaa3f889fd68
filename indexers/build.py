"""index-build as a library: corpus -> token shards -> reverse suffix arrays -> chunk embeddings -> FAISS -> manifest.

``build_index(inputs, out, BuildOptions(...))`` prepares a ``BuildContext`` and runs one function per stage:
``tokenize_stage``, ``suffix_array_stage``, ``embed_stage``, ``faiss_stage`` (the last two only with
embeddings), then ``publish``. The files it writes and the manifest are the format of
``datastore/index_format.py``; every file goes through ``datastore/durable.py``. With ``engine="ray"`` the
tokenize and suffix array stages hand their computing to Ray tasks (``ray_engine.py``) and write the same bytes.

Crash safety: everything is written into a staging folder next to the destination
(``<parent>/.<name>.building``). Each finished unit of work leaves a stage marker
(``stages/<stage>.json``) holding the sha256 of the files it produced; a rerun with the same inputs and
options re-validates the markers by checksum and skips what is done. ``manifest.json`` is written last, then
the staging folder is fsynced and swapped onto the destination in one atomic step (``durable.replace_dir``:
``renameat2(RENAME_EXCHANGE)`` on Linux), so a reader, or a crash at any instant, finds the old complete index
or the new complete one, never a half and never none. On file systems without that swap the old index is
renamed aside first; a build killed between the two renames is repaired by the next build's
``recover_publish`` (before anything else), and readers find the old copy meanwhile
(``index_format.readable_index_dir``). A build holds ``<parent>/.<name>.lock`` from start to publish.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..datastore.durable import (atomic_path, exclusive_lock, fsync_dir, fsync_tree, old_copies, replace_dir, save_npy,
                                 sha256_file, write_json)
from ..datastore.index_format import (FAISS_CHUNKS, FAISS_FILES, FAISS_INDEX, FORMAT, FORMAT_VERSION, LAYOUT,
                                      MANIFEST_NAME, SHARD_BUCKETS, SHARD_DOC_IDS, SHARD_DOCS, SHARD_FILES,
                                      SHARD_RSA, SHARD_TOKENS, IndexFormatError, IndexManifest, faiss_path,
                                      file_entry, index_id_of, is_complete_index, shard_path, tokenizer_fingerprint)
from ..datastore.model_files import load_tokenizer
from ..datastore.suffix_shard import build_buckets, build_reverse_sa, pack_documents, sep_for, token_dtype_for
from .readers import ReadStats, input_signature, iter_documents

DEFAULT_SHARD_TOKENS = 1 << 26   # 67M tokens per shard (~400 MB of SA + tokens)
DEFAULT_CHUNK_TOKENS = 256
#: word pieces embedded per chunk ([CLS] + first 126 pieces + [SEP]): the encoder's training length; the
#: embedding stage costs ~O(total word pieces), so this halves the build time against the full 256-token chunk
DEFAULT_EMBED_MAX_PIECES = 128
#: chunks per embedding checkpoint: a crash in the (long) embed stage loses at most this many chunks
EMBED_PART_CHUNKS = 4096
FAISS_DEVICES = ("auto", "cpu", "gpu")
ENGINES = ("local", "ray")
CRASH_ENV = "SPECSTORE_INDEX_CRASH_AT"   # test hook: raise at a named point of the build


class BuildError(RuntimeError):
    """A build that cannot go on (bad options, tokenizer mismatch on --append, ...)."""


class EngineTaskFailed(BuildError):
    """A task of a distributed engine (``--engine ray``) failed: it raised, its worker died, the cluster went
    away. The staging folder keeps every finished shard, so rerunning the same command resumes."""


class SimulatedCrash(RuntimeError):
    pass


class AlreadyAppended(Exception):
    """--append of the inputs (same files, sizes, mtimes, options) that the index's last append added."""

    def __init__(self, manifest):
        super().__init__("already appended")
        self.manifest = manifest


def _crash_point(name: str, want: Optional[str] = None) -> None:
    """Test hook: ``SPECSTORE_INDEX_CRASH_AT=<point>`` raises there, ``<point>!kill`` SIGKILLs the process.
    ``want``: the hook's value where the environment is not the driver's (a Ray task gets it as an argument)."""
    want = want or os.environ.get(CRASH_ENV)
    if not want:
        return
    point, _, how = want.partition("!")
    if point == name:
        if how == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise SimulatedCrash(f"simulated crash at {name}")


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class BuildOptions:
    """The knobs of one build: ``index-build build``'s flags (indexers/cli.py fills it from argparse).

    model: model spec whose tokenizer is used (datastore/model_files.py) when no tokenizer object is given
    text_field, template: how a record becomes text (indexers/readers.py); None = auto
    shard_tokens: tokens per shard, one suffix array each (16 <= n < 2**31 - 1)
    workers: tokenizer processes (1 = batched in this process); with engine "ray", the CPUs of the local Ray
        instance the build starts (1 or less = every core); batch_docs: documents per tokenizer batch
    engine: where tokenisation and suffix arrays run, one of ENGINES: "local" (this process and ``workers``
        processes) or "ray" (Ray tasks, indexers/ray_engine.py; same bytes); ray_address: a Ray cluster to use
        (None = start a local Ray instance)
    embeddings: chunk embeddings + FAISS; embedder: encoder folder (None = all-MiniLM-L6-v2, the default)
    faiss_factory: FAISS index_factory string (None = by size, ``default_faiss_factory``)
    faiss_device: where FAISS trains and adds, one of FAISS_DEVICES
    chunk_tokens: target-model tokens per embedded chunk; embed_batch: chunks per encoder batch
    append: add the inputs to the index at ``out`` as new shards (tokenizer, embedder and chunk size come
        from that index)
    skip_bad_records: skip and count malformed records instead of stopping at the first
    progress: progress bars (stderr)
    """

    model: Optional[str] = None
    text_field: Optional[str] = None
    template: Optional[str] = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = 1
    batch_docs: int = 512
    embeddings: bool = True
    embedder: Optional[str] = None
    faiss_factory: Optional[str] = None
    faiss_device: str = "auto"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    embed_batch: int = 64
    append: bool = False
    skip_bad_records: bool = False
    progress: bool = True
    engine: str = "local"
    ray_address: Optional[str] = None

    def check(self) -> None:
        """BuildError for values no build can use."""
        if self.faiss_device not in FAISS_DEVICES:
            raise BuildError(f"--faiss-device must be one of {', '.join(FAISS_DEVICES)}, not {self.faiss_device!r}")
        if self.shard_tokens < 16 or self.shard_tokens >= 2**31 - 1:
            raise BuildError("--shard-tokens must be between 16 and 2**31-2")
        if self.engine not in ENGINES:
            raise BuildError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.ray_address and self.engine != "ray":
            raise BuildError("--address names a Ray cluster: it needs --engine ray")


# ------------------------------------------------------------------------------------------ stage markers
class _Stages:
    """Stage markers: name -> {"files": {relpath: {bytes, sha256}}, ...extra}."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> Optional[dict]:
        p = self.dir / f"{name}.json"
        if not p.exists():
            return None
        try:
            m = json.loads(p.read_text())
            for rel, ent in m.get("files", {}).items():
                fp = self.root / rel
                if not fp.exists() or fp.stat().st_size != ent["bytes"] or sha256_file(fp) != ent["sha256"]:
                    p.unlink()
                    return None
            return m
        except (OSError, ValueError, KeyError):
            p.unlink(missing_ok=True)
            return None

    def mark(self, name: str, files: Sequence[Path], **extra) -> dict:
        m = {"files": {str(f.relative_to(self.root)): file_entry(f) for f in files}, **extra}
        write_json(self.dir / f"{name}.json", m)
        return m


# ------------------------------------------------------------------------------------------ report
@dataclass
class BuildReport:
    path: Path
    manifest: dict
    stage_seconds: dict = field(default_factory=dict)
    resumed: list = field(default_factory=list)   # stage markers reused from an interrupted build
    read_stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        st = m["stats"]
        lines = [
            f"index {m['index_id']} published at {self.path}",
            f"  documents {st['num_documents']:,}  tokens {st['num_tokens']:,}  shards {len(m['shards'])}  "
            f"dtype {m['token_dtype']}",
            f"  disk (FAISS aside) {st['bytes_suffix_store']:,} B = {st['bytes_per_token']:.2f} B/token",
        ]
        if m.get("faiss"):
            f = m["faiss"]
            lines.append(f"  FAISS {f['factory']} over {f['num_vectors']:,} chunks, dim {f['dim']}, "
                         f"embedder {f['embedder']['id']}")
        lines.append("  stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.stage_seconds.items()))
        rs = self.read_stats
        if rs.get("bad_records"):
            cut = f", {rs['bad_files']} of them cut a file short" if rs.get("bad_files") else ""
            lines.append(f"  skipped {rs['bad_records']} bad records (--skip-bad-records{cut}); first: "
                         f"{rs['bad_examples'][0] if rs['bad_examples'] else ''}")
        if rs.get("empty_files"):
            lines.append(f"  {rs['empty_files']} input files held no record")
        if rs.get("empty_records"):
            lines.append(f"  {rs['empty_records']} empty records skipped")
        if rs.get("skipped_files"):
            lines.append(f"  {len(rs['skipped_files'])} files of unknown type ignored")
        if self.resumed:
            lines.append(f"  resumed {len(self.resumed)} finished stages: {', '.join(self.resumed[:8])}"
                         + (" ..." if len(self.resumed) > 8 else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the build
@dataclass
class BuildContext:
    """What the stages of one build share.

    opts: the effective options (``--append`` takes embeddings, embedder and chunk size from the index);
    inputs: input paths as str ([] with ``token_docs``); token_docs: int64 arrays, one per document, or None;
    fingerprint, vocab_size, dtype, sep: the token space (dtype uint16|uint32, sep = its max value);
    engine: the Ray connection (``ray_engine.RayEngine``) when ``opts.engine == "ray"``;
    old: the manifest of the index appended to; embedder_path: resolved encoder folder (with embeddings);
    old_shards, doc_base: shard entries inherited from ``old`` and the first new document id;
    new_shards: manifest entries of the shards this build writes (``files`` filled by the suffix array stage);
    read_stats: the reader's counters; faiss_meta: the manifest's ``faiss`` part (after the FAISS stage);
    key: the build's resume key (inputs' paths, sizes, mtimes, options, append base), kept in the manifest.
    """

    opts: BuildOptions
    out: Path
    staging: Path
    stages: _Stages
    report: BuildReport
    log: Callable[[str], None]
    inputs: list
    token_docs: Optional[list]
    tokenizer: object
    fingerprint: str
    vocab_size: int
    dtype: type
    sep: int
    old: Optional[IndexManifest] = None
    embedder_path: Optional[str] = None
    old_shards: list = field(default_factory=list)
    doc_base: int = 0
    new_shards: list = field(default_factory=list)
    read_stats: dict = field(default_factory=dict)
    faiss_meta: Optional[dict] = None
    key: str = ""
    engine: object = None   # ray_engine.RayEngine with engine "ray", else None

    @property
    def first_new(self) -> int:
        return len(self.old_shards)


def _config_key(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_faiss_factory(n: int) -> str:
    if n < 20_000:
        return "Flat"
    if n < 2_000_000:
        nlist = max(16, min(int(4 * math.sqrt(n)), n // 39))
        return f"IVF{nlist},Flat"
    return "HNSW32,Flat"


def default_nprobe(factory: str) -> int:
    if factory.startswith("IVF"):
        try:
            nlist = int(factory[3:].split(",")[0].split("_")[0])
        except ValueError:
            return 16
        return max(8, min(64, nlist // 16))
    return 0


def build_index(
    inputs: Optional[Iterable],
    out,
    options: Optional[BuildOptions] = None,
    *,
    tokenizer=None,
    log: Callable[[str], None] = print,
    token_docs: Optional[Iterable[Sequence[int]]] = None,
    vocab_size: Optional[int] = None,
    fingerprint: Optional[str] = None,
) -> BuildReport:
    """Build (or extend, with ``options.append``) an index at ``out`` and publish it atomically.

    ``tokenizer`` (an HF fast tokenizer object) overrides ``options.model`` (a model spec for
    ``datastore.model_files.load_tokenizer``). Raises ``readers.BadRecordError`` on bad input (unless
    ``skip_bad_records``) and ``BuildError`` on bad options.

    Tests and tools may skip text entirely: ``token_docs`` (an iterable of token-id sequences, one per
    document) with ``vocab_size`` and ``fingerprint`` (defaults: the tokenizer's when one is given, else
    max id + 1 and ``"tokens-only"``). ``inputs`` is then ignored, and embeddings need ``tokenizer``.
    """
    t_start = time.time()
    options = options or BuildOptions()
    options.check()
    if options.engine == "ray":   # a missing ray is refused before anything is written
        from .ray_engine import import_ray

        import_ray()
    out = Path(out).expanduser().resolve()
    with build_lock(out):
        recover_publish(out, log)
        try:
            ctx = _prepare(inputs, out, options, tokenizer, log, token_docs, vocab_size, fingerprint)
        except AlreadyAppended as done:
            log(f"{out} already holds these inputs: its last --append added them (a rerun after that append "
                "was interrupted once published); nothing to do")
            return BuildReport(out, done.manifest.to_dict())
        _link_old_shards(ctx)
        try:
            if ctx.opts.engine == "ray":
                from .ray_engine import RayEngine

                # started after every refusal of _prepare (Ray's start costs seconds, reported as its own stage)
                t_ray = time.time()
                ctx.engine = RayEngine(ctx.opts.ray_address, ctx.opts.workers if ctx.opts.workers > 1 else None,
                                       crash_at=os.environ.get(CRASH_ENV))
                ctx.report.stage_seconds["ray_start"] = time.time() - t_ray
            tokenize_stage(ctx)
            suffix_array_stage(ctx)
        finally:
            if ctx.engine is not None:
                ctx.engine.close()
        if ctx.opts.embeddings:
            embed_stage(ctx)
            faiss_stage(ctx)
        ctx.report.stage_seconds["total"] = time.time() - t_start
        manifest = _manifest(ctx)
        publish(ctx, manifest)
    ctx.report.manifest = manifest.to_dict()
    return ctx.report


def staging_path(out: Path) -> Path:
    """The folder a build of ``out`` works in: ``<parent>/.<name>.building``."""
    return out.parent / f".{out.name}.building"


def _publish_ready(staging: Path) -> bool:
    """The staging folder is a finished build that ``publish`` was swapping in: manifest written, scratch
    (``build.json``, stage markers) removed, every file present with its size."""
    return not (staging / "build.json").exists() and not (staging / "stages").exists() and is_complete_index(staging)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold ``<parent>/.<name>.lock`` for a build of ``out``: a second build of the same index (which would
    share the staging folder) is refused at once. The parent folder is created here, so a read-only or full
    output location fails here, before anything else, as an OSError naming the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    try:
        with exclusive_lock(lock):
            yield
    except BlockingIOError:
        raise BuildError(f"another index-build is writing {out} (it holds {lock}); wait for it to finish") from None


def recover_publish(out: Path, log: Callable[[str], None] = print) -> Optional[str]:
    """Repair what a build killed inside ``publish`` left at ``out``; call with ``build_lock(out)`` held.

    No index at ``out`` but a complete one waiting in the staging folder (killed between the two renames of
    the fallback swap, or before the first publish's rename): roll forward, rename it onto ``out``. No index
    and no finished build, but a complete old copy ``.<name>.old-*``: roll back, rename it onto ``out``. Then
    every old copy left is removed. Returns "forward", "back" or None (nothing to restore).
    """
    done = None
    staging = staging_path(out)
    if not out.exists():
        if staging.is_dir() and _publish_ready(staging):
            os.rename(staging, out)
            done = "forward"
        else:
            back = next((o for o in old_copies(out) if is_complete_index(o)), None)
            if back is not None:
                os.rename(back, out)
                done = "back"
        if done:
            fsync_dir(out.parent)
            log(f"recovered {out} from a build killed while publishing: rolled {done} to the "
                f"{'finished new' if done == 'forward' else 'previous'} index")
    for old in old_copies(out):
        log(f"removing {old}, the old copy a build killed while publishing left")
        shutil.rmtree(old, ignore_errors=True)
    return done


def _prepare(inputs, out, opts: BuildOptions, tokenizer, log, token_docs, vocab_size, fingerprint) -> BuildContext:
    """Settle the token space (tokenizer, vocabulary, dtype) and the --append base, then open (or resume) the
    staging folder: every refusal comes before the first write (the lock file aside). ``out`` is resolved and
    ``opts`` checked (``build_index``)."""
    if token_docs is not None:
        token_docs = [np.asarray(d, dtype=np.int64) for d in token_docs]
        inputs = []
        if tokenizer is None:
            opts = replace(opts, embeddings=False)
            if vocab_size is None:
                vocab_size = 1 + max((int(d.max()) for d in token_docs if len(d)), default=0)
            fingerprint = fingerprint or "tokens-only"
    else:
        inputs = [str(Path(p).expanduser()) for p in inputs]
    if tokenizer is None and token_docs is None:
        tokenizer = load_tokenizer(opts.model)
    if tokenizer is not None:
        fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
        vocab_size = int(vocab_size or len(tokenizer))
    vocab_size = int(vocab_size)
    dtype = token_dtype_for(vocab_size)

    old = None
    if opts.append:
        old, opts = _append_base(out, opts, fingerprint)
    elif out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise BuildError(f"{out} exists and is not an index; refusing to replace it")

    emb_path = emb_id = None
    if opts.embeddings:
        from ..datastore.embedder import default_embedder_path, embedder_id

        emb_path = str(Path(opts.embedder).expanduser().resolve()) if opts.embedder else str(default_embedder_path())
        emb_id = embedder_id(emb_path)

    key_of = dict(
        format=FORMAT_VERSION, inputs=input_signature(inputs),
        token_docs=hashlib.sha256(b"".join(d.tobytes() + b"|" for d in token_docs)).hexdigest()
        if token_docs is not None else None, fingerprint=fingerprint, text_field=opts.text_field,
        template=opts.template, shard_tokens=opts.shard_tokens, skip_bad=opts.skip_bad_records,
        embeddings=opts.embeddings, embedder=emb_id, faiss=opts.faiss_factory, chunk_tokens=opts.chunk_tokens)
    key = _config_key(**key_of, append=old.index_id if old else None)
    if old is not None and old.stats.get("appended_from") and \
            old.stats.get("build_key") == _config_key(**key_of, append=old.stats["appended_from"]):
        # the rerun of an --append that was killed after its publish: appending again would add every
        # document a second time
        raise AlreadyAppended(old)
    staging = _open_staging(out, key, inputs, log)
    return BuildContext(opts=opts, out=out, staging=staging, stages=_Stages(staging), report=BuildReport(out, {}),
                        log=log, inputs=inputs, token_docs=token_docs, tokenizer=tokenizer, fingerprint=fingerprint,
                        vocab_size=vocab_size, dtype=dtype, sep=sep_for(dtype), old=old, embedder_path=emb_path,
                        key=key)


def _append_base(out: Path, opts: BuildOptions, fingerprint: str) -> tuple[IndexManifest, BuildOptions]:
    """(the manifest of the index at ``out``, the options with its embedding settings) for --append."""
    if not (out / MANIFEST_NAME).exists():
        raise BuildError(f"--append: {out} holds no published index (manifest.json missing)")
    try:
        old = IndexManifest.load(out)
    except IndexFormatError as e:
        raise BuildError(f"--append: {e}") from None
    if old.fingerprint != fingerprint:
        raise BuildError(f"--append: tokenizer fingerprint {fingerprint} differs from the index's {old.fingerprint}")
    if old.faiss and not opts.embeddings:
        raise BuildError("--append with --no-embeddings on an index that has FAISS would leave documents "
                         "unsearchable; drop --no-embeddings")
    if not old.faiss:
        opts = replace(opts, embeddings=False)
    if opts.embeddings:
        opts = replace(opts, embedder=opts.embedder or old.faiss["embedder"].get("path"),
                       chunk_tokens=old.faiss["chunk_tokens"])
    return old, opts


def _open_staging(out: Path, key: str, inputs: list, log) -> Path:
    """``<parent>/.<name>.building``: resumed when an unfinished build left it with the same ``key``
    (inputs and options), else emptied."""
    staging = staging_path(out)
    if staging.exists():
        try:
            prev = json.loads((staging / "build.json").read_text())["key"]
        except (OSError, ValueError, KeyError):
            prev = None
        if prev != key:
            log(f"discarding an unfinished build with other inputs/options in {staging}")
            shutil.rmtree(staging)
        else:
            log(f"resuming the unfinished build in {staging}")
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / "build.json", {"key": key, "inputs": inputs, "started": time.time()})
    (staging / "shards").mkdir(exist_ok=True)
    return staging


def _link_old_shards(ctx: BuildContext) -> None:
    """--append: the old index's shards enter the staging folder as hard links (copies where links fail);
    the old files are never rewritten."""
    if not ctx.old:
        return
    for sh in ctx.old.shards:
        d = shard_path(ctx.staging, sh["name"])
        d.mkdir(exist_ok=True)
        for fname in sh["files"]:
            dst = d / fname
            if not dst.exists():
                src = shard_path(ctx.out, sh["name"]) / fname
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        ctx.old_shards.append(sh)
    ctx.doc_base = int(ctx.old.stats["num_documents"])


# ------------------------------------------------------------------------------------------ stage 1: tokenize
_WORKER_TOK = None


def _worker_init(tok_json: str) -> None:
    # A spawned worker's own environment: the tokenizers library has no API for its thread pool, and
    # ``workers`` processes each running a pool over every core would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOK
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tok_json)


def _encode(backend, texts: list) -> list:
    return [np.asarray(e.ids, dtype=np.uint32) for e in backend.encode_batch(texts, add_special_tokens=False)]


def _worker_encode(texts: list) -> list:
    return _encode(_WORKER_TOK, texts)


class _PoolEncoder:
    """Tokenizer batches on ``workers`` spawned processes: ``submit(texts)`` -> handle, ``result(handle)`` ->
    token arrays (uint32), ``width``: workers (2 x width batches are kept in flight), ``close()``."""

    def __init__(self, backend, workers: int):
        import multiprocessing as mp

        self.width = workers
        self.pool = mp.get_context("spawn").Pool(workers, _worker_init, (backend.to_str(),))

    def submit(self, texts: list):
        return self.pool.apply_async(_worker_encode, (texts,))

    def result(self, handle) -> list:
        return handle.get()

    def close(self) -> None:
        self.pool.terminate()


def _backend_of(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise BuildError("a fast (Rust) tokenizer is required")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())  # a private copy we may reconfigure
    backend.no_truncation()
    backend.no_padding()
    return backend


def _batched(docs, batch_docs: int, batch_chars: int):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if len(batch) >= batch_docs or chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_stage(ctx: BuildContext) -> None:
    """Documents -> token shards ``shards/shard-NNNNN/{tokens,docs,doc_ids}.npy`` of about
    ``shard_tokens`` tokens, one stage marker per shard and one for the stage; resumes after the last
    finished shard. Fills ``ctx.new_shards`` and ``ctx.read_stats``."""
    from tqdm import tqdm

    t0 = time.time()
    o, stages, report = ctx.opts, ctx.stages, ctx.report
    i = ctx.first_new
    done_docs = 0
    while True:   # finished tokenize markers from an interrupted run
        m = stages.done(f"tokenize-{i:05d}")
        if m is None:
            break
        ctx.new_shards.append(m["shard"])
        done_docs = m["doc_end"]
        report.resumed.append(f"tokenize-{i:05d}")
        i += 1
    all_tok = stages.done("tokenize")
    if all_tok is not None:
        report.resumed.append("tokenize")
        ctx.read_stats = all_tok["read_stats"]
    else:
        for j in range(i, i + 10_000):  # stale markers after the first missing one
            p = stages.dir / f"tokenize-{j:05d}.json"
            if not p.exists():
                break
            p.unlink()
        read_stats = ReadStats()
        backend = docs = pool = None
        if ctx.token_docs is None:
            backend = _backend_of(ctx.tokenizer)
            docs = iter_documents(ctx.inputs, text_field=o.text_field, template=o.template,
                                  skip_bad=o.skip_bad_records, stats=read_stats)
            if ctx.engine is not None:
                pool = ctx.engine.encoder(backend)
            elif o.workers > 1:
                pool = _PoolEncoder(backend, o.workers)
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not o.progress, leave=True)
        buf: list[np.ndarray] = []
        buf_ids: list[int] = []
        buf_len = 0
        try:
            for ids0, arrs in _encoded_batches(ctx, docs, backend, pool, done_docs):
                for j, a in enumerate(arrs):
                    if len(a) == 0:
                        continue
                    if a.size and (int(a.max()) >= ctx.vocab_size or int(a.min()) < 0):
                        raise BuildError(f"document {ids0 + j}: token id outside the vocabulary [0, {ctx.vocab_size})")
                    buf.append(a.astype(ctx.dtype, copy=False))
                    buf_ids.append(ids0 + j)
                    buf_len += len(a) + 1
                    bar.update(len(a))
                    if buf_len >= o.shard_tokens:
                        ctx.new_shards.append(_write_shard(ctx, i, buf, buf_ids))
                        buf, buf_ids, buf_len = [], [], 0
                        i += 1
            if buf:
                ctx.new_shards.append(_write_shard(ctx, i, buf, buf_ids))
                i += 1
        finally:
            bar.close()
            if pool is not None:
                pool.close()
        ctx.read_stats = read_stats.as_dict()
        stages.mark("tokenize", [], read_stats=ctx.read_stats, num_shards=i)
    report.read_stats = ctx.read_stats
    report.stage_seconds["tokenize"] = time.time() - t0
    if not ctx.old_shards and not ctx.new_shards:
        raise BuildError("no documents found in the inputs" +
                         (f" ({ctx.read_stats['bad_records']} bad records skipped)"
                          if ctx.read_stats.get("bad_records") else ""))


def _encoded_batches(ctx: BuildContext, docs, backend, pool, done_docs: int) -> Iterator[tuple[int, list]]:
    """(global id of the first document, its token arrays and the following ones') per batch, in document
    order, skipping the first ``done_docs`` documents (tokenized by an interrupted run whose shards are kept).
    ``pool``: None (encode here) or an encoder (``_PoolEncoder``, ``ray_engine.RayEncoder``)."""
    if ctx.token_docs is not None:
        for j in range(done_docs, len(ctx.token_docs)):
            yield ctx.doc_base + j, [ctx.token_docs[j]]
        return
    pending = []
    ndoc = 0
    for batch in _batched(docs, ctx.opts.batch_docs, 4 << 20):
        start = ndoc
        ndoc += len(batch)
        if ndoc <= done_docs:
            continue
        skip = max(0, done_docs - start)
        texts = [d.text for d in batch[skip:]]
        ids0 = ctx.doc_base + start + skip
        if pool is None:
            yield ids0, _encode(backend, texts)
        else:
            pending.append((ids0, pool.submit(texts)))
            if len(pending) >= 2 * pool.width:
                a, r = pending.pop(0)
                yield a, pool.result(r)
    for a, r in pending:
        yield a, pool.result(r)


def _write_shard(ctx: BuildContext, i: int, buf: list, buf_ids: list) -> dict:
    """Write shard number ``i`` from the token arrays ``buf`` (document ids ``buf_ids``) and mark it done;
    returns its manifest entry (``files`` and ``bytes`` come with the suffix array stage)."""
    name = f"shard-{i:05d}"
    d = shard_path(ctx.staging, name)
    d.mkdir(exist_ok=True)
    T, starts = pack_documents(buf, ctx.dtype)
    save_npy(d / SHARD_TOKENS, T)
    save_npy(d / SHARD_DOCS, starts)
    save_npy(d / SHARD_DOC_IDS, np.asarray(buf_ids, dtype=np.int64))
    _crash_point(f"tokenize:{name}")
    shard = {"name": name, "num_tokens": len(T) - len(buf) - 1, "array_len": int(len(T)),
             "num_documents": len(buf), "doc_id_min": int(buf_ids[0]), "doc_id_max": int(buf_ids[-1])}
    ctx.stages.mark(f"tokenize-{i:05d}", [d / SHARD_TOKENS, d / SHARD_DOCS, d / SHARD_DOC_IDS],
                    shard=shard, doc_end=int(buf_ids[-1]) - ctx.doc_base + 1)
    return shard


# ------------------------------------------------------------------------------------------ stage 2: suffix arrays
def suffix_array_stage(ctx: BuildContext) -> None:
    """Per new shard: ``rsa.npy`` (reverse suffix array) and ``buckets.npy``, one marker each; then every
    new shard's manifest entry gets its ``files`` (size + sha256) and ``bytes``."""
    from tqdm import tqdm

    t0 = time.time()
    bar = tqdm(total=sum(s["array_len"] for s in ctx.new_shards), desc="suffix array", unit="tok", unit_scale=True,
               disable=not ctx.opts.progress)
    todo = []
    for sh in ctx.new_shards:
        if ctx.stages.done(f"sa-{sh['name']}") is not None:
            ctx.report.resumed.append(f"sa-{sh['name']}")
            bar.update(sh["array_len"])
        else:
            todo.append(sh)
    lens = {sh["name"]: sh["array_len"] for sh in todo}

    def save(name: str, rsa: np.ndarray, buckets) -> None:
        d = shard_path(ctx.staging, name)
        save_npy(d / SHARD_RSA, rsa)
        _crash_point(f"sa:{name}")
        save_npy(d / SHARD_BUCKETS, buckets() if callable(buckets) else buckets)
        ctx.stages.mark(f"sa-{name}", [d / SHARD_RSA, d / SHARD_BUCKETS])
        bar.update(lens[name])

    def tokens(name: str) -> np.ndarray:
        return np.load(shard_path(ctx.staging, name) / SHARD_TOKENS)

    try:
        if ctx.engine is not None:
            ctx.engine.suffix_arrays(((sh["name"], lambda n=sh["name"]: tokens(n)) for sh in todo), ctx.vocab_size,
                                     save)
        else:
            for sh in todo:
                T = tokens(sh["name"])
                # buckets after the rsa is saved, so that the crash point between the two sees the local order
                save(sh["name"], build_reverse_sa(T), lambda T=T: build_buckets(T, ctx.vocab_size))
                del T
    finally:
        bar.close()
    for sh in ctx.new_shards:
        d = shard_path(ctx.staging, sh["name"])
        sh["files"] = {f: file_entry(d / f) for f in SHARD_FILES}
        sh["bytes"] = sum(e["bytes"] for e in sh["files"].values())
    ctx.report.stage_seconds["suffix_array"] = time.time() - t0


# ------------------------------------------------------------------------------------------ stage 3: embed
def embed_stage(ctx: BuildContext) -> None:
    """Per new shard: its documents cut into ``chunk_tokens`` spans, decoded and embedded
    (``embed/<shard>.vec.npy`` float32 [chunks, dim], ``embed/<shard>.chunks.npy`` int64 [chunks, 4]),
    checkpointed every ``EMBED_PART_CHUNKS`` chunks."""
    from tqdm import tqdm

    from ..datastore.embedder import get_embedder

    t0 = time.time()
    emb = get_embedder(ctx.embedder_path)
    edir = ctx.staging / "embed"
    edir.mkdir(exist_ok=True)
    backend = _backend_of(ctx.tokenizer)
    todo = []
    for si, sh in enumerate(ctx.new_shards, start=ctx.first_new):
        name = sh["name"]
        if ctx.stages.done(f"embed-{name}") is not None:
            ctx.report.resumed.append(f"embed-{name}")
        else:
            todo.append((si, sh))
    bar = tqdm(total=sum(s["num_tokens"] for _, s in todo), desc="embed", unit="tok", unit_scale=True,
               disable=not ctx.opts.progress)
    for si, sh in todo:
        name = sh["name"]
        vecs, chunks = _embed_shard(shard_path(ctx.staging, name), si, backend, emb, ctx.opts.chunk_tokens,
                                    ctx.opts.embed_batch, bar, ctx.stages, name, ctx.report)
        save_npy(edir / f"{name}.vec.npy", vecs)
        save_npy(edir / f"{name}.chunks.npy", chunks)
        _crash_point(f"embed:{name}")
        ctx.stages.mark(f"embed-{name}", [edir / f"{name}.vec.npy", edir / f"{name}.chunks.npy"])
    bar.close()
    ctx.report.stage_seconds["embed"] = time.time() - t0


def _embed_shard(d: Path, shard_idx: int, backend, emb, chunk_tokens: int, batch: int, bar, stages=None,
                 name: str = "", report=None):
    T = np.load(d / SHARD_TOKENS, mmap_mode="r")
    starts = np.load(d / SHARD_DOCS)
    ids = np.load(d / SHARD_DOC_IDS)
    spans = []
    for j in range(len(ids)):
        s, e = int(starts[j]), int(starts[j + 1]) - 1
        for a in range(s, e, chunk_tokens):
            spans.append((int(ids[j]), shard_idx, a, min(e, a + chunk_tokens)))
    chunks = np.asarray(spans, dtype=np.int64).reshape(-1, 4)
    vecs = np.zeros((len(chunks), emb.dim), dtype=np.float32)
    step = max(batch * 8, 256)
    part_n = max(1, EMBED_PART_CHUNKS)
    for k, p0 in enumerate(range(0, len(chunks), part_n)):
        p1 = min(len(chunks), p0 + part_n)
        mark = f"embed-{name}-part{k:05d}"
        pfile = d.parent.parent / "embed" / f"{name}.part{k:05d}.npy"
        if stages is not None and stages.done(mark) is not None:
            vecs[p0:p1] = np.load(pfile)
            bar.update(int((chunks[p0:p1, 3] - chunks[p0:p1, 2]).sum()))
            if report is not None:
                report.resumed.append(mark)
            continue
        for a in range(p0, p1, step):
            part = chunks[a:min(a + step, p1)]
            texts = backend.decode_batch([T[s:e].tolist() for _, _, s, e in part], skip_special_tokens=False)
            vecs[a:a + len(part)] = emb.encode(texts, batch_size=batch, max_length=DEFAULT_EMBED_MAX_PIECES)
            bar.update(int((part[:, 3] - part[:, 2]).sum()))
        if stages is not None and p1 < len(chunks):   # checkpoint (the last part goes into the shard file)
            save_npy(pfile, vecs[p0:p1])
            stages.mark(mark, [pfile])
            _crash_point(f"embed-part:{name}:{k}")
    return vecs, chunks


# ------------------------------------------------------------------------------------------ stage 4: FAISS
def faiss_stage(ctx: BuildContext) -> None:
    """One FAISS index over every chunk vector (a copy of the old one grown by the new vectors on --append):
    ``faiss/index.faiss`` and ``faiss/chunks.npy``. Sets ``ctx.faiss_meta``, the manifest's ``faiss`` part."""
    from ..datastore.embedder import get_embedder

    t0 = time.time()
    fdir = faiss_path(ctx.staging)
    fdir.mkdir(exist_ok=True)
    if ctx.stages.done("faiss") is not None:
        ctx.report.resumed.append("faiss")
        meta = json.loads((ctx.stages.dir / "faiss.json").read_text())["meta"]
    else:
        meta = _build_faiss(ctx, get_embedder(ctx.embedder_path))
        _crash_point("faiss")
        ctx.stages.mark("faiss", [fdir / f for f in FAISS_FILES], meta=meta)
    meta["files"] = {f: file_entry(fdir / f) for f in FAISS_FILES}
    ctx.faiss_meta = meta
    ctx.report.stage_seconds["faiss"] = time.time() - t0


def faiss_gpu_count(faiss) -> int:
    """GPUs a FAISS build can use (0 for faiss-cpu, whose ``get_num_gpus`` is absent or returns 0)."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - a GPU build without a usable driver
        return 0


def _to_device(faiss, index, device: str, log: Callable[[str], None]):
    """(index to train/add on, True if it lives on GPUs). ``auto`` uses every GPU a FAISS GPU build sees
    (the ``gpu`` extra) and falls back to the CPU for index types FAISS cannot move (e.g. HNSW)."""
    if device == "cpu":
        return index, False
    n = faiss_gpu_count(faiss)
    if n == 0:
        if device == "gpu":
            raise BuildError("--faiss-device gpu: this FAISS build sees no GPU (install the gpu extra: "
                             "pip uninstall faiss-cpu && pip install faiss-gpu-cu12)")
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError for indexes without a GPU version
        if device == "gpu":
            raise BuildError(f"--faiss-device gpu: FAISS cannot put this index on a GPU: {e}") from None
        log(f"faiss: index type has no GPU version ({str(e).splitlines()[0][:120]}); building on the CPU")
        return index, False


def _build_faiss(ctx: BuildContext, emb) -> dict:
    import faiss

    o, staging = ctx.opts, ctx.staging
    fdir = faiss_path(staging)
    vecs = [np.load(staging / "embed" / f"{s['name']}.vec.npy") for s in ctx.new_shards]
    chunks = [np.load(staging / "embed" / f"{s['name']}.chunks.npy") for s in ctx.new_shards]
    X = np.concatenate(vecs) if vecs else np.zeros((0, emb.dim), np.float32)
    C = np.concatenate(chunks) if chunks else np.zeros((0, 4), np.int64)
    if ctx.old and ctx.old.faiss:
        index = faiss.read_index(str(faiss_path(ctx.out) / FAISS_INDEX))
        C = np.concatenate([np.load(faiss_path(ctx.out) / FAISS_CHUNKS), C])
        factory = ctx.old.faiss["factory"]
        work, on_gpu = _to_device(faiss, index, o.faiss_device, ctx.log)
        _add_batched(work, X, o.progress)
    else:
        factory = o.faiss_factory or default_faiss_factory(len(X))
        index = faiss.index_factory(emb.dim, factory, faiss.METRIC_INNER_PRODUCT)
        work, on_gpu = _to_device(faiss, index, o.faiss_device, ctx.log)
        if not work.is_trained:
            if len(X) == 0:
                raise BuildError("no chunks to train the FAISS index")
            rng = np.random.default_rng(0)
            train = X if len(X) <= 200_000 else X[rng.choice(len(X), 200_000, replace=False)]
            work.train(np.ascontiguousarray(train))
        _add_batched(work, X, o.progress)
    if on_gpu:   # the file format and the service are CPU-side: bring it back before writing
        index = faiss.index_gpu_to_cpu(work)
    with atomic_path(fdir / FAISS_INDEX) as tmp:
        faiss.write_index(index, str(tmp))
    save_npy(fdir / FAISS_CHUNKS, C)
    return {"factory": factory, "metric": "inner_product", "normalized": True, "num_vectors": int(index.ntotal),
            "dim": int(emb.dim), "nprobe": default_nprobe(factory), "chunk_tokens": o.chunk_tokens,
            "embed_max_pieces": DEFAULT_EMBED_MAX_PIECES, "built_on": "gpu" if on_gpu else "cpu",
            "embedder": {"id": emb.id, "path": str(ctx.embedder_path)}}


def _add_batched(index, X: np.ndarray, progress: bool, step: int = 65536) -> None:
    from tqdm import tqdm

    with tqdm(total=len(X), desc="faiss", unit="vec", unit_scale=True, disable=not progress) as bar:
        for a in range(0, len(X), step):
            index.add(np.ascontiguousarray(X[a:a + step]))
            bar.update(min(step, len(X) - a))


# ------------------------------------------------------------------------------------------ stage 5: publish
def _manifest(ctx: BuildContext) -> IndexManifest:
    shards = ctx.old_shards + ctx.new_shards
    num_tokens = sum(s["num_tokens"] for s in shards)
    store_bytes = sum(s["bytes"] for s in shards)
    faiss_meta = ctx.faiss_meta
    prev_stats = ctx.old.stats if ctx.old else {}
    tok = ctx.tokenizer
    return IndexManifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        index_id=index_id_of(shards, faiss_meta and faiss_meta["files"]),
        created_unix=time.time(),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tokenizer={"spec": ctx.opts.model, "fingerprint": ctx.fingerprint, "vocab_size": ctx.vocab_size,
                   "class": type(tok).__name__ if tok is not None else None,
                   "name_or_path": str(getattr(tok, "name_or_path", "") or "")},
        vocab_size=ctx.vocab_size,
        token_dtype=np.dtype(ctx.dtype).name,
        separator=ctx.sep,
        layout=LAYOUT,
        shards=shards,
        faiss=faiss_meta,
        stats={
            "num_documents": ctx.doc_base + sum(s["num_documents"] for s in ctx.new_shards),
            "num_tokens": num_tokens,
            "num_shards": len(shards),
            "bytes_suffix_store": store_bytes,
            "bytes_per_token": store_bytes / max(1, num_tokens),
            "bytes_faiss": sum(e["bytes"] for e in faiss_meta["files"].values()) if faiss_meta else 0,
            "read": ctx.read_stats,
            "inputs": ctx.inputs,
            "appended_from": ctx.old.index_id if ctx.old else None,
            "previous_inputs": prev_stats.get("inputs", []) + prev_stats.get("previous_inputs", []),
            "build_key": ctx.key,
        },
        build_seconds=dict(ctx.report.stage_seconds),
        builder={"chunk_tokens": ctx.opts.chunk_tokens if ctx.opts.embeddings else None,
                 "shard_tokens": ctx.opts.shard_tokens, "engine": ctx.opts.engine},
    )


def publish(ctx: BuildContext, manifest: IndexManifest) -> None:
    """Write the manifest (last), drop the build's scratch (embeddings, stage markers), fsync everything in
    the staging folder and swap it onto ``ctx.out`` (``durable.replace_dir``; crash points
    ``publish:before-swap``, ``publish:mid-swap`` (two-rename fallback only), ``publish:after-swap``)."""
    manifest.dump(ctx.staging)
    _crash_point("manifest")
    shutil.rmtree(ctx.staging / "embed", ignore_errors=True)
    (ctx.staging / "build.json").unlink(missing_ok=True)
    shutil.rmtree(ctx.staging / "stages", ignore_errors=True)
    fsync_tree(ctx.staging)
    replace_dir(ctx.staging, ctx.out, hook=lambda point: _crash_point(f"publish:{point}"))
