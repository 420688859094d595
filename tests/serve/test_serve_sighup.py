"""SIGHUP to `serve --workers 2` under load: every worker reloads at once, none is restarted, and
not one request fails (uvicorn's own supervisor replaced the workers and reset a few keep-alive
connections: 3 of 18,466 requests)."""

from __future__ import annotations

import signal
import threading

import httpx
from test_serve import version_at, wait_for

from lenet_embed.search import SearchIndex
from scripts.harness.running import running_service

THREADS = 8
REQUESTS = 2000
# SIGHUP is sent when this many requests have been answered (load-driven, not timed).
SIGHUP_AT = (300, 800, 1300)


def _load(url: str, count: int, failures: list[str], done: list[int], lock: threading.Lock
          ) -> None:
    """``count`` requests on one keep-alive connection, as a client behind a load balancer."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(count):
            try:
                response = client.get("/healthz" if i % 2 else "/v1/info")
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:80]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            with lock:
                done[0] += 1


def test_sighup_under_load_reloads_every_worker_and_drops_no_request(lenet_embed_cmd,
                                                                      bundle_copy, tmp_path):
    log_path = tmp_path / "serve.log"
    command = [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_copy), "--workers", "2"]

    def log() -> str:
        return log_path.read_text()

    with running_service(lambda port: [*command, "--port", str(port)], log_path) as (url, server):
        wait_for(lambda: log().count("Application startup complete") == 2, seconds=120,
                 what="two workers")
        failures: list[str] = []
        done = [0]
        lock = threading.Lock()
        clients = [threading.Thread(target=_load, args=(url, REQUESTS // THREADS, failures,
                                                         done, lock)) for _ in range(THREADS)]
        for client in clients:
            client.start()
        for mark in SIGHUP_AT:
            wait_for(lambda mark=mark: done[0] >= mark, seconds=120, what=f"{mark} requests")
            server.send_signal(signal.SIGHUP)
        for client in clients:
            client.join(timeout=300)
        assert not any(client.is_alive() for client in clients)
        assert done[0] == REQUESTS
        assert failures == []
        # Each SIGHUP reached both workers, which kept serving: none was restarted.
        wait_for(lambda: log().count("SIGHUP: reading the bundle's manifest now") == 6,
                 seconds=10, what="three SIGHUPs in each worker")
        # And the reload is real: a commit made now is served by both after one more SIGHUP.
        version = _remove_one(bundle_copy)
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: all(version_at(url) == version for _ in range(6)), seconds=5,
                 what="the new version on both workers")
        assert server.poll() is None
        running = log()
        assert running.count("Application startup complete") == 2, running
        assert "Shutting down" not in running and "Finished server process" not in running
    assert "Traceback" not in log()


def _remove_one(bundle) -> int:
    """Remove item 1 as another process would; the version it committed."""
    index = SearchIndex(bundle)
    index.remove([1])
    return index.version
