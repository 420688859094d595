"""Running the service: the worker configuration, logging, uvicorn's app factory and ``serve``."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from ..embed import LiteRTEncoder
from ..errors import LenetEmbedError
from ..search import SearchIndex
from .app import create_app
from .auth import read_token, write_problem
from .connections import (
    HEADER_TIMEOUT,
    RESERVED_FILES,
    quiet_repeated_warnings,
    raise_open_file_limit,
)
from .pools import DECODE_TIMEOUT

log = logging.getLogger(__package__)

# Worker processes (``--workers N``) rebuild the app from this variable: a JSON ServiceConfig.
CONFIG_ENV = "LENET_EMBED_SERVE_CONFIG"
# What uvicorn's worker processes import; the package re-exports app_from_env under this name.
_APP_FACTORY = "lenet_embed.serve:app_from_env"
# uvicorn's httptools protocol with the connection cap and header limits (see .connections).
_PROTOCOL = "lenet_embed.serve.connections:GuardedHttpToolsProtocol"
# Worker processes' event loop: uvloop sharing connections fairly among them (see .accept).
_FAIR_LOOP = "lenet_embed.serve.accept:FairLoop"
MAX_CONNECTIONS = 1000
# Connections the kernel queues before the server accepts them (uvicorn's default; Linux caps
# it at net.core.somaxconn).
BACKLOG = 2048
KEEP_ALIVE = 5
WORKER_READY_SECONDS = 60


@dataclass(frozen=True)
class ServiceConfig:
    """What a worker process needs to load the same index: JSON in ``$LENET_EMBED_SERVE_CONFIG``."""

    index_dir: str
    backend: str = "auto"
    threads: int = 1
    search_params: dict[str, int] = field(default_factory=dict)
    write_token_file: str | None = None
    allowed_hosts: list[str] | None = None
    decode_timeout: float = DECODE_TIMEOUT
    show_sources: bool = False

    def to_json(self) -> str:
        """This configuration as a JSON string."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServiceConfig:
        """Read a configuration written by :meth:`to_json`."""
        return cls(**json.loads(text))

    def load(self) -> SearchIndex:
        """Load the bundle."""
        return SearchIndex.load(self.index_dir, backend=self.backend, threads=self.threads,
                                search_params=self.search_params)


