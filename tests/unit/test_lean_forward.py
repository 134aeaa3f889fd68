"""client/lean_forward.py: the verifier's Llama forward without the module machinery gives the model's own
logits bit for bit, and falls back to the model's forward wherever it might not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from specstore.bench.tiny_llama import tiny_llama
from specstore.client import batch_invariant, lean_forward
from specstore.client.types import DraftTree
from specstore.client.verifier import Verifier


def _random_tree(rng, n: int, vocab: int, root: int) -> DraftTree:
    parents = np.concatenate([[-1], [rng.integers(0, i) for i in range(1, n)]]).astype(np.int32)
    tokens = np.concatenate([[root], rng.integers(3, vocab, n - 1)]).astype(np.int32)
    return DraftTree(tokens, parents, np.ones(n, np.float32), np.zeros(n, np.uint8))


def _verify_both_ways(model, monkeypatch, steps: int = 12, seed: int = 0, features: bool = False):
    """Two verifiers on the same model and the same trees, one the lean way and one the model's own way; returns
    the lean one's use count and asserts every step's logits (and features) equal."""
    rng = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    prompt = rng.integers(3, vocab, 20)
    lean, own = Verifier(model, keep_features=features), Verifier(model, keep_features=features)
    lean.prefill(prompt)
    own.prefill(prompt)
    assert lean_forward.usable(model)          # the probe, before the count starts
    calls = []
    real = lean_forward.forward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lean_forward, "forward", counted)
    root = int(prompt[-1])
    for step in range(steps):
        tree = _random_tree(rng, int(rng.integers(1, 9)), vocab, root)
        monkeypatch.delenv("SPECSTORE_LEAN_FORWARD", raising=False)
        a = lean.verify(tree)
        fa = lean.features
        monkeypatch.setenv("SPECSTORE_LEAN_FORWARD", "0")
        b = own.verify(tree)
        assert torch.equal(a, b), f"step {step}: logits differ"
        if features:
            assert torch.equal(fa, own.features), f"step {step}: features differ"
        # accept a random root-to-node path, as a decoder would
        node = int(rng.integers(0, len(tree)))
        path = [0, *tree.path_to(node)] if node else [0]
        lean.commit(path)
        own.commit(path)
        root = int(tree.tokens[path[-1]])
    monkeypatch.delenv("SPECSTORE_LEAN_FORWARD", raising=False)
    return len(calls)


@pytest.mark.parametrize("attn,dtype,hidden", [("sdpa", None, 32), ("eager", None, 32),
                                               ("sdpa", torch.bfloat16, 128)])
def test_lean_forward_gives_the_models_own_logits(attn, dtype, hidden, monkeypatch):
    model = tiny_llama(attn=attn, dtype=dtype, hidden=hidden)
    used = _verify_both_ways(model, monkeypatch)
    assert used > 0, "the lean forward was never used"


def test_lean_forward_keeps_the_features_a_head_reads(monkeypatch):
    model = tiny_llama()
    assert _verify_both_ways(model, monkeypatch, steps=6, features=True) > 0


def test_a_model_of_other_classes_goes_its_own_way():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    model = tiny_llama()
    model.__class__ = MyLlama
    assert not lean_forward.usable(model)


def test_a_forward_hook_sends_the_verify_the_models_way():
    model = tiny_llama()
    assert lean_forward.usable(model)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not lean_forward.usable(model)
    handle.remove()
    assert lean_forward.usable(model)


def test_a_forward_that_differs_from_the_models_is_refused_by_the_probe(monkeypatch):
    real = lean_forward.forward

    def off_by_a_bit(*a, **k):
        logits, h = real(*a, **k)
        return logits + 1e-6, h

    monkeypatch.setattr(lean_forward, "forward", off_by_a_bit)
    model = tiny_llama()
    assert not lean_forward.usable(model)
    assert model._specstore_lean[1] is False


def test_switched_off_by_the_environment(monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("SPECSTORE_LEAN_FORWARD", "0")
    assert not lean_forward.usable(model)


def _bf16_model():
    model = tiny_llama(dtype=torch.bfloat16, hidden=128)
    Verifier(model)     # installs the batch-invariant forwards
    from specstore.client import batch_invariant

    if batch_invariant.installed(model) != "packed":
        pytest.skip("no packed bfloat16 GEMM on this machine: the fused GEMMs are for packed layers only")
    return model


def test_fused_gemms_give_the_models_own_logits(monkeypatch):
    """bfloat16 on CPU with packed linear layers: q/k/v and gate/up each in one GEMM, the rotary over q and k at
    once; every verify's logits equal the model's own forward's."""
    from specstore.client import batch_invariant

    model = _bf16_model()
    assert lean_forward.usable(model)
    assert lean_forward._fusion(model) != (None, None), "the check refused fusing on this machine"
    fused = []
    real = batch_invariant.fused_linear
    monkeypatch.setattr(batch_invariant, "fused_linear", lambda *a: fused.append(1) or real(*a))
    assert _verify_both_ways(model, monkeypatch, steps=10) > 0
    assert fused, "no verify used the fused GEMMs"


