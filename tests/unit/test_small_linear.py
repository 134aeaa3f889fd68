"""client/small_linear.py: the compiled kernel for 1..MAX_ROWS rows gives torch's linear's values (up to rounding),
leaves big inputs on torch's own path bit for bit, gives the same values whatever the thread count, leaves
training to autograd's paths, and is installed only on CPU float32 models."""
from __future__ import annotations

import json

import pytest
import torch

from specstore.client import lean_forward, small_linear
from specstore.client.budget import CostProfile, cached_cost_profile
from specstore.client.verifier import Verifier

from ..helpers import TEST_DEVICE, tiny_llama


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def _native_key(model) -> str:
    """The cost profile key's mark of the C kernel (where it builds here)."""
    return "-native" if small_linear.installed(model) == "native" else ""


def _plain_logits(model, ids):
    small_linear.uninstall(model)
    try:
        with torch.inference_mode():
            return model(ids).logits
    finally:
        small_linear.install(model)


@pytest.mark.parametrize("n", [1, 2, 5, 17, small_linear.MAX_ROWS, small_linear.MAX_ROWS + 1, 100])
def test_same_values_as_torch_linear(n):
    model = tiny_llama(vocab=96, layers=2).cpu()
    assert small_linear.install(model) and small_linear.installed(model)
    ids = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n))
    ref = _plain_logits(model, ids)
    with torch.inference_mode():
        got = model(ids).logits
    if n > small_linear.MAX_ROWS:
        assert torch.equal(got, ref)                   # torch's own path, bit for bit
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_kernel_values_do_not_depend_on_threads(rows, native, monkeypatch):
    import numba

    from specstore.client import native_rows

    if native and native_rows.load() is None:
        pytest.skip("client/row_kernel.c does not build here")
    monkeypatch.setattr(small_linear, "_native_fits", lambda linears: native)
    lin = torch.nn.Linear(200, 75, bias=False)     # 75 outputs: blocks of 4 (numba), 16 (C), and a ragged last one
    holder = torch.nn.Sequential(lin)
    assert small_linear.install(holder) and small_linear.installed(holder) == ("native" if native else "kernel")
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(rows))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(lin(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0], x @ lin.weight.detach().t(), rtol=1e-5, atol=1e-5)


def test_training_keeps_autograd_paths():
    lin = torch.nn.Linear(16, 4)
    assert small_linear.install(torch.nn.Sequential(lin))
    x = torch.randn(1, 16, requires_grad=True)
    lin(x).sum().backward()                        # the kernel would have cut the graph here
    assert lin.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(lin.weight.grad, x.detach().expand(4, 16))


def test_bias_and_batch_shapes():
    lin = torch.nn.Linear(8, 5, bias=True)
    x = torch.randn(2, 3, 8)
    ref = lin(x)
    holder = torch.nn.Sequential(lin)
    assert small_linear.install(holder)
    got = lin(x)
    assert got.shape == (2, 3, 5)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_only_cpu_float32_and_not_when_disabled(monkeypatch):
    assert not small_linear.install(tiny_llama().to(torch.bfloat16))
    monkeypatch.setenv("SPECSTORE_SMALL_LINEAR", "0")
    model = tiny_llama()
    assert not small_linear.install(model)
    assert all("forward" not in m.__dict__ for m in _linears(model))


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the few-rows path is for CPU models")
def test_verifier_installs_it_and_the_cost_profile_says_so(tmp_path):
    model = tiny_llama()
    Verifier(model)
    assert small_linear.installed(model)
    prof = cached_cost_profile(model, "tiny", cache_dir=tmp_path, measure=lambda sizes: CostProfile([1, 2], [1.0, 1.0]))
    (path,) = tmp_path.glob("*.json")
    assert f"-smalllinear{small_linear.MAX_ROWS}{_native_key(model)}-gqa" in path.name
    assert json.loads(path.read_text())["sizes"] == prof.sizes


