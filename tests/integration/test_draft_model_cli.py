"""A distilled draft and a feature head end to end through the commands: draft-model distill makes them,
spec-generate and spec-bench decode with them (alone, fused with the other drafters, RASD, FR-Spec), output
identical to plain greedy."""
import json
import subprocess
import sys

import pytest

from tests.draft_fixtures import write_corpus, write_tiny_target, write_tokenizer


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("draftcli")
    target = write_tiny_target(d / "target", layers=4)
    corpus = write_corpus(d / "corpus")
    r = _run("specstore.client.draft_cli", "distill", "--model", str(target), "--text", str(corpus), "--out",
             str(d / "draft"), "--layers", "2", "--seq-len", "16", "--batch", "4", "--steps", "6", "--threads", "1",
             "--eval-windows", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("specstore.client.draft_cli", "distill", "--feature-head", "--model", str(target), "--text", str(corpus),
             "--out", str(d / "head"), "--seq-len", "16", "--batch", "4", "--steps", "6", "--threads", "1",
             "--eval-windows", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    return d, target, corpus


@pytest.mark.parametrize("extra", [["--drafters", "draft"],
                                   ["--drafters", "all", "--draft-vocab", "30", "--draft-vocab-from", "CORPUS"],
                                   ["--drafters", "all", "--no-rasd", "--draft-depth", "2", "--draft-width", "3"]])
@pytest.mark.parametrize("which", ["draft", "head"])
def test_spec_generate_with_the_draft_is_plain_greedy(made, extra, which):
    d, target, corpus = made
    extra = [str(corpus) if a == "CORPUS" else a for a in extra]
    r = _run("specstore.client.cli", "--model", str(target), "--draft-model", str(d / which), "--raw", "--prompt",
             "the red cat runs over the hill and the", "--max-new-tokens", "40", "--json", "--compare-plain",
             "--threads", "1", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["identical_to_plain"] is True and out["new_tokens"] > 0


def test_a_draft_of_another_tokenizer_is_refused(made, tmp_path):
    d, target, _ = made
    other = write_tiny_target(tmp_path / "other", layers=1, words=["x", "y", "z"] * 1 + ["w"])
    r = _run("specstore.client.cli", "--model", str(target), "--draft-model", str(other), "--raw", "--prompt", "the")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    write_tokenizer(tmp_path / "other")   # the right words again, still another vocabulary size: refused too
    r = _run("specstore.client.cli", "--model", str(target), "--draft-model", str(other), "--raw", "--prompt", "the")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_spec_bench_reports_the_draft_configurations(made, tmp_path):
    d, target, corpus = made
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n" for i, (c, t) in
                         enumerate([("qa", "the red cat runs"), ("qa", "the big dog sees the"),
                                    ("qa", "one small bird eats")])))
    r = _run("specstore.bench.cli", "--model", str(target), "--draft-model", str(d / "draft"), "--questions", str(q),
             "--categories", "qa", "--n-per-category", "2", "--max-new-tokens", "24", "--threads", "1", "--quiet",
             "--draft-vocab", "30", "--draft-vocab-from", str(corpus),
             "--configs", "draft", "draft:frspec", "context,recycling,draft", "context,recycling,draft:norasd",
             "--report", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "--json-out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    methods = set(res["methods"])
    assert {"assisted", "ours:draft", "ours:draft:frspec", "ours:context,recycling,draft:norasd"} <= methods
    counters = res["meta"]["drafter_counters"]["ours:context,recycling,draft"]["DraftModelDrafter"]
    assert counters["seconds"] > 0 and counters["verified"] >= counters["accepted"] >= 0


def test_spec_bench_with_a_feature_head_leaves_out_assisted_decoding(made, tmp_path):
    d, target, _ = made
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n" for i, t in
                         enumerate(["the red cat runs", "the big dog sees the"])))
    r = _run("specstore.bench.cli", "--model", str(target), "--draft-model", str(d / "head"), "--questions", str(q),
             "--categories", "qa", "--n-per-category", "2", "--max-new-tokens", "24", "--threads", "1", "--quiet",
             "--configs", "draft", "context,recycling,draft", "--no-pld",
             "--report", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "--json-out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "feature head" in r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert "assisted" not in res["methods"] and "ours:draft" in res["methods"]
    counters = res["meta"]["drafter_counters"]["ours:context,recycling,draft"]["FeatureHeadDrafter"]
    assert counters["seconds"] > 0 and counters["verified"] >= counters["accepted"] >= 0


@pytest.mark.parametrize("which", ["draft", "head"])
def test_draft_agreement_tool_measures_the_draft(made, tmp_path, which):
    d, target, _ = made
    cats = ["writing", "translation", "summarization", "qa", "math_reasoning", "rag"]
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": ["the red cat runs over the"]}) + "\n"
                         for i, c in enumerate(cats)))
    r = _run("specstore.bench.draft_agreement", str(d / which), "--model", str(target), "--questions", str(q),
             "--max-new-tokens", "12", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompts"] == 6 and out["positions"] > 0
    assert 0.0 <= out["teacher_forced_top1_agreement"] <= 1.0 and 0.0 <= out["first_node_acceptance"] <= 1.0