def _f32_native_model(bias: bool = False):
    from specstore.client import small_linear

    model = tiny_llama(hidden=128)
    if bias:
        model.config.attention_bias = model.config.mlp_bias = True
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj):
                lin.bias = torch.nn.Parameter(torch.randn(lin.out_features) * 0.5)
    Verifier(model)
    if small_linear.installed(model) != "native":
        pytest.skip("client/row_kernel.c does not build here (or its packed copies do not fit)")
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_float32_fused_gemms_on_the_c_kernel_give_the_models_own_logits(bias, monkeypatch):
    """float32 on client/row_kernel.c: q/k/v and gate/up each in one kernel call over the weights side by side;
    every verify's logits equal the model's own forward's (the parts' own kernel calls), biases included."""
    from specstore.client import small_linear

    model = _f32_native_model(bias)
    assert lean_forward.usable(model) and lean_forward._fusion(model) == (False, False)
    fused = []
    real = small_linear.fused_rows
    monkeypatch.setattr(small_linear, "fused_rows", lambda *a: fused.append(1) or real(*a))
    assert _verify_both_ways(model, monkeypatch, steps=8) > 0
    assert fused, "no verify used the fused kernel calls"


def test_float32_fused_gemms_only_for_the_row_counts_on_the_kernel(monkeypatch):
    """Where the cost profile gave a tree size to torch's linear, the parts compute with torch's bits: no fused
    call for that size, and the logits still equal the model's own (float32 without the batch-invariant forwards,
    whose rows are pinned to the kernel)."""
    from specstore.client import small_linear

    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")
    model = _f32_native_model()
    assert lean_forward.usable(model)
    small_linear.kernel_rows(model, [])              # torch's linear for every size
    monkeypatch.setattr(small_linear, "fused_rows", lambda *a: pytest.fail("a fused call off the kernel"))
    assert _verify_both_ways(model, monkeypatch, steps=4) > 0


def test_float32_fused_rows_match_catches_a_difference(monkeypatch):
    from specstore.client import native_rows, small_linear

    monkeypatch.setenv("SPECSTORE_BATCH_INVARIANT", "0")       # rows not pinned: the check must leave them as they were
    model = _f32_native_model()
    att = model.model.layers[0].self_attn
    parts = [att.q_proj, att.k_proj, att.v_proj]
    assert small_linear.fused_rows_match(parts)
    real = native_rows.matmul
    total = sum(p.out_features for p in parts)
    monkeypatch.setattr(native_rows, "matmul", lambda packed, x, n_out:
                        real(packed, x, n_out) * (1.01 if n_out == total and len(x) == 5 else 1))
    assert not small_linear.fused_rows_match(parts)
    down = model.model.layers[0].mlp.down_proj
    assert down.in_features != att.q_proj.in_features
    assert not small_linear.fused_rows_match([att.q_proj, down])        # another input width: not fused
    assert small_linear.kernel_rows(model) == set(range(1, small_linear.MAX_ROWS + 1))   # the check left them so


