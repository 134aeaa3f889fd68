"""The draft-model drafter: OPT-Tree growth, its KV cache, FR-Spec, RASD pruning, and losslessness."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from specstore.client.budget import CostProfile
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.drafters import ContextDrafter, RecyclingDrafter
from specstore.client.drafters.draft_model import DraftModelDrafter
from specstore.client.kv_cache import new_cache
from specstore.client.opt_tree import OptTree
from specstore.client.rasd import prune_by_hint
from specstore.client.types import DraftTree, Source
from specstore.datastore.index import build_tree
from tests.helpers import assert_same_kv, plain_greedy, tiny_llama

VOCAB = 96


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab=VOCAB, seed=0, layers=2)


def truncated_draft(target, layers: int = 1, seed: int = 0, sharpen: float = 1.0):
    """A draft built like `draft-model distill` builds one: the target's first layers, embedding and head."""
    d = tiny_llama(vocab=target.config.vocab_size, seed=seed, layers=layers)
    own = d.state_dict()
    d.load_state_dict({k: v for k, v in target.state_dict().items() if k in own})
    if sharpen != 1.0:
        with torch.no_grad():
            d.lm_head.weight.mul_(sharpen)
    return d


# ------------------------------------------------------------------ OPT-Tree
def _brute_force_best(dist, vocab: int, n: int) -> float:
    """Max over parent-closed sets of n nodes of the sum of path probabilities, over the full tree of
    depth n (every path of length <= n is a node)."""
    nodes = []
    for d in range(1, n + 1):
        for path in itertools.product(range(vocab), repeat=d):
            pp = 1.0
            for j in range(d):
                pp *= dist(path[:j])[path[j]]
            nodes.append((path, pp))
    best = 0.0
    for combo in itertools.combinations(range(len(nodes)), n):
        chosen = {nodes[i][0] for i in combo}
        if all(p[:-1] in chosen or len(p) == 1 for p in chosen):
            best = max(best, sum(nodes[i][1] for i in combo))
    return best


@pytest.mark.parametrize("seed,vocab,n", [(s, 3, 3) for s in range(4)] + [(s, 2, 4) for s in range(4)])
def test_opt_tree_selection_equals_brute_force(seed, vocab, n):
    rng = np.random.default_rng(seed)
    table = {}

    def dist(prefix):
        if prefix not in table:
            table[prefix] = rng.dirichlet(np.full(vocab, 0.5))
        return table[prefix]

    tree = OptTree(0)
    while tree.depth < n:
        frontier = tree.layers[-1]
        paths = [tuple(tree.tokens[j] for j in _path(tree, i)) for i in frontier]
        probs = np.stack([dist(p) for p in paths])
        toks = np.tile(np.arange(vocab), (len(frontier), 1))
        if not len(tree.add_layer(toks, probs, width=n)):
            break
    chosen = tree.to_tree(n)
    ours = float(chosen.path_probs()[1:].sum())
    assert chosen.num_drafts == n
    assert ours == pytest.approx(_brute_force_best(dist, vocab, n), rel=1e-6)  # float32 probs


def _path(tree: OptTree, node: int) -> list[int]:
    out = []
    while node > 0:
        out.append(node)
        node = tree.parents[node]
    return out[::-1]


def test_opt_tree_layers_take_the_best_offers_over_the_whole_frontier():
    tree = OptTree(5)
    tree.add_layer(np.array([[7, 8, 9]]), np.array([[0.6, 0.3, 0.1]]), width=2)
    assert tree.tokens[1:] == [7, 8]
    # node 1 (pp .6) offers .6*.5=.3 and .6*.4=.24; node 2 (pp .3) offers .3*.9=.27: best two are .3 and .27
    new = tree.add_layer(np.array([[1, 2], [3, 4]]), np.array([[0.5, 0.4], [0.9, 0.1]]), width=2)
    assert [tree.tokens[i] for i in new] == [1, 3] and [tree.parents[i] for i in new] == [1, 2]
    assert tree.to_tree(3).tokens.tolist() == [5, 7, 8, 1]


# ------------------------------------------------------------------ losslessness
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), width=st.integers(1, 6), depth=st.integers(1, 5), budget=st.integers(0, 20),
       plen=st.integers(1, 16), max_new=st.integers(1, 30), sharpen=st.sampled_from([1.0, 6.0]))
