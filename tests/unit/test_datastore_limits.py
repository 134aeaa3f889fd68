"""Pieces of the datastore's request limits and hardening, without a server: the per-request limits and
their checks, the parser that never raises, the rate-limited log line, the public manifest."""
from __future__ import annotations

import inspect
import json
import logging

import pytest

from specstore.datastore.logs import RateLimitedLog
from specstore.datastore.public_manifest import REDACTED, public_manifest
from specstore.datastore.servicer import INDEX_DEFAULTS, MEMORY_MATCHES, ServiceConfig, _clip
from specstore.datastore.wire import SERVICE, Undecodable, add_to_server, tolerant_parser
from specstore.protos import datastore_pb2 as pb


def test_index_defaults_match_retrieve():
    """The servicer prices a request that leaves an option unset at DatastoreIndex.retrieve's default."""
    from specstore.datastore.index import DatastoreIndex

    params = inspect.signature(DatastoreIndex.retrieve).parameters
    assert {k: params[k].default for k in INDEX_DEFAULTS} == INDEX_DEFAULTS
    assert params["memory_matches"].default == MEMORY_MATCHES


@pytest.mark.parametrize("kw,msg", [
    ({"retrieve_defaults": {"max_matches": 2048}}, "max_matches"),
    ({"retrieve_defaults": {"max_matches": 1024, "depth": 128}}, "max_lookup_cells"),
    ({"retrieve_defaults": {"min_prob": 2.0}}, "min_prob"),
    ({"max_hint": 0}, "max_hint"),
    ({"lookup_workers": 0}, "lookup_workers"),
])
def test_config_check_refuses_defaults_beyond_the_limits(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ServiceConfig(**kw).check()
    ServiceConfig().check()
    ServiceConfig(retrieve_defaults={"max_matches": 1024, "depth": 64}).check()


def test_cli_reports_bad_defaults_as_usage_error():
    from specstore.datastore.cli import _config_from_args, build_parser
    from specstore.datastore.cli_common import UsageError

    a = build_parser().parse_args(["--index", "x", "--max-matches", "1024", "--depth", "1024"])
    with pytest.raises(UsageError, match="max_lookup_cells"):
        _config_from_args(a)
    a = build_parser().parse_args(["--index", "x", "--max-matches", "1024", "--depth", "1024",
                                   "--max-lookup-cells", str(1 << 20)])
    assert _config_from_args(a).max_lookup_cells == 1 << 20


def test_clip_keeps_details_short():
    assert _clip("abc") == "'abc'"
    c = _clip("x" * 100_000)
    assert len(c) < 100 and "100000 characters" in c


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\x80" * 10 + b"\x01"])
def test_tolerant_parser_never_raises(data):
    out = tolerant_parser(pb.RetrieveRequest)(data)
    assert isinstance(out, Undecodable) and out.size == len(data) and out.message == "RetrieveRequest"
    assert "RetrieveRequest" in out.details()
    good = pb.RetrieveRequest(context=[1, 2], budget=3)
    assert tolerant_parser(pb.RetrieveRequest)(good.SerializeToString()) == good


def test_add_to_server_registers_every_method():
    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            self.generic = handlers

        def add_registered_method_handlers(self, name, handlers):
            self.name, self.handlers = name, handlers

    class Servicer:
        def __getattr__(self, name):
            return lambda *a: name

    r = Recorder()
    add_to_server(Servicer(), r)
    assert r.name == "specstore.datastore.v1.Datastore"
    assert set(r.handlers) == {m.name for m in SERVICE.methods}
    assert r.handlers["RetrieveStream"].request_streaming and r.handlers["RetrieveStream"].response_streaming
    assert isinstance(r.handlers["Info"].request_deserializer(b"\xff"), Undecodable)


def test_rate_limited_log(caplog):
    t = [0.0]
    rl = RateLimitedLog(logging.getLogger("test.rl"), interval_s=60, clock=lambda: t[0])
    with caplog.at_level(logging.WARNING, "test.rl"):
        assert rl.warning("bad", n=1)
        assert not any(rl.warning("bad", n=i) for i in range(500))
        t[0] = 61.0
        assert rl.warning("bad", n=2)
    recs = [r for r in caplog.records if r.name == "test.rl"]
    assert len(recs) == 2 and recs[0].suppressed == 0 and recs[1].suppressed == 500


def test_public_manifest_drops_paths_keeps_facts():
    m = {"index_id": "abc", "created": "2026-11-29T15:03:45Z", "vocab_size": 49152,
         "tokenizer": {"spec": None, "fingerprint": "7f07", "class": "TokenizersBackend",
                       "name_or_path": "/root/.cache/specstore/models/smollm2/tokenizer"},
         "shards": [{"name": "shard-00000", "num_tokens": 10, "files": {"tokens.npy": {"bytes": 1, "sha256": "ab"}}}],
         "faiss": {"factory": "IVF2,Flat", "embedder": {"id": "e", "path": "~/emb"}},
         "stats": {"num_tokens": 10, "inputs": ["examples/corpus"], "previous_inputs": ["C:\\data"],
                   "read": {"files": 3, "skipped_files": ["a.bin"], "bad_examples": ["x.jsonl:3: bad"]},
                   "appended_from": None}}
    p = public_manifest(m)
    text = json.dumps(p)
    for secret in ("/root", "examples/corpus", "C:", "a.bin", "x.jsonl", "~/emb"):
        assert secret not in text
    assert p["tokenizer"] == {"spec": None, "fingerprint": "7f07", "class": "TokenizersBackend",
                              "name_or_path": REDACTED}
    assert p["shards"] == m["shards"] and p["faiss"]["factory"] == "IVF2,Flat" and p["faiss"]["embedder"]["id"] == "e"
    assert p["stats"] == {"num_tokens": 10, "read": {"files": 3}, "appended_from": None}
    assert m["stats"]["inputs"] == ["examples/corpus"]       # the original is left alone
