"""Load benchmark: what opening a bundle costs, against a baseline tree measured in the same run.

    python scripts/bench_load.py [--data PATH] [--index-dir DIR | --model models/lenet.keras]
        [--baseline f30d9d6] [--repeats 7]

The baseline is the package as of git revision ``--baseline`` (default ``f30d9d6``, the last
commit whose loads computed the sha256 of every file), extracted with ``git archive`` into a
temporary folder. Both trees open the same bundle, each time in a fresh process (so peak RSS is
the load's own), taking turns so that a change in the machine's load hits both:

1. ``SearchIndex.load`` wall time, median of ``--repeats`` processes, and how much the process's
   peak RSS grew during the load (the modules are imported before the clock starts; the page cache
   is warm after the first turn, which is not counted);
2. the first search after the load (one digit, k=10): a load that maps files instead of reading
   them pays for touching the pages here instead;
3. ``SearchIndex.item_image``: microseconds per lookup, median over 10,000 random live ids;
4. ``inspect_bundle`` (``lenet-embed info``) and, in this tree, ``inspect_bundle(verify=True)``
   (``info --verify``, every checksum compared), in the same processes;
5. ``lenet-embed info`` and ``info --verify`` as whole commands (median of 3; Python's start-up
   and imports included).

Without ``--index-dir``, a Flat bundle of the 60,000 MNIST training digits is built from
``--model`` in a temporary folder first (about a minute). Exit status 0 unless the benchmark
itself could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lenet_embed import LenetEmbedError, build_index, load_mnist
from lenet_embed.cli import run_script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path("models/lenet.keras")
LOOKUPS = 10_000

# Runs in a fresh process with PYTHONPATH at one tree: argv = bundle, queries.npy, verify (0/1).
CHILD = r"""
import json, resource, sys, time
import numpy as np
import lenet_embed.embed, lenet_embed.search, lenet_embed.snapshot
try:
    import ai_edge_litert.interpreter
except ImportError:
    pass
from lenet_embed import SearchIndex
from lenet_embed.snapshot import inspect_bundle

path, queries, verify = sys.argv[1], np.load(sys.argv[2]), sys.argv[3] == "1"
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak()
started = time.perf_counter()
index = SearchIndex.load(path)
load = time.perf_counter() - started
grown = peak() - before
started = time.perf_counter()
index.search(queries[0], k=10)
first_search = time.perf_counter() - started
snapshot = index.snapshot
ids = np.random.default_rng(0).choice(snapshot.ids[snapshot.live_rows()], 10_000)
lookups = []
for item_id in ids.tolist():
    started = time.perf_counter()
    index.item_image(item_id)
    lookups.append(time.perf_counter() - started)
started = time.perf_counter()
inspect_bundle(path)
inspect = time.perf_counter() - started
out = {"load": load, "rss_growth_mb": grown, "first_search": first_search,
       "lookup_us": float(np.median(lookups)) * 1e6, "inspect": inspect}
if verify:
    started = time.perf_counter()
    inspect_bundle(path, verify=True)
    out["inspect_verify"] = time.perf_counter() - started
print(json.dumps(out))
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def baseline_tree(revision: str, into: Path) -> Path:
    """The package as of ``revision``, extracted from this repository's history."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "lenet_embed"],
                             capture_output=True)
    if archive.returncode != 0:
        raise LenetEmbedError(f"git archive {revision}: {archive.stderr.decode().strip()}; give "
                              "--baseline a revision of this repository")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def child(tree: Path, bundle: Path, queries: Path, verify: bool) -> dict[str, float]:
    """One fresh process of ``tree`` opening ``bundle``: the figures of CHILD."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(queries),
                           "1" if verify else "0"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise LenetEmbedError(f"the load in {tree} failed: "
                              f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_seconds(tree: Path, args: list[str], repeats: int = 3) -> float:
    """Median wall time of ``lenet-embed ARGS`` run from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lenet_embed", *args], check=True, env=env,
                       capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="MNIST folder or .npz (default: $LENET_EMBED_MNIST)")
    parser.add_argument("--index-dir", type=Path,
                        help="bundle to open (default: build one of the 60,000 training digits)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="classifier .keras file for the bundle built without --index-dir")
    parser.add_argument("--baseline", default="f30d9d6", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=7, help="loads per tree (median)")
    args = parser.parse_args()
    dataset = load_mnist(args.data)  # first, so that a missing MNIST stops the run at once
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        scratch = Path(tmp)
        bundle = args.index_dir
        if bundle is None:
            if not args.model.is_file():
                raise LenetEmbedError(f"{args.model}: no model; train one with `lenet-embed "
                                      "train` or give --model or --index-dir")
            bundle = scratch / "index"
            say(f"building a Flat bundle of {len(dataset.train):,} digits with {args.model}")
            build_index(data=dataset, model=args.model, index_dir=bundle)
        queries = scratch / "queries.npy"
        np.save(queries, dataset.test.images[:10])
        trees = {"baseline": baseline_tree(args.baseline, scratch / "baseline"), "this": REPO}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for turn in range(args.repeats + 1):
            say(f"turn {turn + 1} of {args.repeats + 1}")
            for name, tree in trees.items():
                figures = child(tree, bundle, queries, verify=name == "this")
                if turn:  # the first turn warms the page cache
                    runs[name].append(figures)
        say("timing the info commands")
        where = ["--index-dir", str(bundle)]
        commands = {"baseline": command_seconds(trees["baseline"], ["info", *where]),
                    "this": command_seconds(REPO, ["info", *where]),
                    "verify": command_seconds(REPO, ["info", "--verify", *where])}

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    print(f"bundle {bundle} ({bundle_bytes(bundle) / 1e6:.1f} MB on disk); baseline "
          f"{args.baseline}; median of {args.repeats} fresh processes per tree, page cache "
          f"warm; load average {os.getloadavg()[0]:.2f}\n")
    print(f"| figure | baseline ({args.baseline}) | this tree | this / baseline |")
    print("|---|---|---|---|")
    rows = [("1. `SearchIndex.load`", "load", 1000, "ms"),
            ("1. peak RSS growth during the load", "rss_growth_mb", 1, "MB"),
            ("2. first search after the load (1 digit, k=10)", "first_search", 1000, "ms"),
            ("3. `item_image` per lookup (median of 10,000)", "lookup_us", 1, "µs"),
            ("4. `inspect_bundle` (`info`)", "inspect", 1000, "ms")]
    for title, key, scale, unit in rows:
        old, new = median("baseline", key) * scale, median("this", key) * scale
        print(f"| {title} | {old:.2f} {unit} | {new:.2f} {unit} | {new / max(old, 1e-9):.2f}x |")
    verify_ms = median("this", "inspect_verify") * 1000
    print(f"| 4. `inspect_bundle(verify=True)` (`info --verify`) | - | {verify_ms:.2f} ms | "
          f"{verify_ms / (median('baseline', 'inspect') * 1000):.2f}x of baseline `info` |")
    print(f"| 5. `lenet-embed info` (whole command) | {commands['baseline']:.2f} s | "
          f"{commands['this']:.2f} s | {commands['this'] / commands['baseline']:.2f}x |")
    print(f"| 5. `lenet-embed info --verify` (whole command) | - | {commands['verify']:.2f} s | "
          f"{commands['verify'] / commands['baseline']:.2f}x of baseline `info` |")


if __name__ == "__main__":
    run_script(main)
