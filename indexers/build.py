"""index-build as a library: corpus -> token shards -> reverse suffix arrays -> chunk embeddings -> FAISS -> manifest.

Crash safety: everything is written into a staging folder next to the destination
(``<parent>/.<name>.building``). Each finished unit of work leaves a stage marker
(``stages/<stage>.json``) holding the sha256 of the files it produced; a rerun with the same inputs and
options re-validates the markers by checksum and skips what is done. ``manifest.json`` is written last, then
the staging folder is fsynced and renamed onto the destination (an existing index is first renamed aside and
removed after the swap, so a reader sees either the old complete index or the new complete one, never a half).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..datastore.suffix_shard import build_buckets, build_reverse_sa, sep_for, token_dtype_for
from .readers import ReadStats, input_signature, iter_documents

FORMAT = "specstore-index"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 26   # 67M tokens per shard (~400 MB of SA + tokens)
DEFAULT_CHUNK_TOKENS = 256
#: word pieces embedded per chunk ([CLS] + first 126 pieces + [SEP]): the encoder's training length; the
#: embedding stage costs ~O(total word pieces), so this halves the build time against the full 256-token chunk
DEFAULT_EMBED_MAX_PIECES = 128
CRASH_ENV = "SPECSTORE_INDEX_CRASH_AT"   # test hook: raise at a named point of the build


class BuildError(RuntimeError):
    """A build that cannot go on (bad options, tokenizer mismatch on --append, ...)."""


class SimulatedCrash(RuntimeError):
    pass


def _crash_point(name: str) -> None:
    """Test hook: ``SPECSTORE_INDEX_CRASH_AT=<point>`` raises there, ``<point>!kill`` SIGKILLs the process."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    point, _, how = want.partition("!")
    if point == name:
        if how == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise SimulatedCrash(f"simulated crash at {name}")


