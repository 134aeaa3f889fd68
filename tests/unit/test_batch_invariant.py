"""Batch-invariant half precision on CPU (client/batch_invariant.py, client/attention_kernel.py and .c): a tree row
gets plain decoding's bits, so bfloat16 speculative decoding is token-identical to plain greedy."""
import os
from contextlib import contextmanager
from unittest import mock

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from specstore.client import batch_invariant, native
from specstore.client.attention_kernel import attend, kernel, visible_lists
from specstore.client.budget import CostProfile
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.drafters import ContextDrafter, RecyclingDrafter
from specstore.client.kv_cache import cache_keyword
from specstore.client.tree_attention import ancestor_matrix
from specstore.client.types import DraftTree
from specstore.client.verifier import Verifier
from tests.helpers import RandomTreeDrafter, plain_greedy, tiny_llama

VOCAB = 96
# install refuses inner dimensions below batch_invariant.MIN_INNER (the default tiny Llama's 32 and 64)
BF16_HIDDEN = 128


def _tree_visible(parents: list[int], past: int) -> np.ndarray:
    n = len(parents)
    tree = DraftTree(np.zeros(n, np.int32), np.array(parents, np.int32), np.ones(n, np.float32), np.zeros(n, np.uint8))
    vis = np.ones((n, past + n), bool)
    vis[:, past:] = ancestor_matrix(tree)
    return vis


KERNELS = ["numba", pytest.param("native", marks=pytest.mark.skipif(
    native.load() is None, reason="client/attention_kernel.c does not build here"))]


@contextmanager
def _attention_kernel(name: str):
    """attend() on the numba kernel or on client/attention_kernel.c (where the head dimension allows it)."""
    with mock.patch.dict(os.environ, {"SPECSTORE_NATIVE_ATTENTION": "1" if name == "native" else "0"}):
        yield


@pytest.mark.parametrize("which", KERNELS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 20), past=st.integers(0, 300),
       dim=st.sampled_from([8, 16, 64, 128]), heads=st.sampled_from([(6, 2), (12, 2), (5, 5)]))
def test_a_tree_row_equals_the_same_query_alone(which, seed, n, past, dim, heads):
    """Each node's output has the bits of its query over its visible keys alone (plain decoding's cache),
    and matches torch's attention to float32 rounding: on either kernel, for head groups of 3, 6 (more than the C
    kernel's 4 heads per pass) and 1, and past the C kernel's blocks of 16 keys."""
    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads[0], n, dim, generator=g).bfloat16()
    k = torch.randn(heads[1], past + n, dim, generator=g).bfloat16()
    v = torch.randn(heads[1], past + n, dim, generator=g).bfloat16()
    vis = _tree_visible(parents, past)
    with _attention_kernel(which):
        assert kernel(dim) == ("numba" if dim % 16 else which)
        out = attend(q, k, v, *visible_lists(vis), dim ** -0.5)
        for i in range(n):
            keys = torch.as_tensor(np.flatnonzero(vis[i]))
            alone = attend(q[:, i:i + 1], k[:, keys], v[:, keys], *visible_lists(np.ones((1, len(keys)), bool)),
                           dim ** -0.5)
            assert torch.equal(alone[0], out[i])
    ref = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None],
                                         attn_mask=torch.as_tensor(vis)[None, None], enable_gqa=True)
    torch.testing.assert_close(out, ref[0].transpose(0, 1), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("which", KERNELS)
def test_attention_does_not_depend_on_the_thread_count(which):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, 12, 64, generator=g), torch.randn(3, 400, 64, generator=g),
               torch.randn(3, 400, 64, generator=g))
    lists = visible_lists(np.tril(np.ones((12, 400), bool), 388))
    before, torch_before = numba.get_num_threads(), torch.get_num_threads()
    try:
        with _attention_kernel(which):
            numba.set_num_threads(1)
            torch.set_num_threads(1)
            one = attend(q, k, v, *lists, 0.125)
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
            torch.set_num_threads(max(2, os.cpu_count() or 2))
            many = attend(q, k, v, *lists, 0.125)
    finally:
        numba.set_num_threads(before)
        torch.set_num_threads(torch_before)
    assert torch.equal(one, many)