def test_fused_gemms_with_biases_give_the_models_own_logits(monkeypatch):
    """A Llama with biased projections (``attention_bias``, ``mlp_bias``): the fused GEMMs add the biases side by
    side, kept between verifies and made again when a bias changes."""
    from specstore.client import batch_invariant

    model = tiny_llama(hidden=128)
    model.config.attention_bias = model.config.mlp_bias = True
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                    layer.mlp.up_proj):
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features) * 0.5)
    model = model.to(torch.bfloat16)
    Verifier(model)
    if batch_invariant.installed(model) != "packed":
        pytest.skip("no packed bfloat16 GEMM on this machine: the fused GEMMs are for packed layers only")
    assert lean_forward.usable(model) and lean_forward._fusion(model) != (None, None)
    assert _verify_both_ways(model, monkeypatch, steps=6) > 0
    att = model.model.layers[0].self_attn
    held = att._specstore_qkv._bias[1]
    assert torch.equal(held, torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
    _verify_both_ways(model, monkeypatch, steps=2)
    assert att._specstore_qkv._bias[1] is held                  # kept, not concatenated at every call
    with torch.no_grad():
        att.k_proj.bias.add_(1.0)
    assert _verify_both_ways(model, monkeypatch, steps=4, seed=1) > 0     # the changed bias is used
    assert torch.equal(att._specstore_qkv._bias[1][att.q_proj.out_features:][:att.k_proj.out_features],
                       att.k_proj.bias)


def test_fused_gemms_switched_off_by_the_environment(monkeypatch):
    from specstore.client import batch_invariant

    model = _bf16_model()
    monkeypatch.setenv("SPECSTORE_FUSED_LINEAR", "0")
    assert lean_forward._fusion(model) == (None, None)
    monkeypatch.setattr(batch_invariant, "fused_linear", lambda *a: pytest.fail("a fused GEMM while switched off"))
    assert _verify_both_ways(model, monkeypatch, steps=3) > 0


def test_a_fused_gemm_that_differs_is_refused_and_the_lean_forward_goes_on_without(monkeypatch):
    from specstore.client import batch_invariant

    real = batch_invariant.fused_linear
    monkeypatch.setattr(batch_invariant, "fused_linear", lambda *a: real(*a) * 1.01)
    model = _bf16_model()
    assert lean_forward.usable(model)
    assert model._specstore_fusion == (None, None)


def test_fused_rows_match_checks_the_bits_for_every_row_count(monkeypatch):
    from specstore.client import batch_invariant

    model = _bf16_model()
    att = model.model.layers[0].self_attn
    parts = [att.q_proj, att.k_proj, att.v_proj]
    assert batch_invariant.fused_rows_match(parts, 16) in (False, True)
    real = batch_invariant._packed_linear

    def off_at_five_rows(packed, x, bias=None):
        out = real(packed, x, bias)
        return out * 1.01 if x.shape[0] == 5 and packed.shape[0] == sum(p.out_features for p in parts) else out

    monkeypatch.setattr(batch_invariant, "_packed_linear", off_at_five_rows)
    assert batch_invariant.fused_rows_match(parts, 4) in (False, True)     # below the row count that differs
    assert batch_invariant.fused_rows_match(parts, 16) is None


def test_fused_rows_match_refuses_what_it_cannot_fuse():
    from specstore.client import batch_invariant

    model = _bf16_model()
    att = model.model.layers[0].self_attn
    assert batch_invariant.fused_rows_match([att.q_proj, att.o_proj, model.model.layers[0].mlp.down_proj]) is None
    plain = torch.nn.Linear(128, 64, bias=False).to(torch.bfloat16)     # not an installed (packed) layer
    assert batch_invariant.fused_rows_match([att.q_proj, plain]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_four_calls_gives_transformers_bits(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 7, 9, 64, generator=g) * 3).to(dtype)         # [1, n, heads, d]
    k = (torch.randn(1, 7, 3, 64, generator=g) * 3).to(dtype)
    cos, sin = (torch.randn(1, 7, 64, generator=g).to(dtype) for _ in range(2))
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qk = lean_forward._rotary(torch.cat([q, k], 2), cos.unsqueeze(2), lean_forward._signed_sin(sin).unsqueeze(2))
    assert torch.equal(qk[:, :, :9].transpose(1, 2), want_q)
    assert torch.equal(qk[:, :, 9:].transpose(1, 2), want_k)


def test_the_cost_profile_names_the_fused_gemms(tmp_path, monkeypatch):
    """t(n) with fused GEMMs (or a float32 KV cache) is lower: its cached profile is another file than the unfused
    one's."""
    from specstore.client.budget import cached_cost_profile

    model = _bf16_model()
    cached_cost_profile(model, "tiny", cache_dir=tmp_path, sizes=(1, 2))
    monkeypatch.setenv("SPECSTORE_FUSED_LINEAR", "0")
    cached_cost_profile(model, "tiny", cache_dir=tmp_path, sizes=(1, 2))
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(names) == 2 and names[0].endswith("-lean-fused.json") != names[1].endswith("-lean-fused.json")
    assert any(n.endswith("-lean.json") for n in names)
    assert all("-f32kv-" in n for n in names)
    monkeypatch.setenv("SPECSTORE_FLOAT_CACHE", "0")           # a cache in the model's dtype: another curve
    cached_cost_profile(model, "tiny", cache_dir=tmp_path, sizes=(1, 2))
    assert len(list(tmp_path.glob("*.json"))) == 3 and len(list(tmp_path.glob("*-f32kv-*.json"))) == 2
    cattn = batch_invariant.attention_kernel(model) == "native"     # client/attention_kernel.c: another curve
    assert all(("-cattn-" in p.name) == cattn for p in tmp_path.glob("*.json"))
    monkeypatch.setenv("SPECSTORE_NATIVE_ATTENTION", "0")
    cached_cost_profile(model, "tiny", cache_dir=tmp_path, sizes=(1, 2))
    assert len(list(tmp_path.glob("*.json"))) == 3 + cattn
