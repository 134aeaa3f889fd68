"""An index served by shard groups in different servers (``datastore-serve --shard-group I/N``) and a client
that fans each lookup out and fuses the trees (client/sharded_backend.py): real gRPC servers on 127.0.0.1."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from specstore.client.datastore_client import DatastoreClient
from specstore.client.datastore_drafter import make_datastore_drafter
from specstore.client.sharded_backend import ShardedBackend
from specstore.datastore.index import DatastoreIndex
from specstore.datastore.server import default_opener
from specstore.datastore.servicer import ServiceConfig
from tests.integration.datastore_support import ServerThread, stop_at_step

TOPICS = ["The borrow checker rejects two mutable references to one value at the same time.",
          "A closure captures variables from its environment by reference, by mutable reference or by value.",
          "Traits define shared behaviour; a generic function can require a type to implement a trait.",
          "An iterator adapter such as map or filter is lazy: nothing happens until the iterator is consumed.",
          "Pattern matching with match must be exhaustive: every possible value has to be handled.",
          "A module tree starts at the crate root; use brings paths into scope and pub makes items public."]


@pytest.fixture(scope="module")
def sharded_index(tmp_path_factory):
    from specstore.datastore.model_files import load_tokenizer
    from specstore.indexers.build import BuildOptions, build_index

    tok = load_tokenizer()
    d = tmp_path_factory.mktemp("sharded")
    (d / "corpus").mkdir()
    for i, t in enumerate(TOPICS):
        (d / "corpus" / f"t{i}.txt").write_text((t + " ") * 4)
    build_index([str(d / "corpus")], d / "index", BuildOptions(progress=False, embeddings=False, shard_tokens=64),
                tokenizer=tok, log=lambda *_: None)
    return d / "index", tok


def test_shard_groups_split_the_shards(sharded_index):
    path, _ = sharded_index
    full = DatastoreIndex.open(path, load_faiss=False)
    parts = [DatastoreIndex.open(path, load_faiss=False, shard_group=(i, 3)) for i in range(3)]
    names = [sorted(s.name for s in p.shards) for p in parts]
    assert len(full.shards) >= 3 and all(names)
    assert sorted(sum(names, [])) == sorted(s.name for s in full.shards)
    from specstore.datastore.index_format import IndexFormatError

    with pytest.raises(IndexFormatError, match="holds none"):
        DatastoreIndex.open(path, load_faiss=False, shard_group=(len(full.shards), len(full.shards) + 1))


def test_fan_out_finds_what_the_whole_index_finds_and_survives_a_dead_group(sharded_index):
    path, tok = sharded_index
    groups = [ServerThread(path, ServiceConfig(), opener=default_opener(load_faiss=False, shard_group=(i, 2)))
              for i in range(2)]
    whole = ServerThread(path, ServiceConfig(), opener=default_opener(load_faiss=False))
    try:
        drafter = make_datastore_drafter(address=";".join(g.address for g in groups), tokenizer=tok, timeout_s=1.0)
        assert isinstance(drafter.backend, ShardedBackend)
        one = DatastoreClient(whole.address, timeout_s=1.0)
        rng = np.random.default_rng(0)
        hits_fan = hits_whole = 0
        for t in TOPICS:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            for _ in range(3):
                k = int(rng.integers(3, len(ids) - 1))
                ctx, nxt = ids[:k], ids[k]
                fan = drafter.backend.retrieve(ctx, 16)
                hits_fan += int(nxt in fan.tokens[1:].tolist())
                hits_whole += int(nxt in one.retrieve(ctx, 16).tokens[1:].tolist())
        assert hits_fan >= hits_whole > 10
        groups[1].stop()                                  # one shard group dies
        ids = tok(TOPICS[0], add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        for _ in range(5):
            drafter.backend.retrieve(ids[:6], 16)
        assert (time.perf_counter() - t0) / 5 < 1.0 + 0.5   # at most the deadline, never stuck
        sid = drafter.backend.open_session(ids[:6], None, memory=True, documents=False)
        assert sid is not None and sid.split(",")[0]      # the live group opened its session
        drafter.backend.close_session(sid)
        drafter.close(); one.close()
    finally:
        groups[0].stop(); whole.stop()


def test_decoding_over_shard_groups_is_plain_with_a_group_killed(sharded_index, smol, tmp_path):
    import torch

    from specstore.client.budget import CostProfile
    from specstore.client.decoder import SpeculativeDecoder
    from specstore.client.drafters import ContextDrafter

    path, _ = sharded_index
    model, tok = smol
    groups = [ServerThread(path, ServiceConfig(), opener=default_opener(load_faiss=False, shard_group=(i, 2)))
              for i in range(2)]
    try:
        ds = make_datastore_drafter(address=";".join(g.address for g in groups), tokenizer=tok, timeout_s=1.0)
        dec = SpeculativeDecoder(model, tok, [ds, ContextDrafter()], profile=CostProfile.flat(17), max_budget=16)
        dec.drafters.append(stop_at_step(groups[0], at=3))    # a group dies in the middle of the first request
        for prompt in ["Explain what the borrow checker does.", "What does a closure capture?"]:
            ids = dec.encode_prompt(prompt)
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=sorted(dec.eos_token_ids))[0, len(ids):].tolist()
            assert dec.generate(ids, max_new_tokens=32, prompt_text=prompt).new_tokens == ref
        ds.close()
    finally:
        groups[1].stop()


def test_shard_group_flag_is_checked():
    r = subprocess.run([sys.executable, "-m", "specstore.datastore.cli", "--index", "x", "--shard-group", "2/2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--shard-group" in r.stderr
