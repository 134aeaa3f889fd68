"""A real ``datastore-serve --stats-dir D --outputs-compact-tokens 200`` on 127.0.0.1: pushed outputs are
compacted into a shard in ``D/outputs/`` in the background, Retrieve still drafts their continuations from
it, and after kill -9 and a restart on the same folder it still does."""
from __future__ import annotations

import random
import time

from specstore.bench.push_crash import TOKEN, Server, build_index
from specstore.client.datastore_client import DatastoreClient
from specstore.datastore.output_shards import OUTPUTS_DIR
from specstore.datastore.stats_log import StatsLog
from specstore.protos import datastore_pb2 as pb


def _path_in_tree(tree, path) -> bool:
    """Whether the tree (root at index 0) holds the chain root -> path[0] -> path[1] ..."""
    toks = tree.tokens.tolist()
    pars = tree.parents.tolist()
    node = 0
    for t in path:
        kids = [i for i in range(1, len(toks)) if pars[i] == node and toks[i] == t]
        if not kids:
            return False
        node = kids[0]
    return True


def _shards(stats_dir):
    d = stats_dir / OUTPUTS_DIR
    return sorted(p.name for p in d.iterdir() if ".tmp" not in p.name) if d.is_dir() else []


def test_pushed_outputs_are_compacted_and_still_draft_after_kill_9(tmp_path):
    index = build_index(tmp_path)
    stats_dir = tmp_path / "stats"
    rng = random.Random(7)
    outs = [[rng.randrange(3000, 9000) for _ in range(40)] for _ in range(12)]   # unlike the corpus's text
    args = ["--auth-token", TOKEN, "--outputs-compact-tokens", "200", "--stats-half-life", "1e15"]
    srv = Server(index, stats_dir, tmp_path / "serve.log", args=args)
    try:
        srv.wait_ready()
        c = DatastoreClient(srv.address, auth_token=TOKEN, timeout_s=5.0)
        try:
            for i in range(0, len(outs), 4):
                req = pb.PushStatsRequest(batch_id=f"o{i}", outputs=[pb.Output(tokens=o) for o in outs[i:i + 4]])
                assert c.push_stats(req)[0]
            deadline = time.monotonic() + 60
            while not _shards(stats_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _shards(stats_dir), (tmp_path / "serve.log").read_text()[-2000:]
            ctx, cont = outs[0][10:20], outs[0][20:24]          # the oldest output: compacted first
            assert _path_in_tree(c.retrieve(ctx, budget=16), cont)
        finally:
            c.close()
    finally:
        srv.kill()                                           # SIGKILL: no snapshot, no clean close
    again = Server(index, stats_dir, tmp_path / "serve.log", args=args)
    try:
        again.wait_ready()
        c = DatastoreClient(again.address, timeout_s=5.0)
        try:
            for o in (outs[0], outs[-1]):                      # compacted and (likely) still online
                tree = c.retrieve(o[10:20], budget=16)
                assert _path_in_tree(tree, o[20:24]), (tree.tokens.tolist(), o[20:24])
        finally:
            c.close()
    finally:
        again.kill()
    log = StatsLog(stats_dir).open()                         # offline: every output exactly once, in order
    try:
        held = []
        for o in log.stats.output_shards:
            st = o.shard.doc_starts
            held += [list(map(int, o.shard.tokens[a:b - 1])) for a, b in zip(st, st[1:])]
        assert held + log.stats.outputs.oldest(1 << 30)[1] == outs and log.stats.output_shards
    finally:
        log.close()
