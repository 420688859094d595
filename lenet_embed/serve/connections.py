"""Connections: a cap on the open connections of a server process, and a time and size limit on
request headers, so idle or slow clients cannot use up its file descriptors.

uvicorn (0.54) has neither a header-read timeout nor, with httptools, a header size limit (h11
has one, 16 KB); its keep-alive timer is reset by every byte, so a client sending a byte every
few seconds is never dropped; a connection that sends nothing is never dropped; and its
``limit_concurrency`` only answers the requests beyond the limit with a plain-text 503 (one
warning each), leaving idle sockets open. :class:`GuardedHttpToolsProtocol`, uvicorn's httptools
protocol plus the following, takes its place (``serve`` passes it to uvicorn with the limit as
``limit_concurrency``):

- at most ``limit_concurrency`` open connections: a connection beyond it closes the oldest idle
  one (one that never sent a request first, then one kept alive between requests); when every
  connection has a request in progress, the new one is answered 503 with ``Retry-After`` and
  closed. Either is logged at most once per interval, never per connection;
- a request's headers must arrive within :data:`HEADER_TIMEOUT` seconds of the connection
  becoming idle (opened, or its previous response sent), else it is closed;
- a request line and headers over :data:`MAX_HEADER_BYTES` get 431 and the connection is
  closed.

:func:`raise_open_file_limit` lifts the process's soft limit on open files to its hard limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .overload import RETRY_AFTER, OverloadLog

HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 16 * 1024
# Open files a server process needs besides its connections: the bundle's files, pipes, logs.
RESERVED_FILES = 128


class _IdleConnections:
    """A server's connections without a request in progress, oldest first: those that never
    sent one apart from those kept alive after a response; and its overload reports."""

    def __init__(self) -> None:
        self.fresh: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()
        self.kept: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()
        self.overload = OverloadLog()

    def add(self, connection: GuardedHttpToolsProtocol, fresh: bool) -> None:
        (self.fresh if fresh else self.kept)[connection] = None

    def discard(self, connection: GuardedHttpToolsProtocol) -> None:
        self.fresh.pop(connection, None)
        self.kept.pop(connection, None)

    def pop_oldest(self) -> GuardedHttpToolsProtocol | None:
        for group in (self.fresh, self.kept):
            if group:
                return group.popitem(last=False)[0]
        return None


# Per server (uvicorn's ServerState), so that servers in one process do not mix.
_idle_by_server: weakref.WeakKeyDictionary[Any, _IdleConnections] = weakref.WeakKeyDictionary()


_TOO_LARGE = f"request headers over {MAX_HEADER_BYTES // 1024} KB"


async def _headers_too_large(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app that answers a request whose headers are over the limit."""
    body = json.dumps({"error": _TOO_LARGE}).encode()
    await send({"type": "http.response.start", "status": 431,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _refusal(status: bytes, message: str, retry_after: bool = False) -> bytes:
    body = json.dumps({"error": message}).encode()
    headers = [b"HTTP/1.1 " + status, b"content-type: application/json",
               b"content-length: " + str(len(body)).encode(), b"connection: close"]
    if retry_after:
        headers.append(b"retry-after: " + str(RETRY_AFTER).encode())
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap, a header timeout and a header size
    limit (see the module's description)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # The limit is kept when connections open; uvicorn's own check is turned off.
        self.max_connections: int | None = self.limit_concurrency
        self.limit_concurrency = None
        idle = _idle_by_server.get(server_state)
        if idle is None:
            idle = _idle_by_server[server_state] = _IdleConnections()
        self._idle = idle
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # received while waiting for headers
        self._header_size = 0  # of the request line and headers parsed
        self._waiting_for_headers = False

    # ------------------------------------------------------------------ connection cap

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.max_connections
        if limit is not None and len(self.connections) > limit:
            victim = self._idle.pop_oldest()
            report = self._idle.overload.refused
            if victim is None:
                report("busy", f"connection limit reached: {limit} open, all with a request "
                               "in progress; answering new ones 503")
                self._close(_refusal(b"503 Service Unavailable",
                                     "the service is at its connection limit; retry in a moment",
                                     retry_after=True))
                return
            report("idle", f"connection limit reached: {limit} open; closing the oldest idle "
                           "ones")
            victim._close()
        self._await_headers(fresh=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _close(self, farewell: bytes = b"") -> None:
        """Close now; the connection no longer counts against the limit."""
        self._stop_waiting()
        self.connections.discard(self)
        if not self.transport.is_closing():
            if farewell:
                self.transport.write(farewell)
            self.transport.close()

    # ------------------------------------------------------------------ header timeout and size

    def _await_headers(self, fresh: bool) -> None:
        """The connection is idle: the next request's headers must come, in time and small."""
        self._waiting_for_headers = True
        self._header_bytes = 0
        self._idle.add(self, fresh)
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._close)

    def _stop_waiting(self) -> None:
        self._waiting_for_headers = False
        self._idle.discard(self)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Headers that never end: cut off once over the limit.
        if self._waiting_for_headers and self._header_bytes > MAX_HEADER_BYTES:
            self._close(_refusal(b"431 Request Header Fields Too Large", _TOO_LARGE))

    def on_message_begin(self) -> None:
        self._header_size = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_size > MAX_HEADER_BYTES:  # headers that came whole, but too large
            app, self.app = self.app, _headers_too_large
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._waiting_for_headers:
            return
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request started
            self._await_headers(fresh=False)


def raise_open_file_limit() -> int | None:
    """Lift this process's soft limit on open files to its hard limit; the new soft limit (None
    where there is none to read)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def quiet_repeated_warnings() -> None:
    """Let each of uvicorn's warnings through at most once per interval: it warns once per
    malformed or unsupported request, which a flood would turn into a flood of lines."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(known, _RepeatFilter) for known in logger.filters):
        logger.addFilter(_RepeatFilter())


class _RepeatFilter(logging.Filter):
    """Lets a warning through at most once per interval."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = str(record.msg)
        now = record.created
        last = self._last.get(message)
        if last is not None and now - last < self.interval:
            return False
        self._last[message] = now
        return True
