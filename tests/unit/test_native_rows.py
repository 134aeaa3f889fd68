"""client/native.py, client/native_rows.py and client/row_kernel.c: the C few-rows linear layer gives x @ w^T up to
rounding for every shape (ragged panels, odd input sizes, 1..MAX_ROWS rows), gives a row the same bits alone as
within any batch and whatever the thread count, packs again when a weight changes, survives a deepcopy, is cached on
disk, and gives way to the numba kernel where it cannot be built, is switched off, or its packed copies do not fit
in memory."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from specstore.client import native, native_rows, small_linear

from ..helpers import tiny_llama

pytestmark = pytest.mark.skipif(native_rows.load() is None, reason="client/row_kernel.c does not build here")


@pytest.mark.parametrize("n_out,n_in", [(75, 200), (16, 8), (3, 5), (200, 7), (33, 96)])
def test_values_and_row_invariance(n_out, n_in):
    g = torch.Generator().manual_seed(n_out * n_in)
    w = torch.randn(n_out, n_in, generator=g)
    packed = native_rows.pack(w)
    x = torch.randn(small_linear.MAX_ROWS, n_in, generator=g)
    alone = torch.cat([native_rows.matmul(packed, x[i:i + 1], n_out) for i in range(len(x))])
    torch.testing.assert_close(alone, (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-5)
    for n in range(2, small_linear.MAX_ROWS + 1):
        for start in (0, small_linear.MAX_ROWS - n):
            got = native_rows.matmul(packed, x[start:start + n].contiguous(), n_out)
            assert torch.equal(got, alone[start:start + n]), (n, start)     # the same bits, wherever the row falls


def test_threads_do_not_change_the_bits():
    w, x = torch.randn(1000, 64), torch.randn(9, 64)
    packed = native_rows.pack(w)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native_rows.matmul(packed, x, 1000))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_a_changed_weight_is_packed_again_and_a_copy_packs_its_own(monkeypatch):
    monkeypatch.setattr(small_linear, "_native_fits", lambda linears: True)
    model = tiny_llama(vocab=96, layers=2).cpu()
    assert small_linear.install(model) and small_linear.installed(model) == "native"
    ids = torch.tensor([[5, 7, 9]])
    with torch.inference_mode():
        before = model(ids).logits
    lin = model.lm_head
    with torch.no_grad():
        lin.weight.mul_(2.0)                     # in place: torch counts it, the packed copy is made again
    with torch.inference_mode():
        after = model(ids).logits
    assert not torch.allclose(after, before)
    small_linear.uninstall(model)
    with torch.inference_mode():
        ref = model(ids).logits
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)
    small_linear.install(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, after) and not twin(ids).logits.any()


def test_built_once_and_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSTORE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    assert native_rows.load() is not None
    (built,) = (tmp_path / "kernels").glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_lib", None)
    assert native_rows.load() is not None and built.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("why", ["switched off", "no compiler", "build fails", "does not fit"])
def test_the_numba_kernel_takes_over(why, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SPECSTORE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    if why == "switched off":
        monkeypatch.setenv("SPECSTORE_NATIVE_ROWS", "0")
    elif why == "no compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    elif why == "build fails":
        monkeypatch.setattr(native, "FLAGS", native.FLAGS + ["-include", "/nonexistent.h"])
    else:
        from specstore.client import batch_invariant

        monkeypatch.setattr(batch_invariant, "_available_memory", lambda: 1000)
    model = tiny_llama(vocab=96, layers=2).cpu()
    with caplog.at_level(logging.INFO):
        assert small_linear.install(model)
    assert small_linear.installed(model) == "kernel"
    if why == "build fails":
        assert "could not build the C kernels" in caplog.text and not list((tmp_path / "kernels").glob("*.so"))
    ids = torch.tensor([[5, 7, 9]])
    with torch.inference_mode():
        got = model(ids).logits
    small_linear.uninstall(model)
    with torch.inference_mode():
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)