@pytest.mark.skipif(native.load() is None, reason="client/attention_kernel.c does not build here")
def test_the_two_attention_kernels_agree_to_rounding_and_a_query_that_sees_nothing_gets_zeros():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 40, 64, generator=g)
    k, v = torch.randn(2, 90, 64, generator=g), torch.randn(2, 90, 64, generator=g)
    vis = np.random.default_rng(2).random((40, 90)) < 0.7
    vis[5] = False
    outs = []
    for which in ("numba", "native"):
        with _attention_kernel(which):
            outs.append(attend(q, k, v, *visible_lists(vis), 0.125))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=1e-5)
    assert not outs[1][5].any() and not torch.equal(outs[0], outs[1])   # two kernels, rounded each its own way


def test_the_gemm_check_has_teeth(monkeypatch):
    w = torch.randn(48, BF16_HIDDEN, generator=torch.Generator().manual_seed(0)).bfloat16()
    if not batch_invariant.linear_is_invariant(w):
        pytest.skip("this machine's bfloat16 GEMM is not row-invariant (install refuses; tested below)")
    real = F.linear
    monkeypatch.setattr(batch_invariant.F, "linear", lambda x, w, b=None: real(x, w, b) * (1 + 1e-2 * (len(x) > 3)))
    assert not batch_invariant.linear_is_invariant(w)


def test_narrow_weights_are_refused():
    """Inner dimensions of 32..64 gave rare row-dependent bits in both ways of GEMM (see _gemm_mode)."""
    m = tiny_llama(vocab=VOCAB, layers=1).to(torch.bfloat16)           # width 32
    assert not batch_invariant.install(m) and not batch_invariant.installed(m)
    with pytest.raises(batch_invariant.NotBatchInvariantError, match=r"inner dimensions \[32, 64\].*float32"):
        SpeculativeDecoder(m, None, [ContextDrafter()])


def test_no_packed_copies_where_memory_is_short(monkeypatch):
    m = tiny_llama(vocab=VOCAB, layers=1, hidden=BF16_HIDDEN).to(torch.bfloat16)
    monkeypatch.setattr(batch_invariant, "_available_memory", lambda: 4096)
    if not batch_invariant.install(m):
        pytest.skip("bfloat16 GEMMs on this machine are not row-invariant")
    assert batch_invariant.installed(m) == "chunked"
    assert batch_invariant.packing_fits([torch.zeros(512, dtype=torch.bfloat16)])         # 1 KB of 4 KB
    assert not batch_invariant.packing_fits([torch.zeros(2048, dtype=torch.bfloat16)])    # 4 KB of 4 KB


def test_the_packed_gemm_check_has_teeth(monkeypatch):
    w = torch.randn(48, BF16_HIDDEN, generator=torch.Generator().manual_seed(0)).bfloat16()
    if not batch_invariant.packed_is_invariant(w):
        pytest.skip("no row-invariant packed bfloat16 GEMM on this machine (install falls back to chunks)")
    real = batch_invariant._packed_linear
    monkeypatch.setattr(batch_invariant, "_packed_linear",
                        lambda p, x, b=None: real(p, x, b) * (1 + 1e-2 * (len(x) > 3)))
    assert not batch_invariant.packed_is_invariant(w)
    monkeypatch.setattr(batch_invariant, "_pack", lambda w: (_ for _ in ()).throw(RuntimeError("no oneDNN")))
    assert not batch_invariant.packed_is_invariant(w)       # a torch that cannot pack: False, not an error


