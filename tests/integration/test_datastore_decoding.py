"""Decoding with the datastore (in process and over gRPC) stays token-identical to plain greedy decoding."""
from __future__ import annotations

import pytest
import torch

from specstore.client.budget import CostProfile
from specstore.client.datastore_drafter import make_datastore_drafter
from specstore.client.decoder import SpeculativeDecoder
from specstore.client.drafters import ContextDrafter
from tests.integration.datastore_support import ServerThread

CORPUS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris. Paris is known for the Eiffel Tower, the Louvre museum and its cafes.",
    "To make a cup of tea, boil water, put a tea bag in a cup, pour the hot water and wait three minutes.",
    "Rust's ownership rules: each value in Rust has an owner. There can only be one owner at a time. "
    "When the owner goes out of scope, the value will be dropped.",
]
PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "What are Rust's ownership rules?"]


@pytest.fixture(scope="module")
def index(tmp_path_factory, smol):
    from specstore.indexers.build import BuildOptions, build_index

    d = tmp_path_factory.mktemp("dsdec")
    (d / "corpus").mkdir()
    for i, t in enumerate(CORPUS):
        (d / "corpus" / f"doc{i}.txt").write_text(t)
    build_index([str(d / "corpus")], d / "index", BuildOptions(progress=False), tokenizer=smol[1], log=lambda *_: None)
    return d / "index"


def check_identical(model, tok, drafter, new_tokens=40):
    dec = SpeculativeDecoder(model, tok, [drafter, ContextDrafter()], profile=CostProfile.flat(17), max_budget=16)
    drafted = 0
    for p in PROMPTS:
        ids = dec.encode_prompt(p)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=sorted(dec.eos_token_ids))[0, len(ids):].tolist()
        res = dec.generate(ids, max_new_tokens=new_tokens, prompt_text=p)
        assert res.new_tokens == ref, p
        drafted += sum(res.drafted_per_step)
    assert drafted > 0


def test_embedded_index_decoding_is_lossless(smol, index):
    model, tok = smol
    drafter = make_datastore_drafter(index_path=str(index), tokenizer=tok)
    check_identical(model, tok, drafter)


def test_remote_datastore_decoding_is_lossless(smol, index):
    model, tok = smol
    with ServerThread(index) as srv:
        drafter = make_datastore_drafter(address=srv.address, tokenizer=tok, timeout_s=0.5)
        check_identical(model, tok, drafter)
        stats = drafter.client.stats if hasattr(drafter, "client") else drafter.stats
        assert stats["hits"] > 0  # the server really answered with trees
        assert stats["streams_opened"] >= 1 and stats["failures"] == 0   # lookups went over RetrieveStream
