"""Shared statistics over a real gRPC server on 127.0.0.1: PushStats / PullStats, Retrieve fused with the
statistics, auth and validation; and two decoders (one of them the spec-generate CLI in its own process)
whose statistics reach each other while every output stays identical to plain greedy decoding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from specstore.client.datastore_client import DatastoreClient
from specstore.datastore.ngram_stats import NgramStats
from specstore.datastore.servicer import ServiceConfig
from specstore.datastore.stats_log import StatsLog
from specstore.protos import datastore_pb2 as pb
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread

TOKEN = "stats-token"


def _batch(bid, run=(5, 6, 7, 8), rows=()):
    return pb.PushStatsRequest(batch_id=bid, runs=[pb.TokenRun(tokens=list(run), new_from=1)],
                               rows=[pb.TopkRow(token=t, next_tokens=n, probs=p) for t, n, p in rows])


@pytest.fixture()
def fake_server(tmp_path):
    idx = write_fake_index(tmp_path / "idx", [[1, 2, 3, 4, 9, 9, 9]], fingerprint="fp-test")
    log = StatsLog(tmp_path / "stats", stats=NgramStats(half_life_s=1e12)).open()
    with ServerThread(idx, ServiceConfig(auth_token=TOKEN), opener=FakeIndex.open, stats=log) as srv:
        yield srv


def test_push_pull_and_retrieve_fuse_the_statistics(fake_server):
    c = DatastoreClient(fake_server.address, auth_token=TOKEN, timeout_s=2.0)
    try:
        assert c.retrieve([5, 6], budget=4).num_drafts == 0          # nothing known yet
        for i in range(3):
            assert c.push_stats(_batch(f"a{i}", rows=[(6, [7, 1], [0.7, 0.2])])) == (True, i + 1)
        assert c.push_stats(_batch("a1")) == (False, 3)               # a retry is applied once
        tree = c.retrieve([5, 6], budget=4)
        assert tree.tokens.tolist()[:3] == [6, 7, 8]                 # root 6, then 7 and 8 from the runs
        assert all(s & pb.SOURCE_RECYCLED for s in tree.sources[1:].tolist())
        # the corpus and the statistics fused by longest prefix: 2 -> 3 from the corpus, 3 -> 4 both
        c.push_stats(_batch("b", run=(2, 3, 50)))
        t2 = c.retrieve([1, 2], budget=8)
        by_token = dict(zip(t2.tokens.tolist(), t2.sources.tolist()))
        assert by_token[3] & pb.SOURCE_DATASTORE and by_token[3] & pb.SOURCE_RECYCLED
        rows, version, more = c.pull_stats(0)
        assert version == 4 and not more
        assert dict((t, n[0]) for t, n, _ in rows)[6] == 7
        assert c.pull_stats(version) == ([], 4, False)
    finally:
        c.close()


def test_push_needs_the_token_and_a_valid_batch(fake_server):
    anon = DatastoreClient(fake_server.address, timeout_s=2.0)
    c = DatastoreClient(fake_server.address, auth_token=TOKEN, timeout_s=2.0)
    try:
        with pytest.raises(grpc.RpcError) as e:
            anon.push_stats(_batch("x"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert anon.pull_stats(0)[1] == 0                              # reads stay open
        bad = [pb.PushStatsRequest(batch_id="", runs=[pb.TokenRun(tokens=[1, 2], new_from=1)]),
               pb.PushStatsRequest(batch_id="e"),
               _batch("o", run=(1, 100)),                               # out of the vocabulary (100)
               _batch("n", rows=[(1, [2], [1.5])]),
               pb.PushStatsRequest(batch_id="f", runs=[pb.TokenRun(tokens=[1, 2], new_from=2)]),
               pb.PushStatsRequest(batch_id="l" * 200, runs=[pb.TokenRun(tokens=[1, 2], new_from=1)])]
        for b in bad:
            with pytest.raises(grpc.RpcError) as e:
                c.push_stats(b)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, b
            assert len(e.value.details()) < 300
        with pytest.raises(grpc.RpcError) as e:
            c.push_stats(pb.PushStatsRequest(batch_id="fp", runs=[pb.TokenRun(tokens=[1, 2], new_from=1)],
                                             tokenizer_fingerprint="other"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert c.pull_stats(0)[1] == 0                                 # nothing was applied
    finally:
        anon.close(); c.close()


def test_a_server_without_statistics_says_so(tmp_path):
    idx = write_fake_index(tmp_path / "idx", [[1, 2, 3]], fingerprint="fp-test")
    with ServerThread(idx, ServiceConfig(), opener=FakeIndex.open) as srv:
        c = DatastoreClient(srv.address, timeout_s=2.0)
        try:
            for call in (lambda: c.push_stats(_batch("x")), lambda: c.pull_stats(0)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--stats-dir" in e.value.details()
        finally:
            c.close()


# ------------------------------------------------------------------ two decoders, the real model
PROMPT_A = "List five facts about the planet Mars, one per line."
PROMPT_B = "List five facts about the planet Venus, one per line."


@pytest.fixture(scope="module")
def real_index(tmp_path_factory, smol):
    from specstore.indexers.build import BuildOptions, build_index

    d = tmp_path_factory.mktemp("stats-idx")
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_text("Mars is the fourth planet from the Sun. Venus is the second planet. " * 3)
    build_index([str(d / "corpus")], d / "index", BuildOptions(progress=False, embeddings=False),
                tokenizer=smol[1], log=lambda *_: None)
    return d / "index"


def test_node_a_statistics_reach_node_b_and_outputs_stay_plain(smol, real_index, tmp_path):
    import torch

    from specstore.client.budget import CostProfile
    from specstore.client.datastore_drafter import make_datastore_drafter
    from specstore.client.decoder import SpeculativeDecoder
    from specstore.client.drafters import ContextDrafter, RecyclingDrafter
    from specstore.client.shared_stats import StatsSharer

    model, tok = smol
    log = StatsLog(tmp_path / "stats", stats=NgramStats(half_life_s=1e12)).open()
    with ServerThread(real_index, ServiceConfig(auth_token=TOKEN), stats=log) as srv:
        # node A: the spec-generate CLI in its own process
        env = {**os.environ, "DATASTORE_AUTH_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # two requests, the first opting in to shared outputs and the second not (no --share-outputs)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": PROMPT_A, "share_output": True}) + "\n"
                           + json.dumps({"prompt": PROMPT_B, "share_output": False}) + "\n")
        p = subprocess.run([sys.executable, "-m", "specstore.client.cli", "--prompts-file", str(prompts),
                            "--datastore", srv.address, "--share-stats", "--max-new-tokens", "48", "--json", "--compare-plain",
                            "--threads", "2", "--max-budget", "16"],
                           capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2],
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        outs = [json.loads(line) for line in p.stdout.strip().splitlines()[-2:]]
        assert all(o["identical_to_plain"] is True for o in outs)
        assert log.stats.outputs.outputs == 1          # the opted-in request's output only (no warm-up either)
        c = DatastoreClient(srv.address, auth_token=TOKEN, timeout_s=2.0)
        try:
            rows, version, _ = c.pull_stats(0)
            assert version > 0 and len(rows) > 10, "node A pushed nothing"
            # node B, in this process: its recycling table starts from node A's rows
            vocab = int(model.config.vocab_size)
            recycling = RecyclingDrafter(vocab)
            sharer = StatsSharer(c, recycling=recycling, flush_steps=4)
            assert sharer.warm_start() == len(rows)
            ds = make_datastore_drafter(address=srv.address, tokenizer=tok, timeout_s=1.0, auth_token=TOKEN)
            dec = SpeculativeDecoder(model, tok, [ds, ContextDrafter(), recycling, sharer],
                                     profile=CostProfile.flat(17), max_budget=16)
            for prompt in (PROMPT_B, PROMPT_A):
                ids = dec.encode_prompt(prompt)
                ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                     eos_token_id=sorted(dec.eos_token_ids))[0, len(ids):].tolist()
                res = dec.generate(ids, max_new_tokens=40, prompt_text=prompt)
                assert res.new_tokens == ref, prompt
            sharer.close()
            assert sharer.pusher.stats["pushed"] > 0 and sharer.pusher.stats["failed"] == 0
            assert c.pull_stats(0)[1] > version                        # node B's pushes arrived too
            # node A's accepted tokens drafted by the service for its own prompt's context
            a_ids = dec.encode_prompt(PROMPT_A)
            tree = c.retrieve(a_ids + ref[:8], budget=16)
            assert any(s & pb.SOURCE_RECYCLED for s in tree.sources[1:].tolist())
            ds.close()
        finally:
            c.close()


def test_shared_outputs_draft_for_another_node(tmp_path):
    """Node A shares its finished generation (opt-in); node B, asked the same, drafts it from the service's
    recent outputs: fewer steps, the same tokens as plain greedy."""
    from specstore.client.budget import CostProfile
    from specstore.client.datastore_drafter import DatastoreDrafter, RemoteBackend
    from specstore.client.decoder import SpeculativeDecoder
    from specstore.client.shared_stats import StatsSharer
    from tests.helpers import plain_greedy, tiny_llama

    model = tiny_llama(vocab=96, seed=7)
    prompt = [5, 17, 33, 2, 41, 8]
    want = plain_greedy(model, prompt, 40)
    idx = write_fake_index(tmp_path / "idx", [[90, 91, 92]], fingerprint="fp-test")
    log = StatsLog(tmp_path / "stats", stats=NgramStats(half_life_s=1e12)).open()
    with ServerThread(idx, ServiceConfig(auth_token=TOKEN), opener=FakeIndex.open, stats=log) as srv:
        steps = {}
        for node, share in (("a", True), ("b", False)):
            c = DatastoreClient(srv.address, auth_token=TOKEN, timeout_s=2.0, stream=False)
            sharer = StatsSharer(c, share_outputs=share)
            ds = DatastoreDrafter(RemoteBackend(c), documents=False, memory=False)
            dec = SpeculativeDecoder(model, None, [ds, sharer], profile=CostProfile.flat(17), max_budget=16)
            res = dec.generate(prompt, max_new_tokens=40)
            assert res.new_tokens == want, node
            steps[node] = len(res.drafted_per_step)
            sharer.close()
            ds.close()
        assert len(log.stats.outputs) >= 40 and log.stats.outputs.outputs == 1   # only A shared its output
        t = log.stats.output_tree(prompt + want[:6], budget=16, min_prob=0.0, depth=8)
        assert t.tokens.tolist()[:8] == want[6:14]                               # A's output, continued
        assert steps["b"] <= steps["a"] // 3, steps                              # B drafted A's output
