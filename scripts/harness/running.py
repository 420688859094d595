"""The service in a subprocess, as the benchmarks and the tests run it: started on a free loopback
port, waited for until ``/healthz`` answers, stopped as Ctrl-C stops it.

A helper of the benchmarks (``from harness.running import ...``, as they run from ``scripts/``)
and of the tests (``from scripts.harness.running import ...``), not part of the package."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from lenet_embed.errors import LenetEmbedError

HOST = "127.0.0.1"
# How long a stopped service has to finish what it is doing before it is killed.
STOP_SECONDS = 30.0


class RunningService(NamedTuple):
    """A service subprocess that answers: its base URL and its process."""

    url: str
    process: subprocess.Popen[bytes]

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.rsplit(":", 1)[1])


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def health(port: int) -> dict[str, Any] | None:
    """What ``GET /healthz`` answers on ``port``, or None when nothing answers it (yet)."""
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=2)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return json.loads(body) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


@contextlib.contextmanager
def running_service(command: Callable[[int], Sequence[str]], log_path: str | os.PathLike[str],
                    timeout: float = 60.0) -> Iterator[RunningService]:
    """Run ``command(port)`` (a service listening on ``port`` of 127.0.0.1, such as
    ``lenet-embed serve ... --port PORT``) with its output in ``log_path``; yield it once
    ``/healthz`` answers, and stop it when the block ends.

    Raises :class:`LenetEmbedError` when it exits, or does not answer within ``timeout``
    seconds, before that.
    """
    port = free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(list(command(port)), stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while health(port) is None:
            if process.poll() is not None:
                raise LenetEmbedError(f"the service exited with status {process.returncode}; "
                                      f"see {log_path}")
            if time.monotonic() >= deadline:
                raise LenetEmbedError(f"the service did not answer /healthz within {timeout:g} "
                                      f"s; see {log_path}")
            time.sleep(0.2)
        yield RunningService(f"http://{HOST}:{port}", process)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C the service (SIGINT), then kill it if it has not stopped within
    :data:`STOP_SECONDS`."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
