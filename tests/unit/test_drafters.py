import json

import numpy as np
import pytest

from specstore.client.budget import BudgetController, CostProfile
from specstore.client.drafters import ContextDrafter, RecyclingDrafter
from specstore.client.drafters.recycling import load_template
from specstore.client.types import DecodeContext, DraftTree, Source, StepResult


def ctx(tokens, req=1):
    return DecodeContext(np.asarray(tokens, np.int64), prompt_len=len(tokens), request_id=req)


def paths_of(tree):
    return {tuple(int(tree.tokens[j]) for j in tree.path_to(i)) for i in range(1, len(tree))}


def test_context_drafter_counts_continuations_into_a_tree():
    d = ContextDrafter(max_ngram=3, depth=3)
    seq = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 6, 9, 1, 2, 3]
    t = d.propose(ctx(seq), budget=10)
    assert t.root == 3
    # suffix [1, 2, 3] occurred twice, followed by 4 5 9 and 4 6 9
    assert paths_of(t) == {(4,), (4, 5), (4, 5, 9), (4, 6), (4, 6, 9)}
    four = [i for i in range(1, len(t)) if t.tokens[i] == 4][0]
    five = [i for i in range(1, len(t)) if t.tokens[i] == 5][0]
    assert t.probs[four] > t.probs[five]  # 2 of 2 matches vs 1 of 2
    assert set(t.sources[1:]) == {int(Source.CONTEXT)}
    assert d.propose(ctx(seq), budget=2).num_drafts == 2
    assert d.propose(ctx([7, 8, 42]), budget=10).num_drafts == 0  # new request, no match


def test_context_drafter_is_incremental_and_matches_fresh_index():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 6, 200).tolist()
    inc = ContextDrafter()
    for L in range(2, 200, 7):
        a = inc.propose(ctx(seq[:L]), 16)
        b = ContextDrafter().propose(ctx(seq[:L]), 16)
        assert paths_of(a) == paths_of(b)


def test_recycling_table_update_propose_save_load(tmp_path):
    d = RecyclingDrafter(vocab_size=50, k=8)
    assert d.propose(ctx([3]), 10).num_drafts == 0
    tree = DraftTree.from_paths(3, [[7]], Source.CONTEXT)
    topk = np.array([[7, 8, 9, 10, 11, 12, 13, 14], [3, 4, 5, 6, 7, 8, 9, 10]])
    probs = np.linspace(0.5, 0.1, 16).reshape(2, 8).astype(np.float32)
    d.observe(StepResult(tree, np.array([0, 1]), np.array([7, 3]), topk, probs))
    assert d.table[3].tolist() == topk[0].tolist() and d.table[7].tolist() == topk[1].tolist()
    t = d.propose(ctx([3]), 20)
    assert t.num_drafts == 20
    assert 7 in t.tokens[t.parents == 0]
    # 7 -> 3 in the table, so the path 3 -> 7 -> 3 is drafted
    assert (7, 3) in paths_of(t)
    f = tmp_path / "table.npz"
    d.save(f)
    e = RecyclingDrafter(vocab_size=50, k=8)
    e.load(f)
    assert paths_of(e.propose(ctx([3]), 20)) == paths_of(t)
    with pytest.raises(ValueError):
        RecyclingDrafter(vocab_size=49).load(f)


def test_template_formats(tmp_path):
    tr = load_template()
    assert len(tr) == 61 and len(tr[0]) == 7  # the shipped Token Recycling template
    p = tmp_path / "paths.json"
    p.write_text(json.dumps([[0], [1], [0, 0], [0, 1], [1, 0]]))
    assert load_template(p) == [[1, 2], [3, 4], [5], [], [], []]


def test_controller_learns_and_prefers_accepted_sources():
    prof = CostProfile([1, 2, 64], [1.0, 1.3, 10.0])
    c = BudgetController(prof, max_budget=8, thompson=False)
    good = DraftTree.from_paths(0, [[1, 2, 3]], Source.CONTEXT, [[0.9, 0.9, 0.9]])
    bad = DraftTree.from_paths(0, [[4, 5, 6]], Source.RECYCLED, [[0.9, 0.9, 0.9]])
    for _ in range(60):
        c.observe(good, [0, 1, 2, 3])
        c.observe(bad, [0])
    q_good = c.calibrate(good)
    q_bad = c.calibrate(bad)
    assert q_good[1] > 0.9 and q_bad[1] < 0.1
    from specstore.client.fusion import fuse

    chosen, expected = c.choose(fuse([good, bad], 8))
    assert paths_of(chosen) == {(1,), (1, 2), (1, 2, 3)}
    assert expected > 2.5


def test_flat_profile_prefers_full_tree_and_steep_profile_plain():
    t = DraftTree.from_paths(0, [[1, 2], [3]], Source.CONTEXT, [[0.95, 0.95], [0.95]])
    c = BudgetController(CostProfile.flat(64), max_budget=8, thompson=False)
    for _ in range(30):
        c.observe(t, [0, 1, 2])
    assert c.choose(t)[0].num_drafts >= 2
    steep = BudgetController(CostProfile([1, 2, 64], [1.0, 10.0, 20.0]), max_budget=8, thompson=False)
    assert steep.choose(t)[0].num_drafts == 0


def test_an_embedded_index_is_warmed_when_it_is_opened():
    """DatastoreDrafter.embedded runs one lookup of the index's own tokens at once (its compiled kernels are
    built then, not in the first decode step); a failing warm-up costs nothing."""
    from types import SimpleNamespace

    from specstore.client.datastore_drafter import DatastoreDrafter

    calls = []

    class Index:
        tokenizer_fingerprint = "fp"
        shards = [SimpleNamespace(tokens=np.arange(100, dtype=np.int32))]

        def retrieve(self, ctx, budget, **kw):
            calls.append((ctx.tolist(), budget, sorted(kw)))
            raise RuntimeError("no real index here")

    DatastoreDrafter.embedded("unused", index=Index(), documents=False)
    assert calls == [(list(range(1, 17)), 8, ["memory"])]
