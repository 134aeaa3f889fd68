"""Corpus readers: every input format, text selection rules, bad records with file:line."""
from __future__ import annotations

import json

import pytest

from specstore.indexers.readers import BadRecordError, ReadStats, iter_documents, record_text


def texts(*inputs, **kw):
    return [d.text for d in iter_documents(list(map(str, inputs)), **kw)]


def test_jsonl_field_template_and_auto(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "first doc", "id": "1"}\n\n{"text": "second doc", "id": "2"}\n')
    assert texts(p) == ["first doc", "second doc"]
    assert texts(p, text_field="id") == ["1", "2"]
    q = tmp_path / "b.jsonl"
    q.write_text(json.dumps({"instruction": "Add two numbers", "input": "", "response": "def add(a, b): ...",
                             "ID": "7", "label": "yes"}) + "\n")
    assert texts(q) == ["Add two numbers\ndef add(a, b): ..."]           # auto: text-like strings joined
    assert texts(q, template="Q: {instruction}\nA: {response}") == ["Q: Add two numbers\nA: def add(a, b): ..."]
    r = tmp_path / "c.jsonl"
    r.write_text('"just a string"\n{"meta": {"body": "nested body"}}\n')
    assert texts(r, text_field="meta.body", skip_bad=True) == ["nested body"]


def test_json_array_streamed_with_line_numbers(tmp_path, monkeypatch):
    p = tmp_path / "arr.json"
    recs = [{"text": f"document number {i} " + "x" * (i * 37 % 200)} for i in range(50)]
    p.write_text(json.dumps(recs, indent=2))
    import specstore.indexers.readers as R

    real = R._iter_json_array
    monkeypatch.setattr(R, "_iter_json_array", lambda path: real(path, chunk_chars=64))  # force many refills
    assert texts(p) == [r["text"] for r in recs]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "ok one"},\n  {"text": "ok two"},\n  {"text": oops}\n]\n')
    with pytest.raises(BadRecordError) as e:
        texts(bad)
    assert str(e.value).startswith(f"{bad}:4:")
    st = ReadStats()
    assert texts(bad, skip_bad=True, stats=st) == ["ok one", "ok two"] and st.bad_records == 1


def test_jsonl_bad_lines_and_missing_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "good"}\n{"text": broken\n{"body": "no text field"}\n{"text": "good again"}\n')
    with pytest.raises(BadRecordError, match=r"d\.jsonl:2: malformed JSON"):
        texts(p)
    d2 = tmp_path / "d2.jsonl"
    d2.write_text('{"text": "a b"}\n{"text": "c d"}\n{"body": "x"}\n')
    with pytest.raises(BadRecordError, match=r"d2\.jsonl:3: record has no field 'text' \(fields: body\)"):
        texts(d2, text_field="text")
    st = ReadStats()
    assert texts(p, text_field="text", skip_bad=True, stats=st) == ["good", "good again"]
    assert st.bad_records == 2 and "d.jsonl:2" in st.bad_examples[0] and "d.jsonl:3" in st.bad_examples[1]
    with pytest.raises(BadRecordError, match=r"template field \{answer\} missing"):
        texts(p, template="{text} {answer}")


def test_parquet_streamed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"what is {i}?", "answer": f"it is {i}"} for i in range(5000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=700)
    out = texts(tmp_path / "t.parquet", template="{question} {answer}")
    assert len(out) == 5000 and out[4321] == "what is 4321? it is 4321"
    with pytest.raises(BadRecordError, match=r"t\.parquet:1: record has no field 'body'"):
        texts(tmp_path / "t.parquet", text_field="body")


def test_hf_datasets_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i} text" for i in range(30)], "n": list(range(30))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert texts(tmp_path / "ds") == [f"row {i} text" for i in range(30)]
    dd = datasets.DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(3, 5))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert sorted(texts(tmp_path / "dd")) == sorted(f"row {i} text" for i in range(5))
    # a dataset folder inside a corpus folder is read as a dataset, not as loose files
    assert len(texts(tmp_path)) == 35


def test_text_and_markdown_folders_recursive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# Beta\n\nmarkdown")
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("gamma")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.txt").write_text("   \n")
    st = ReadStats()
    assert texts(tmp_path, stats=st) == ["alpha text", "# Beta\n\nmarkdown", "gamma"]
    assert st.empty == 1 and len(st.skipped_files) == 1 and st.skipped_files[0].endswith("image.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(BadRecordError, match="latin1.txt: not UTF-8"):
        texts(tmp_path / "latin1.txt")


def test_missing_input():
    with pytest.raises(BadRecordError, match="no such file or folder"):
        texts("/nonexistent/corpus.jsonl")


def test_record_text_rules():
    assert record_text({"content": "hello world", "id": "x"}, "f", 1) == "hello world"
    assert record_text({"a": "one two", "b": "three four"}, "f", 1) == "one two\nthree four"
    with pytest.raises(BadRecordError, match="f:3: record has no text field"):
        record_text({"n": 3}, "f", 3)
