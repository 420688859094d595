"""The service's app under each ASGI server installed here (uvicorn, hypercorn, granian).

uvicorn is what ``lenet-embed serve`` runs; each server gets one worker and the same searches.

    python scripts/bench_servers.py [--index-dir index] [--model models/lenet.keras]
        [--data PATH] [--requests 2000] [--clients 8] [-k 5]

Each server runs the app from :func:`lenet_embed.serve.app_from_env` as a subprocess on a free
loopback port and gets ``--requests`` single-image searches (multipart PNG uploads of MNIST test
digits) on ``--clients`` keep-alive connections after a warm-up, as ``bench_service.py`` sends
them. Printed per server: requests/s, p50/p99 latency and the server's CPU milliseconds per
request (its process and children, Linux ``/proc``), the figure other work on a shared machine
moves least; uvicorn's row is the baseline of the same run. A server that is not installed is
listed as such (hypercorn and granian are not dependencies of the project:
``pip install hypercorn granian`` to compare them). The servers run in turns, twice each, so that
other work on the machine weighs on all alike.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from bench_service import WARMUP, ensure_bundle, load_arguments, multipart, over_http, png_bytes
from harness.running import HOST, running_service

from lenet_embed import load_mnist
from lenet_embed.cli import run_script
from lenet_embed.serve import CONFIG_ENV, ServiceConfig

QUERIES = 200
APP = "lenet_embed.serve:app_from_env"


def commands(port: int) -> dict[str, list[str]]:
    """Each server's command for the app on ``port``, with the settings ``serve`` gives uvicorn
    where the server has them (no access log, keep-alive 5 s)."""
    python = sys.executable
    return {
        "uvicorn": [python, "-m", "uvicorn", "--factory", APP, "--host", HOST, "--port",
                    str(port), "--no-access-log", "--timeout-keep-alive", "5",
                    "--limit-concurrency", "1000", "--no-proxy-headers"],
        # In its own process: hypercorn's worker processes are daemonic, which may not start
        # the decode pool's processes.
        "hypercorn": [python, "-m", "hypercorn", "--workers", "0", "--bind", f"{HOST}:{port}",
                      "--keep-alive", "5", f"{APP}()"],
        "granian": [python, "-m", "granian", "--interface", "asgi", "--factory", "--host", HOST,
                    "--port", str(port), "--workers", "1", "--http", "1", "--no-ws", APP],
    }


def main() -> None:
    """Command-line entry point."""
    args = load_arguments(__doc__, requests=2000).parse_args()

    dataset = load_mnist(args.data)
    pngs = [png_bytes(image) for image in dataset.test.images[:QUERIES]]
    labels = dataset.test.labels[:QUERIES].tolist()
    bodies = [multipart(f"test-{i}.png", data) for i, data in enumerate(pngs)]
    installed = [name for name in commands(0) if importlib.util.find_spec(name) is not None]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in installed}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ensure_bundle(args.index_dir, args.model, dataset, Path(tmp))
        os.environ[CONFIG_ENV] = ServiceConfig(index_dir=str(bundle.resolve())).to_json()
        for name in installed + installed[::-1]:
            with running_service(lambda port, name=name: commands(port)[name],
                                 Path(tmp) / f"{name}.log") as service:
                figures, _ = over_http(service.process.pid, service.port, bodies, labels,
                                       args.requests, args.clients, args.k)
                results[name].append(figures)
    print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{args.requests} requests after {WARMUP} warm-up, {args.clients} clients, twice per "
          "server in turns (the better run shown)\n")
    print("| server | requests/s | p50 ms | p99 ms | server CPU ms/request | vs uvicorn |")
    print("|---|---|---|---|---|---|")
    base = max(results["uvicorn"], key=lambda f: f["rps"]) if "uvicorn" in results else None
    for name in commands(0):
        if name not in results:
            print(f"| {name} | not installed | | | | |")
            continue
        best = max(results[name], key=lambda f: f["rps"])
        ratio = f"{best['rps'] / base['rps']:.2f}x" if base else "-"
        print(f"| {name}{' (baseline)' if name == 'uvicorn' else ''} | {best['rps']:,.0f} | "
              f"{best['p50']:.2f} | {best['p99']:.2f} | {best['cpu_ms']:.2f} | {ratio} |")


if __name__ == "__main__":
    run_script(main)
