"""Sharing connections fairly among worker processes (``serve --workers N``).

The workers all accept from one listening socket. uvloop accepts every pending connection in one
go when the socket becomes readable, so when a burst of connections arrives (clients that open
their keep-alive connections together, as load balancers and benchmarks do), the first worker to
wake takes them all and keeps them: with 2 workers, 11 of 15 bursts of 8 keep-alive connections
went all to one worker (3 more 7 to 1), which then used a whole core while the other idled, at
half the requests per second of a balanced run.

:class:`FairLoop` is uvicorn's event loop in each worker (its ``loop`` setting names it):
uvloop's, except that a server on an inherited listening socket accepts one connection at a
time, and a worker that already holds ``n`` open connections, fewer than
:data:`FAIR_CONNECTIONS`, waits ``n`` x :data:`STEP_SECONDS` before it takes the next one, so
the worker holding fewer connections, or an idle one, gets it first. Only this process's own
count is used (no shared state), as nginx's ``accept_disabled`` does; a connection nobody else
takes is accepted at the end of the wait, so a lone worker still serves everyone. A worker
holding more accepts without waiting: spread over that many connections the shares even out,
and a flood of connections must not be accepted at a few hundred a second. Running out of file
descriptors pauses accepting for a second (logged once per interval) instead of failing.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import uvloop

from .overload import OverloadLog

log = logging.getLogger(__package__)

STEP_SECONDS = 0.001
FAIR_CONNECTIONS = 16
# When the process (or machine) is out of descriptors or memory, accepting pauses this long.
PAUSE_SECONDS = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class FairListener:
    """Accepts connections on a listening socket one at a time, after a wait that grows with the
    connections this process holds open (see the module's description). It stands in for the
    ``asyncio.Server`` uvicorn gets from ``create_server``: it has ``sockets``, ``close`` and
    ``wait_closed``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol], backlog: int = 100) -> None:
        self.sockets = [sock]
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._protocols: weakref.WeakSet[asyncio.Protocol] = weakref.WeakSet()
        self._pending: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._waited = False
        self._closed = False
        self._overload = OverloadLog()
        sock.setblocking(False)
        sock.listen(backlog)  # as create_server does: the socket may be bound only
        loop.add_reader(sock.fileno(), self._readable)

    def open_connections(self) -> int:
        """Connections this listener accepted that are still open."""
        return sum(1 for _ in self._open())

    def wait_before_accepting(self) -> float:
        """Seconds to leave a pending connection to other workers first."""
        # Counted only as far as it matters: a worker holding hundreds accepts at every one.
        held = sum(1 for _ in itertools.islice(self._open(), FAIR_CONNECTIONS))
        return held * STEP_SECONDS if held < FAIR_CONNECTIONS else 0.0

    def _open(self) -> Iterator[asyncio.Protocol]:
        # A WeakSet may be iterated while the collector drops members.
        return (protocol for protocol in self._protocols
                if not _closing(getattr(protocol, "transport", None)))

    def _readable(self) -> None:
        if self._closed:
            return
        if not self._waited:
            wait = self.wait_before_accepting()
            if wait > 0:
                self._pause(wait, waited=True)
                return
        self._waited = False
        try:
            connection, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            self._overload.refused("accept", f"cannot accept connections: {exc.strerror}; "
                                             f"pausing {PAUSE_SECONDS:g} s")
            self._pause(PAUSE_SECONDS, waited=False)
            return
        connection.setblocking(False)
        task = self._loop.create_task(self._serve(connection))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve(self, connection: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._counted, connection)
        except OSError:  # the client went away before its transport was made
            connection.close()

    def _counted(self) -> asyncio.Protocol:
        protocol = self._factory()
        self._protocols.add(protocol)
        return protocol

    def _pause(self, seconds: float, waited: bool) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._timer = self._loop.call_later(seconds, self._resume, waited)

    def _resume(self, waited: bool) -> None:
        self._timer = None
        if not self._closed:
            self._waited = waited
            self._loop.add_reader(self._sock.fileno(), self._readable)

    def is_serving(self) -> bool:
        """Whether it still accepts connections."""
        return not self._closed

    def close(self) -> None:
        """Stop accepting (the socket itself is its owner's to close)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())

    async def wait_closed(self) -> None:
        """Wait for connections accepted but not yet handed to their protocol."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _closing(transport: Any) -> bool:
    return transport is None or transport.is_closing()


class FairLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop's event loop whose servers on an inherited listening socket are
    :class:`FairListener`\\ s (those it makes itself, or with TLS, are uvloop's own)."""

    async def create_server(self, protocol_factory: Any, host: Any = None, port: Any = None,
                            *args: Any, sock: socket.socket | None = None, ssl: Any = None,
                            **kwargs: Any) -> Any:
        if sock is None or ssl is not None or args or host is not None or port is not None:
            return await super().create_server(protocol_factory, host, port, *args, sock=sock,
                                               ssl=ssl, **kwargs)
        return FairListener(self, sock, protocol_factory, kwargs.get("backlog", 100))

