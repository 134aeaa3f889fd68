"""Structured logs: one JSON object per line on stderr."""
from __future__ import annotations

import json
import logging
import sys
import time

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """One log line per ``interval_s`` at most, for events a client can cause at will (bad requests).

    The first event logs at once; later ones inside the interval are only counted, and the next line
    carries that count as ``"suppressed"``: a flood costs one line per interval, and none goes unseen.
    Called from the event loop thread only (no lock).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, clock=time.monotonic):
        self.logger, self.interval_s, self._clock = logger, float(interval_s), clock
        self._next = float("-inf")
        self.suppressed = 0

    def warning(self, event: str, **extra) -> bool:
        """Log ``event`` with ``extra`` fields unless a line went out less than ``interval_s`` ago.
        Returns whether it logged."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self.logger.warning(event, extra={**extra, "suppressed": self.suppressed})
        self.suppressed, self._next = 0, now + self.interval_s
        return True