def test_one_row_goes_as_two_where_the_blas_computes_it_otherwise(monkeypatch):
    """Where one row alone takes another path than several (oneDNN's matrix-vector product for SmolLM2's down
    projections on the AMD VM), a layer of that shape computes it as two rows, and its rows agree whatever the
    count; other shapes keep one-row calls."""
    m = tiny_llama(vocab=VOCAB, layers=1, hidden=BF16_HIDDEN).to(torch.bfloat16)
    down = m.model.layers[0].mlp.down_proj
    if not batch_invariant.packed_is_invariant(down.weight.detach()):
        pytest.skip("no row-invariant packed bfloat16 GEMM on this machine")
    real = batch_invariant._packed_linear

    def one_row_otherwise(p, x, b=None):
        y = real(p, x, b)
        return y * 1.01 if x.numel() == x.shape[-1] == down.in_features else y

    monkeypatch.setattr(batch_invariant, "_packed_linear", one_row_otherwise)
    assert not batch_invariant.packed_is_invariant(down.weight.detach())
    assert batch_invariant.packed_is_invariant(down.weight.detach(), pair=True)
    assert batch_invariant.install(m) and batch_invariant.installed(m) == "packed"
    assert down.in_features != m.config.hidden_size              # only the down projection's inputs are this wide
    assert down._specstore_pair and not m.model.layers[0].mlp.up_proj._specstore_pair
    h = torch.randn(1, 5, down.in_features).bfloat16()
    with torch.inference_mode():
        assert torch.equal(down(h[:, :1]), down(h)[:, :1])
        assert torch.equal(down(h[0, 2]), down(h)[0, 2])                   # a one-dimensional input too


def test_the_gemm_stress_benchmark_counts_rows_with_other_bits(monkeypatch):
    """bench/gemm_row_stress.py: 0 rows with other bits for the way install picks; a one-row call left unpaired
    where the shape needs pairing is counted."""
    from specstore.bench import gemm_row_stress

    res = gemm_row_stress.stress((96, BF16_HIDDEN), 64, [3, 16])
    if res["way"] != "packed":
        pytest.skip("no row-invariant packed bfloat16 GEMM on this machine")
    assert res["other_bits"] == {3: 0, 16: 0} and not res["paired"]
    real = batch_invariant._packed_linear
    monkeypatch.setattr(batch_invariant, "_packed_linear",
                        lambda p, x, b=None: real(p, x, b) * (1.01 if x.numel() == x.shape[-1] else 1.0))
    res = gemm_row_stress.stress((96, BF16_HIDDEN), 64, [3, 16])
    assert res["paired"] and res["other_bits"] == {3: 0, 16: 0}
    monkeypatch.setattr(batch_invariant, "_gemm_mode", lambda w, packed_ok=True: ("packed", "", set()))
    assert gemm_row_stress.stress((96, BF16_HIDDEN), 64, [3, 16])["other_bits"][3] > 0     # pairing forgotten


@pytest.fixture(scope="module", params=["packed", "chunked"])
def bf16_model(request):
    """A tiny bfloat16 Llama with each way of batch-invariant linear layers (client/batch_invariant.py)."""
    m = tiny_llama(vocab=VOCAB, layers=2, hidden=BF16_HIDDEN).to(torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "chunked":
            mp.setenv("SPECSTORE_PACKED_LINEAR", "0")
        if not batch_invariant.install(m):
            pytest.skip("bfloat16 GEMMs on this machine are not row-invariant: the decoder refuses (tested below)")
    if batch_invariant.installed(m) != request.param:
        pytest.skip(f"no row-invariant {request.param} bfloat16 GEMM on this machine")
    return m


def test_a_packed_layer_follows_its_weight_and_survives_a_copy():
    """The packed copy is made again when the weight changes, and a copied model (whose packed tensors cannot
    be copied) packs its own."""
    import copy

    m = tiny_llama(vocab=VOCAB, layers=1, hidden=BF16_HIDDEN).to(torch.bfloat16)
    if not batch_invariant.install(m) or batch_invariant.installed(m) != "packed":
        pytest.skip("no row-invariant packed bfloat16 GEMM on this machine")
    x = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        before = m(x).logits                                 # packs every layer
    twin = copy.deepcopy(m)
    with torch.inference_mode():
        assert torch.equal(twin(x).logits, before)
        lin = m.model.layers[0].mlp.down_proj
        h = torch.randn(4, lin.in_features).bfloat16()
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(lin(h), batch_invariant._packed_linear(batch_invariant._pack(lin.weight), h))
        assert not torch.equal(m(x).logits, before)
        assert torch.equal(twin(x).logits, before)           # the copy has weights of its own


def test_tree_logits_have_plain_decodings_bits(bf16_model):
    """Every node's logits equal, bit for bit, those of plain incremental decoding along its path (the prompt at
    once, then one token per forward): bench/half_precision_identity.py's measurement."""
    from specstore.bench.half_precision_identity import measure

    res = measure(bf16_model, trials=6, nodes=33, seed=3, prompt_len=(1, 40))
    assert res["nodes"] >= 12 and res["other_bits"] == 0 and res["max_abs_diff"] == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 100_000), budget=st.integers(1, 32), plen=st.integers(1, 30),
       p_true=st.floats(0.0, 1.0))
