"""FairListener: a worker process of `serve --workers N` accepts one connection at a time, later
the more connections it holds, and still serves every client when it is alone."""

from __future__ import annotations

import asyncio
import errno
import socket

from lenet_embed.serve import accept
from lenet_embed.serve.accept import STEP_SECONDS, FairListener, FairLoop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def run(main) -> object:
    loop = FairLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound only: create_server makes it listen, as for uvicorn
    return sock


def test_a_lone_worker_accepts_everyone_waiting_longer_as_it_holds_more(monkeypatch):
    # Beyond FAIR_CONNECTIONS a worker takes connections without waiting (a flood must not be
    # accepted at a few hundred a second).
    monkeypatch.setattr(accept, "FAIR_CONNECTIONS", 3)
    sock = listening_socket()
    port = sock.getsockname()[1]

    async def main() -> tuple[list[float], list[bytes]]:
        server = await asyncio.get_running_loop().create_server(Echo, sock=sock, backlog=16)
        assert isinstance(server, FairListener) and server.is_serving()
        waits, echoes, clients = [], [], []
        for i in range(4):
            waits.append(server.wait_before_accepting())
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping %d" % i)
            echoes.append(await asyncio.wait_for(reader.readexactly(6), 5))
            clients.append(writer)
        assert server.open_connections() == 4
        for writer in clients:
            writer.close()
        await asyncio.sleep(0.05)
        assert server.open_connections() == 0
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        return waits, echoes

    waits, echoes = run(main)
    assert echoes == [b"ping 0", b"ping 1", b"ping 2", b"ping 3"]
    assert waits == [0.0, STEP_SECONDS, 2 * STEP_SECONDS, 0.0]
    sock.close()


def test_servers_it_makes_itself_are_uvloops_own():
    async def main() -> object:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
        server.close()
        return server

    assert not isinstance(run(main), FairListener)


def test_out_of_file_descriptors_pauses_accepting_and_says_so_once(monkeypatch, caplog):
    sock = listening_socket()
    port = sock.getsockname()[1]
    monkeypatch.setattr(accept, "PAUSE_SECONDS", 0.2)
    failures = []

    class NoDescriptors:
        """The listening socket, failing its first two accepts with EMFILE."""

        def __init__(self, real: socket.socket) -> None:
            self.real = real

        def accept(self):
            if len(failures) < 2:
                failures.append(1)
                raise OSError(errno.EMFILE, "Too many open files")
            return self.real.accept()

        def __getattr__(self, name):
            return getattr(self.real, name)

    async def main() -> bytes:
        server = await asyncio.get_running_loop().create_server(Echo, sock=sock)
        server._sock = NoDescriptors(sock)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello!")
        echo = await asyncio.wait_for(reader.readexactly(6), 5)
        writer.close()
        server.close()
        return echo

    with caplog.at_level("WARNING", logger="lenet_embed.serve"):
        assert run(main) == b"hello!"
    assert len(failures) == 2
    assert caplog.text.count("cannot accept connections") == 1
    sock.close()
