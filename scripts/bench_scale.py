"""Scale benchmark: what a bundle costs as it grows, for several index choices, on one machine.

    python scripts/bench_scale.py [--model PATH] [--sizes 60000,1000000]
        [--data PATH] [--work /tmp/lenet-embed-scale] [--stores flat,auto,ivfpq,milvus]
        [--backends litert] [--png scale.png]

For each size N (60,000 is MNIST's training split itself; other sizes are made once with
``scripts/make_digits.py N`` into ``--work`` and kept for the next run) and each store:

- ``flat``: ``--factory Flat`` (exact; the baseline every other row is compared with),
- ``auto``: ``--factory auto`` (what the package chooses for N, tuned to recall 0.995),
- ``ivfpq``: ``--factory IVF<4 sqrt N>,PQ42`` tuned to recall 0.9 (42 bytes a vector, not 336),
- ``milvus``: ``--store milvus`` into a Milvus Lite file, index of the FLAT family;

``lenet-embed build-index`` runs under ``/usr/bin/time`` (wall time, processor time, peak RSS)
with ``--model`` (default: none, so the shipped default model) and each ``--backends`` entry as
its ``--backend``: ``keras,litert`` builds every bundle twice, embedding with Keras (as every
build did before the default model shipped with its LiteRT export) and with LiteRT, and prints
each LiteRT build time beside the Keras one of the same run. Then a fresh process measures:
load time (``SearchIndex.load``), single-query p50/p99 (1,000 MNIST test digits' vectors, one
``search_vectors`` call each on one thread, k=10, after 100 warm-up queries), batch QPS (10,000
test vectors in one ``search_vectors`` call, two threads) and recall@10 against the Flat
bundle of the same N. Bundle size is the folder's (and the
Milvus Lite file's) bytes on disk. Prints a Markdown table and writes ``--png``: build time,
peak RSS, load time and p50 against N, log-log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lenet_embed import LenetEmbedError, load_mnist
from lenet_embed.cli import run_script
from lenet_embed.store.milvus import URI_ENV

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "lenet_embed"]
STORES = ("flat", "auto", "ivfpq", "milvus")
BACKENDS = ("keras", "litert")
K = 10

# Runs in a fresh process: argv = bundle, exact-ids.npy (or ""), out.npy for its ids.
CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from lenet_embed import SearchIndex, load_mnist
from lenet_embed.ann import set_threads
imported = time.perf_counter()
index = SearchIndex.load(sys.argv[1])
loaded = time.perf_counter()
queries = index.embed(load_mnist(sys.argv[4]).test.images)
set_threads(1)  # one query at a time: one thread, as the service searches
for vector in queries[:100]:
    index.search_vectors(vector, k=10)
single = []
for vector in queries[:1000]:
    start = time.perf_counter()
    index.search_vectors(vector, k=10).neighbors()  # the objects, as `search_vectors` made them
    single.append(time.perf_counter() - start)
set_threads(2)
start = time.perf_counter()
ids = index.search_vectors(queries, k=10).ids
batch = time.perf_counter() - start
np.save(sys.argv[3], ids)
recall = None
if sys.argv[2]:
    exact = np.load(sys.argv[2])
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))
print(json.dumps({"load_s": loaded - imported, "p50_ms": 1e3 * float(np.percentile(single, 50)),
                  "p99_ms": 1e3 * float(np.percentile(single, 99)),
                  "batch_qps": len(queries) / batch, "recall_at_10": recall}))
"""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _data_for(n: int, mnist: Path, work: Path) -> Path:
    """The IDX folder holding N training digits."""
    if n == 60_000:
        return mnist
    folder = work / f"digits-{n}"
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"making {n} digits in {folder}", flush=True)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), str(n),
                        str(folder), "--data", str(mnist)], check=True)
        (folder / "done").write_text("")
    return folder


def _build_args(store: str, n: int, bundle: Path) -> list[str]:
    if store == "flat":
        return ["--factory", "Flat"]
    if store == "auto":
        return ["--factory", "auto"]
    if store == "ivfpq":
        lists = 1 << round(math.log2(4 * math.sqrt(n)))
        return ["--factory", f"IVF{lists},PQ42", "--target-recall", "0.9"]
    return ["--store", "milvus", "--milvus-uri", str(bundle.with_suffix(".db"))]


