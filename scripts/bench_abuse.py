"""Abuse benchmark of ``lenet-embed serve``: normal searches while other clients send the costliest
image the service accepts, and while 20,000 idle connections are held open.

    python scripts/bench_abuse.py [--index-dir index] [--model models/lenet.keras] [--data PATH]
        [--clients 8] [--heavy-clients 4] [--idle 20000] [--seconds 10] [--rounds 3] [--quick]
        [--no-nginx]

Starts the service on 127.0.0.1 (a subprocess on a free port, default limits) with nginx in front
of it (the shipped ``deploy/nginx.conf``, as a deployment others can reach runs it: the protection
against idle and slow connections is nginx's), sends every client's traffic to nginx, and runs, in
one run, three phases whose figures it prints side by side (``--no-nginx``: straight to the
service, which alone keeps idle connections open and answers 503 beyond ``--max-connections``):

1. quiet: ``--clients`` normal clients, each sending single-image searches (multipart PNG uploads
   of MNIST test digits) one after another on a keep-alive connection: the baseline;
2. the same clients while ``--heavy-clients`` more send, in a loop, the image that costs the most
   to decode among those the service accepts: a 4096x4096 JPEG 2000 (RGBA, one resolution level,
   16x8 code-blocks, about 4.5 MB; what decoding it costs in-process is measured first, as the
   baseline of what the service avoids);
3. the same normal clients while ``--idle`` connections are opened and held without sending a
   byte, by several client processes (each raising its soft open-file limit to the hard one and
   holding at most 5,000), plus one client opening a new connection for every search.

Phases 1 and 2 run ``--rounds`` times, ``--seconds`` each, in turns (quiet, heavy, heavy, quiet,
...), so that other work on the machine weighs on both alike; the flood runs once, for long enough
to open the connections.
Goals: with the heavy clients, the normal clients' p99 at most 50 ms and their throughput at
least 80 % of quiet; during the flood, every normal search answered (100 %); no response with a
5xx status other than the documented 503. Every status is counted; the service's open file
descriptors and memory (with its decode workers) are sampled. Exits 1 when a goal is missed.
``--quick``: one round of 5 s, 5,000 idle connections and a smaller JPEG 2000 (142 KB, grayscale,
about a sixth of the decoding cost), for a run of about a minute.

``--index-dir`` must hold a bundle; when it does not, a Flat bundle of the 60,000 MNIST training
digits is built into a temporary folder from ``--model`` (a one-epoch ``seed`` model is trained
there first when the default ``--model`` does not exist; a ``--model`` given but missing is an
error).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bench_service import ensure_bundle, multipart, png_bytes, serve_command
from harness.nginx import running_nginx
from harness.running import HOST, running_service
from PIL import Image, ImageDraw

from lenet_embed import load_mnist
from lenet_embed.cli import run_script
from lenet_embed.errors import LenetEmbedError

QUERIES = 200
DEFAULT_MODEL = Path("models/lenet.keras")
TARGET_P99_MS, TARGET_SHARE = 50.0, 0.80
WARMUP_SECONDS = 2.0
PER_PROCESS = 5000  # idle connections held by one flood process
MAX_REQUESTS = 1_000_000  # per client and phase: every loop is bounded in count as well as time
SAMPLE_SECONDS = 0.25


# ---------------------------------------------------------------------------- the heavy image

def heavy_image(quick: bool) -> tuple[bytes, str]:
    """The JPEG 2000 that costs the most to decode per request (a 4096x4096 digit, no
    resolution levels, small code-blocks: as slow to decode as the body limit allows), and its
    description. Encoding it takes 5-20 s."""
    side = 4096
    picture = Image.new("L", (side, side), 255)
    ImageDraw.Draw(picture).line([(side * 0.3, side * 0.2), (side * 0.7, side * 0.2),
                                  (side * 0.45, side * 0.85)], fill=0, width=side // 25)
    if quick:
        options: dict[str, object] = {"num_resolutions": 1}
        what = "grayscale, one resolution level"
    else:
        picture = picture.convert("RGBA")
        options = {"num_resolutions": 1, "codeblock_size": (16, 8)}
        what = "RGBA, one resolution level, 16x8 code-blocks"
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG2000", **options)
    data = buffer.getvalue()
    return data, f"a {side}x{side} JPEG 2000 ({what}), {len(data) / 1024:,.0f} KB"


def measure_decode(path: str) -> None:
    """``--measure-decode FILE`` (in a process of its own): what decoding an image file costs
    in-process, as the service's worker would, printed as JSON."""
    import resource

    from lenet_embed.search import Query

    def memory_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    data = Path(path).read_bytes()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # the peak so far (imports) is forgotten
    before = memory_kb("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        Query(image=data, name="heavy").pixels()
        outcome = "decoded"
    except LenetEmbedError as exc:
        outcome = str(exc)
    result = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
              "extra_rss_mb": (memory_kb("VmHWM") - before) / 1024, "outcome": outcome}
    print(json.dumps(result))


