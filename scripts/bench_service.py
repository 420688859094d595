"""Load benchmark of ``lenet-embed serve``: HTTP searches per second against in-process searches.

    python scripts/bench_service.py [--index-dir index] [--model models/lenet.keras]
        [--data PATH] [--requests 3000] [--clients 8] [--workers 1] [-k 5]

Starts the service on 127.0.0.1 (a subprocess on a free port), sends ``--requests`` single-image
searches (multipart PNG uploads of MNIST test digits, as ``curl -F file=@digit.png`` does) from
``--clients`` threads on keep-alive connections, stops the service, and prints requests/s with
p50/p99 latency next to the same searches made in-process through ``SearchIndex`` (decode the
PNG, preprocess, embed, search; one thread, one FAISS thread), so the HTTP overhead reads as a
ratio. It also prints the service's CPU time per request (Linux ``/proc``) and the load average,
because other work on the machine moves the other figures. Target on two cores: >= 500
requests/s with p99 <= 50 ms. Exits 1 when it is missed.

``--index-dir`` must hold a bundle; when it does not, a Flat bundle of the 60,000 MNIST training
digits is built into a temporary folder from ``--model``, or from a one-epoch ``seed`` model
trained there first when ``--model`` does not exist either (about 30 s on two cores).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lenet_embed import SearchIndex, build_index, load_mnist, train
from lenet_embed.cli import run_script
from lenet_embed.data import Dataset
from lenet_embed.serve.running import HOST, running_service

CLI = str(Path(sys.executable).with_name("lenet-embed"))
QUERIES = 200
WARMUP = 200
TARGET_RPS, TARGET_P99_MS = 500.0, 50.0


def serve_command(index_dir: Path, port: int, workers: int) -> list[str]:
    """``lenet-embed serve`` of ``index_dir`` on ``port`` with ``workers`` worker processes."""
    return [CLI, "serve", "--index-dir", str(index_dir), "--host", HOST, "--port", str(port),
            "--workers", str(workers)]


def ensure_bundle(index_dir: Path, model: Path, dataset: Dataset, scratch: Path) -> Path:
    """``index_dir`` when it holds a bundle; else a Flat bundle built into ``scratch``."""
    if (index_dir / "manifest.json").is_file():
        return index_dir
    if not model.exists():
        model = scratch / "lenet.keras"
        print(f"no bundle at {index_dir} and no model: training a 1-epoch seed model", flush=True)
        train(data=dataset, recipe="seed", epochs=1, seed=0, out=model, verbose=0)
    print(f"building a Flat bundle of {len(dataset.train)} digits with {model}", flush=True)
    return Path(build_index(data=dataset, model=model, index_dir=scratch / "index").path)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A 28x28 uint8 digit as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field ``file``, and its content type."""
    boundary = "lenet-embed-bench-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data + tail, f"multipart/form-data; boundary={boundary}"


def summary(latencies_s: list[float], seconds: float) -> dict[str, float]:
    """Requests/s and p50/p99 latency in milliseconds."""
    ms = np.asarray(latencies_s) * 1000
    return {"rps": len(ms) / seconds, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99))}