def _timed(command: list[str]) -> tuple[float, float, float]:
    """Run ``command`` under /usr/bin/time: (wall seconds, processor seconds, peak RSS in GB).

    Processor time (user + system, every thread) is the work done: a machine that lends its cores
    to others stretches the wall-clock time of the same build, not its processor time."""
    done = subprocess.run(["/usr/bin/time", "-f", "@@ %e %U %S %M", *command],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise LenetEmbedError(f"{' '.join(command[:3])}... failed: "
                              f"{done.stderr.strip().splitlines()[-1:]}")
    wall, user, system, rss_kb = re.findall(r"@@ ([\d.]+) ([\d.]+) ([\d.]+) (\d+)",
                                            done.stderr)[-1]
    # GNU time reports KiB
    return float(wall), float(user) + float(system), int(rss_kb) * 1024 / 1e9


def measure(n: int, store: str, backend: str, args: argparse.Namespace) -> dict[str, object]:
    """Build one bundle and measure it."""
    work: Path = args.work
    bundle = work / f"n{n}-{store}-{backend}" / "index"
    shutil.rmtree(bundle.parent, ignore_errors=True)
    bundle.parent.mkdir(parents=True)
    data = _data_for(n, args.data, work)
    model = ["--model", str(args.model)] if args.model else []
    command = [*CLI, "build-index", "--data", str(data), *model, "--backend", backend,
               "--index-dir", str(bundle), *_build_args(store, n, bundle)]
    print(f"N={n} {store} ({backend}): building", flush=True)
    wall, cpu, rss = _timed(command)
    exact = work / f"n{n}-flat-{backend}" / "ids.npy"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), "" if store == "flat" else str(exact),
         str(bundle.parent / "ids.npy"), str(args.data)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                             # the Milvus Lite file beside the bundle, named
                                             URI_ENV: str(bundle.with_suffix(".db"))})
    if child.returncode != 0:
        raise LenetEmbedError(f"measuring {bundle}: {child.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    if store == "flat":
        figures["recall_at_10"] = 1.0
        (bundle.parent / "ids.npy").replace(exact)
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"n": n, "store": store, "backend": backend, "factory": manifest["factory"],
            "search_params": manifest["search_params"], "build_s": wall, "build_cpu_s": cpu,
            "peak_rss_gb": rss,
            "bytes": _size(bundle) + (_size(bundle.with_suffix(".db"))
                                      if store == "milvus" else 0), **figures}


def table(rows: list[dict[str, object]]) -> str:
    """The results as a Markdown table."""
    lines = ["| N | store | embedding | index | build s | vs keras | build processor s "
             "| vs keras | peak RSS GB | size MB | load ms | p50 ms | p99 ms | batch QPS "
             "| recall@10 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['store']} | {r['backend']} | {r['factory']} | {r['build_s']:.0f} "
            f"| {r.get('build_vs_keras', '-')} | {r['build_cpu_s']:.0f} "
            f"| {r.get('build_cpu_vs_keras', '-')} | "
            f"{r['peak_rss_gb']:.2f} | {r['bytes'] / 1e6:.0f} | {1e3 * r['load_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['batch_qps']:,.0f} | "
            f"{r['recall_at_10']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Build time, peak RSS, load time and p50 against N, one line per store, log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LenetEmbedError('the plot needs matplotlib: pip install -e ".[dev]"') from None
    panels = [("build_s", "build (s)"), ("peak_rss_gb", "peak RSS (GB)"),
              ("load_s", "load (s)"), ("p50_ms", "single query p50 (ms)")]
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    for axis, (key, title) in zip(axes, panels, strict=True):
        for store in STORES:
            for backend in BACKENDS:
                points = sorted((r["n"], r[key]) for r in rows
                                if r["store"] == store and r["backend"] == backend)
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o",
                              label=f"{store} ({backend})")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("items")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    """Parse the options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a .keras model or a model folder "
                        "(default: the shipped default model)")
    parser.add_argument("--data", type=Path, default=Path(
        os.environ.get("LENET_EMBED_MNIST", REPO.parent / "shared" / "data" / "mnist")))
    parser.add_argument("--sizes", default="60000,1000000")
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lenet-embed-scale"))
    parser.add_argument("--backends", default="litert",
                        help="build-index --backend for every bundle, comma-separated: "
                        "keras,litert compares the two")
    parser.add_argument("--png", type=Path, default=Path("scale.png"))
    args = parser.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    if "flat" not in stores or not set(stores) <= set(STORES):
        raise LenetEmbedError(f"--stores: a list from {', '.join(STORES)}, with flat (the "
                              "baseline of recall)")
    backends = [b for b in args.backends.split(",") if b]
    if not backends or not set(backends) <= set(BACKENDS):
        raise LenetEmbedError(f"--backends: a list from {', '.join(BACKENDS)}")
    load_mnist(args.data)  # one line naming the folder when MNIST is not there
    if args.model is not None and not args.model.exists():
        raise LenetEmbedError(f"{args.model}: no such model; train one with `lenet-embed train`")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for store in stores:
            for backend in backends:
                rows.append(measure(n, store, backend, args))
                baseline = [r for r in rows[:-1] if (r["n"], r["store"], r["backend"])
                            == (n, store, "keras")]
                if baseline and backend != "keras":
                    for key in ("build_s", "build_cpu_s"):
                        rows[-1][key.replace("_s", "_vs_keras")] = (
                            f"{rows[-1][key] / baseline[0][key]:.2f}x")
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    plot(rows, args.png)
    print(f"wrote {args.png} and {args.work / 'results.json'}")


if __name__ == "__main__":
    run_script(main)
