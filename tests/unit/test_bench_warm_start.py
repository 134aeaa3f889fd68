"""bench/warm_start.py's workload split: node A and node B get different prompts of every category."""
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
