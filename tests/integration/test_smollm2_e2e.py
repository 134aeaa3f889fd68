"""End to end with the real SmolLM2-135M-Instruct: output identical to transformers' greedy generate."""
import json
import subprocess
import sys

import torch

from specstore.client.budget import CostProfile
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.drafters import ContextDrafter, RecyclingDrafter

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize in two sentences: The quick brown fox jumps over the lazy dog. The dog did not move. "
    "The fox jumped again and again over the lazy dog, and the dog kept sleeping.",
    "Translate to French: I like to read books in the garden when the weather is nice.",
]


def _assert_identical_to_generate(model, tok, max_budget: int) -> None:
    # a flat profile makes the controller verify real trees at every step it has drafts
    dec = SpeculativeDecoder(model, tok, [ContextDrafter(), RecyclingDrafter(model.config.vocab_size)],
                             profile=CostProfile.flat(max_budget + 1), max_budget=max_budget)
    steps = new = 0
    for p in PROMPTS:
        ids = dec.encode_prompt(p)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                             eos_token_id=sorted(dec.eos_token_ids))[0, len(ids):].tolist()
        res = dec.generate(ids, max_new_tokens=48)
        assert res.new_tokens == ref, (p, res.text)
        steps += res.steps
        new += len(res.new_tokens)
    assert new / steps > 1.3  # drafts were accepted, not just plain steps


def test_greedy_identical_to_transformers_generate(smol):
    _assert_identical_to_generate(*smol, max_budget=16)


def test_cli_json_and_compare_plain(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "List three colors of the rainbow."}) + "\n")
    r = subprocess.run([sys.executable, "-m", "specstore.client.cli", "--prompts-file", str(f), "--json",
                        "--max-new-tokens", "24", "--compare-plain", "--threads", "2",
                        "--recycling-table", str(tmp_path / "table.npz")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"text", "new_tokens", "steps", "accepted_per_step", "decode_seconds", "tokens_per_second"} <= set(out)
    assert out["identical_to_plain"] is True
    assert 0 < out["new_tokens"] <= 24
    assert (tmp_path / "table.npz").exists()  # the recycling table persists across runs


def test_cli_rejects_prompt_longer_than_context():
    r = subprocess.run([sys.executable, "-m", "specstore.client.cli", "--raw", "--prompt", "word " * 9000],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "context" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "specstore.client.cli", "--raw", "--prompt", ""],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_draft_model_trees_on_the_real_model_are_plain_greedy(smol):
    """SmolLM2 with a draft cut from its own first layers (untrained: its guesses are poor, which tests the
    rejected paths as much as the accepted ones), fused with context and recycling, RASD and FR-Spec on."""
    import numpy as np

    from specstore.client.draft_build import build_draft
    from specstore.client.drafters.draft_model import DraftModelDrafter

    model, tok = smol
    draft = build_draft(model, [0, 1]).eval()
    dm = DraftModelDrafter(draft, width=4, max_depth=3, vocab_ids=np.arange(0, 8192), min_layer_gain=0)
    dec = SpeculativeDecoder(model, tok, [ContextDrafter(), RecyclingDrafter(model.config.vocab_size), dm],
                             profile=CostProfile.flat(17), max_budget=16)
    for p in PROMPTS[:2]:
        ids = dec.encode_prompt(p)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                             eos_token_id=sorted(dec.eos_token_ids))[0, len(ids):].tolist()
        assert dec.generate(ids, max_new_tokens=40).new_tokens == ref, p
    assert dm.stats["drafted"] > 0 and dm.stats["forwards"] > dm.stats["drafted"]
    assert dec.drafter_stats["DraftModelDrafter"]["verified"] > 0


def test_bfloat16_greedy_identical_to_transformers_generate(smol):
    """In bfloat16 a tree verify is only token-identical with batch-invariant forwards (client/batch_invariant.py):
    plain generate and our decoder then give every token the same bits."""
    import copy

    from specstore.client import batch_invariant

    model = copy.deepcopy(smol[0]).to(torch.bfloat16)
    tok = smol[1]
    if not batch_invariant.install(model):
        import pytest

        pytest.skip("this machine's bfloat16 GEMMs are not row-invariant (the decoder refuses bfloat16 here)")
    _assert_identical_to_generate(model, tok, max_budget=32)
