"""The on-disk index format: the one contract between the writer (``indexers/build.py``) and the reader
(``datastore/index.py``). Both import it from here; docs/indexing.md describes it for people.

    DIR/manifest.json                 IndexManifest, written last (its presence = a complete index)
    DIR/shards/<name>/tokens.npy      uint16|uint32 [array_len]: SEP d0 SEP d1 ... SEP
                      rsa.npy         int32 [array_len]: the reverse suffix array (datastore/suffix_shard.py)
                      buckets.npy     int64 [vocab + 1]
                      docs.npy        int64 [documents + 1]: first token of each document, then array_len
                      doc_ids.npy     int64 [documents]: global document ids
    DIR/faiss/index.faiss             FAISS index (inner product on L2-normalised chunk embeddings)
    DIR/faiss/chunks.npy              int64 [vectors, 4]: doc id, shard number, start, end

Every listed file has a ``{"bytes": int, "sha256": hex str}`` entry in the manifest; the reader checks sizes
on open and checksums on request.

Publishing (``indexers/build.py``) swaps a finished folder onto DIR with ``durable.replace_dir``. Where the
system has no one-step swap, a build killed between its two renames leaves no DIR but the complete old copy
``.<DIR name>.old-*`` next to it; ``readable_index_dir`` is how a reader finds it until the next build puts it
back or rolls forward.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .durable import PathLike, old_copies, sha256_file, write_json

FORMAT = "specstore-index"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
LAYOUT = "reverse-suffix-array-v1"
TOKEN_DTYPES = ("uint16", "uint32")

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
FAISS_DIR = "faiss"
SHARD_TOKENS, SHARD_RSA, SHARD_BUCKETS, SHARD_DOCS, SHARD_DOC_IDS = (
    "tokens.npy", "rsa.npy", "buckets.npy", "docs.npy", "doc_ids.npy")
#: a shard's files, in the manifest's order
SHARD_FILES = (SHARD_TOKENS, SHARD_RSA, SHARD_BUCKETS, SHARD_DOCS, SHARD_DOC_IDS)
FAISS_INDEX, FAISS_CHUNKS = "index.faiss", "chunks.npy"
FAISS_FILES = (FAISS_INDEX, FAISS_CHUNKS)


class IndexFormatError(Exception):
    """The folder holds no complete, valid index (missing/half-written files, bad checksum, unknown format)."""


def shard_path(root: PathLike, name: str) -> Path:
    return Path(root) / SHARDS_DIR / name


def faiss_path(root: PathLike) -> Path:
    return Path(root) / FAISS_DIR


def file_entry(path: PathLike) -> dict:
    """A file's manifest entry: {"bytes": size, "sha256": hex digest}."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_files(folder: PathLike, files: dict, verify: bool) -> None:
    """IndexFormatError unless every ``files`` entry (name -> file_entry) exists in ``folder`` with its size
    (and, with ``verify``, its sha256: reads every byte once)."""
    for fname, ent in files.items():
        fp = Path(folder) / fname
        if not fp.exists():
            raise IndexFormatError(f"{fp}: missing (half-written or damaged index)")
        if fp.stat().st_size != ent["bytes"]:
            raise IndexFormatError(f"{fp}: size {fp.stat().st_size} differs from the manifest's {ent['bytes']}")
        if verify and sha256_file(fp) != ent["sha256"]:
            raise IndexFormatError(f"{fp}: sha256 differs from the manifest (damaged file)")


def is_complete_index(folder: PathLike) -> bool:
    """``folder`` holds a readable manifest and every file it lists with the listed size (no checksums)."""
    try:
        m = IndexManifest.load(folder)
        for sh in m.shards:
            check_files(shard_path(folder, sh["name"]), sh["files"], False)
        if m.faiss:
            check_files(faiss_path(folder), m.faiss["files"], False)
    except (IndexFormatError, OSError):
        return False
    return True


def readable_index_dir(path: PathLike) -> Path:
    """The folder a reader should open for the index published at ``path``: ``path`` itself, unless it is
    gone and a publish killed between its two renames left the complete old copy next to it (read in place,
    never moved: a reader may have no write access, and a live build may be about to finish the swap)."""
    path = Path(path)
    if path.exists():
        return path
    for old in old_copies(path):
        if is_complete_index(old):
            return old
    return path


def tokenizer_fingerprint(tokenizer) -> str:
    """A short stable hash of the vocabulary and special tokens: equal fingerprints <=> same token ids.

    ``tokenizer``: a Hugging Face tokenizer (``get_vocab()``, ``all_special_tokens``). An index records its
    tokenizer's fingerprint; clients and the service refuse to mix token ids of different tokenizers.
    """
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)).encode())
    return h.hexdigest()[:16]