def _ensure_logging() -> None:
    """Send this package's INFO lines to stderr when nothing else has set logging up (worker
    processes, or ``serve`` called from Python)."""
    logger = logging.getLogger("lenet_embed")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def app_from_env() -> ASGIApp:
    """App factory for uvicorn's worker processes: the index named in ``$LENET_EMBED_SERVE_CONFIG``
    (see :class:`ServiceConfig`)."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise LenetEmbedError(f"${CONFIG_ENV} is not set; start the service with lenet-embed serve")
    # The supervisor passes SIGHUP on to every worker (see serve). Its default action ends the
    # process: ignored while this worker loads the bundle, until the reloader takes it over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _ensure_logging()
    quiet_repeated_warnings()
    config = ServiceConfig.from_json(text)
    return create_app(config.load(), threads=config.threads,
                      # serve() warned about the token already, once.
                      write_token=read_token(config.write_token_file, warn=False),
                      allowed_hosts=config.allowed_hosts, decode_timeout=config.decode_timeout,
                      show_sources=config.show_sources)


_LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to listen on) reaches this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def allowed_hosts(host: str, extra: list[str] | None = None) -> list[str] | None:
    """The ``Host`` names the service answers for when listening on ``host``: the loopback names,
    and beyond loopback this machine's own names and addresses, plus ``extra`` (``*``: any).

    A browser page on another site that gets its name to resolve to this machine (DNS rebinding)
    sends its own name as ``Host`` and is refused.
    """
    extra = list(extra or [])
    if "*" in extra:
        return None
    names = set(_LOOPBACK_NAMES) | {name.lower() for name in extra}
    if not is_loopback(host):
        if host not in ("0.0.0.0", "::", ""):
            names.add(host.lower())
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        with contextlib.suppress(OSError):
            names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
    return sorted(names)


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          threads: int = 1, write_token_file: str | None = None,
          allowed_host: list[str] | None = None, max_connections: int = MAX_CONNECTIONS,
          decode_timeout: float = DECODE_TIMEOUT, show_sources: bool = False) -> None:
    """Serve a loaded index over HTTP until interrupted (``lenet-embed serve``).

    Load the index first (``SearchIndex.load``), so a bad bundle is one error line before any
    socket opens. With ``workers`` > 1, uvicorn starts that many processes, each loading the same
    bundle with the same encoder and search parameters through :func:`app_from_env`.
    ``threads`` caps FAISS's threads per search (see :func:`create_app`). Writes are enabled by
    a token in ``write_token_file`` or ``$LENET_EMBED_WRITE_TOKEN`` (see :mod:`.auth`). Every
    process follows commits to the bundle; SIGHUP makes every process read the bundle's
    manifest at once (with ``workers`` > 1 the supervisor passes it on to each worker; none is
    restarted, so no request or connection is dropped). Requests whose ``Host`` is not among
    :func:`allowed_hosts` (with ``allowed_host`` added) are refused.

    Each process keeps at most ``max_connections`` connections open (closing idle ones first,
    see :mod:`.connections`; bounded by its open-file limit, which is raised to the hard limit
    first) and gives each uploaded image ``decode_timeout`` seconds to decode (see
    :mod:`.pools`). Answers name no server folder unless ``show_sources`` (see :mod:`.exposure`).
    """
    import uvicorn

    _ensure_logging()
    token = read_token(write_token_file)  # a bad token file is an error before any socket opens
    if token is None:
        log.info("writes disabled (start with --write-token-file to enable them)")
    elif write_problem(index.path) is None:  # else create_app warns that writes are off
        log.info("writes enabled (POST/DELETE /v1/items need the token)")
    hosts = allowed_hosts(host, allowed_host)
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can search this index%s",
                    host, "" if token else " (writes stay off without a write token)")
    log.info("answering for Host: %s", "any" if hosts is None else ", ".join(hosts))
    connections = _connection_limit(max_connections)
    quiet_repeated_warnings()
    # proxy_headers off: nothing in the service reads the client's address, and uvicorn's
    # X-Forwarded-For middleware would otherwise run on every request.
    options: dict[str, Any] = {"host": host, "port": port, "access_log": False,
                               "proxy_headers": False,
                               "log_level": "info", "timeout_graceful_shutdown": 5,
                               "http": _PROTOCOL, "limit_concurrency": connections,
                               "backlog": BACKLOG, "timeout_keep_alive": KEEP_ALIVE}
    log.info("limits per process: %d connections, request headers within %g s, keep-alive %d s, "
             "image decoding within %g s", connections, HEADER_TIMEOUT, KEEP_ALIVE,
             decode_timeout)
    log.info("serving %s (%d items) on http://%s:%d with %d worker(s)",
             index.path, len(index), host, port, workers)
    if workers == 1:
        uvicorn.run(create_app(index, threads=threads, write_token=token, allowed_hosts=hosts,
                               decode_timeout=decode_timeout, show_sources=show_sources),
                    **options)
        return
    config = ServiceConfig(
        index_dir=str(Path(index.path).resolve()),
        backend="litert" if isinstance(index.encoder, LiteRTEncoder) else "keras",
        threads=threads,
        search_params=dict(index.overrides),
        write_token_file=str(Path(write_token_file).resolve()) if write_token_file else None,
        allowed_hosts=hosts,
        decode_timeout=decode_timeout,
        show_sources=show_sources,
    )
    os.environ[CONFIG_ENV] = config.to_json()
    from uvicorn.supervisors import Multiprocess

    # What uvicorn.run does for workers, plus TCP_NODELAY: uvicorn makes this socket without
    # IPPROTO_TCP, so asyncio leaves Nagle's algorithm on for the connections accepted from it
    # (they inherit the option) and each response's body waits ~40 ms for a delayed ACK.
    # A new worker loads the bundle before it answers uvicorn's health check: on a busy machine
    # that takes longer than uvicorn's 5 s, after which a SIGHUP restart is given up (the old
    # worker serves meanwhile, so waiting longer costs nothing).
    # Each worker takes its fair share of new connections (see .accept).
    server_config = uvicorn.Config(_APP_FACTORY, factory=True, workers=workers, loop=_worker_loop(),
                                   timeout_worker_healthcheck=WORKER_READY_SECONDS, **options)
    sock = server_config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    supervisor = Multiprocess(server_config, sockets=[sock])
    # uvicorn's supervisor answers SIGHUP by replacing every worker, and a worker being replaced
    # closes its idle keep-alive connections while clients may be sending on them: 3 of 18,466
    # requests under load were reset. Here SIGHUP means what it means with one process, "reload
    # the bundle now": it is passed on to the workers, which reload while they serve. (The
    # handler replaces the one uvicorn's supervisor installs when it is made.)
    signal.signal(signal.SIGHUP, _reload_workers)
    with contextlib.suppress(KeyboardInterrupt):
        supervisor.run()


def _reload_workers(signum: int, frame: object) -> None:
    """Pass SIGHUP on to every worker process. The supervisor's only multiprocessing children
    are uvicorn's workers (they make their own decoding pools, not it)."""
    for worker in multiprocessing.active_children():
        if worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGHUP)


def _worker_loop() -> str:
    """uvicorn's ``loop`` setting for worker processes: :class:`.accept.FairLoop` where uvloop is
    installed (``uvicorn[standard]`` brings it, except on Windows), else uvicorn's choice."""
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the platform
        return "auto"
    return _FAIR_LOOP


def _connection_limit(wanted: int) -> int:
    """``wanted`` connections per process, or fewer when the open-file limit (raised to its hard
    limit first; worker processes inherit it) leaves no room for them."""
    open_files = raise_open_file_limit()
    if open_files is None or wanted + RESERVED_FILES <= open_files:
        return wanted
    allowed = max(open_files - RESERVED_FILES, 1)
    log.warning("--max-connections %d does not fit the open-file limit of %d (ulimit -n); "
                "using %d", wanted, open_files, allowed)
    return allowed