# ------------------------------------------------------------------------------------------ file utils
def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


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
        m = {"files": {str(f.relative_to(self.root)): _file_entry(f) for f in files}, **extra}
        _write_json(self.dir / f"{name}.json", m)
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
            lines.append(f"  skipped {rs['bad_records']} bad records (--skip-bad-records); first: "
                         f"{rs['bad_examples'][0] if rs['bad_examples'] else ''}")
        if rs.get("empty_records"):
            lines.append(f"  {rs['empty_records']} empty records skipped")
        if rs.get("skipped_files"):
            lines.append(f"  {len(rs['skipped_files'])} files of unknown type ignored")
        if self.resumed:
            lines.append(f"  resumed {len(self.resumed)} finished stages: {', '.join(self.resumed[:8])}"
                         + (" ..." if len(self.resumed) > 8 else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tokenizing
_WORKER_TOK = None


def _worker_init(tok_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOK
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tok_json)


def _encode(backend, texts: list) -> list:
    return [np.asarray(e.ids, dtype=np.uint32) for e in backend.encode_batch(texts, add_special_tokens=False)]


def _worker_encode(texts: list) -> list:
    return _encode(_WORKER_TOK, texts)


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


# ------------------------------------------------------------------------------------------ the build
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
    inputs: Iterable,
    out,
    *,
    model: Optional[str] = None,
    tokenizer=None,
    text_field: Optional[str] = None,
    template: Optional[str] = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 1,
    batch_docs: int = 512,
    embeddings: bool = True,
    embedder: Optional[str] = None,
    faiss_factory: Optional[str] = None,
    faiss_device: str = "auto",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    embed_batch: int = 64,
    append: bool = False,
    skip_bad_records: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    token_docs: Optional[Iterable[Sequence[int]]] = None,
    vocab_size: Optional[int] = None,
    fingerprint: Optional[str] = None,
) -> BuildReport:
    """Build (or extend, with ``append=True``) an index at ``out`` and publish it atomically.

    ``tokenizer`` (an HF fast tokenizer object) overrides ``model`` (a model spec for
    ``datastore.model_files.load_tokenizer``). Raises ``readers.BadRecordError`` on bad input (unless
    ``skip_bad_records``) and ``BuildError`` on bad options.

    Tests and tools may skip text entirely: ``token_docs`` (an iterable of token-id sequences, one per
    document) with ``vocab_size`` and ``fingerprint`` (defaults: the tokenizer's when one is given, else
    max id + 1 and ``"tokens-only"``). ``inputs`` is then ignored, and embeddings need ``tokenizer``.
    """
    from tqdm import tqdm

    from ..datastore.index_format import tokenizer_fingerprint
    from ..datastore.model_files import load_tokenizer

    t_start = time.time()
    if faiss_device not in FAISS_DEVICES:
        raise BuildError(f"--faiss-device must be one of {', '.join(FAISS_DEVICES)}, not {faiss_device!r}")
    out = Path(out).expanduser().resolve()
    if shard_tokens < 16 or shard_tokens >= 2**31 - 1:
        raise BuildError("--shard-tokens must be between 16 and 2**31-2")
    if token_docs is not None:
        token_docs = [np.asarray(d, dtype=np.int64) for d in token_docs]
        inputs = []
        if tokenizer is None:
            embeddings = False
            if vocab_size is None:
                vocab_size = 1 + max((int(d.max()) for d in token_docs if len(d)), default=0)
            fingerprint = fingerprint or "tokens-only"
    else:
        inputs = [str(Path(p).expanduser()) for p in inputs]
    if tokenizer is None and token_docs is None:
        tokenizer = load_tokenizer(model)
    if tokenizer is not None:
        fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
        vocab_size = int(vocab_size or len(tokenizer))
    vocab_size = int(vocab_size)
    dtype = token_dtype_for(vocab_size)
    sep = sep_for(dtype)

    old_manifest = None
    if append:
        if not (out / "manifest.json").exists():
            raise BuildError(f"--append: {out} holds no published index (manifest.json missing)")
        old_manifest = json.loads((out / "manifest.json").read_text())
        if old_manifest["tokenizer"]["fingerprint"] != fingerprint:
            raise BuildError(f"--append: tokenizer fingerprint {fingerprint} differs from the index's "
                             f"{old_manifest['tokenizer']['fingerprint']}")
        if old_manifest.get("faiss") and not embeddings:
            raise BuildError("--append with --no-embeddings on an index that has FAISS would leave documents "
                             "unsearchable; drop --no-embeddings")
        if not old_manifest.get("faiss"):
            embeddings = False
        if embeddings:
            embedder = embedder or old_manifest["faiss"]["embedder"].get("path")
            chunk_tokens = old_manifest["faiss"]["chunk_tokens"]
    elif out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise BuildError(f"{out} exists and is not an index; refusing to replace it")

    emb_id = None
    if embeddings:
        from ..datastore.embedder import default_embedder_path, embedder_id

        embedder = str(Path(embedder).expanduser().resolve()) if embedder else str(default_embedder_path())
        emb_id = embedder_id(embedder)

    key = _config_key(
        format=FORMAT_VERSION, inputs=input_signature(inputs),
        token_docs=hashlib.sha256(b"".join(d.tobytes() + b"|" for d in token_docs)).hexdigest()
        if token_docs is not None else None, fingerprint=fingerprint, text_field=text_field,
        template=template, shard_tokens=shard_tokens, skip_bad=skip_bad_records, embeddings=embeddings,
        embedder=emb_id, faiss=faiss_factory, chunk_tokens=chunk_tokens,
        append=old_manifest["index_id"] if old_manifest else None,
    )
    staging = out.parent / f".{out.name}.building"
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
    _write_json(staging / "build.json", {"key": key, "inputs": inputs, "started": time.time()})
    stages = _Stages(staging)
    (staging / "shards").mkdir(exist_ok=True)
    report = BuildReport(out, {})
    times = report.stage_seconds

    # ---- shards inherited from the old index (--append): hard links, the old files are never rewritten
    old_shards = []
    doc_base = 0
    if old_manifest:
        for sh in old_manifest["shards"]:
            d = staging / "shards" / sh["name"]
            d.mkdir(exist_ok=True)
            for fname in sh["files"]:
                dst = d / fname
                if not dst.exists():
                    try:
                        os.link(out / "shards" / sh["name"] / fname, dst)
                    except OSError:
                        shutil.copy2(out / "shards" / sh["name"] / fname, dst)
            old_shards.append(sh)
        doc_base = int(old_manifest["stats"]["num_documents"])
    first_new = len(old_shards)

    # ---- stage 1: tokenize into shards
    t0 = time.time()
    read_stats = ReadStats()
    new_shards: list[dict] = []
    i = first_new
    done_docs = 0
    while True:   # finished tokenize markers from an interrupted run
        m = stages.done(f"tokenize-{i:05d}")
        if m is None:
            break
        new_shards.append(m["shard"])
        done_docs = m["doc_end"]
        report.resumed.append(f"tokenize-{i:05d}")
        i += 1
    all_tok = stages.done("tokenize")
    if all_tok is not None:
        report.resumed.append("tokenize")
        read_stats_d = all_tok["read_stats"]
    else:
        for j in range(i, i + 10_000):  # stale markers after the first missing one
            p = stages.dir / f"tokenize-{j:05d}.json"
            if not p.exists():
                break
            p.unlink()
        backend = _backend_of(tokenizer) if token_docs is None else None
        docs = iter_documents(inputs, text_field=text_field, template=template, skip_bad=skip_bad_records,
                              stats=read_stats)
        pool = None
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, _worker_init, (backend.to_str(),))
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not progress, leave=True)
        buf: list[np.ndarray] = []
        buf_ids: list[int] = []
        buf_len = 0
        ndoc = 0

        def flush():
            nonlocal buf, buf_ids, buf_len, i
            name = f"shard-{i:05d}"
            d = staging / "shards" / name
            d.mkdir(exist_ok=True)
            lens = np.fromiter((len(a) for a in buf), dtype=np.int64, count=len(buf))
            T = np.empty(int(lens.sum()) + len(buf) + 1, dtype=dtype)
            starts = np.empty(len(buf) + 1, dtype=np.int64)
            pos = 0
            for j, a in enumerate(buf):
                T[pos] = sep
                starts[j] = pos + 1
                T[pos + 1:pos + 1 + len(a)] = a
                pos += 1 + len(a)
            T[pos] = sep
            starts[-1] = len(T)
            _save_npy(d / "tokens.npy", T)
            _save_npy(d / "docs.npy", starts)
            _save_npy(d / "doc_ids.npy", np.asarray(buf_ids, dtype=np.int64))
            _crash_point(f"tokenize:{name}")
            shard = {"name": name, "num_tokens": int(lens.sum()), "array_len": int(len(T)),
                     "num_documents": len(buf), "doc_id_min": int(buf_ids[0]), "doc_id_max": int(buf_ids[-1])}
            stages.mark(f"tokenize-{i:05d}", [d / "tokens.npy", d / "docs.npy", d / "doc_ids.npy"],
                        shard=shard, doc_end=int(buf_ids[-1]) - doc_base + 1)
            new_shards.append(shard)
            buf, buf_ids, buf_len = [], [], 0
            i += 1

        def encoded_batches():
            nonlocal ndoc
            pending = []
            if token_docs is not None:
                for j in range(done_docs, len(token_docs)):
                    ndoc = j + 1
                    yield doc_base + j, [token_docs[j]]
                return
            for batch in _batched(docs, batch_docs, 4 << 20):
                start = ndoc
                ndoc += len(batch)
                if ndoc <= done_docs:
                    continue  # tokenized by the interrupted run (its shards are kept)
                skip = max(0, done_docs - start)
                texts = [d.text for d in batch[skip:]]
                ids0 = doc_base + start + skip
                if pool is None:
                    yield ids0, _encode(backend, texts)
                else:
                    pending.append((ids0, pool.apply_async(_worker_encode, (texts,))))
                    if len(pending) >= 2 * workers:
                        a, r = pending.pop(0)
                        yield a, r.get()
            for a, r in pending:
                yield a, r.get()

        try:
            for ids0, arrs in encoded_batches():
                for j, a in enumerate(arrs):
                    if len(a) == 0:
                        continue
                    if a.size and (int(a.max()) >= vocab_size or int(a.min()) < 0):
                        raise BuildError(f"document {ids0 + j}: token id outside the vocabulary [0, {vocab_size})")
                    buf.append(a.astype(dtype, copy=False))
                    buf_ids.append(ids0 + j)
                    buf_len += len(a) + 1
                    bar.update(len(a))
                    if buf_len >= shard_tokens:
                        flush()
            if buf:
                flush()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        read_stats_d = read_stats.as_dict()
        stages.mark("tokenize", [], read_stats=read_stats_d, num_shards=i)
    report.read_stats = read_stats_d
    times["tokenize"] = time.time() - t0
    shards = old_shards + new_shards
    if not shards:
        raise BuildError("no documents found in the inputs" +
                         (f" ({read_stats_d['bad_records']} bad records skipped)" if read_stats_d.get("bad_records") else ""))

    # ---- stage 2: suffix arrays
    t0 = time.time()
    bar = tqdm(total=sum(s["array_len"] for s in new_shards), desc="suffix array", unit="tok", unit_scale=True,
               disable=not progress)
    for sh in new_shards:
        name = sh["name"]
        d = staging / "shards" / name
        if stages.done(f"sa-{name}") is not None:
            report.resumed.append(f"sa-{name}")
        else:
            T = np.load(d / "tokens.npy")
            _save_npy(d / "rsa.npy", build_reverse_sa(T))
            _crash_point(f"sa:{name}")
            _save_npy(d / "buckets.npy", build_buckets(T, vocab_size))
            del T
            stages.mark(f"sa-{name}", [d / "rsa.npy", d / "buckets.npy"])
        bar.update(sh["array_len"])
    bar.close()
    for sh in new_shards:
        d = staging / "shards" / sh["name"]
        sh["files"] = {f: _file_entry(d / f) for f in ("tokens.npy", "rsa.npy", "buckets.npy", "docs.npy",
                                                       "doc_ids.npy")}
        sh["bytes"] = sum(e["bytes"] for e in sh["files"].values())
    times["suffix_array"] = time.time() - t0

    # ---- stage 3 + 4: chunk embeddings and FAISS
    faiss_meta = None
    if embeddings:
        from ..datastore.embedder import get_embedder

        t0 = time.time()
        emb = get_embedder(embedder)
        (staging / "embed").mkdir(exist_ok=True)
        backend = _backend_of(tokenizer)
        todo = []
        for si, sh in enumerate(new_shards, start=first_new):
            name = sh["name"]
            if stages.done(f"embed-{name}") is not None:
                report.resumed.append(f"embed-{name}")
            else:
                todo.append((si, sh))
        bar = tqdm(total=sum(s["num_tokens"] for _, s in todo), desc="embed", unit="tok", unit_scale=True,
                   disable=not progress)
        for si, sh in todo:
            name = sh["name"]
            vecs, chunks = _embed_shard(staging / "shards" / name, si, backend, emb, chunk_tokens, embed_batch,
                                        bar, stages, name, report)
            _save_npy(staging / "embed" / f"{name}.vec.npy", vecs)
            _save_npy(staging / "embed" / f"{name}.chunks.npy", chunks)
            _crash_point(f"embed:{name}")
            stages.mark(f"embed-{name}", [staging / "embed" / f"{name}.vec.npy",
                                          staging / "embed" / f"{name}.chunks.npy"])
        bar.close()
        times["embed"] = time.time() - t0

        t0 = time.time()
        fdir = staging / "faiss"
        fdir.mkdir(exist_ok=True)
        if stages.done("faiss") is not None:
            report.resumed.append("faiss")
            faiss_meta = json.loads((stages.dir / "faiss.json").read_text())["meta"]
        else:
            faiss_meta = _build_faiss(staging, out, new_shards, old_manifest, faiss_factory, emb, embedder,
                                      chunk_tokens, progress, faiss_device, log)
            _crash_point("faiss")
            stages.mark("faiss", [fdir / "index.faiss", fdir / "chunks.npy"], meta=faiss_meta)
        faiss_meta["files"] = {f: _file_entry(fdir / f) for f in ("index.faiss", "chunks.npy")}
        times["faiss"] = time.time() - t0

    # ---- manifest (last), then publish
    num_docs = doc_base + sum(s["num_documents"] for s in new_shards)
    num_tokens = sum(s["num_tokens"] for s in shards)
    store_bytes = sum(s["bytes"] for s in shards)
    index_id = hashlib.sha256(json.dumps([[s["name"], s["files"]] for s in shards], sort_keys=True).encode()
                              + json.dumps(faiss_meta and faiss_meta["files"], sort_keys=True).encode()
                              ).hexdigest()[:16]
    times["total"] = time.time() - t_start
    prev_stats = old_manifest["stats"] if old_manifest else {}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "index_id": index_id,
        "created_unix": time.time(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"spec": model, "fingerprint": fingerprint, "vocab_size": vocab_size,
                      "class": type(tokenizer).__name__ if tokenizer is not None else None,
                      "name_or_path": str(getattr(tokenizer, "name_or_path", "") or "")},
        "vocab_size": vocab_size,
        "token_dtype": np.dtype(dtype).name,
        "separator": sep,
        "layout": "reverse-suffix-array-v1",
        "shards": shards,
        "faiss": faiss_meta,
        "stats": {
            "num_documents": num_docs,
            "num_tokens": num_tokens,
            "num_shards": len(shards),
            "bytes_suffix_store": store_bytes,
            "bytes_per_token": store_bytes / max(1, num_tokens),
            "bytes_faiss": sum(e["bytes"] for e in faiss_meta["files"].values()) if faiss_meta else 0,
            "read": read_stats_d,
            "inputs": inputs,
            "appended_from": old_manifest["index_id"] if old_manifest else None,
            "previous_inputs": prev_stats.get("inputs", []) + prev_stats.get("previous_inputs", []),
        },
        "build_seconds": dict(times),
        "builder": {"chunk_tokens": chunk_tokens if embeddings else None, "shard_tokens": shard_tokens},
    }
    _write_json(staging / "manifest.json", manifest)
    _crash_point("manifest")
    _publish(staging, out)
    report.manifest = manifest
    return report


