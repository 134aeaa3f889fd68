"""The reduced CI form of the push kill campaign (bench/push_crash.py, RELIABILITY.md promise 2): a real
``datastore-serve --stats-dir`` SIGKILLed while 4 threads push statistics; after a restart every acknowledged
batch is there (its retry answers "applied before"), and the table on disk is the sum of every batch sent,
each counted once. Full run: ``python -m specstore.bench.push_crash --runs 50``."""
from __future__ import annotations

from specstore.bench.push_crash import run_campaign


def test_acknowledged_pushes_survive_kill_9_exactly_once(tmp_path):
    lines = []
    records, summary = run_campaign(3, tmp_path, seed=1, pushers=4, log=lines.append)
    assert summary["failures"] == 0 and summary["lost"] == 0, "\n".join(lines)
    assert summary["tables_equal"] == 3 and summary["versions_ok"] == 3, "\n".join(lines)
    assert summary["acknowledged_pushes"] > 30 and summary["unacknowledged_pushes"] > 0, "\n".join(lines)
