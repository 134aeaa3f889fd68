"""bench/warm_start.py's workload split: node A and node B get different prompts of every category."""
import json
from pathlib import Path

import pytest

from specstore.bench.spec_bench import CATEGORIES, MT_BENCH_SUBCATEGORIES, Prompt
from specstore.bench.warm_start import split_prompts


def _questions():
    out = []
    for cat in CATEGORIES:
        for i in range(10):
            sub = MT_BENCH_SUBCATEGORIES[i % len(MT_BENCH_SUBCATEGORIES)] if cat == "mt_bench" else cat
            out.append(Prompt(cat, sub, f"{cat}-{i}", f"{cat} question {i}"))
    return out


def test_a_and_b_are_disjoint_and_cover_every_category():
    a, b = split_prompts(_questions(), 2, n_a=5)
    assert len(a) == 5 * len(CATEGORIES) and len(b) == 2 * len(CATEGORIES)
    assert not {p.text for p in a} & {p.text for p in b}
    for cat in CATEGORIES:
        assert sum(p.category == cat for p in b) == 2 and sum(p.category == cat for p in a) == 5


def test_a_gpu_profile_report_sizes_trees_as_on_that_gpu(tmp_path):
    from specstore.client.budget import CostProfile

    load_verify_profile = CostProfile.load

    p = load_verify_profile(Path(__file__).parents[2] / "bench/results/gpu_profile_smollm2-135m.json")  # an H100
    assert p.sizes[0] == 1 and p.t(48) == pytest.approx(0.026513) and p.t(64) > p.t(48)
    own = tmp_path / "own.json"
    own.write_text(json.dumps(CostProfile([1, 8], [0.05, 0.08]).to_json()))
    assert load_verify_profile(own).t(8) == pytest.approx(0.08)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        load_verify_profile(bad)