def test_draft_model_is_lossless_greedy(target, seed, width, depth, budget, plen, max_new, sharpen):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, plen).tolist()
    ref = plain_greedy(target, prompt, max_new)
    dm = DraftModelDrafter(truncated_draft(target, sharpen=sharpen), width=width, max_depth=depth, min_layer_gain=0)
    dec = SpeculativeDecoder(target, None, [ContextDrafter(), dm, RecyclingDrafter(VOCAB)],
                             profile=CostProfile.flat(max(budget, 1) + 1), max_budget=budget)
    assert dec.generate(prompt, max_new, eos_token_id=[]).new_tokens == ref
    assert not dec.drafter_errors.counts


def test_draft_model_drafts_get_accepted_and_layers_grow(target):
    dm = DraftModelDrafter(truncated_draft(target, sharpen=4.0), width=4, max_depth=4, min_layer_gain=0)
    dec = SpeculativeDecoder(target, None, [dm], profile=CostProfile.flat(33), max_budget=16)
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, VOCAB, 12).tolist()
    res = dec.generate(prompt, 40, eos_token_id=[])
    assert res.new_tokens == plain_greedy(target, prompt, 40)
    assert dm.stats["forwards"] > dm.stats["drafted"]          # more than one forward per step: deeper layers
    assert dm.stats["reused_rows"] > 0                         # accepted drafts kept their KV rows
    assert res.accepted_per_step > 1.0


def test_draft_kv_after_commit_equals_recomputation(target):
    draft = truncated_draft(target, sharpen=4.0)
    dm = DraftModelDrafter(draft, width=3, max_depth=4, min_layer_gain=0)
    dec = SpeculativeDecoder(target, None, [ContextDrafter(), dm], profile=CostProfile.flat(17), max_budget=12)
    prompt = np.random.default_rng(5).integers(3, VOCAB, 9).tolist()
    checked = 0
    for _ in dec.stream(prompt, 30, eos_token_id=[]):
        fresh = new_cache()
        with torch.no_grad():
            draft.get_decoder()(input_ids=torch.tensor([dm.seen]), use_cache=True, cache=fresh)
        assert_same_kv(dm.cache, fresh)
        checked += 1
    assert checked > 3 and dm.stats["reused_rows"] > 0


def test_fr_spec_proposes_only_frequent_tokens_and_stays_lossless(target):
    allowed = np.arange(3, VOCAB, 2)
    dm = DraftModelDrafter(truncated_draft(target, sharpen=4.0), width=4, max_depth=3, vocab_ids=allowed,
                           min_layer_gain=0)
    seen = []
    orig = dm.propose

    def spy(ctx, budget):
        t = orig(ctx, budget)
        seen.extend(t.tokens[1:].tolist())
        return t

    dm.propose = spy
    dec = SpeculativeDecoder(target, None, [dm], profile=CostProfile.flat(17), max_budget=12)
    prompt = [5, 9, 11, 40, 41]
    assert dec.generate(prompt, 30, eos_token_id=[]).new_tokens == plain_greedy(target, prompt, 30)
    assert seen and set(seen) <= set(allowed.tolist())
    with pytest.raises(ValueError):
        DraftModelDrafter(truncated_draft(target), vocab_ids=[VOCAB + 5])


def test_draft_model_sampling_follows_the_plain_distribution():
    from tests.unit.test_sampling import assert_model_drafter_samples_exactly

    assert_model_drafter_samples_exactly(
        lambda target: DraftModelDrafter(truncated_draft(target), width=3, max_depth=2, min_layer_gain=0))


def test_costly_drafting_is_skipped(target):
    """With a draft that costs far more than it gains, the drafter stops drafting (but explores now and then)."""
    verify = CostProfile([1, 64], [0.001, 0.001])
    dm = DraftModelDrafter(truncated_draft(target), width=2, max_depth=2, verify_profile=verify,
                           draft_profile=CostProfile([1, 64], [10.0, 10.0]))
    dec = SpeculativeDecoder(target, None, [dm], profile=verify, max_budget=8)
    dm_secs = dm._learn

    def slow_learn(step):            # pretend every drafted step took a second
        dm._secs = 1.0
        dm_secs(step)

    dm._learn = slow_learn
    prompt = [5, 6, 7, 8]
    assert dec.generate(prompt, 60, eos_token_id=[]).new_tokens == plain_greedy(target, prompt, 60)
    assert dm.stats["skipped"] > dm.stats["drafted"]
    assert dm.stats["drafted"] >= 4


def test_marginal_gain_counts_the_path_from_the_first_node_only_ours():
    from specstore.client.drafters.draft_model import marginal_gain

    only = np.array([False, False, True, False, True, False])
    assert marginal_gain(np.array([0, 1, 2, 3]), only) == 2        # node 2 (2nd accepted) only ours: 2 and 3
    assert marginal_gain(np.array([0, 1, 3, 5]), only) == 0        # every accepted node proposed by another too
    assert marginal_gain(np.array([0, 4, 5]), only) == 2           # the first accepted node is ours alone
    assert marginal_gain(np.array([0]), only) == 0                 # nothing accepted


