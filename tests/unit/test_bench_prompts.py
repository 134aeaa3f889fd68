"""spec-bench prompt loading: categories, MT-bench grouping, deterministic selection, warm-up prompt."""
import json

import pytest

from specstore.bench.spec_bench import (CATEGORIES, DEFAULT_QUESTIONS, MT_BENCH_SUBCATEGORIES, category_of, load_questions,
                              parse_categories, select_prompts)


def write_questions(path, per_sub=3, per_cat=4):
    qid = 0
    lines = []
    for sub in MT_BENCH_SUBCATEGORIES:
        for i in range(per_sub):
            qid += 1
            lines.append({"question_id": qid, "category": sub, "turns": [f"{sub} q{i}", "second turn"]})
    for cat in CATEGORIES[1:]:
        for i in range(per_cat):
            qid += 1
            lines.append({"question_id": qid, "category": cat, "turns": [f"{cat} q{i}"]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def test_grouping_and_first_turn(tmp_path):
    qs = load_questions(write_questions(tmp_path / "q.jsonl"))
    assert {q.category for q in qs} == set(CATEGORIES)
    assert category_of("writing") == "mt_bench" and category_of("qa") == "qa"
    w = next(q for q in qs if q.subcategory == "writing")
    assert w.category == "mt_bench" and w.text == "writing q0"  # first turn only


def test_mt_bench_spread_over_subcategories(tmp_path):
    qs = load_questions(write_questions(tmp_path / "q.jsonl"))
    chosen, _ = select_prompts(qs, ["mt_bench"], 10)
    subs = [p.subcategory for p in chosen]
    assert subs[:8] == list(MT_BENCH_SUBCATEGORIES)  # one of each first
    assert subs[8:] == ["writing", "roleplay"]
    assert [p.text for p in chosen[8:]] == ["writing q1", "roleplay q1"]
    again, _ = select_prompts(qs, ["mt_bench"], 10)
    assert [p.question_id for p in again] == [p.question_id for p in chosen]  # deterministic
    chosen, _ = select_prompts(qs, ["mt_bench"], 5)
    assert [p.subcategory for p in chosen] == list(MT_BENCH_SUBCATEGORIES[:5])


def test_selection_order_counts_and_warmup(tmp_path):
    qs = load_questions(write_questions(tmp_path / "q.jsonl"))
    chosen, warm = select_prompts(qs, ["rag", "qa"], 2)
    assert [(p.category, p.text) for p in chosen] == [("rag", "rag q0"), ("rag", "rag q1"), ("qa", "qa q0"),
                                                     ("qa", "qa q1")]
    assert warm is not None and warm.category in ("rag", "qa")
    assert warm.question_id not in {p.question_id for p in chosen}
    # more than available: take all there is
    chosen, _ = select_prompts(qs, ["qa"], 50)
    assert len(chosen) == 4


def test_parse_categories():
    assert parse_categories(None) == list(CATEGORIES)
    assert parse_categories("all") == list(CATEGORIES)
    assert parse_categories("qa, rag,qa") == ["qa", "rag"]
    with pytest.raises(ValueError, match="unknown categories"):
        parse_categories("qa,poetry")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "qa"}\n')
    with pytest.raises(ValueError, match="turns"):
        load_questions(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_questions(bad)
    qs = load_questions(write_questions(tmp_path / "q.jsonl"))
    with pytest.raises(ValueError, match="n-per-category"):
        select_prompts(qs, ["qa"], 0)
    only_qa = [q for q in qs if q.category == "qa"]
    with pytest.raises(ValueError, match="no questions"):
        select_prompts(only_qa, ["rag"], 1)


@pytest.mark.skipif(not DEFAULT_QUESTIONS.exists(), reason="shared Spec-Bench file not present")
def test_real_spec_bench_file():
    qs = load_questions(DEFAULT_QUESTIONS)
    chosen, warm = select_prompts(qs, CATEGORIES, 5)
    assert len(chosen) == 30 and warm is not None
    assert [p.category for p in chosen] == [c for c in CATEGORIES for _ in range(5)]
    assert len({p.subcategory for p in chosen if p.category == "mt_bench"}) == 5
