"""The reduced CI form of the wire fuzzer (bench/wire_fuzz.py, RELIABILITY.md promise 3): 3,000 raw-byte
inputs of every class to every method of two real `datastore-serve` processes (a token; a token and
--auth-reads), with no token, the right one and a wrong one. No call hangs, none gets UNKNOWN, INTERNAL or
a code its class does not expect, every OK lookup is within its caps (valid ones equal the in-process
tree), both servers stay up, answer a valid lookup at the end, stop cleanly and log no traceback, and
their RSS stays bounded. Full run: ``python -m specstore.bench.wire_fuzz --inputs 100000``."""
from __future__ import annotations

import json

from specstore.bench.wire_fuzz import CLASSES, run_fuzz


def test_wire_fuzz_reduced(tmp_path):
    s = run_fuzz(3000, tmp_path, seed=1, oversized=1, log=lambda *_: None)
    report = json.dumps({k: s[k] for k in ("examples", "final_checks", "logs", "rss", "codes")}, indent=1)[:6000]
    assert s["ok"], report
    assert s["inputs"] == 3000 and s["violations"] == s["hangs"] == s["crashes"] == s["bad_answers"] == 0
    assert set(s["by_class"]) == set(CLASSES), s["by_class"]
    assert {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"} <= set(s["codes"])
    assert not {"UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED"} & set(s["codes"])
    for name, r in s["rss"].items():
        assert r["peak_mib"] - r["start_mib"] < 128, (name, r)
    for name, lg in s["logs"].items():     # undecodable bytes: one rate-limited line, not one per call
        assert lg["tracebacks"] == 0 and lg["undecodable_lines"] <= 2 and lg["bytes"] < 20_000, (name, lg)