def in_process(index: SearchIndex, pngs: list[bytes], n: int, k: int) -> dict[str, float]:
    """The same searches through ``SearchIndex``, one after another in this thread."""
    def one(i: int) -> None:
        index.search(Image.open(io.BytesIO(pngs[i % len(pngs)])), k=k)

    for i in range(WARMUP):
        one(i)
    latencies = []
    started = time.perf_counter()
    for i in range(n):
        begun = time.perf_counter()
        one(i)
        latencies.append(time.perf_counter() - begun)
    return summary(latencies, time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its direct children (Linux ``/proc``): the
    service and, with ``--workers``, its worker processes."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def over_http(server_pid: int, port: int, bodies: list[tuple[bytes, str]], labels: list[int],
              n: int, clients: int, k: int) -> tuple[dict[str, float], float]:
    """``n`` searches from ``clients`` threads on keep-alive connections, after a warm-up;
    returns the figures (with the service's CPU milliseconds per request) and the share of
    answers predicting the digit's true label."""

    def run(count: int) -> tuple[list[float], int, float]:
        lock = threading.Lock()
        issued = [0]
        latencies: list[float] = []
        correct = [0]
        failures: list[str] = []

        def client() -> None:
            connection = http.client.HTTPConnection(HOST, port, timeout=30)
            mine, right = [], 0
            while not failures:
                with lock:
                    i = issued[0]
                    issued[0] += 1
                if i >= count:
                    break
                body, content_type = bodies[i % len(bodies)]
                begun = time.perf_counter()
                connection.request("POST", f"/v1/search?k={k}", body=body,
                                   headers={"Content-Type": content_type})
                response = connection.getresponse()
                payload = response.read()
                mine.append(time.perf_counter() - begun)
                if response.status != 200:
                    failures.append(f"HTTP {response.status}: {payload[:200]!r}")
                    break
                right += json.loads(payload)["predicted_label"] == labels[i % len(labels)]
            connection.close()
            with lock:
                latencies.extend(mine)
                correct[0] += right

        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SystemExit(f"a search failed: {failures[0]}")
        return latencies, correct[0], time.perf_counter() - started

    run(WARMUP)
    cpu_before = cpu_seconds(server_pid)
    latencies, correct, seconds = run(n)
    figures = summary(latencies, seconds)
    figures["cpu_ms"] = (cpu_seconds(server_pid) - cpu_before) / n * 1000
    return figures, correct / n


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", default="index", type=Path)
    parser.add_argument("--model", default="models/lenet.keras", type=Path)
    parser.add_argument("--data", help="MNIST folder or mnist.npz")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()

    dataset = load_mnist(args.data)
    pngs = [png_bytes(image) for image in dataset.test.images[:QUERIES]]
    labels = dataset.test.labels[:QUERIES].tolist()
    bodies = [multipart(f"test-{i}.png", data) for i, data in enumerate(pngs)]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ensure_bundle(args.index_dir, args.model, dataset, Path(tmp))
        index = SearchIndex.load(bundle, threads=1)
        baseline = in_process(index, pngs, args.requests, args.k)
        count, factory = len(index), index.manifest.factory
        del index
        with running_service(lambda port: serve_command(bundle, port, args.workers),
                             Path(tmp) / "serve.log") as service:
            load_before = os.getloadavg()[0]
            served, accuracy = over_http(service.process.pid, service.port, bodies, labels,
                                         args.requests, args.clients, args.k)
            load_after = os.getloadavg()[0]

    met = served["rps"] >= TARGET_RPS and served["p99"] <= TARGET_P99_MS
    print(f"machine: {os.cpu_count()} cores, load average {load_before:.1f} -> {load_after:.1f} "
          f"during the HTTP run; bundle: {count} items ({factory}); k={args.k}; "
          f"{args.requests} requests after {WARMUP} warm-up; predicted label right for "
          f"{accuracy:.1%} of HTTP answers\n")
    print("| path | clients | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    print(f"| in-process `SearchIndex.search` (baseline) | 1 | {baseline['rps']:,.0f} | "
          f"{baseline['p50']:.2f} | {baseline['p99']:.2f} |")
    print(f"| HTTP `POST /v1/search` (multipart PNG), {args.workers} worker(s) | {args.clients} | "
          f"{served['rps']:,.0f} | {served['p50']:.2f} | {served['p99']:.2f} |")
    print(f"\nHTTP / in-process throughput: {served['rps'] / baseline['rps']:.2f}x; the service "
          f"spent {served['cpu_ms']:.2f} ms of CPU per request (in-process: "
          f"{1000 / baseline['rps']:.2f} ms of wall time per search)")
    print(f"target >= {TARGET_RPS:.0f} requests/s with p99 <= {TARGET_P99_MS:.0f} ms: "
          f"{'met' if met else 'MISSED'}")
    if not met:
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