# ---------------------------------------------------------------------------- clients

class Tally:
    """Statuses, latencies and connection errors of a group of clients (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.no_retry_after = 0

    def answer(self, status: int, seconds: float, retry_after: str | None) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.latencies.append(seconds)
            self.no_retry_after += status == 503 and not retry_after

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1

    @property
    def attempts(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    def figures(self, seconds: float) -> dict[str, float]:
        ms = np.asarray(self.latencies or [float("nan")]) * 1000
        return {"rps": self.statuses[200] / seconds, "p50": float(np.percentile(ms, 50)),
                "p99": float(np.percentile(ms, 99)),
                "ok": self.statuses[200] / max(self.attempts, 1)}

    def outcomes(self) -> str:
        parts = [f"{status} x{count:,}" for status, count in sorted(self.statuses.items())]
        parts += [f"{kind} x{count:,}" for kind, count in sorted(self.errors.items())]
        return ", ".join(parts) or "none"


def client(port: int, bodies: list[tuple[bytes, str]], start: int, deadline: float, tally: Tally,
           timeout: float, fresh: bool = False) -> None:
    """Searches one after another until ``deadline``: on one keep-alive connection, or on a new
    connection each (``fresh``); a connection that fails is replaced."""
    connection: http.client.HTTPConnection | None = None
    for i in range(start, start + MAX_REQUESTS):
        if time.monotonic() >= deadline:
            break
        if connection is None:
            connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
        body, content_type = bodies[i % len(bodies)]
        begun = time.perf_counter()
        try:
            connection.request("POST", "/v1/search?k=5", body=body,
                               headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            tally.answer(response.status, time.perf_counter() - begun,
                         response.getheader("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:
            tally.error(type(exc).__name__)
            connection.close()
            connection = None
            continue
        if fresh or response.getheader("Connection", "").lower() == "close":
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


def run_clients(port: int, groups: list[tuple[int, list[tuple[bytes, str]], Tally, float, bool]],
                seconds: float) -> float:
    """Runs groups of (count, bodies, tally, timeout, fresh) clients for ``seconds``; returns the
    time the first group took (its last answers included; not the other groups' last answers,
    which can come seconds after the end)."""
    deadline = time.monotonic() + seconds
    threads = [[threading.Thread(target=client, args=(port, bodies, 7919 * n, deadline, tally,
                                                      timeout, fresh), daemon=True)
                for n in range(count)]
               for count, bodies, tally, timeout, fresh in groups]
    started = time.perf_counter()
    for group in threads:
        for thread in group:
            thread.start()
    took = seconds
    for number, group in enumerate(threads):
        for thread in group:
            thread.join(timeout=seconds + 120)
        if number == 0:
            took = time.perf_counter() - started
    return took


# ---------------------------------------------------------------------------- the service

def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``): the service, its decode workers and
    the process that forks them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo and len(tree) < 1000:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Sampler:
    """The service's open file descriptors and its process tree's memory, sampled in a thread
    until stopped (at most an hour)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_files = 0
        self.max_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        for _ in range(int(3600 / SAMPLE_SECONDS)):
            self.max_files = max(self.max_files, open_files(self.pid))
            self.max_rss = max(self.max_rss, rss_mb(process_tree(self.pid)))
            if self._stop.wait(SAMPLE_SECONDS):
                return


# ---------------------------------------------------------------------------- the idle flood

