"""Failures of drafter hooks: counted and logged, never raised into the decode loop.

A drafter is an optimisation: when one raises, the step goes on without it and the output stays the same.
Each failure is counted; the log gets one line (with the traceback) per drafter at most every
``log_every_s`` seconds, because a drafter that breaks tends to break at every step.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

log = logging.getLogger(__name__)


class DrafterErrors:
    """counts: (drafter class name, hook name) -> number of exceptions that hook raised."""

    def __init__(self, log_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.log_every_s = float(log_every_s)
        self.counts: Counter[tuple[str, str]] = Counter()
        self._clock = clock
        self._next_log: dict[int, float] = {}   # id(drafter) -> when its next failure may be logged
        self._unlogged: Counter[int] = Counter()   # id(drafter) -> failures since its last log line

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, drafter: object, hook: str, exc: Exception) -> None:
        """Count ``exc``, raised by ``drafter.<hook>``, and log it unless this drafter logged recently."""
        name = type(drafter).__name__
        self.counts[(name, hook)] += 1
        key, now = id(drafter), self._clock()
        if now < self._next_log.get(key, now):
            self._unlogged[key] += 1
            return
        self._next_log[key] = now + self.log_every_s
        quiet = self._unlogged.pop(key, 0)
        also = f" ({quiet} more failures of this drafter since its last report)" if quiet else ""
        log.warning("drafter %s raised in %s(): %s: %s; the step goes on without it%s "
                    "(reported at most every %g s per drafter)", name, hook, type(exc).__name__, exc, also,
                    self.log_every_s, exc_info=exc)