#: chunks per embedding checkpoint: a crash in the (long) embed stage loses at most this many chunks
EMBED_PART_CHUNKS = 4096


def _embed_shard(d: Path, shard_idx: int, backend, emb, chunk_tokens: int, batch: int, bar, stages=None,
                 name: str = "", report=None):
    T = np.load(d / "tokens.npy", mmap_mode="r")
    starts = np.load(d / "docs.npy")
    ids = np.load(d / "doc_ids.npy")
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
            _save_npy(pfile, vecs[p0:p1])
            stages.mark(mark, [pfile])
            _crash_point(f"embed-part:{name}:{k}")
    return vecs, chunks


FAISS_DEVICES = ("auto", "cpu", "gpu")


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


def _build_faiss(staging: Path, out: Path, new_shards, old_manifest, factory, emb, embedder, chunk_tokens,
                 progress, device: str = "auto", log: Callable[[str], None] = print):
    import faiss

    fdir = staging / "faiss"
    vecs = [np.load(staging / "embed" / f"{s['name']}.vec.npy") for s in new_shards]
    chunks = [np.load(staging / "embed" / f"{s['name']}.chunks.npy") for s in new_shards]
    X = np.concatenate(vecs) if vecs else np.zeros((0, emb.dim), np.float32)
    C = np.concatenate(chunks) if chunks else np.zeros((0, 4), np.int64)
    if old_manifest and old_manifest.get("faiss"):
        index = faiss.read_index(str(out / "faiss" / "index.faiss"))
        C = np.concatenate([np.load(out / "faiss" / "chunks.npy"), C])
        factory = old_manifest["faiss"]["factory"]
        work, on_gpu = _to_device(faiss, index, device, log)
        _add_batched(work, X, progress)
    else:
        factory = factory or default_faiss_factory(len(X))
        index = faiss.index_factory(emb.dim, factory, faiss.METRIC_INNER_PRODUCT)
        work, on_gpu = _to_device(faiss, index, device, log)
        if not work.is_trained:
            if len(X) == 0:
                raise BuildError("no chunks to train the FAISS index")
            rng = np.random.default_rng(0)
            train = X if len(X) <= 200_000 else X[rng.choice(len(X), 200_000, replace=False)]
            work.train(np.ascontiguousarray(train))
        _add_batched(work, X, progress)
    if on_gpu:   # the file format and the service are CPU-side: bring it back before writing
        index = faiss.index_gpu_to_cpu(work)
    tmp = fdir / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    _fsync_file(tmp)
    os.replace(tmp, fdir / "index.faiss")
    _save_npy(fdir / "chunks.npy", C)
    return {"factory": factory, "metric": "inner_product", "normalized": True, "num_vectors": int(index.ntotal),
            "dim": int(emb.dim), "nprobe": default_nprobe(factory), "chunk_tokens": chunk_tokens,
            "embed_max_pieces": DEFAULT_EMBED_MAX_PIECES, "built_on": "gpu" if on_gpu else "cpu",
            "embedder": {"id": emb.id, "path": str(embedder)}}


def _add_batched(index, X: np.ndarray, progress: bool, step: int = 65536) -> None:
    from tqdm import tqdm

    with tqdm(total=len(X), desc="faiss", unit="vec", unit_scale=True, disable=not progress) as bar:
        for a in range(0, len(X), step):
            index.add(np.ascontiguousarray(X[a:a + step]))
            bar.update(min(step, len(X) - a))


def _publish(staging: Path, out: Path) -> None:
    """fsync everything in ``staging`` then swap it onto ``out``; remove leftovers."""
    shutil.rmtree(staging / "embed", ignore_errors=True)
    (staging / "build.json").unlink(missing_ok=True)
    shutil.rmtree(staging / "stages", ignore_errors=True)
    for root, dirs, files in os.walk(staging):
        for f in files:
            _fsync_file(Path(root) / f)
        _fsync_dir(Path(root))
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
        os.rename(out, old)
    os.rename(staging, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
