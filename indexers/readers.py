"""Corpus readers: every supported input format streamed as one sequence of documents.

Supported inputs (files or folders, folders are walked recursively in sorted order):

* JSON lines (``.jsonl``, ``.ndjson``, and ``.json`` files whose first non-blank character is not ``[``)
* JSON arrays (``.json`` starting with ``[``), parsed incrementally (bounded memory)
* Parquet (``.parquet``), streamed with ``pyarrow.parquet.ParquetFile.iter_batches``
* plain text / Markdown (``.txt``, ``.text``, ``.md``, ``.markdown``, ``.rst``): one document per file
  (files larger than ``TEXT_PIECE_CHARS`` are split at line boundaries into several documents)
* Hugging Face ``datasets`` folders written by ``save_to_disk`` (``state.json`` + ``*.arrow``, or a
  ``dataset_dict.json`` with one folder per split), read with ``pyarrow.ipc`` (no ``datasets`` import)

A record becomes text by ``template`` (``str.format_map`` over the record), else ``text_field``, else the
auto rule (see :func:`record_text`). Problems raise :class:`BadRecordError` carrying ``file:line``; with
``skip_bad=True`` the reader counts them in ``ReadStats`` and goes on. A bad JSON line (malformed, not
UTF-8, nested too deeply, longer than ``MAX_LINE_BYTES``) or a damaged Parquet row group is one bad record;
the lines and row groups around it are read. A problem that leaves the rest of a file unreadable (a
truncated JSON array, a Parquet file without its footer) is one bad record and one ``bad_files``; files
with no record at all are counted as ``empty_files``. Nothing is dropped without being counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

JSON_EXTS = {".json", ".jsonl", ".ndjson"}
TEXT_EXTS = {".txt", ".text", ".md", ".markdown", ".rst"}
PARQUET_EXTS = {".parquet"}
TEXT_PIECE_CHARS = 8 << 20
AUTO_FIELDS = ("text", "content", "document", "body", "markdown", "passage")
# A JSON line longer than this is a bad record, skipped without being held in memory (a binary file or a
# missing newline would otherwise make one "line" of the whole file).
MAX_LINE_BYTES = 256 << 20
_SKIP_CHUNK = 1 << 20


class BadRecordError(ValueError):
    """An input problem, located: ``str(err)`` is ``file:line: what is wrong``."""

    def __init__(self, path, line, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        loc = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{loc}: {message}")


@dataclass
class Document:
    text: str
    source: str          # file path
    line: Optional[int]  # 1-based line (JSON lines / arrays) or row number (parquet, datasets), None for text files


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    documents: int = 0
    empty: int = 0
    bad_records: int = 0
    bad_files: int = 0       # files whose rest could not be read after a problem (counted in bad_records too)
    empty_files: int = 0     # files that held no record at all
    skipped_files: list = field(default_factory=list)
    bad_examples: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "files": self.files, "records": self.records, "documents": self.documents,
            "empty_records": self.empty, "bad_records": self.bad_records,
            "bad_files": self.bad_files, "empty_files": self.empty_files,
            "skipped_files": self.skipped_files[:50], "bad_examples": self.bad_examples[:20],
        }


class _SafeDict(dict):
    def __init__(self, rec, path, line):
        super().__init__(rec)
        self._path, self._line = path, line

    def __missing__(self, key):
        raise BadRecordError(self._path, self._line, f"template field {{{key}}} missing from record "
                             f"(fields: {', '.join(sorted(map(str, self.keys())))})")


def _to_str(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return "\n".join(_to_str(x) for x in v)
    return str(v)


def record_text(rec, path, line, text_field: Optional[str] = None, template: Optional[str] = None) -> str:
    """The text of one record.

    - ``template``: ``template.format_map(record)`` (missing field -> BadRecordError)
    - ``text_field``: that field (dotted paths such as ``meta.body`` allowed; missing -> BadRecordError)
    - auto: a string record is its own text; a dict with exactly one of the common text fields
      (text, content, document, body, markdown, passage) and no other text-like string uses it; otherwise
      every text-like string value (one containing whitespace) is joined with newlines, in record order.
    """
    if template is not None:
        if not isinstance(rec, dict):
            raise BadRecordError(path, line, f"template needs an object record, got {type(rec).__name__}")
        try:
            return template.format_map(_SafeDict(rec, path, line))
        except BadRecordError:
            raise
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
            raise BadRecordError(path, line, f"template {template!r} failed: {e}") from None
    if text_field is not None:
        if not isinstance(rec, dict):
            raise BadRecordError(path, line, f"expected an object with field {text_field!r}, "
                                 f"got {type(rec).__name__}")
        cur = rec
        for part in text_field.split("."):
            if not isinstance(cur, dict) or part not in cur:
                keys = ", ".join(sorted(map(str, rec.keys())))
                raise BadRecordError(path, line, f"record has no field {text_field!r} (fields: {keys})")
            cur = cur[part]
        return _to_str(cur)
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise BadRecordError(path, line, f"cannot find text in a {type(rec).__name__} record; "
                             "use --text-field or --template")
    textlike = [k for k, v in rec.items() if isinstance(v, str) and any(c.isspace() for c in v.strip())]
    named = [k for k in AUTO_FIELDS if k in rec and isinstance(rec[k], str)]
    if len(named) == 1 and all(k == named[0] for k in textlike):
        return rec[named[0]]
    if textlike:
        return "\n".join(rec[k] for k in textlike)
    strs = [v for v in rec.values() if isinstance(v, str) and v]
    if strs:
        return "\n".join(strs)
    raise BadRecordError(path, line, f"record has no text field (fields: {', '.join(map(str, rec.keys()))}); "
                         "use --text-field or --template")


# ----------------------------------------------------------------------------------- per-format readers
def _json_error(path, line, e: Exception) -> BadRecordError:
    """The BadRecordError of a value ``json`` could not parse: JSONDecodeError, RecursionError (nesting
    deeper than the interpreter's stack), ValueError (an integer of more than 4300 digits)."""
    if isinstance(e, json.JSONDecodeError):
        return BadRecordError(path, line, f"malformed JSON: {e.msg} (column {e.colno})")
    if isinstance(e, RecursionError):
        return BadRecordError(path, line, "JSON nested too deeply")
    return BadRecordError(path, line, f"malformed JSON: {str(e)[:200]}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record or BadRecordError) per non-blank line. Read as bytes and decoded line by line:
    a text-mode reader decodes ahead in 8 KB blocks, so one bad byte failed the lines before it too, with
    the wrong line number."""
    max_line = MAX_LINE_BYTES
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line and not raw.endswith(b"\n"):
                while (chunk := f.readline(_SKIP_CHUNK)) and not chunk.endswith(b"\n"):
                    pass
                yield lineno, BadRecordError(path, lineno, f"line longer than {max_line} bytes")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                s = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield lineno, BadRecordError(path, lineno, f"not UTF-8 text ({e.reason} at byte {e.start + 1})")
                continue
            if not s:
                continue
            try:
                yield lineno, json.loads(s)
            except (ValueError, RecursionError) as e:
                yield lineno, _json_error(path, lineno, e)


def _iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Incremental parse of ``[obj, obj, ...]``: yields (line of the element's start, element)."""
    dec = json.JSONDecoder()
    with open(path, "r", encoding="utf-8") as f:
        buf = ""
        pos = 0
        line = 1
        eof = False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            try:
                chunk = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise BadRecordError(path, line, f"not UTF-8 text ({e.reason})") from None
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_ws():
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise BadRecordError(path, line, "expected a JSON array ('[')")
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos >= len(buf):
                raise BadRecordError(path, line, "unexpected end of file inside the JSON array")
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise BadRecordError(path, line, f"expected ',' or ']' between array elements, got {buf[pos]!r}")
                pos += 1
                skip_ws()
            first = False
            start_line = line
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    # a number/literal cut at the buffer edge could parse short: make sure a delimiter follows
                    if end >= len(buf) and more():
                        continue
                    break
                except json.JSONDecodeError as e:
                    if more():
                        continue
                    err_line = start_line + buf.count("\n", pos, e.pos)
                    raise BadRecordError(path, err_line, f"malformed JSON: {e.msg}") from None
                except (ValueError, RecursionError) as e:
                    raise _json_error(path, start_line, e) from None
            line += buf.count("\n", pos, end)
            pos = end
            yield start_line, obj


def _json_kind(path: Path) -> str:
    if path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "array" if head.startswith(b"[") else "jsonl"


def _iter_parquet(path: Path, columns=None, batch_rows: int = 2048) -> Iterator[tuple[int, object]]:
    """(row number, record) per row, one row group at a time: a row group whose pages are damaged is one
    bad record naming its rows, and the other groups are read."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises ArrowInvalid etc.
        raise BadRecordError(path, None, f"unreadable Parquet file: {str(e).strip()}") from None
    row = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            # decoded whole before it is handed out: a group fails before any of its rows is yielded
            recs = [r for b in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns)
                    for r in b.to_pylist()]
        except Exception as e:  # noqa: BLE001 - OSError, ArrowInvalid, ...: damaged pages
            yield row + 1, BadRecordError(path, row + 1, f"row group {g} (rows {row + 1}-{row + n}) unreadable: "
                                          f"{str(e).strip()[:200]}")
            row += n
            continue
        for rec in recs:
            row += 1
            yield row, rec


def is_dataset_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def _read_json(path: Path) -> dict:
    """A small JSON object file (a dataset folder's state.json), BadRecordError when it is none."""
    try:
        out = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise _json_error(path, None, e) from None
    if not isinstance(out, dict):
        raise BadRecordError(path, None, f"expected a JSON object, got {type(out).__name__}")
    return out


def _iter_dataset_dir(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = _read_json(path / "dataset_dict.json").get("splits") or sorted(
            d.name for d in path.iterdir() if d.is_dir())
        for s in splits:
            yield from _iter_dataset_dir(path / s)
        return
    state = _read_json(path / "state.json")
    files = [path / d["filename"] for d in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
    row = 0
    for fp in files:
        try:
            src = pa.memory_map(str(fp), "r")
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
        except Exception as e:
            raise BadRecordError(fp, None, f"unreadable Arrow file: {e}") from None
        for batch in batches:
            for rec in batch.to_pylist():
                row += 1
                yield row, rec


def _iter_text(path: Path) -> Iterator[tuple[Optional[int], object]]:
    try:
        size = path.stat().st_size
        with open(path, "r", encoding="utf-8") as f:
            if size <= TEXT_PIECE_CHARS:
                yield None, f.read()
                return
            line = 1
            while True:
                piece = f.read(TEXT_PIECE_CHARS)
                if not piece:
                    return
                tail = f.readline()
                piece += tail
                yield line, piece
                line += piece.count("\n")
    except UnicodeDecodeError as e:
        raise BadRecordError(path, None, f"not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise BadRecordError(path, None, f"unreadable file: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------- the whole corpus
def expand_inputs(inputs: Iterable, stats: Optional[ReadStats] = None) -> list[tuple[str, Path]]:
    """(kind, path) for every input file/dataset, in a deterministic order. Missing input -> BadRecordError."""
    out: list[tuple[str, Path]] = []

    def classify(p: Path, explicit: bool):
        if is_dataset_dir(p):
            out.append(("dataset", p))
        elif p.is_dir():
            for child in sorted(p.iterdir()):
                if child.name.startswith("."):
                    continue
                classify(child, False)
        elif p.suffix.lower() in JSON_EXTS:
            out.append(("json", p))
        elif p.suffix.lower() in PARQUET_EXTS:
            out.append(("parquet", p))
        elif p.suffix.lower() in TEXT_EXTS or explicit:
            out.append(("text", p))
        elif stats is not None:
            stats.skipped_files.append(str(p))

    for inp in inputs:
        p = Path(inp).expanduser()
        if not p.exists():
            raise BadRecordError(p, None, "no such file or folder")
        classify(p, True)
    return out


def iter_documents(inputs: Iterable, *, text_field: Optional[str] = None, template: Optional[str] = None,
                   skip_bad: bool = False, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Every document of every input, in order. Empty texts are counted (``stats.empty``) and skipped."""
    stats = stats if stats is not None else ReadStats()
    files = expand_inputs(inputs, stats)

    def bad(err: BadRecordError):
        if not skip_bad:
            raise err
        stats.bad_records += 1
        if len(stats.bad_examples) < 20:
            stats.bad_examples.append(str(err))

    for kind, p in files:
        stats.files += 1
        records_before = stats.records
        try:
            if kind == "json":
                it = _iter_jsonl(p) if _json_kind(p) == "jsonl" else _iter_json_array(p)
            elif kind == "parquet":
                it = _iter_parquet(p)
            elif kind == "dataset":
                it = _iter_dataset_dir(p)
            else:
                it = _iter_text(p)
            for line, rec in it:
                stats.records += 1
                if isinstance(rec, BadRecordError):
                    bad(rec)
                    continue
                try:
                    if kind == "text":
                        text = rec
                    else:
                        text = record_text(rec, p, line, text_field, template)
                except BadRecordError as e:
                    bad(e)
                    continue
                if not text or not text.strip():
                    stats.empty += 1
                    continue
                stats.documents += 1
                yield Document(text, str(p), line)
            if stats.records == records_before:
                stats.empty_files += 1
        except BadRecordError as e:
            # a whole-file problem (unreadable, truncated array): the rest of this file is skipped
            stats.bad_files += skip_bad
            bad(e)
        except OSError as e:
            stats.bad_files += skip_bad
            bad(BadRecordError(p, None, f"unreadable file: {e.strerror or e}"))


def input_signature(inputs: Iterable) -> list[dict]:
    """Path, size and mtime of every input file: part of the resume key of a build."""
    sig = []
    for kind, p in expand_inputs(inputs):
        if p.is_dir():
            for fp in sorted(p.rglob("*")):
                if fp.is_file():
                    st = fp.stat()
                    sig.append({"path": str(fp.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        else:
            st = p.stat()
            sig.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return sig


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
