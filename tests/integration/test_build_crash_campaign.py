"""The reduced CI form of the index-build kill campaign (bench/build_crash.py, RELIABILITY.md promise 1):
real index-build processes SIGKILLed at random points of a rebuild, an --append and a first build; the
published path always holds the old or the new complete index (watched during the run and served by a real
server after the kill), and the rerun equals the reference build byte for byte. Full run:
``python -m specstore.bench.build_crash --runs 50``."""
from __future__ import annotations

from specstore.bench.build_crash import SCENARIOS, run_campaign


def test_killed_builds_leave_the_old_or_the_new_index(tmp_path):
    lines = []
    summary, records = run_campaign(4, tmp_path, seed=1, embeddings=True, log=lines.append)
    assert summary["failures"] == 0, "\n".join(lines)
    assert summary["runs"] == 4 and set(summary["by_scenario"]) == set(SCENARIOS)
    assert summary["reruns_ok"] == 4 and summary["reads_during_runs"]["bad"] == 0
    assert summary["reads_during_runs"]["old"] > 0 and summary["killed"] >= 3, "\n".join(lines)