@pytest.mark.parametrize("others, gain, only, drafts", [
    (0.0, 0.5, 4, True),      # alone: half a token a step beats plain decoding at 2 ms a step
    (1.0, 0.0, 0, False),     # next to others that propose all it does: its 2 ms buy nothing
    (1.0, 0.3, 2, True),      # it adds 0.3 tokens a step to the others' 2: worth 2 ms and 2 nodes
    (1.0, 0.02, 2, False),    # it adds too little to pay its forward
])
def test_next_to_other_drafters_only_what_the_draft_adds_pays_for_it(target, others, gain, only, drafts):
    verify = CostProfile([1, 64], [0.05, 0.05])
    dm = DraftModelDrafter(truncated_draft(target), width=2, max_depth=2, verify_profile=verify,
                           draft_profile=CostProfile([1, 64], [0.002, 0.002]))
    dm._stat_w, dm._secs_avg, dm._nodes_avg = 10.0, 0.002, 6.0
    dm._others_avg, dm._gain_avg, dm._only_avg = others, gain, float(only)
    assert [dm._worth_drafting(16) for _ in range(15)] == [drafts] * 15     # (every 16th skipped step explores)


# ------------------------------------------------------------------ RASD
def test_prune_by_hint_follows_the_datastore_rule():
    # the service's rule on a trie of continuation rows (datastore/index.py build_tree) and ours on the same
    # first level must agree: first-level p -> sqrt(p * hint); a confident hint drops the tokens it lacks
    conts = np.array([[10, 11], [10, 12], [20, 21], [30, 31]], np.int64)
    hint = (np.array([10, 30]), np.array([0.85, 0.1]))
    served = build_tree(conts, np.zeros(4, bool), 16, 0.0, *hint)
    tok, par, prob = served[0], served[1], served[2]
    first = {int(t): float(p) for t, p, q in zip(tok, prob, par) if q < 0}
    local = DraftTree.from_paths(1, [[10, 11], [10, 12], [20, 21], [30, 31]], Source.CONTEXT,
                                 [[0.5, 0.5], [0.5, 0.5], [0.25, 1.0], [0.25, 1.0]])
    pruned = prune_by_hint(local, hint)
    mine = {int(pruned.tokens[i]): float(pruned.probs[i]) for i in range(1, len(pruned)) if pruned.parents[i] == 0}
    assert mine.keys() == first.keys() == {10, 30}                   # 20 vetoed, with its child
    for t in mine:
        assert mine[t] == pytest.approx(first[t], rel=1e-5)
    assert 21 not in pruned.tokens.tolist() and 31 in pruned.tokens.tolist()
    unsure = prune_by_hint(local, (np.array([10]), np.array([0.5])))   # not confident: nothing dropped
    assert unsure.num_drafts == local.num_drafts


def test_decoder_prunes_local_trees_by_the_draft_hint(target):
    """The draft model runs first, its root distribution reaches the other drafters' trees, output unchanged."""
    seen_hints = []

    class Spy(ContextDrafter):
        def propose(self, ctx, budget):
            seen_hints.append(ctx.draft_hint is not None)
            return super().propose(ctx, budget)

    dm = DraftModelDrafter(truncated_draft(target, sharpen=4.0), width=3, max_depth=2)
    dec = SpeculativeDecoder(target, None, [Spy(), dm], profile=CostProfile.flat(17), max_budget=12)
    assert dec.drafters[0] is dm
    prompt = [5, 6, 7, 8, 5, 6, 7, 8]
    assert dec.generate(prompt, 24, eos_token_id=[]).new_tokens == plain_greedy(target, prompt, 24)
    assert seen_hints and all(seen_hints)


def test_draft_profile_times_the_drafters_own_forward(target):
    full = DraftModelDrafter(truncated_draft(target), width=2)
    cut = DraftModelDrafter(truncated_draft(target), width=2, vocab_ids=np.arange(3, 40))
    for d in (full, cut):
        prof = d.measure_profile(sizes=(1, 4, 8), past_len=32, reps=2)
        assert prof.sizes == [1, 4, 8] and all(s > 0 for s in prof.seconds)
        assert prof.seconds == sorted(prof.seconds)
        assert d.cache is None and d.seen == []          # the measurement leaves no request state behind
    assert cut.measure_profile(sizes=(1,), past_len=8, reps=1).meta["vocab"] == 37