def test_gqa_attention_takes_masked_steps_without_copying_the_cache(monkeypatch):
    """client/gqa_attention.py: a masked forward (a tree verify) gives the same logits, bit for bit, through
    torch's grouped attention; the verifier installs it on CPU models and the cost profile says so."""
    from specstore.client import gqa_attention

    model = tiny_llama(vocab=96, layers=2).cpu()
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    n = 7
    ids = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    mask = torch.zeros(1, 1, n, n).masked_fill_(causal, torch.finfo(torch.float32).min)
    with torch.inference_mode():
        ref = model(ids, attention_mask=mask).logits
    assert gqa_attention.install(model) and model.config._attn_implementation == gqa_attention.NAME
    grouped = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: grouped.append(k.get("enable_gqa", False)) or sdpa(*a, **k))
    with torch.inference_mode():
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, ref) and grouped == [True, True]     # one grouped call per layer
    monkeypatch.setenv("SPECSTORE_GQA_ATTENTION", "0")
    assert not gqa_attention.install(tiny_llama(vocab=96, layers=2).cpu())


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the few-rows path is for CPU models")
def test_cost_profile_keeps_the_faster_path_for_each_size(monkeypatch, tmp_path):
    """The verify cost profile times the kernel and torch's linear for each size the kernel covers and keeps the
    faster (here, by a fake clock: torch's faster for 1..3 rows, the kernel from 4); sizes between two timed
    ones follow the smaller; a cached profile applies its choice to a fresh model."""
    from specstore.client import budget

    model = tiny_llama(vocab=96, layers=2).cpu()
    clock = [0.0]
    real_verify = Verifier.verify

    def verify(self, tree):
        n = len(tree.tokens)
        on_kernel = n in small_linear.kernel_rows(self.model)
        slower = on_kernel if n <= 3 else (not on_kernel and n <= small_linear.MAX_ROWS)
        clock[0] += 1.0 + slower
        return real_verify(self, tree)

    monkeypatch.setattr(Verifier, "verify", verify)
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    prof = cached_cost_profile(model, "tiny", cache_dir=tmp_path, sizes=(1, 2, 6, 24))
    assert prof.meta["kernel_rows"] == list(range(6, small_linear.MAX_ROWS + 1))
    assert small_linear.kernel_rows(model) == set(range(6, small_linear.MAX_ROWS + 1))
    assert prof.seconds == [1.0] * 4                 # each size's time on its faster path
    (path,) = tmp_path.glob("*.json")                # no Verifier before: the key still names what was timed
    fused = "-fused" if lean_forward.fused(model) else ""          # float32 on the C kernel fuses q/k/v, gate/up
    assert path.name.endswith(f"-smalllinear{small_linear.MAX_ROWS}{_native_key(model)}-gqa-lean{fused}.json")

    fresh = tiny_llama(vocab=96, layers=2).cpu()
    Verifier(fresh)
    assert small_linear.kernel_rows(fresh) == set(range(1, small_linear.MAX_ROWS + 1))
    cached_cost_profile(fresh, "tiny", cache_dir=tmp_path, sizes=(1, 2, 6, 24))
    assert small_linear.kernel_rows(fresh) == set(range(6, small_linear.MAX_ROWS + 1))
    ids = torch.tensor([[5]])
    ref = _plain_logits(fresh, ids)
    small_linear.kernel_rows(fresh, range(6, small_linear.MAX_ROWS + 1))   # _plain_logits re-installed it
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, ref)   # one row: torch's own path, bit for bit


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the few-rows path is for CPU models")
def test_the_draft_model_takes_the_targets_choice_of_paths(tmp_path):
    from specstore.client.drafters.draft_model import open_draft_model
    from specstore.client.models import load_model
    from tests.draft_fixtures import write_tiny_target

    target, tok = load_model(str(write_tiny_target(tmp_path / "target", layers=2)), device="cpu", dtype="float32")
    assert small_linear.kernel_rows(target) == set(range(1, small_linear.MAX_ROWS + 1))
    small_linear.kernel_rows(target, range(4, 9))              # as a cost profile measured it
    draft = open_draft_model(str(write_tiny_target(tmp_path / "draft", layers=1, seed=1)), target, tok)
    assert small_linear.kernel_rows(draft) == set(range(4, 9))
    assert small_linear.kernel_rows(draft) is not small_linear.kernel_rows(target)


def test_cost_profile_times_the_sizes_in_turn(monkeypatch):
    """A machine that slows down while the profile is measured (a fake clock: every verify costs a little more
    than the one before, whatever its size) slows every size alike: the sizes are timed in turn, not one after
    another, so t(n) keeps its shape (here flat), which is what the budget's choice depends on."""
    from specstore.client import budget

    model = tiny_llama(vocab=96, layers=2).cpu()
    clock, calls = [0.0], [0]
    real_verify = Verifier.verify

    def verify(self, tree):
        calls[0] += 1
        clock[0] += 1.0 + 0.01 * calls[0]
        return real_verify(self, tree)

    monkeypatch.setattr(Verifier, "verify", verify)
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    prof = budget.measure_cost_profile(model, sizes=(1, 2, 6, 24, 48))
    assert max(prof.seconds) / min(prof.seconds) < 1.1, prof.seconds
