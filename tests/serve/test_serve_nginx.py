"""The shipped deployment: a real nginx with ``deploy/nginx.conf`` in front of a real
``lenet-embed serve``. What protects the service against idle and slow connections, header
floods, oversized bodies and connection floods is nginx's; these tests check that the shipped
configuration does it, and that searches, the service's own refusals and ``/metrics`` pass
through unchanged.

Skipped when no nginx is installed (CI installs Debian's ``nginx``). Every wait is bounded: the
configuration's timeouts are 10 s, so a check of them waits at most 15 s."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from test_serve import png
from test_serve_limits import is_closed, read_response

from scripts.harness.nginx import nginx_binary, running_nginx
from scripts.harness.running import running_service

pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (Debian: apt-get install nginx)")

HEADER_TIMEOUT = 10  # client_header_timeout and client_body_timeout in deploy/nginx.conf
PER_CLIENT = 64  # limit_conn in deploy/nginx.conf


@pytest.fixture(scope="module")
def deployed(lenet_embed_cmd, bundle_dir, tmp_path_factory):
    """(nginx's URL, the service's URL, the service's process, the service's log path)."""
    folder = tmp_path_factory.mktemp("deployed")
    log_path = folder / "serve.log"

    def command(port: int) -> list[str]:
        return [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir), "--port", str(port)]

    with running_service(command, log_path) as service, \
            running_nginx([service.port], folder / "nginx") as url:
        yield url, service.url, service.process, log_path
    log = log_path.read_text()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def digit(bundle_data) -> bytes:
    return png(bundle_data.test.images[0])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(url)), timeout=5)


def assert_json_error(status: int, headers: dict[str, str], body: bytes, want: int,
                      fragment: str) -> None:
    assert status == want, (status, body)
    assert headers["content-type"].startswith("application/json")
    message = json.loads(body)["error"]
    assert fragment in message and "\n" not in message


def test_searches_refusals_and_metrics_pass_through(deployed, digit):
    url, direct, _, _ = deployed
    files = {"file": ("d.png", digit, "image/png")}
    through = httpx.post(f"{url}/v1/search?k=3", files=files, timeout=10)
    assert through.status_code == 200
    assert through.json() == httpx.post(f"{direct}/v1/search?k=3", files=files,
                                        timeout=10).json()
    assert through.headers["x-content-type-options"] == "nosniff"  # the service's headers
    # The service's own refusals come through as the service words them.
    blank = httpx.post(f"{url}/v1/search", timeout=10,
                       files={"file": ("blank.png", png(np.zeros((28, 28), np.uint8)))})
    assert blank.status_code == 422 and "blank.png" in blank.json()["error"]
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'lenet_embed_http_requests_total{method="POST",route="/v1/search",status="200"}' \
        in metrics.text


def test_a_body_over_the_limit_is_413_before_it_is_sent(deployed):
    url, _, _, _ = deployed
    with connect(url) as sock:
        sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 6000000\r\n\r\n")
        assert_json_error(*read_response(sock), 413, "over 5 MB")


def test_oversized_headers_are_refused(deployed):
    url, _, _, _ = deployed
    with connect(url) as sock:  # one header line over 8 KB
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000
                     + b"\r\n\r\n")
        assert_json_error(*read_response(sock), 431, "over 8 KB")
    with connect(url) as sock:  # many lines that are each allowed, 40 KB in all
        lines = b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 7000) for i in range(6))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + lines + b"\r\n")
        assert_json_error(*read_response(sock), 431, "over 8 KB")


def test_requests_in_progress_beyond_the_per_client_limit_get_503(deployed, digit):
    """64 requests whose bodies have not arrived are in progress; the 65th gets nginx's 503 with
    Retry-After, as JSON; once they go, searches are answered again."""
    url, _, _, _ = deployed
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(url)) for _ in range(PER_CLIENT)]
        for sock in held:
            sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        with connect(url) as late:
            late.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, body = read_response(late)
        assert_json_error(status, headers, body, 503, "too many requests in progress")
        assert headers["retry-after"] == "1"
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the held requests were never released"
        time.sleep(0.2)
    assert httpx.post(f"{url}/v1/search", files={"file": ("d.png", digit)},
                      timeout=10).status_code == 200


def socket_count(pid: int) -> int | None:
    """Open sockets of a process (Linux /proc), or None."""
    import os

    try:
        return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def test_idle_slow_and_silent_connections_are_cut_off_and_never_reach_the_service(deployed,
                                                                                 digit):
    """300 connections that send nothing, one sending its headers a byte at a time (slowloris)
    and one whose body stops half-way: searches are answered meanwhile, the service holds none of
    those connections, and nginx closes every one within its 10 s timeouts (uvicorn alone keeps
    the silent and slow ones open for ever; nginx resets them, sending nothing). (A body trickled
    a byte at a time is held by nginx, never by the service, and counts against the per-client
    limit of requests in progress.)"""
    url, _, process, _ = deployed
    stop = threading.Event()

    def trickle(sock: socket.socket, head: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(head)
            while not stop.wait(0.5):
                sock.sendall(b"X")

    with contextlib.ExitStack() as stack:
        silent = [stack.enter_context(connect(url)) for _ in range(300)]
        slow_head, stalled = connect(url), connect(url)
        stack.enter_context(slow_head)
        stack.enter_context(stalled)
        begun = time.monotonic()
        stalled.sendall(b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                        b"Content-Type: application/json\r\n\r\n{")
        thread = threading.Thread(target=trickle, daemon=True,
                                  args=(slow_head, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"))
        thread.start()
        try:
            for i in range(5):
                response = httpx.post(f"{url}/v1/search?k=3", timeout=10,
                                      files={"file": (f"{i}.png", digit)})
                assert response.status_code == 200
            sockets = socket_count(process.pid)
            if sockets is not None:  # the listening socket, nginx's keep-alive ones, pipes
                assert sockets < 80, sockets
            assert is_closed(stalled, HEADER_TIMEOUT + 5)
            assert is_closed(slow_head, 5)
            assert all(is_closed(sock, 0.2) for sock in silent[:20])
            assert time.monotonic() - begun < HEADER_TIMEOUT + 8
        finally:
            stop.set()


def test_nginx_shares_requests_among_several_services(lenet_embed_cmd, bundle_dir, digit,
                                                      tmp_path):
    """Two services behind one nginx (the upstream block listing both, as the configuration's
    header describes for several processes): concurrent clients' searches are shared between
    them by their requests in progress, each service's own /metrics counting its part."""
    def command(port: int) -> list[str]:
        return [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir), "--port", str(port)]

    with running_service(command, tmp_path / "a.log") as first, \
            running_service(command, tmp_path / "b.log") as second, \
            running_nginx([first.port, second.port], tmp_path / "nginx") as url:
        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as session:
                for i in range(10):
                    response = session.post("/v1/search?k=3", files={"file": (f"{i}.png", digit)})
                    assert response.status_code == 200

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        counted = 'lenet_embed_http_requests_total{method="POST",route="/v1/search",status="200"}'
        shares = []
        for service in (first, second):
            text = httpx.get(f"{service.url}/metrics", timeout=10).text
            line = next((line for line in text.splitlines() if line.startswith(counted)), None)
            shares.append(0.0 if line is None else float(line.split()[-1]))
    assert sum(shares) == 40, shares
    assert min(shares) >= 8, shares
