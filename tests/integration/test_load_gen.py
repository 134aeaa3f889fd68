"""RELIABILITY.md promise 4, "Load", reduced: bench/load_gen.py's decoder-like clients against a real
``datastore-serve`` process on 127.0.0.1 with a small --max-concurrency, at 4x its measured capacity and then
at 0.5x. Past capacity the server refuses (RESOURCE_EXHAUSTED, and no other error) quickly instead of
queueing, its memory stays bounded, and once the load drops every call is answered again.

The lookups ask for wide trees (1024 matches x depth 64, the costliest the server accepts; half the calls
are RetrieveBatch calls of 16) so that the service's capacity is set by lookup work, ~200 lookups/s (~25
calls/s), which one load-generator process in the test's own process offers four times over even on a
shared 2-core machine (with the cheap default lookups the generator itself would be the bottleneck there)."""
from __future__ import annotations

import numpy as np
import pytest

from specstore.bench import load_gen
from tests.integration.datastore_support import ServeProcess

WIDE = {"max_span": 1, "min_span": 1, "max_matches": 1024, "depth": 64, "min_prob": 1e-30}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A token-only index (index-build's own code) of 200k tokens over a 1000-token vocabulary, every other
    token the same one: wide lookups have up to 100k occurrences to choose from."""
    from specstore.indexers.build import BuildOptions, build_index

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(20):
        d = rng.integers(10, 1000, 10_000)
        d[::2] = 7
        docs.append(d)
    out = tmp_path_factory.mktemp("load") / "index"
    build_index(None, out, BuildOptions(progress=False), token_docs=docs, vocab_size=1000, log=lambda *_: None)
    return out


@pytest.mark.timeout(120)
def test_overload_is_refused_fast_and_recovers(index, tmp_path):
    """Capacity by a short closed-loop ramp, then 5 s of open-loop arrivals at 4x it, 4 s at 0.5x, and 1 s of
    three decoders in a closed loop (fewer than --max-concurrency: none may be refused; an in-flight count
    that leaked under overload would refuse them)."""
    with ServeProcess(index, "--no-faiss", "--max-concurrency", "8", "--lookup-workers", "1",
                      "--log-level", "warning", log_path=tmp_path / "log") as s:
        windows = load_gen.token_windows(str(index), n=64)
        base = load_gen.PhaseSpec(address=s.address, windows=windows, seconds=0, start_at=0,
                                  mix={"stream": 1, "unary": 1, "batch": 2}, batch=16, options=WIDE, timeout_s=5.0,
                                  channels=8)
        sampler = load_gen.Sampler(s.proc.pid)
        gen = load_gen.Generator(base, 0, sampler)
        try:
            cap, ramp = load_gen.measure_capacity(gen, 1.0, 8, log=lambda *_: None)
            per_call = load_gen.lookups_per_call(base.mix, base.batch)
            over = gen.run("4x", 5.0, rate=4 * cap / per_call)
            calm = gen.run("0.5x", 4.0, rate=0.5 * cap / per_call)
            after = gen.run("after", 1.0, clients=3)
        finally:
            sampler.stop()
        log = s.log()
    for p in (over, calm, after):
        p.pop("raw")
    summary = {"capacity": cap, "4x": over, "0.5x": calm, "after": after}
    assert cap > 0, ramp
    # past capacity: refusals, and no other error (no deadline ran out: nothing waited 5 s in a queue)
    assert over["codes"].get("RESOURCE_EXHAUSTED", 0) > 0, summary
    assert set(over["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, summary
    # refusals are fast: far quicker than the answers that waited their turn for the lookup thread
    assert over["refused_ms"]["p50"] < 100 and over["refused_ms"]["p99"] < over["ok_ms"]["p99"] / 2, summary
    assert not over["queue_growing"], summary
    # memory and open files stay bounded (RSS ~190 MB here; a queue of 4x the capacity would grow it)
    rss0 = ramp[0]["server_rss_mb"]["start"]
    assert over["server_rss_mb"]["max"] < rss0 + 100 and calm["server_rss_mb"]["max"] < rss0 + 100, summary
    assert over["server_fds"]["max"] < 200, summary
    # the load dropped: answered again (0.5x: mostly; closed loop below the limit: every call)
    assert calm["codes"].get("OK", 0) > 0 and calm["error_rate"] < 0.2, summary
    assert set(after["codes"]) == {"OK"}, summary
    assert "Traceback" not in log
