"""Corpus readers on bad input (issue 10, promise 3): every problem is a BadRecordError naming the file and
the line (or row), or with ``skip_bad`` a counted skip; no other exception, and no good record is lost
around a bad one."""
from __future__ import annotations

import json

import pytest

import specstore.indexers.readers as R
from specstore.indexers.readers import BadRecordError, ReadStats, iter_documents

GOOD = [f"good document {i}" for i in range(10)]


def read(path, **kw):
    """(texts, stats) of ``path`` read with ``skip_bad``; the strict read must raise BadRecordError."""
    with pytest.raises(BadRecordError):
        list(iter_documents([str(path)], **kw))
    st = ReadStats()
    return [d.text for d in iter_documents([str(path)], skip_bad=True, stats=st, **kw)], st


def jsonl(path, bad_line: bytes):
    """Ten good lines, ``bad_line`` as line 11, one good line after it."""
    body = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in GOOD)
    path.write_bytes(body + bad_line + b"\n" + b'{"text": "after the bad line"}\n')
    return path


@pytest.mark.parametrize("bad,msg", [
    (b'{"text": "caf\xe9 latin-1"}', "not UTF-8"),                    # invalid UTF-8 inside one line
    (b"\x89PNG\r\x1a\x00\x00\x00\rIHDR\xff\xfe\x00", "not UTF-8"),    # binary bytes
    (b"[" * 100_000, "nested too deeply"),                            # json.loads: RecursionError
    (b'{"text": "a b", "n": ' + b"1" * 5000 + b"}", "malformed JSON"),  # json.loads: int digits limit
    (b'{"text": broken', "malformed JSON"),
    (b'{"body": "no text here"}', "no field 'text'"),
])
def test_bad_jsonl_line_is_located_and_skipped_alone(tmp_path, bad, msg):
    """The bad line is reported as line 11 and skipped alone: before the fix invalid UTF-8 was reported
    at line 1 and dropped the whole file (its ten good lines too), and deep nesting or a 5000-digit
    number raised RecursionError / ValueError out of the reader."""
    p = jsonl(tmp_path / "c.jsonl", bad)
    with pytest.raises(BadRecordError) as ei:
        list(iter_documents([str(p)], text_field="text"))
    assert str(ei.value).startswith(f"{p}:11: ") and msg in str(ei.value), str(ei.value)[:300]
    texts, st = read(p, text_field="text")
    assert texts == GOOD + ["after the bad line"]
    assert st.bad_records == 1 and st.bad_examples[0].startswith(f"{p}:11: ") and len(st.bad_examples[0]) < 400


def test_huge_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "MAX_LINE_BYTES", 1000)
    p = jsonl(tmp_path / "h.jsonl", json.dumps({"text": "x " * 5000}).encode())
    texts, st = read(p)
    assert texts == GOOD + ["after the bad line"]
    assert st.bad_records == 1 and st.bad_examples[0].startswith(f"{p}:11: line longer than 1000 bytes")


def test_bad_json_array_element(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"text": "one two"},\n {"text": "three"},\n ' + "[" * 100_000 + "]")
    with pytest.raises(BadRecordError, match=rf"{p}:3: JSON nested too deeply"):
        list(iter_documents([str(p)]))
    texts, st = read(p)
    assert texts == ["one two", "three"] and st.bad_records == 1 and st.bad_files == 1


def test_template_type_error_is_a_bad_record(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "one two"}\n')
    with pytest.raises(BadRecordError, match=rf"{p}:1: template"):
        list(iter_documents([str(p)], template="{text[x]}"))


def _parquet(path, rows=5000, group=500):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(rows)]}), path, row_group_size=group)
    return path


def test_truncated_parquet(tmp_path):
    p = _parquet(tmp_path / "t.parquet")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(BadRecordError, match=rf"{p}: unreadable Parquet file"):
        list(iter_documents([str(p)]))
    texts, st = read(p)
    assert texts == [] and st.bad_records == 1 and st.bad_files == 1


def test_corrupt_parquet_row_group_is_skipped_alone(tmp_path):
    """A row group whose pages are damaged is one bad record naming its rows; the others are read (before
    the fix the whole file went, the good row groups before and after the damaged one too)."""
    import pyarrow.parquet as pq

    p = _parquet(tmp_path / "c.parquet")
    col = pq.ParquetFile(p).metadata.row_group(3).column(0)
    b = bytearray(p.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    for i in range(start + 30, start + col.total_compressed_size - 10, 7):
        b[i] ^= 0x5A
    p.write_bytes(bytes(b))
    with pytest.raises(BadRecordError, match=rf"{p}:1501: row group 3 \(rows 1501-2000\) unreadable"):
        list(iter_documents([str(p)]))
    texts, st = read(p)
    assert texts == [f"parquet row {i}" for i in range(5000) if not 1500 <= i < 2000]
    assert st.bad_records == 1 and st.bad_files == 0


def test_bad_dataset_folder(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "state.json").write_text("{not json")
    with pytest.raises(BadRecordError, match=rf"{d / 'state.json'}: malformed JSON"):
        list(iter_documents([str(d)]))


def test_empty_and_blank_files_are_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "b.jsonl").write_bytes(b"\n  \n")
    (tmp_path / "c.parquet").write_bytes(b"")
    (tmp_path / "d.txt").write_text('{"text": "x"}')
    st = ReadStats()
    assert [d.text for d in iter_documents([str(tmp_path)], skip_bad=True, stats=st)] == ['{"text": "x"}']
    assert st.empty_files == 2 and st.bad_files == 1 and st.as_dict()["empty_files"] == 2


def test_build_reports_and_records_the_skips(tmp_path):
    """index-build --skip-bad-records: the summary says what was skipped and the manifest records the
    counts (stats.read), with the first examples located by file:line."""
    from specstore.datastore.model_files import load_tokenizer
    from specstore.indexers.build import BuildOptions, build_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    jsonl(corpus / "a.jsonl", b'{"text": "caf\xe9"}')
    (corpus / "b.jsonl").write_bytes(b"")
    (corpus / "c.json").write_text('[{"text": "one two"},\n' + "[" * 100_000)
    rep = build_index([corpus], tmp_path / "idx", BuildOptions(embeddings=False, progress=False,
                                                              skip_bad_records=True), tokenizer=load_tokenizer())
    read = rep.manifest["stats"]["read"]
    assert read["documents"] == 12 and read["bad_records"] == 2 and read["bad_files"] == 1
    assert read["empty_files"] == 1 and read["bad_examples"][0].startswith(f"{corpus / 'a.jsonl'}:11: not UTF-8")
    summary = rep.summary()
    assert "skipped 2 bad records (--skip-bad-records, 1 of them cut a file short)" in summary
    assert "1 input files held no record" in summary
