"""Recall and speed of search as items are removed, for Flat, HNSW and IVF bundles.

    python scripts/bench_removed.py [--data PATH] [--model models/lenet.keras] [--items 60000]
        [--queries 500] [--factories Flat,HNSW32,IVF256,Flat] [--quick]

For each factory a bundle of the first ``--items`` MNIST training digits is built; then ever more
of its items are removed, at random (0, 50, 70, 90 and 95 %), and at each share the same
``--queries`` MNIST test digits are searched for k=10. recall@10 is measured against exact search
over the live items, two ways in the same run:

- baseline: today's method before this change, the sealed index searched with an
  ``IDSelectorBitmap`` at its tuned ``efSearch`` (IVF: ``nprobe`` scaled by the live share);
- new: ``SearchIndex.search_vectors``, what the package does now.

Each also gets its search time per query (one thread, the queries in one batch), beside the time
of the same queries on a compacted copy at that share: how much ``compact`` would win back. Missing
the 0.99 goal is a measurement, not a failure: the exit status is 0 unless the benchmark itself
could not run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lenet_embed import SearchIndex, build_index, load_mnist, train
from lenet_embed.ann import exact_search, prepare_vectors, set_threads
from lenet_embed.cli import run_script
from lenet_embed.data import Dataset, LabeledImages
from lenet_embed.metrics import recall_at_k
from lenet_embed.store.faiss import FaissSnapshot as Snapshot

K = 10
SHARES = (0.0, 0.5, 0.7, 0.9, 0.95)
GOAL = 0.99
DEFAULT_MODEL = Path("models/lenet.keras")


def say(message: str) -> None:
    """Progress on stderr, so stdout holds the results."""
    print(message, file=sys.stderr, flush=True)


def baseline_search(snapshot: Snapshot, vectors: np.ndarray, k: int) -> np.ndarray:
    """Rows found by the filtered search as it was before this change (one sealed segment):
    the tuned efSearch whatever the share removed; IVF's nprobe scaled by the live share."""
    part = snapshot._parts[0]  # noqa: SLF001 - the benchmark compares against the old method
    index, live = part["segment"].index, part["live"]
    if not part["removed"]:
        return index.search(vectors, k)[1]
    if isinstance(index, faiss.IndexHNSW):
        params: Any = faiss.SearchParametersHNSW()
        params.efSearch = index.hnsw.efSearch
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(index.nlist, math.ceil(index.nprobe / (part["live_count"]
                                                                  / len(live))))
    else:
        params = faiss.SearchParameters()
    params.sel = part["selector"]
    return index.search(vectors, k, params=params)[1]


def timed(search: Any, repeats: int = 3) -> tuple[Any, float]:
    """``search()``'s result and its best wall time of ``repeats`` runs, in seconds."""
    best, result = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        result = search()
        best = min(best, time.perf_counter() - started)
    return result, best


def measure(bundle: Path, scratch: Path, queries: np.ndarray, shares: tuple[float, ...],
            seed: int) -> list[dict[str, Any]]:
    """Remove ever more items at random; at each share, recall@10 and time per query of the
    baseline and the new search, and the time per query after a compaction."""
    index = SearchIndex.load(bundle, threads=1)
    vectors = prepare_vectors(index.embed(queries), index.metric)
    order = np.random.default_rng(seed).permutation(index.snapshot.ids)
    total, removed, rows = len(order), 0, []
    for share in shares:
        goal = round(share * total)
        if goal > removed:
            index.remove(order[removed:goal])
            removed = goal
        snapshot = index.snapshot
        live = snapshot.live_rows()
        exact = live[exact_search(snapshot.vectors(live), vectors, snapshot.metric, K)]
        old, old_seconds = timed(lambda s=snapshot: baseline_search(s, vectors, K))
        new, new_seconds = timed(lambda: index.search_vectors(vectors, K).ids)
        new_rows = np.searchsorted(snapshot.ids, new)
        copy = scratch / f"compacted-{share}"
        shutil.copytree(bundle, copy)
        compacted = SearchIndex.load(copy, threads=1)
        compacted.compact()
        _, compact_seconds = timed(lambda c=compacted: c.search_vectors(vectors, K))
        shutil.rmtree(copy)
        per_query = 1000 / len(vectors)
        rows.append({"share": share, "live": len(live),
                     "baseline": recall_at_k(old, exact, K), "new": recall_at_k(new_rows, exact, K),
                     "baseline_ms": old_seconds * per_query, "new_ms": new_seconds * per_query,
                     "compacted_ms": compact_seconds * per_query})
        say(f"    {share:.0%} removed: recall {rows[-1]['baseline']:.4f} -> {rows[-1]['new']:.4f}")
    return rows


def ensure_model(model: Path | None, dataset: Dataset, scratch: Path) -> Path:
    """``--model``, else ``models/lenet.keras``, else a one-epoch seed model trained here."""
    if model is not None:
        return model
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL
    out = scratch / "lenet.keras"
    say("no --model and no models/lenet.keras: training a 1-epoch seed model on 10,000 digits")
    train(dataset.head(10_000, 1_000), recipe="seed", epochs=1, seed=1, verbose=0, out=out)
    return out


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder or mnist.npz (default: $LENET_EMBED_MNIST)")
    parser.add_argument("--model", type=Path, help="classifier .keras file")
    parser.add_argument("--items", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--factories", default="Flat;HNSW32;IVF256,Flat",
                        help="FAISS factories separated by ';'")
    parser.add_argument("--quick", action="store_true", help="10,000 items, 200 queries")
    args = parser.parse_args()
    items, n_queries = (10_000, 200) if args.quick else (args.items, args.queries)
    set_threads(1)
    dataset = load_mnist(args.data)
    print(f"| factory | removed | live | recall@10 baseline | new | ms/query baseline | new "
          f"| compacted | goal >= {GOAL} |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-removed-") as tmp:
        scratch = Path(tmp)
        model = ensure_model(args.model, dataset, scratch)
        subset = Dataset(LabeledImages(dataset.train.images[:items],
                                       dataset.train.labels[:items]),
                         dataset.test.head(1_000), f"{dataset.source} train[:{items}]")
        for factory in args.factories.split(";"):
            say(f"building a {factory} bundle of {items:,} digits")
            bundle = scratch / factory.replace(",", "_")
            built = build_index(data=subset, model=model, index_dir=bundle, factory=factory)
            say(f"    {built.manifest.factory_reason}")
            for row in measure(bundle, scratch, dataset.test.images[1_000:1_000 + n_queries],
                               SHARES, seed=1):
                met = "yes" if row["new"] >= GOAL else "**NO**"
                print(f"| {factory} | {row['share']:.0%} | {row['live']:,} | "
                      f"{row['baseline']:.4f} | {row['new']:.4f} | {row['baseline_ms']:.3f} | "
                      f"{row['new_ms']:.3f} | {row['compacted_ms']:.3f} | {met} |", flush=True)
            shutil.rmtree(bundle)


if __name__ == "__main__":
    run_script(main)
