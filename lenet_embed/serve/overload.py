"""Saying the service is overloaded: a 503 with ``Retry-After``, and one warning per kind of
overload per interval (not one per refusal: a flood must not become a flood of log lines)."""

from __future__ import annotations

import logging
import threading
import time

from .errors import ApiError

log = logging.getLogger(__package__)

REPORT_INTERVAL = 10.0
RETRY_AFTER = 1


def busy(message: str) -> ApiError:
    """The refusal of a request the service has no room for now: 503, retry in a second."""
    return ApiError(503, message, retry_after=RETRY_AFTER)


class OverloadLog:
    """Logs a warning for a kind of overload at most once per ``interval`` seconds, with the
    number of refusals of that kind since its previous line. Thread-safe."""

    def __init__(self, interval: float = REPORT_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def refused(self, kind: str, message: str) -> None:
        """Count one refusal of ``kind``; log ``message`` if this kind was quiet for an
        interval."""
        now = time.monotonic()
        with self._lock:
            count = self._counts.get(kind, 0) + 1
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._counts[kind] = count
                return
            self._last[kind] = now
            self._counts[kind] = 0
        log.warning("%s (%d since the previous report)", message, count)