def test_bfloat16_speculation_is_token_identical_to_generate(bf16_model, seed, budget, plen, p_true):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, plen).tolist()
    ref = plain_greedy(bf16_model, prompt, 40, eos=None)
    dec = SpeculativeDecoder(bf16_model, None, [RandomTreeDrafter(ref, plen, VOCAB, seed, p_true=p_true),
                                                ContextDrafter(), RecyclingDrafter(VOCAB)],
                             profile=CostProfile.flat(budget + 1), max_budget=budget)
    assert dec.generate(prompt, 40, eos_token_id=[]).new_tokens == ref


NEEDS_C = pytest.mark.skipif(native.load() is None, reason="the C kernels do not build here")


@NEEDS_C
def test_float32_tree_logits_have_plain_decodings_bits_on_the_c_kernels(monkeypatch):
    """float32 on CPU ("rows"): every linear layer on client/row_kernel.c for 1..TREE_ROWS rows and the attention on
    client/attention_kernel.c give every node plain decoding's bits; torch's kernels do not (the reason)."""
    from specstore.bench.half_precision_identity import measure
    from specstore.client import small_linear

    m = tiny_llama(vocab=VOCAB, layers=2, hidden=BF16_HIDDEN)
    res = measure(m, trials=6, nodes=33, seed=3, prompt_len=(1, 40))
    assert batch_invariant.installed(m) == "rows" and small_linear.pinned(m)
    assert res["nodes"] >= 12 and res["other_bits"] == 0 and res["max_abs_diff"] == 0
    small_linear.kernel_rows(m, [1, 2])                 # what a cost profile does: refused, every count stays
    assert small_linear.kernel_rows(m) == set(range(1, batch_invariant.TREE_ROWS + 1))
    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")
    m = tiny_llama(vocab=VOCAB, layers=2, hidden=BF16_HIDDEN)
    res = measure(m, trials=6, nodes=33, seed=3, prompt_len=(1, 40))
    assert not batch_invariant.installed(m) and res["other_bits"] > 0


@NEEDS_C
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100_000), budget=st.integers(1, 40), plen=st.integers(1, 30),
       p_true=st.floats(0.0, 1.0))
def test_float32_speculation_on_the_c_kernels_is_token_identical_to_generate(seed, budget, plen, p_true):
    m = tiny_llama(vocab=VOCAB, layers=2, hidden=BF16_HIDDEN, seed=seed % 7)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, plen).tolist()
    assert batch_invariant.install(m) and batch_invariant.installed(m) == "rows"
    ref = plain_greedy(m, prompt, 40, eos=None)
    dec = SpeculativeDecoder(m, None, [RandomTreeDrafter(ref, plen, VOCAB, seed, p_true=p_true), ContextDrafter(),
                                       RecyclingDrafter(VOCAB)], profile=CostProfile.flat(budget + 1),
                             max_budget=budget)
    assert dec.generate(prompt, 40, eos_token_id=[]).new_tokens == ref


