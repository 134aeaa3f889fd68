"""spec-bench report: aggregates, Markdown and PNG from fake results."""
import json

import pytest

from specstore.bench.report import OVERALL, render_markdown, summarize, write_reports
from specstore.bench.spec_bench import BenchResult, Record, first_difference, median

METHODS = ["plain", "pld", "ours-plain", "ours:context"]


def fake_result(mismatch=False):
    recs = []
    # (category, method) -> (seconds, forwards) for 16 new tokens
    spec = {"plain": (1.0, 16), "pld": (1.25, 12), "ours-plain": (1.0, 16), "ours:context": (0.5, 8)}
    for pi, cat in enumerate(["qa", "qa", "rag"]):
        base = 1.0 + pi  # prompt 2 (rag) is slower for everybody
        for order, m in enumerate(METHODS):
            secs, fw = spec[m]
            secs *= base
            if m == "pld":
                fw = None if cat == "rag" else fw  # unknown for one prompt -> MAT n/a there
            bad = mismatch and m == "ours:context" and pi == 1
            recs.append(Record(pi, cat, cat, pi, 30, m, order, 16, secs, 16 / secs, fw,
                               (16 / fw) if fw else None, (16 / secs) / (16 / base), not bad, 3 if bad else None))
    return BenchResult({"model": "tiny", "device": "cpu", "torch_threads": 2, "date": "2025-01-01",
                        "command": "spec-bench --n-per-category 2"}, METHODS, recs)


def test_summary_numbers():
    s = summarize(fake_result())
    assert list(s) == ["qa", "rag", OVERALL]  # Spec-Bench order, overall last
    ctx = s["qa"]["ours:context"]
    assert ctx["mat"] == pytest.approx(2.0)
    assert ctx["speedup_median"] == pytest.approx(2.0) and ctx["speedup_total"] == pytest.approx(2.0)
    assert s["qa"]["plain"]["mat"] == pytest.approx(1.0)
    assert s["qa"]["pld"]["mat"] == pytest.approx(16 / 12)
    assert s["rag"]["pld"]["mat"] is None
    assert s[OVERALL]["pld"]["speedup_median"] == pytest.approx(0.8)
    assert s[OVERALL]["plain"]["tokens_per_second"] == pytest.approx(48 / 6.0)
    assert s[OVERALL]["ours:context"]["mismatches"] == 0


def test_markdown_and_files(tmp_path):
    res = fake_result()
    out = write_reports(res, tmp_path / "r" / "spec.md", tmp_path / "r" / "spec.png", tmp_path / "raw.json")
    md = (tmp_path / "r" / "spec.md").read_text()
    assert "| qa |" in md and "**overall**" in md and "2.00x [2.00x]" in md
    assert "n/a" in md  # pld MAT on rag
    assert "produced exactly plain greedy's tokens" in md
    assert "`spec-bench --n-per-category 2`" in md and "tiny" in md
    assert "![speedup per category](spec.png)" in md  # relative to the report
    png = (tmp_path / "r" / "spec.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert len(raw["records"]) == 12 and raw["summary"][OVERALL]["ours:context"]["mat"] == pytest.approx(2.0)
    assert BenchResult.from_json(raw).records == res.records
    assert out[OVERALL]["plain"]["speedup_median"] == pytest.approx(1.0)


def test_markdown_reports_mismatches():
    res = fake_result(mismatch=True)
    assert [r.prompt_index for r in res.mismatches()] == [1]
    md = render_markdown(res)
    assert "differ from plain greedy" in md and "position 3" in md


def test_helpers():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert median([3.0, None, 1.0, 2.0]) == 2.0 and median([]) is None


def test_markdown_lists_drafter_counters():
    res = fake_result()
    assert "Drafter counters" not in render_markdown(res)
    res.meta["drafter_counters"] = {"ours:datastore": {"DatastoreDrafter": {"failures": 0, "hits": 41,
                                                                            "requests": 50}}}
    md = render_markdown(res)
    assert "## Drafter counters" in md and "- ours:datastore / DatastoreDrafter: failures 0, hits 41, requests 50" in md