def raise_open_file_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def hold_idle(port: int, count: int, seconds: float) -> None:
    """``--idle-worker PORT COUNT SECONDS`` (a process of its own): open ``count`` connections
    that never send a byte (for at most the first three quarters of ``seconds``), hold them to
    the end of ``seconds``, and print as JSON how many opened, failed, and were closed by the
    server (and how long after opening)."""
    limit = raise_open_file_limit()
    count = min(count, limit - 64)
    began = time.monotonic()
    stop_opening, deadline = began + 0.75 * seconds, began + seconds
    selector = selectors.DefaultSelector()
    failed: Counter[str] = Counter()
    opened_at: dict[socket.socket, float] = {}
    closed: list[float] = []  # how long each lived
    answered = 0

    def watch(timeout: float) -> None:
        nonlocal answered
        for key, _events in selector.select(timeout=timeout):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                answered += 1  # a refusal written before closing
                continue
            closed.append(time.monotonic() - opened_at[sock])
            selector.unregister(sock)
            sock.close()

    for number in range(count):
        if time.monotonic() >= stop_opening:
            break
        sock = socket.socket()
        sock.settimeout(5)
        try:
            sock.connect((HOST, port))
        except OSError as exc:
            failed[type(exc).__name__] += 1
            sock.close()
            continue
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        opened_at[sock] = time.monotonic()
        if number % 100 == 99:
            watch(0)
    open_seconds = time.monotonic() - began
    for _ in range(int(seconds / 0.05) + 1):
        if time.monotonic() >= deadline or not selector.get_map():
            break
        watch(0.05)
    still_open = len(selector.get_map())
    for sock in opened_at:
        sock.close()
    print(json.dumps({"opened": len(opened_at), "failed": dict(failed), "closed": len(closed),
                      "answered": answered, "still_open": still_open,
                      "open_seconds": open_seconds,
                      "median_lifetime_s": float(np.median(closed)) if closed else None}))


def flood(port: int, idle: int, seconds: float) -> list[subprocess.Popen[str]]:
    """Processes holding ``idle`` idle connections between them, at most PER_PROCESS each."""
    processes = []
    for first in range(0, idle, PER_PROCESS):
        count = min(PER_PROCESS, idle - first)
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--idle-worker", str(port), str(count), str(seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def flood_reports(processes: list[subprocess.Popen[str]], seconds: float) -> list[dict]:
    reports = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        lines = out.strip().splitlines()
        if process.returncode != 0 or not lines:
            raise LenetEmbedError(f"an idle-connection process failed: "
                                  f"{(err.strip().splitlines() or ['no output'])[-1]}")
        reports.append(json.loads(lines[-1]))
    return reports


# ---------------------------------------------------------------------------- the run

@dataclass
class Phase:
    """What the clients of one phase saw, over its rounds, and the service's peaks."""

    normal: Tally = field(default_factory=Tally)
    heavy: Tally = field(default_factory=Tally)
    fresh: Tally = field(default_factory=Tally)
    seconds: float = 0.0
    max_files: int = 0
    max_rss: float = 0.0
    flood: list[dict] = field(default_factory=list)
    round_rps: list[float] = field(default_factory=list)


def idle_seconds(args: argparse.Namespace) -> float:
    """The flood's length: time to open the connections (the service accepts a few thousand a
    second on two cores) and to hold them."""
    return max(args.seconds, args.idle / 1000)


def run_phase(name: str, phase: Phase, port: int, server_pid: int, args: argparse.Namespace,
              bodies: list[tuple[bytes, str]], heavy_bodies: list[tuple[bytes, str]]) -> None:
    """One round of a phase: the normal clients, plus the heavy clients or the idle flood."""
    groups = [(args.clients, bodies, phase.normal, 10.0, False)]
    processes: list[subprocess.Popen[str]] = []
    if name == "heavy":
        groups.append((args.heavy_clients, heavy_bodies, phase.heavy, 60.0, False))
    seconds = args.seconds
    if name == "idle":
        seconds = idle_seconds(args)
        processes = flood(port, args.idle, seconds)
        groups.append((1, bodies, phase.fresh, 10.0, True))
    print(f"phase: {name} ({seconds:g} s)", flush=True)
    answered = phase.normal.statuses[200]
    try:
        with Sampler(server_pid) as sampler:
            took = run_clients(port, groups, seconds)
            phase.flood += flood_reports(processes, seconds)
        phase.seconds += took
        phase.round_rps.append((phase.normal.statuses[200] - answered) / took)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    phase.max_files = max(phase.max_files, sampler.max_files)
    phase.max_rss = max(phase.max_rss, sampler.max_rss)