@NEEDS_C
def test_a_model_converted_after_install_is_installed_again_for_its_new_dtype():
    """float32 ("rows") then ``.to(bfloat16)``, the copy of an installed model included: install starts afresh
    (packed or chunked GEMMs, the lean forward checked again), and tree nodes keep plain decoding's bits."""
    import copy

    from specstore.bench.half_precision_identity import measure

    m = tiny_llama(vocab=VOCAB, layers=2, hidden=BF16_HIDDEN)
    assert measure(m, trials=2, nodes=9, seed=1, prompt_len=(1, 20))["other_bits"] == 0
    assert batch_invariant.installed(m) == "rows"
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert batch_invariant.installed(half) == ""            # installed for float32, not for what it is now
    if not batch_invariant.install(half):
        pytest.skip("bfloat16 GEMMs on this machine are not row-invariant")
    assert batch_invariant.installed(half) in ("packed", "chunked")
    res = measure(half, trials=3, nodes=17, seed=2, prompt_len=(1, 30))
    assert res["other_bits"] == 0 and res["nodes"] >= 6
    back = half.to(torch.float32)
    assert batch_invariant.install(back) and batch_invariant.installed(back) == "rows"
    assert measure(back, trials=2, nodes=9, seed=3, prompt_len=(1, 20))["other_bits"] == 0


@pytest.mark.parametrize("why", ["head dimension", "attention switched off", "no C kernels"])
def test_float32_keeps_torchs_kernels_where_the_c_kernels_do_not_apply(why, monkeypatch, caplog):
    import logging

    from specstore.client import native_rows

    hidden = 32 if why == "head dimension" else BF16_HIDDEN           # 4 heads of 8: not a multiple of 16
    if why == "attention switched off":
        monkeypatch.setenv("SPECSTORE_NATIVE_ATTENTION", "0")
    elif why == "no C kernels":
        monkeypatch.setattr(native_rows, "load", lambda: None)
    m = tiny_llama(vocab=VOCAB, layers=1, hidden=hidden)
    with caplog.at_level(logging.INFO):
        assert not batch_invariant.install(m)
    assert not batch_invariant.installed(m) and "float32 without batch-invariant forwards" in caplog.text
    SpeculativeDecoder(m, None, [ContextDrafter()])                      # float32 is never refused


def test_without_it_bfloat16_trees_part_from_plain_decoding(monkeypatch):
    """The reason for all this: torch's own attention gives a tree row other bits than plain decoding."""
    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")
    m = tiny_llama(vocab=VOCAB, layers=2).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    differ = 0
    for _ in range(8):
        prompt = rng.integers(3, VOCAB, 30).tolist()
        tokens = [prompt[-1]] + rng.integers(3, VOCAB, 15).tolist()
        tree = DraftTree(np.array(tokens, np.int32), np.arange(-1, 15, dtype=np.int32), np.ones(16, np.float32),
                         np.zeros(16, np.uint8))
        v = Verifier(m)
        assert not batch_invariant.installed(m)
        v.prefill(np.array(prompt))
        logits = v.verify(tree)
        with torch.inference_mode():
            full = m(torch.tensor([prompt + tokens[1:]])).logits[0, len(prompt) - 1:].float()
            cache = m(torch.tensor([prompt]), use_cache=True).past_key_values
            steps = [m(torch.tensor([[t]]), use_cache=True, **{cache_keyword(m): cache}).logits[0, -1].float()
                     for t in tokens[1:]]
        differ += int(not torch.equal(logits[1:], torch.stack(steps))) + int(not torch.equal(logits, full))
    assert differ > 0