def index_id_of(shards: list, faiss_files: Optional[dict]) -> str:
    """16 hex digits over every file's checksum (``shards``: manifest shard entries; ``faiss_files``: the
    FAISS file entries or None): equal ids <=> same files."""
    return hashlib.sha256(json.dumps([[s["name"], s["files"]] for s in shards], sort_keys=True).encode()
                          + json.dumps(faiss_files, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class IndexManifest:
    """``manifest.json``. Nested parts stay plain JSON dicts (the service sends the manifest as JSON):

    tokenizer: {"spec", "fingerprint", "vocab_size", "class", "name_or_path"}
    shards: [{"name", "num_tokens", "array_len", "num_documents", "doc_id_min", "doc_id_max",
              "files": {file name: {"bytes", "sha256"}}, "bytes"}]
    faiss: None (no embeddings) or {"factory", "metric", "normalized", "num_vectors", "dim", "nprobe",
           "chunk_tokens", "embed_max_pieces", "built_on", "embedder": {"id", "path"}, "files"}
    stats: {"num_documents", "num_tokens", "num_shards", "bytes_suffix_store", "bytes_per_token", "bytes_faiss",
            "read", "inputs", "appended_from", "previous_inputs", "build_key" (the build's resume key: a rerun
            of the last --append with the same inputs and options is recognised and does nothing)}
    build_seconds: stage -> seconds; builder: {"chunk_tokens", "shard_tokens", "engine"}
    extra: top-level keys this version does not know (kept as they are on a load/dump round trip)
    """

    index_id: str
    tokenizer: dict
    vocab_size: int
    token_dtype: str
    shards: list
    stats: dict
    separator: Optional[int] = None
    faiss: Optional[dict] = None
    created_unix: Optional[float] = None
    created: Optional[str] = None
    build_seconds: dict = field(default_factory=dict)
    builder: dict = field(default_factory=dict)
    layout: str = LAYOUT
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    #: the manifest's keys in file order (``extra`` follows them)
    KEYS = ("format", "format_version", "index_id", "created_unix", "created", "tokenizer", "vocab_size",
            "token_dtype", "separator", "layout", "shards", "faiss", "stats", "build_seconds", "builder")
    _REQUIRED = ("index_id", "tokenizer", "vocab_size", "token_dtype", "shards", "stats")

    @property
    def fingerprint(self) -> str:
        return self.tokenizer["fingerprint"]

    @property
    def num_tokens(self) -> int:
        return int(self.stats["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.stats["num_documents"])

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.KEYS}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "IndexManifest":
        """Validate ``d`` (parsed manifest.json; ``where`` prefixes the messages) or raise IndexFormatError."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise IndexFormatError(f"{where}: not a specstore index manifest")
        if d.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise IndexFormatError(f"{where}: unsupported format version {d.get('format_version')}")

        def need(obj: Any, key: str, name: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise IndexFormatError(f"{where}: manifest lacks '{name}'")
            return obj[key]

        for k in cls._REQUIRED:
            need(d, k, k)
        need(d["tokenizer"], "fingerprint", "tokenizer.fingerprint")
        for k in ("num_tokens", "num_documents"):
            need(d["stats"], k, f"stats.{k}")
        if d["token_dtype"] not in TOKEN_DTYPES:
            raise IndexFormatError(f"{where}: unknown token dtype {d['token_dtype']!r}")
        parts = [(f"shards[{i}]", sh) for i, sh in enumerate(d["shards"])]
        if d.get("faiss") is not None:
            parts.append(("faiss", d["faiss"]))
        for name, part in parts:
            if name != "faiss":
                need(part, "name", f"{name}.name")
            for fname, ent in need(part, "files", f"{name}.files").items():
                for k in ("bytes", "sha256"):
                    need(ent, k, f"{name}.files.{fname}.{k}")
        known = {k: d[k] for k in cls.KEYS if k in d}
        return cls(**known, extra={k: v for k, v in d.items() if k not in cls.KEYS})

    @classmethod
    def load(cls, folder: PathLike) -> "IndexManifest":
        """The validated manifest of the index at ``folder`` (IndexFormatError when there is none)."""
        mpath = Path(folder) / MANIFEST_NAME
        if not mpath.exists():
            raise IndexFormatError(f"{folder}: no manifest.json (not an index, or a build that never finished)")
        try:
            d = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{mpath}: unreadable manifest: {e}") from None
        return cls.from_dict(d, str(mpath))

    def dump(self, folder: PathLike) -> Path:
        """Write ``folder/manifest.json`` durably (temp file, fsync, rename); returns its path."""
        mpath = Path(folder) / MANIFEST_NAME
        write_json(mpath, self.to_dict())
        return mpath