def main() -> int:
    """Command-line entry point."""
    if len(sys.argv) == 5 and sys.argv[1] == "--idle-worker":
        hold_idle(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-decode":
        measure_decode(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", default="index", type=Path)
    parser.add_argument("--model", type=Path,
                        help=f"model to build a bundle with (default {DEFAULT_MODEL})")
    parser.add_argument("--data", help="MNIST folder or mnist.npz")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--heavy-clients", type=int, default=4)
    parser.add_argument("--idle", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a phase's round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="quiet and heavy rounds, taken in turns")
    parser.add_argument("--quick", action="store_true",
                        help="one round of 5 s, 5,000 idle connections, a smaller JPEG 2000")
    parser.add_argument("--no-nginx", dest="nginx", action="store_false",
                        help="send the traffic straight to the service, without nginx")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.idle, args.rounds = min(args.seconds, 5.0), min(args.idle, 5000), 1
    if args.model is not None and not args.model.exists() \
            and not (args.index_dir / "manifest.json").is_file():
        raise LenetEmbedError(f"{args.model}: no such model; train one with lenet-embed train, "
                              f"or give --index-dir a bundle")

    dataset = load_mnist(args.data)
    pngs = [png_bytes(image) for image in dataset.test.images[:QUERIES]]
    bodies = [multipart(f"test-{i}.png", data) for i, data in enumerate(pngs)]
    print("encoding the heavy image (5-20 s)", flush=True)
    heavy, heavy_what = heavy_image(args.quick)
    heavy_bodies = [multipart("heavy.jp2", heavy)]

    with tempfile.TemporaryDirectory() as tmp:
        heavy_path = Path(tmp) / "heavy.jp2"
        heavy_path.write_bytes(heavy)
        decode = json.loads(subprocess.run(
            [sys.executable, __file__, "--measure-decode", str(heavy_path)],
            capture_output=True, text=True, timeout=600, check=True).stdout.splitlines()[-1])
        bundle = ensure_bundle(args.index_dir, args.model or DEFAULT_MODEL, dataset, Path(tmp))
        log_path = Path(tmp) / "serve.log"
        phases = {name: Phase() for name in ("quiet", "heavy", "idle")}
        with running_service(lambda port: serve_command(bundle, port, 1), log_path) as service, \
                contextlib.ExitStack() as stack:
            port = service.port
            if args.nginx:  # room for the flood, the clients and nginx's own to the service
                url = stack.enter_context(running_nginx(
                    [service.port], Path(tmp) / "nginx", worker_connections=args.idle + 2048))
                port = int(url.rsplit(":", 1)[1])
            load_before = os.getloadavg()[0]
            run_clients(port, [(args.clients, bodies, Tally(), 10.0, False)], WARMUP_SECONDS)
            # Quiet and heavy rounds in turns, ABBA (quiet, heavy, heavy, quiet, ...), so that
            # other work on the machine, even when it grows or shrinks, weighs on both alike;
            # the flood last.
            order = [["quiet", "heavy"], ["heavy", "quiet"]]
            for name in [n for r in range(args.rounds) for n in order[r % 2]] + ["idle"]:
                run_phase(name, phases[name], port, service.process.pid, args, bodies,
                          heavy_bodies)
            load_after = os.getloadavg()[0]
        log = log_path.read_text()
    return report(args, phases, decode, heavy_what, load_before, load_after, log)


def report(args: argparse.Namespace, phases: dict[str, Phase], decode: dict, heavy_what: str,
           load_before: float, load_after: float, log: str) -> int:
    """Prints the table and the goals; 1 when a goal is missed."""
    figures = {name: phase.normal.figures(phase.seconds) for name, phase in phases.items()}
    quiet = figures["quiet"]
    print(f"\nmachine: {os.cpu_count()} cores, load average {load_before:.1f} -> "
          f"{load_after:.1f}; service: lenet-embed serve, 1 worker, default limits"
          f"{', behind nginx (deploy/nginx.conf)' if args.nginx else ', no nginx'}; quiet and "
          f"heavy: {args.rounds} round(s) of {args.seconds:g} s each, in turns; flood: "
          f"{idle_seconds(args):g} s (connections opened in the first three quarters)")
    print(f"heaviest accepted image: {heavy_what}; decoding it in-process costs "
          f"{decode['cpu_s']:.1f} s of CPU ({decode['wall_s']:.1f} s) and "
          f"{decode['extra_rss_mb']:,.0f} MB (measured now, in a process of its own)\n")
    print(f"| phase | {args.clients} normal clients: searches/s | vs quiet | p50 ms | p99 ms | "
          "answered 200 | other outcomes |")
    print("|---|---|---|---|---|---|---|")
    names = {"quiet": "quiet (baseline)",
             "heavy": f"+ {args.heavy_clients} clients sending the heavy image in a loop",
             "idle": f"+ {args.idle:,} idle connections opened and held"}
    for name, row in figures.items():
        tally = phases[name].normal
        others = [f"{status} x{count:,}" for status, count in sorted(tally.statuses.items())
                  if status != 200]
        others += [f"{kind} x{count:,}" for kind, count in sorted(tally.errors.items())]
        print(f"| {names[name]} | {row['rps']:,.0f} | {row['rps'] / quiet['rps']:.0%} | "
              f"{row['p50']:.1f} | {row['p99']:.1f} | {row['ok']:.2%} | "
              f"{', '.join(others) or 'none'} |")

    print("\nsearches/s of the normal clients in each round: " + "; ".join(
        f"{name} " + ", ".join(f"{rps:,.0f}" for rps in phase.round_rps)
        for name, phase in phases.items()))
    heavy = phases["heavy"].heavy
    heavy_ms = heavy.figures(phases["heavy"].seconds)
    print(f"heavy-image clients: {heavy.attempts:,} requests: {heavy.outcomes()}; "
          f"p50 {heavy_ms['p50'] / 1000:.1f} s; 503s without Retry-After: {heavy.no_retry_after}")
    print("service peaks (its process, forkserver and decode workers): memory "
          + ", ".join(f"{phase.max_rss:,.0f} MB ({name})" for name, phase in phases.items())
          + "; open file descriptors "
          + ", ".join(f"{phase.max_files:,} ({name})" for name, phase in phases.items()))
    reports = phases["idle"].flood
    failed: Counter[str] = Counter()
    for one in reports:
        failed.update(one["failed"])
    lifetimes = [one["median_lifetime_s"] for one in reports
                 if one["median_lifetime_s"] is not None]
    opening = max((one["open_seconds"] for one in reports), default=0.0)
    print(f"idle connections: {sum(one['opened'] for one in reports):,} opened by "
          f"{len(reports)} processes in {opening:.1f} s"
          f" ({sum(failed.values()):,} failed{': ' + str(dict(failed)) if failed else ''}); "
          f"the service closed {sum(one['closed'] for one in reports):,} of them while they were "
          f"held (median {float(np.median(lifetimes)) if lifetimes else float('nan'):.1f} s "
          f"after opening), {sum(one['still_open'] for one in reports):,} were still open at the "
          f"end, {sum(one['answered'] for one in reports):,} were answered 503 first")
    fresh = phases["idle"].fresh
    fresh_ms = fresh.figures(phases["idle"].seconds)
    print(f"a client opening a new connection for each search during the flood: "
          f"{fresh.attempts:,} searches, {fresh_ms['ok']:.2%} answered 200, p99 "
          f"{fresh_ms['p99']:.1f} ms ({fresh.outcomes()})")
    overload = [line for line in log.splitlines() if line.startswith(
        ("connection limit", "decode queue", "decode budget", "warning", "WARNING"))]
    print(f"the service's overload log ({len(overload)} lines):")
    for line in overload[:12]:
        print(f"    {line}")
    every: Counter[int] = Counter()
    for phase in phases.values():
        for tally in (phase.normal, phase.heavy, phase.fresh):
            every.update(tally.statuses)
    bad = sum(count for status, count in every.items() if status >= 500 and status != 503)
    print("every response: " + ", ".join(f"{s} x{c:,}" for s, c in sorted(every.items()))
          + f"; 5xx other than 503: {bad}; tracebacks in the log: {log.count('Traceback')}")

    heavy_row, idle_row = figures["heavy"], figures["idle"]
    goals = [
        (f"p99 <= {TARGET_P99_MS:.0f} ms with heavy clients", heavy_row["p99"] <= TARGET_P99_MS),
        (f"throughput >= {TARGET_SHARE:.0%} of quiet with heavy clients",
         heavy_row["rps"] >= TARGET_SHARE * quiet["rps"]),
        ("100 % answered during the flood", idle_row["ok"] == 1.0),
        ("no 5xx but 503", bad == 0 and not heavy.no_retry_after),
    ]
    print("goals: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in goals))
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    run_script(main)