def test_the_decoder_refuses_half_precision_that_is_not_invariant(monkeypatch):
    monkeypatch.setattr(batch_invariant, "rows_are_invariant", lambda *a, **k: False)
    m = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    with pytest.raises(batch_invariant.NotBatchInvariantError, match="float32"):
        SpeculativeDecoder(m, None, [ContextDrafter()])
    SpeculativeDecoder(m, None, [ContextDrafter()], speculate=False)        # plain decoding needs nothing
    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")                    # asked for: a warning only
    SpeculativeDecoder(tiny_llama(vocab=VOCAB).to(torch.bfloat16), None, [ContextDrafter()])
    SpeculativeDecoder(tiny_llama(vocab=VOCAB), None, [ContextDrafter()])   # float32 needs nothing


def test_dtype_auto_is_bfloat16_on_a_cpu_that_computes_it(monkeypatch, tmp_path):
    """--dtype auto on a CPU with AMX / AVX512-BF16: bfloat16 with the batch-invariant forwards; elsewhere, or
    with them switched off, float32."""
    from specstore.client import models
    from tests.draft_fixtures import write_tiny_target

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    assert models.pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    assert models.pick_dtype("auto", cpu) == models.pick_dtype(None, cpu) == torch.bfloat16
    assert models.pick_dtype("float32", cpu) == torch.float32
    model, _ = models.load_model(str(write_tiny_target(tmp_path / "t", layers=2, hidden=BF16_HIDDEN)), "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and batch_invariant.installed(model)
    SpeculativeDecoder(model, None, [ContextDrafter()])                     # which the decoder accepts
    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")
    assert models.pick_dtype("auto", cpu) == torch.float32


def test_dtype_auto_falls_back_to_float32_where_the_gemms_fail(monkeypatch, tmp_path, caplog):
    from specstore.client import models
    from tests.draft_fixtures import write_tiny_target

    folder = str(write_tiny_target(tmp_path / "t", layers=2, hidden=BF16_HIDDEN))
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(batch_invariant, "rows_are_invariant", lambda *a, **k: False)
    with caplog.at_level("WARNING", logger=models.__name__):
        model, _ = models.load_model(folder, "cpu", "auto")
    assert next(model.parameters()).dtype == torch.float32 and "loading float32" in caplog.text
    SpeculativeDecoder(model, None, [ContextDrafter()])
    model, _ = models.load_model(folder, "cpu", "bfloat16")                 # asked for: kept, and refused
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(batch_invariant.NotBatchInvariantError):
        SpeculativeDecoder(model, None, [ContextDrafter()])


def test_the_kernel_benchmark_runs_and_its_tree_mask_is_a_tree():
    from specstore.bench import invariant_kernels

    vis = invariant_kernels.tree_visible(6, 20)
    assert vis[:, :14].all() and all(vis[r, 14 + r] for r in range(6))
    assert not vis[0, 15:].any()                                  # the root sees none of its descendants
    rows = invariant_kernels.attention_rows(4, 2, 16, 40, [1, 6], reps=2)
    assert [r["queries"] for r in rows] == [1, 6]
    assert all(r["invariant"] > 0 and r["in_place"] > 0 and r["torch"] > 0 for r in rows)
    assert all((r.get("in_place_c", 0) > 0) == (native.load() is not None) for r in rows)
    if batch_invariant.packed_is_invariant(torch.randn(32, 64).bfloat16(), max_rows=2):
        rows = invariant_kernels.linear_rows([(32, 64)], [1, 3], reps=2)
        assert [(r["weight"], r["rows"]) for r in rows] == [("32x64", 1), ("32x64", 3)]


def test_the_identity_probe_sees_what_the_invariant_forwards_fix(monkeypatch):
    """bench/half_precision_identity.py (what a GPU session runs on CUDA): zero nodes with other bits with the
    batch-invariant forwards, some without them."""
    from specstore.bench import half_precision_identity as probe

    m = probe.tiny_model("cpu", torch.bfloat16)
    if not batch_invariant.install(m):
        pytest.skip("bfloat16 GEMMs on this machine are not row-invariant")
    assert probe.measure(m, trials=4, nodes=12)["other_bits"] == 0
    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")
    stock = probe.tiny_model("cpu", torch.bfloat16)
    res = probe.measure(stock, trials=6, nodes=12)
    assert res["other_bits"] > 0 and res["nodes"] >= 6


def test_half_precision_off_the_cpu_warns_once(caplog):
    """CUDA's kernels are not made batch-invariant here: the decoder says so (once per device type) instead of
    promising identity. A meta-device layer stands in for a GPU."""
    layer = torch.nn.Linear(4, 4, device="meta", dtype=torch.bfloat16)
    batch_invariant._warned_devices.discard("meta")
    with caplog.at_level("WARNING", logger="specstore.client.batch_invariant"):
        batch_invariant.check(layer)
        batch_invariant.check(layer)
    warnings = [r for r in caplog.records if "half_precision_identity" in r.getMessage()]
    assert len(warnings) == 1 and "meta" in warnings[0].getMessage()


def test_the_verifier_keeps_half_precision_keys_in_float32_and_reads_them_in_place(bf16_model, monkeypatch):
    """With the batch-invariant attention the verifier's cache holds the keys and values in float32 buffers (the
    same values), the kernel reads them where they lie, and every logit equals a cache in the model's dtype
    (``SPECSTORE_FLOAT_CACHE=0``), also across the buffer's growth."""
    from specstore.client import kv_cache
    from specstore.client.attention_kernel import _rows

    monkeypatch.setattr(kv_cache._buffered_layer_class(), "MIN_CAPACITY", 2)     # both kinds grow every few commits
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, VOCAB, 40).tolist()
    trees = [DraftTree(np.array([0] + rng.integers(3, VOCAB, 7).tolist(), np.int32),
                       np.array([-1, 0, 0, 1, 2, 2, 4, 0], np.int32), np.ones(8, np.float32), np.zeros(8, np.uint8))
             for _ in range(4)]
    out = {}
    for way in ("1", "0"):
        monkeypatch.setenv("SPECSTORE_FLOAT_CACHE", way)
        v = Verifier(bf16_model)
        v.prefill(np.array(prompt))
        root, out[way], buffers = prompt[-1], [], set()
        for t in trees:
            t.tokens[0] = root
            out[way].append(v.verify(t))
            v.commit([0, 1, 3])
            root = int(out[way][-1][3].argmax())
            buffers.add(v.cache.layers[0]._bk.data_ptr())
        assert len(buffers) > 1                                  # the buffer grew
        layer = v.cache.layers[0]
        assert layer.keys.dtype == (torch.float32 if way == "1" else torch.bfloat16)
        if way == "1":
            rows = _rows(layer.keys[0])
            assert rows.ctypes.data == layer._bk.data_ptr() and rows.shape[1] == layer._bk.shape[2]  # in place
            assert torch.equal(layer.keys, layer.keys.bfloat16().float())    # half-precision values
    assert all(torch.equal(a, b) for a, b in zip(out["1"], out["0"]))


@pytest.mark.parametrize("view", ["buffer", "contiguous", "offset", "transposed", "bfloat16", "one head"])
def test_the_kernels_rows_are_the_tensors_values(view):
    """attention_kernel._rows: float32 [KV, >= T, D] whose first T positions are the tensor's, read in place
    where the layout allows, copied otherwise."""
    from specstore.client.attention_kernel import _rows

    g = torch.Generator().manual_seed(0)
    buf = torch.randn(1, 3, 50, 8, generator=g)
    x = {"buffer": buf[0, :, :20], "contiguous": buf[0, :, :20].contiguous(), "offset": buf[0, 1:, :20],
         "transposed": buf[0, :, :20].transpose(0, 1),
         "bfloat16": buf[0, :, :20].bfloat16(), "one head": buf[0, :1, 5:25]}[view]
    rows = _rows(x)
    assert rows.dtype == np.float32 and rows.flags.c_contiguous and rows.shape[0] == x.shape[0]
    assert torch.equal(torch.from_numpy(rows[:, : x.shape[1]]), x.float())
    if view in ("buffer", "offset", "one head"):
        assert np.shares_memory(rows, buf.numpy())
