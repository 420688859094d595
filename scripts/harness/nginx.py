"""nginx in front of a service, as the tests and benchmarks run it: the shipped
``deploy/nginx.conf`` with its two addresses set to loopback ports, included from a small main
configuration in a folder of its own (pid file, logs, temporary files), started in the foreground
and stopped when the block ends.

The rendering is the one the configuration's header documents: the lines marked ``ADDRESS`` are
the only ones that change, each replaced exactly once (a configuration whose marked lines moved
is an error here, not a silent fallback to the shipped addresses)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from lenet_embed.errors import LenetEmbedError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "nginx.conf"
UPSTREAM_LINE = "server 127.0.0.1:8000;"
LISTEN_LINE = "listen 127.0.0.1:8080 reuseport;"
HOST = "127.0.0.1"


def nginx_binary() -> str | None:
    """The nginx program (Debian's ``nginx`` package puts it in /usr/sbin), or None."""
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)),
        None)


def render(listen_port: int, upstream_ports: list[int], folder: Path,
           worker_connections: int = 1024) -> Path:
    """The shipped configuration for these ports, and a main configuration including it, in
    ``folder``; returns the main configuration's path. Each of nginx's 2 workers holds at most
    ``worker_connections`` connections (clients' and the service's)."""
    text = CONFIG.read_text()
    for line in (UPSTREAM_LINE, LISTEN_LINE):
        if text.count(line) != 1:
            raise LenetEmbedError(f"{CONFIG}: expected the line '{line}' exactly once")
    servers = "\n    ".join(f"server {HOST}:{port};" for port in upstream_ports)
    text = text.replace(UPSTREAM_LINE, servers).replace(
        LISTEN_LINE, f"listen {HOST}:{listen_port} reuseport;")
    site = folder / "lenet-embed.conf"
    site.write_text(text)
    temp = {name: folder / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    # As root, nginx's workers would run as nobody, who cannot reach a private temporary folder.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    main = folder / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 2;\nworker_rlimit_nofile {2 * worker_connections + 64};\n"
        f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
        f"daemon off;\nevents {{\n    worker_connections {worker_connections};\n}}\nhttp {{\n"
        f"    access_log {folder}/access.log;\n"
        f"    client_body_temp_path {temp['body']};\n    proxy_temp_path {temp['proxy']};\n"
        f"    fastcgi_temp_path {temp['fastcgi']};\n    uwsgi_temp_path {temp['uwsgi']};\n"
        f"    scgi_temp_path {temp['scgi']};\n    include {site};\n}}\n")
    return main


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_nginx(upstream_ports: list[int], folder: Path, timeout: float = 20.0,
                  worker_connections: int = 1024) -> Iterator[str]:
    """nginx with the shipped configuration in front of the services on ``upstream_ports``;
    yields its base URL once it accepts connections, and stops it when the block ends."""
    binary = nginx_binary()
    if binary is None:
        raise LenetEmbedError("nginx is not installed; install it (Debian: apt-get install nginx)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    main = render(port, upstream_ports, folder, worker_connections)
    command = [binary, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(main)]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True)
    if check.returncode != 0:
        raise LenetEmbedError(f"nginx refused {main}: {check.stderr.strip()}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise LenetEmbedError(f"nginx did not start; see {folder / 'error.log'}")
            time.sleep(0.05)
        yield f"http://{HOST}:{port}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
