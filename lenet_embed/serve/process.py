"""Running the service: the worker configuration, logging, uvicorn's app factory and ``serve``.

The service runs in uvicorn with uvicorn's public settings only: a cap on concurrent connections
and requests (``limit_concurrency``: beyond it uvicorn answers 503), a keep-alive timeout, the
listen backlog, and uvicorn's own worker processes for ``--workers N``. What protects a service
that others can reach against idle and slow connections, header floods and connection floods is
nginx in front of it, with the configuration the project ships (``deploy/nginx.conf``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from ..embed import LiteRTEncoder
from ..errors import LenetEmbedError
from ..search import SearchIndex
from .app import create_app
from .auth import read_token, write_problem
from .metrics import MULTIPROCESS_ENV
from .pools import DECODE_TIMEOUT

log = logging.getLogger(__package__)

# Worker processes (``--workers N``) rebuild the app from this variable: a JSON ServiceConfig.
CONFIG_ENV = "LENET_EMBED_SERVE_CONFIG"
# What uvicorn's worker processes import; the package re-exports app_from_env under this name.
_APP_FACTORY = "lenet_embed.serve:app_from_env"
MAX_CONNECTIONS = 1000
# Open files a server process needs besides its connections: the bundle's files, pipes, logs.
RESERVED_FILES = 128
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

    Each process answers at most ``max_connections`` connections and requests at once
    (uvicorn's ``limit_concurrency``: beyond it, 503; bounded by its open-file limit, which is
    raised to the hard limit first) and gives each uploaded image ``decode_timeout`` seconds to
    decode (see :mod:`.pools`). Answers name no server folder unless ``show_sources`` (see
    :mod:`.exposure`). With ``workers`` > 1, ``GET /metrics`` adds up every worker's figures
    (see :mod:`.metrics`).
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
        log.warning("listening on %s: anyone who can reach this machine can search this index%s; "
                    "put nginx in front (deploy/nginx.conf) against slow and idle connections",
                    host, "" if token else " (writes stay off without a write token)")
    log.info("answering for Host: %s", "any" if hosts is None else ", ".join(hosts))
    connections = _connection_limit(max_connections)
    quiet_repeated_warnings()
    # proxy_headers off: nothing in the service reads the client's address, and uvicorn's
    # X-Forwarded-For middleware would otherwise run on every request.
    options: dict[str, Any] = {"host": host, "port": port, "access_log": False,
                               "proxy_headers": False,
                               "log_level": "info", "timeout_graceful_shutdown": 5,
                               "limit_concurrency": connections,
                               "backlog": BACKLOG, "timeout_keep_alive": KEEP_ALIVE}
    log.info("limits per process: %d connections, keep-alive %d s, image decoding within %g s",
             connections, KEEP_ALIVE, decode_timeout)
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
    with _metrics_folder():
        _run_workers(options, workers)


@contextlib.contextmanager
def _metrics_folder() -> Any:
    """``$PROMETHEUS_MULTIPROC_DIR`` for the workers' metrics: the caller's, or a new folder
    removed at the end (prometheus-client's multiprocess mode, see :mod:`.metrics`)."""
    if os.environ.get(MULTIPROCESS_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="lenet-embed-metrics-")
    os.environ[MULTIPROCESS_ENV] = folder
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def _run_workers(options: dict[str, Any], workers: int) -> None:
    """uvicorn's worker processes on one listening socket, until interrupted."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    # What uvicorn.run does for workers, plus TCP_NODELAY: uvicorn makes this socket without
    # IPPROTO_TCP, so asyncio leaves Nagle's algorithm on for the connections accepted from it
    # (they inherit the option) and each response's body waits ~40 ms for a delayed ACK.
    # A new worker loads the bundle before it answers uvicorn's health check: on a busy machine
    # that takes longer than uvicorn's 5 s, after which a SIGHUP restart is given up (the old
    # worker serves meanwhile, so waiting longer costs nothing).
    server_config = uvicorn.Config(_APP_FACTORY, factory=True, workers=workers,
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
    malformed or unsupported request, and once per request beyond its concurrency limit, which
    a flood would turn into a flood of lines."""
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
