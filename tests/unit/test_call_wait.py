"""The queue wait a server derives from a client's stated timeout (datastore/call_wait.py)."""
from __future__ import annotations

import pytest

from specstore.datastore.call_wait import (
    CLOCK_KEY, TIMEOUT_KEY, ClockBaselines, DelayBaseline, queue_wait_s, stated_timeout_s, timeout_metadata,
)


def test_round_trip():
    md = (("authorization", "Bearer x"), timeout_metadata(2.5))
    assert md[1] == (TIMEOUT_KEY, "2500")
    assert stated_timeout_s(md) == 2.5
    assert queue_wait_s(2.1, md) == pytest.approx(0.4)
    assert queue_wait_s(2.6, md) == 0.0        # the client's clock ran ahead: never a negative wait


@pytest.mark.parametrize("value", ["", "abc", "-5", "0", "1e3", str(10**12)])
def test_unreadable_or_absurd_values_state_nothing(value):
    assert stated_timeout_s(((TIMEOUT_KEY, value),)) is None
    assert queue_wait_s(1.0, ((TIMEOUT_KEY, value),)) is None


def test_no_deadline_or_no_statement_means_unknown():
    assert queue_wait_s(None, (timeout_metadata(1.0),)) is None
    assert queue_wait_s(1.0, ()) is None and queue_wait_s(1.0, None) is None
    assert timeout_metadata(0.0001) == (TIMEOUT_KEY, "1")   # a sub-millisecond timeout still states one


def test_delay_baseline_measures_from_the_least_delay():
    b = DelayBaseline()
    offset = 10_000_000_000          # the two clocks' origins differ: only differences count
    assert b.wait_s(1_000, offset + 1_500) == 0.0               # first message: the baseline
    assert b.wait_s(2_000, offset + 2_500) == 0.0               # same delay
    assert b.wait_s(3_000, offset + 303_500) == pytest.approx(0.3)   # waited 300 ms more
    assert b.wait_s(4_000, offset + 4_200) == 0.0               # a quicker one lowers the baseline
    assert b.wait_s(5_000, offset + 5_500) == pytest.approx(0.0003)


def test_delay_baseline_forgets_old_buckets():
    """Clocks drift apart: the baseline is the least delay of the last BUCKETS buckets only."""
    b = DelayBaseline()
    bucket = DelayBaseline.BUCKET_S * 1_000_000
    b.wait_s(0, 100)                                            # least delay 100 us in bucket 0
    t = (DelayBaseline.BUCKETS - 1) * bucket                    # later, the clocks are 5 ms further apart
    assert b.wait_s(t, t + 5_100) == pytest.approx(0.005)       # bucket 0 still in the window
    t += bucket
    assert b.wait_s(t, t + 5_100) == 0.0                        # bucket 0 dropped: 5.1 ms is the new least


def test_delay_baseline_restarts_after_a_clock_step():
    """A client machine suspended for a minute: its clock stopped, so every delay is a minute longer. That
    is no queue (gRPC lets no call wait that long): the baseline starts again instead of refusing for the
    whole window."""
    b = DelayBaseline()
    b.wait_s(0, 100)
    step = 60_000_000
    assert b.wait_s(1_000, 1_100 + step) == 0.0
    assert b.wait_s(2_000, 2_100 + step) == 0.0
    assert b.wait_s(3_000, 303_100 + step) == pytest.approx(0.3)   # and measures from the new baseline


def test_clock_baselines_are_per_client_and_clock():
    c = ClockBaselines(limit=2)
    md = ((CLOCK_KEY, "abc"),)
    a = c.for_stream("ipv4:10.0.0.1", md)
    assert c.for_stream("ipv4:10.0.0.1", md) is a               # the same process's next stream
    b = c.for_stream("ipv4:10.0.0.2", md)
    assert b is not a                                           # another caller with the same id
    assert c.for_stream("ipv4:10.0.0.1", ()) is not c.for_stream("ipv4:10.0.0.1", ())   # no clock: private
    assert c.for_stream("ipv4:10.0.0.1", ((CLOCK_KEY, "x" * 65),)) is not a
    assert c.for_stream("ipv4:10.0.0.1", md) is a               # used again: .2 is now the least recent
    c.for_stream("ipv4:10.0.0.3", md)                           # over the limit: .2 is forgotten
    assert c.for_stream("ipv4:10.0.0.1", md) is a
    assert c.for_stream("ipv4:10.0.0.2", md) is not b
