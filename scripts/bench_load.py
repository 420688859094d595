"""Load benchmark: what opening a bundle costs, against a baseline tree measured in the same run.

    python scripts/bench_load.py [--data PATH] [--index-dir DIR | --model models/lenet.keras]
        [--baseline f30d9d6] [--repeats 7]

The baseline is the package as of git revision ``--baseline`` (default ``f30d9d6``, the last
commit whose loads computed the sha256 of every file), extracted with ``git archive`` into a
temporary folder. Both trees open the same bundle, each time in a fresh process (so peak RSS is
the load's own), taking turns so that a change in the machine's load hits both:

1. ``SearchIndex.load`` wall time, median of ``--repeats`` processes, and the process's peak RSS
   during the load (Linux's VmHWM, reset just before it), also less the RSS before the load (the
   modules are imported before the clock starts; the page cache is warm after the first turn,
   which is not counted);
2. the first search after the load (one digit, k=10): a load that maps files instead of reading
   them pays for touching the pages here instead;
3. ``SearchIndex.item_image``: microseconds per lookup, median over 10,000 random live ids;
4. ``inspect_bundle`` (``lenet-embed info``) and, in this tree, ``inspect_bundle(verify=True)``
   (``info --verify``, every checksum compared), in the same processes;
5. ``lenet-embed info`` and ``info --verify`` as whole commands (median of 5; Python's start-up
   and imports included).

Then the same for a bundle of ``--tiled-rows`` rows (default 1,000,000, about 1.2 GB): the first
bundle's rows repeated under new ids in one Flat segment, written directly (nothing embedded), to
show how each figure grows with the data.

Without ``--index-dir``, a Flat bundle of the 60,000 MNIST training digits is built from
``--model`` in a temporary folder first (about a minute). Exit status 0 unless the benchmark
itself could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lenet_embed import LenetEmbedError, SearchIndex, build_index, load_mnist, read_manifest
from lenet_embed.ann import make_index
from lenet_embed.cli import run_script
from lenet_embed.writer import BundleWriter

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path("models/lenet.keras")
LOOKUPS = 10_000

# Runs in a fresh process with PYTHONPATH at one tree: argv = bundle, queries.npy, verify (0/1).
CHILD = r"""
import json, sys, time
import numpy as np
import lenet_embed.embed, lenet_embed.search, lenet_embed.snapshot
try:
    import ai_edge_litert.interpreter
except ImportError:
    pass
from lenet_embed import SearchIndex
from lenet_embed.snapshot import inspect_bundle

path, queries, verify = sys.argv[1], np.load(sys.argv[2]), sys.argv[3] == "1"
def status(key):  # MB, from /proc/self/status
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # Linux: the peak RSS (VmHWM) starts again from the current RSS
before = status("VmRSS")
started = time.perf_counter()
index = SearchIndex.load(path)
load = time.perf_counter() - started
peak = status("VmHWM")
started = time.perf_counter()
index.search(queries[0], k=10).neighbors()
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
out = {"load": load, "peak_growth_mb": peak - before, "peak_rss_mb": peak,
       "first_search": first_search,
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
                           "1" if verify else "0"], capture_output=True, text=True, env=env,
                          cwd=queries.parent)  # not the repository: `-c` imports from there
    if done.returncode != 0:
        raise LenetEmbedError(f"the load in {tree} failed: "
                              f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_seconds(tree: Path, args: list[str], scratch: Path, repeats: int = 5) -> float:
    """Median wall time of ``lenet-embed ARGS`` run from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lenet_embed", *args], check=True, env=env,
                       capture_output=True, cwd=scratch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tiled_bundle(source: Path, rows: int, into: Path) -> Path:
    """A copy of ``source`` whose one segment holds ``rows`` rows: its live rows repeated under
    new ids, in a Flat index. What a load costs at that size, without embedding anything."""
    snapshot = SearchIndex.load(source).snapshot
    take = np.resize(snapshot.live_rows(), rows)
    vectors = snapshot.vectors(take)
    shutil.copytree(source, into)
    with BundleWriter(into) as writer:
        current = writer.require_current()
        segment, files = writer.new_segment(
            vectors=vectors, ids=np.arange(rows, dtype=np.int64), labels=snapshot.labels[take],
            images=snapshot.images(take), index=make_index(vectors, current.metric))
        encoder = {name: current.files[name]
                   for name in (current.encoder_path, current.litert_path)}
        writer.commit(current.next("build", segments=[segment], files={**encoder, **files},
                                   deletions=None, factory="Flat", search_params={},
                                   count=rows, rows=rows, next_id=rows))
    return into


def measure(bundle: Path, trees: dict[str, Path], queries: Path, repeats: int) -> None:
    """Every figure of one bundle, printed as a table."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for turn in range(repeats + 1):
        say(f"{bundle.name}: turn {turn + 1} of {repeats + 1}")
        for name, tree in trees.items():
            figures = child(tree, bundle, queries, verify=name == "this")
            if turn:  # the first turn warms the page cache
                runs[name].append(figures)
    say(f"{bundle.name}: timing the info commands")
    where = ["--index-dir", str(bundle)]
    commands = {"baseline": command_seconds(trees["baseline"], ["info", *where], queries.parent),
                "this": command_seconds(trees["this"], ["info", *where], queries.parent),
                "verify": command_seconds(trees["this"], ["info", "--verify", *where],
                                          queries.parent)}

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    manifest = read_manifest(bundle)
    size = sum(entry.bytes for entry in manifest.files.values())
    print(f"\n{manifest.rows:,} rows, {manifest.factory}, {size / 1e6:.1f} MB of files; median "
          f"of {repeats} fresh processes per tree, page cache warm; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| figure | baseline | this tree | this / baseline |")
    print("|---|---|---|---|")
    rows = [("1. `SearchIndex.load`", "load", 1000, "ms"),
            ("1. peak RSS during the load", "peak_rss_mb", 1, "MB"),
            ("1. peak RSS during the load - RSS before it", "peak_growth_mb", 1, "MB"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="MNIST folder or .npz (default: $LENET_EMBED_MNIST)")
    parser.add_argument("--index-dir", type=Path,
                        help="bundle to open (default: build one of the 60,000 training digits)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="classifier .keras file for the bundle built without --index-dir")
    parser.add_argument("--baseline", default="f30d9d6", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=7, help="loads per tree (median)")
    parser.add_argument("--tiled-rows", type=int, default=1_000_000,
                        help="rows of the second, tiled bundle (0: none)")
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
        print(f"baseline: {args.baseline}; this tree: {REPO}")
        measure(bundle, trees, queries, args.repeats)
        if args.tiled_rows:
            say(f"writing a bundle of {args.tiled_rows:,} rows tiled from {bundle}")
            tiled = tiled_bundle(bundle, args.tiled_rows, scratch / "tiled")
            measure(tiled, trees, queries, args.repeats)


if __name__ == "__main__":
    run_script(main)
