"""bench/vllm_bench.py --summarize: medians over rounds, every round shown, identity to plain counted."""
from __future__ import annotations

import json

from specstore.bench.vllm_bench import summarize


def _report(path, tps, ids, mal=None):
    runs = [{"index": i, "token_ids": t, "text": "", "seconds": 1.0} for i, t in enumerate(ids)]
    path.write_text(json.dumps({"tokens_per_second": tps, "mean_accepted_length": mal, "runs": runs}))


def test_summary_rows(tmp_path):
    _report(tmp_path / "plain_b1_r1.json", 10.0, [[1, 2], [3, 4]])
    _report(tmp_path / "plain_b1_r2.json", 12.0, [[1, 2], [3, 4]])
    _report(tmp_path / "ctx_b1_r1.json", 15.0, [[1, 2], [3, 5]], 2.0)
    _report(tmp_path / "ctx_b1_r2.json", 13.0, [[1, 2], [3, 4]], 2.5)
    lines = summarize(tmp_path).splitlines()
    assert lines[2] == "| plain | 1 | 11.0 | 10.0 / 12.0 | - | 1.00x | 4/4 |"
    # median 14.0 over plain's 11.0; one output of round 1 differs from plain's
    assert lines[3] == "| ctx | 1 | 14.0 | 15.0 / 13.0 | 2.25 | 1.27x | 3/4 |"


def test_summary_names_runs_whose_datastore_failed(tmp_path):
    _report(tmp_path / "plain_b1_r1.json", 10.0, [[1, 2]])
    _report(tmp_path / "remote_b1_r1.json", 12.0, [[1, 2]], 2.0)
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "remote_b1_r1.json").write_text(json.dumps(
        {"extra": {"datastore": {"requests": 90, "failures": 5, "skipped_breaker_open": 80}}}))
    (tmp_path / "stats" / "remote_b1_r2.json").write_text(json.dumps(
        {"extra": {"datastore": {"requests": 1857, "failures": 1}}}))   # one missed deadline: not flagged
    assert summarize(tmp_path).splitlines()[-1] == \
        "**Datastore lookups failed in:** remote_b1_r1 (85 of 90 lookups failed or skipped)"
    (tmp_path / "stats" / "remote_b1_r1.json").write_text(json.dumps({"extra": {}}))
    assert "failed" not in summarize(tmp_path)


def test_the_null_method_runs_speculative_mode_with_no_drafts():
    from types import SimpleNamespace

    from specstore.bench.vllm_bench import NULL_PROPOSER, NullProposer, speculative_config

    cfg = speculative_config(SimpleNamespace(method="null", num_speculative_tokens=8))
    assert cfg == {"method": "custom_class", "model": NULL_PROPOSER, "num_speculative_tokens": 8}
    module, _, name = NULL_PROPOSER.rpartition(".")
    import importlib

    assert getattr(importlib.import_module(module), name) is NullProposer   # importable in vLLM's worker
    assert NullProposer(None).propose([[5], [], [7]], None, None) == [[], [], []]


def test_phases_split_prompt_from_decode_time(tmp_path):
    from specstore.bench.vllm_bench import phases

    prompts, outs = [40, 800, 60, 700, 90, 500], [128, 100, 30, 128, 64, 12]
    for cfg, decode_s in (("plain", 0.045), ("ours", 0.030)):
        runs = [{"index": i, "token_ids": [1] * o, "seconds": 0.1 + 0.004 * p + decode_s * o, "prompt_tokens": p}
                for i, (p, o) in enumerate(zip(prompts, outs))]
        (tmp_path / f"{cfg}_b1_r1.json").write_text(json.dumps({"runs": runs}))
    lines = phases(tmp_path).splitlines()
    assert lines[2].startswith("| plain | 45.0 | 1.00x | 4.00 | ")
    assert lines[3].startswith("| ours | 30.0 | 1.50x | 4.00 | ")
    # lengths from the caller when the reports do not keep them
    for f in tmp_path.glob("*.json"):
        d = json.loads(f.read_text())
        for r in d["runs"]:
            del r["prompt_tokens"]
        f.write_text(json.dumps(d))
    assert phases(tmp_path, prompts).splitlines()[3].startswith("| ours | 30.0 | 1.50x | 4.00 | ")
