"""Hot reload: the service follows commits made by other processes, without a restart.

Every :data:`RELOAD_INTERVAL` seconds (and at once on SIGHUP) the bundle's manifest is read; when
it names a newer version, :meth:`SearchIndex.refresh` loads what changed (reusing unchanged
segments and the encoder) in a worker thread and swaps the version in one assignment. Requests
already running finish on the version they started with, so none fails or mixes two versions.
A version that cannot be loaded (damaged, half-copied by hand) is logged once and the service
keeps answering from the one it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from fastapi.concurrency import run_in_threadpool

from ..errors import LenetEmbedError
from ..search import SearchIndex

log = logging.getLogger(__package__)

RELOAD_INTERVAL = 0.25


class Reloader:
    """Polls the bundle and refreshes ``index``; ``start`` and ``stop`` it with the app."""

    def __init__(self, index: SearchIndex, interval: float = RELOAD_INTERVAL) -> None:
        self.index = index
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_problem: str | None = None

    def start(self) -> None:
        """Begin polling; SIGHUP triggers a reload at once where signals can be caught."""
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            # Only the main thread's loop can take signals (not, e.g., a test client's).
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reading the bundle's manifest now")
        self._wake.set()

    async def stop(self) -> None:
        """Stop polling."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Load the newest version if there is one; True when the served version changed."""
        before = self.index.version
        try:
            changed = await run_in_threadpool(self.index.refresh)
        except LenetEmbedError as exc:
            if str(exc) != self._last_problem:
                log.warning("keeping version %d: %s", before, exc)
                self._last_problem = str(exc)
            return False
        self._last_problem = None
        if changed:
            log.info("now serving version %d (%d items)", self.index.version, len(self.index))
        return changed
