"""How long a call (a stream message) waited before its handler ran: the server's queue, made visible.

Python's asyncio gRPC server takes one call per registered method from gRPC's core per event-loop turn, so
while the loop is saturated, arriving calls wait in the core's pending list where no in-flight count sees
them (measured at 2x the loop's capacity: 2,899 calls ran out of their 5 s deadline in 20 s and none was
refused; RELIABILITY.md section 4). gRPC hands the handler the call's deadline but
not its arrival time. A client that states the timeout it set, in the ``specstore-timeout-ms`` metadata
(ours do), lets the server compute the wait as ``stated - remaining`` with no clock shared between the
machines; the server then refuses a call that waited longer than its bound with RESOURCE_EXHAUSTED, which
costs far less than the lookup, so the loop drains the backlog instead of serving calls late. A call
whose deadline has already passed is dropped for every client: its caller has given up.

RetrieveStream messages have no deadline each: a message carries its client's clock (``sent_us``), and
the server measures its wait against the least delay seen from that clock in the last two minutes
(``DelayBaseline``), shared by every stream of one client process when the client names its clock
(``ClockBaselines``).
"""
from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Iterable, Optional

TIMEOUT_KEY = "specstore-timeout-ms"
CLOCK_KEY = "specstore-clock"
# this process's clock, named once: every stream it opens measures against one baseline on the server
CLOCK_METADATA = (CLOCK_KEY, secrets.token_hex(8))


def timeout_metadata(timeout_s: float) -> tuple[str, str]:
    """The metadata entry a client adds to a call made with ``timeout=timeout_s``."""
    return (TIMEOUT_KEY, str(max(1, int(timeout_s * 1000))))


def stated_timeout_s(metadata: Optional[Iterable[tuple]]) -> Optional[float]:
    """The timeout the client stated (seconds), or None when it stated none or an unreadable one."""
    for key, value in metadata or ():
        if key == TIMEOUT_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return ms / 1000.0 if 0 < ms <= 86_400_000 else None
    return None


def queue_wait_s(remaining_s: Optional[float], metadata: Optional[Iterable[tuple]]) -> Optional[float]:
    """Seconds the call spent between the client's send and its handler (network included), or None when
    the call has no deadline or its client stated no timeout. ``remaining_s``: ``context.time_remaining()``."""
    if remaining_s is None:
        return None
    stated = stated_timeout_s(metadata)
    return None if stated is None else max(0.0, stated - remaining_s)


class DelayBaseline:
    """The least one-way delay (the server's clock minus the client's ``sent_us``) seen from one client clock
    over the last ``BUCKETS`` x ``BUCKET_S`` seconds; a message's wait is its delay less that least delay, so
    that the clocks' offset and the network's transit cancel out. The first message of a clock defines the
    baseline, so its own wait is not seen.

    The window (LEDBAT keeps a base-delay history the same way) lets the baseline follow the two machines'
    clocks drifting apart (50 ppm is 6 ms in two minutes) and forget a standing queue. A clock that steps
    (a suspended or paused machine: CLOCK_MONOTONIC stops there) would make every later message look late
    until the window has passed; a step of more than ``STEP_S`` (longer than any wait gRPC lets a call
    have) restarts the baseline at once, and a smaller one costs at most the window of refused messages
    (the client drafts locally meanwhile)."""

    BUCKET_S = 10
    BUCKETS = 12
    STEP_S = 30.0
    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: list[list[int]] = []   # [bucket index, least delay in it (us)], oldest first

    def wait_s(self, sent_us: int, now_us: int) -> float:
        delay = now_us - sent_us
        bucket = now_us // (self.BUCKET_S * 1_000_000)
        buckets = self._buckets
        if buckets and buckets[-1][0] == bucket:
            if delay < buckets[-1][1]:
                buckets[-1][1] = delay
        else:
            buckets.append([bucket, delay])
            while buckets[0][0] <= bucket - self.BUCKETS:
                buckets.pop(0)
        wait = (delay - min(b[1] for b in buckets)) / 1e6
        if wait > self.STEP_S:
            self._buckets = [[bucket, delay]]
            return 0.0
        return wait


class ClockBaselines:
    """One ``DelayBaseline`` per client clock, so that a client's new RetrieveStream is measured from its
    first message on. A client names its clock (one random id per process: every stream of the process
    reads the same monotonic clock) in the ``specstore-clock`` metadata; the key also holds the caller's
    address, so a caller that does not know another's id cannot move that one's baseline. At most ``limit``
    clocks are kept (the least recently used is forgotten: its next stream starts a new baseline)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = int(limit)
        self._clocks: "OrderedDict[tuple[str, str], DelayBaseline]" = OrderedDict()

    def for_stream(self, client: str, metadata: Optional[Iterable[tuple]]) -> DelayBaseline:
        """The baseline a new stream measures its messages against (its own when it names no clock)."""
        clock = next((v for k, v in metadata or () if k == CLOCK_KEY), None)
        if not clock or len(clock) > 64:
            return DelayBaseline()
        key = (client, clock)
        baseline = self._clocks.get(key)
        if baseline is None:
            baseline = self._clocks[key] = DelayBaseline()
            if len(self._clocks) > self.limit:
                self._clocks.popitem(last=False)
        else:
            self._clocks.move_to_end(key)
        return baseline
