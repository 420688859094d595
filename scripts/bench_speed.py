"""Query-path speed against its baselines, every figure measured in this one run.

    python scripts/bench_speed.py [--data PATH] [--model models/lenet.keras] [--repeats 5]

Builds two bundles from the model over the 60,000 MNIST training digits into a temporary folder:
the default (``--factory auto``, target recall@10 0.995) and exact Flat, then prints one table;
each figure sits next to its baseline and the target it must meet:

- cold ``lenet-embed query one.png`` wall time vs ``python -c "import tensorflow"``: <= 0.25x;
- warm ``SearchIndex.search(path)`` p50 and p99, decode + preprocess + embed + search, on the
  ``auto`` bundle vs the Flat bundle and vs Keras ``predict`` on one image: p50 <= 0.5 ms and
  >= 50x faster than Keras, with recall@10 >= 0.995 against exact search on the 10,000 test
  digits (and on the 5,000 of them the build did not tune on);
- where that time goes: preprocessing, embedding, the search (``search_vectors``) and the result
  objects, each timed alone;
- exact search of one query over 10,000 and 60,000 vectors (FAISS alone): why ``auto`` keeps
  Flat up to 10,000 vectors;
- embedding 10,000 images (LiteRT) vs Keras ``predict(batch_size=1024)``: >= 1.0x;
- batch search of the 10,000 test vectors, k=10, on each bundle: raw FAISS QPS (prepared queries
  straight into the index) beside the API's arrays (``search_vectors``, >= 0.8x raw) and
  objects (its ``neighbors()``, reported); the auto index vs Flat exact: >= 5x;
- ``build-index`` on 60,000 digits with an existing model, both bundles: seconds (reported).

The model is trained first (default recipe) when ``--model`` does not exist. Exits 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from lenet_embed import SearchIndex, build_index, load_mnist, train
from lenet_embed.ann import FLAT_MAX_COUNT, exact_search, prepare_vectors
from lenet_embed.build import TUNING_QUERIES
from lenet_embed.cli import run_script
from lenet_embed.embed import KerasEncoder
from lenet_embed.metrics import recall_at_k
from lenet_embed.preprocess import scale_pixels, to_batch

CLI = str(Path(sys.executable).with_name("lenet-embed"))


def wall(command: list[str], repeats: int) -> float:
    """Median wall time of ``repeats`` runs of a command, after one warm-up run."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def latency_ms(call: Callable[[], object], n: int) -> tuple[float, float]:
    """p50 and p99 latency of ``call`` in milliseconds over ``n`` calls, after 20 warm-up calls."""
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    p50, p99 = np.percentile(times, [50, 99]) * 1000
    return float(p50), float(p99)


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed runs (after one warm-up)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder or mnist.npz")
    parser.add_argument("--model", default="models/lenet.keras")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    dataset = load_mnist(args.data)
    if not Path(args.model).exists():
        print(f"training {args.model} with the default recipe first", file=sys.stderr)
        train(data=dataset, out=args.model, verbose=0)
    rows: list[tuple[str, str, str, str, bool | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        flat_dir, auto_dir = Path(tmp) / "flat", Path(tmp) / "auto"
        started = time.perf_counter()
        build_index(data=dataset, model=args.model, index_dir=flat_dir, factory="Flat")
        flat_build = time.perf_counter() - started
        started = time.perf_counter()
        build_index(data=dataset, model=args.model, index_dir=auto_dir)
        auto_build = time.perf_counter() - started
        one_png = Path(tmp) / "one.png"
        Image.fromarray(dataset.test.images[0]).save(one_png)

        import_tf = wall([sys.executable, "-c", "import tensorflow"], args.repeats)
        cold_query = wall([CLI, "query", str(one_png), "--index-dir", str(auto_dir)],
                          args.repeats)
        ratio = cold_query / import_tf
        rows.append(("cold `lenet-embed query one.png`", f"{cold_query:.3f} s",
                     f"`import tensorflow` {import_tf:.3f} s", f"{ratio:.3f}x (<= 0.25x)",
                     ratio <= 0.25))

        flat = SearchIndex.load(flat_dir)
        auto = SearchIndex.load(auto_dir)
        manifest = auto.manifest
        name = manifest.factory + "".join(
            f", {key} {value}" for key, value in auto.search_params.items())
        print(f"auto chose: {manifest.factory_reason}", file=sys.stderr)

        # Recall of the auto bundle through the API, against exact search over what it holds.
        test_pixels = scale_pixels(dataset.test.images)
        vectors = flat.encoder.embed(test_pixels)
        indexed = np.asarray(flat.snapshot.segments[0].vectors)
        exact = exact_search(indexed, vectors, "cosine", 10)
        found = auto.search_vectors(vectors, k=10).ids  # ids are rows in a fresh build
        recall = recall_at_k(found, exact, 10)
        untuned = recall_at_k(found[TUNING_QUERIES:], exact[TUNING_QUERIES:], 10)

        keras_encoder = KerasEncoder.load(flat.path / flat.manifest.encoder_path)
        one = scale_pixels(dataset.test.images[:1])[..., None]
        keras_one, _ = latency_ms(lambda: keras_encoder.model.predict(one, verbose=0), 200)
        flat_p50, flat_p99 = latency_ms(lambda: flat.search(one_png, k=5), 2000)
        auto_p50, auto_p99 = latency_ms(lambda: auto.search(one_png, k=5), 2000)
        speedup = keras_one / auto_p50
        met = auto_p50 <= 0.5 and speedup >= 50 and recall >= 0.995 and untuned >= 0.995
        rows.append((f"warm `SearchIndex.search(one.png)` p50 / p99, auto bundle ({name}; "
                     f"recall@10 {recall:.4f}, {untuned:.4f} on the 5,000 not tuned on)",
                     f"{auto_p50:.3f} / {auto_p99:.3f} ms",
                     f"Flat bundle {flat_p50:.3f} / {flat_p99:.3f} ms; Keras `predict` 1 image "
                     f"{keras_one:.2f} ms",
                     f"{flat_p50 / auto_p50:.1f}x Flat, {speedup:.0f}x Keras (p50 <= 0.5 ms, "
                     ">= 50x, recall >= 0.995)", met))

        # Where the time of one search(one.png) goes, each stage alone on the auto bundle.
        pixels = to_batch(one_png)
        one_vector = auto.encoder.embed(pixels)
        stages = {
            "preprocess (decode, to MNIST)": lambda: to_batch(one_png),
            "embed (LiteRT)": lambda: auto.encoder.embed(pixels),
            # Titles kept from before Results (scripts/compare.py joins rows by them): arrays
            # are `search_vectors` now, the objects its `neighbors()`.
            "search (`search_vectors_arrays`)": lambda: auto.search_vectors(one_vector, 5),
            "search + result objects (`search_vectors`)": lambda: auto.search_vectors(
                one_vector, 5).neighbors(),
        }
        for stage, call in stages.items():
            rows.append((f"  stage: {stage}", f"{latency_ms(call, 2000)[0]:.3f} ms", "-",
                         "reported", None))

        # Exact search alone over 10,000 and 60,000 vectors: where auto stops choosing Flat.
        query = prepare_vectors(vectors[:200], "cosine")
        small = faiss.IndexFlatIP(indexed.shape[1])
        small.add(indexed[:FLAT_MAX_COUNT])
        flat_index = flat.snapshot.segments[0].index
        counter = itertools.count()
        scan_small, _ = latency_ms(
            lambda: small.search(query[next(counter) % 200][None], 10), 2000)
        scan_all, _ = latency_ms(
            lambda: flat_index.search(query[next(counter) % 200][None], 10), 2000)
        rows.append((f"exact search of 1 query over {FLAT_MAX_COUNT:,} vectors (FAISS alone)",
                     f"{scan_small:.3f} ms", f"over 60,000 vectors {scan_all:.3f} ms",
                     "reported (auto keeps Flat up to here)", None))

        keras_batch = best_seconds(
            lambda: keras_encoder.model.predict(test_pixels[..., None], batch_size=1024,
                                                verbose=0),
            args.repeats,
        )
        litert_batch = best_seconds(lambda: flat.encoder.embed(test_pixels), args.repeats)
        gain = keras_batch / litert_batch
        rows.append(("embed 10,000 images (LiteRT)", f"{litert_batch:.3f} s",
                     f"Keras `predict(batch_size=1024)` {keras_batch:.3f} s",
                     f"{gain:.2f}x (>= 1.0x)", gain >= 1.0))

        # Batch search, 10,000 queries, k=10: raw FAISS on prepared queries vs the API.
        prepared = prepare_vectors(vectors, "cosine")
        qps: dict[str, float] = {}
        for label, index in (("auto", auto), ("Flat", flat)):
            faiss_index = index.snapshot.segments[0].index
            raw = len(vectors) / best_seconds(lambda i=faiss_index: i.search(prepared, 10),
                                              args.repeats)
            arrays = len(vectors) / best_seconds(
                lambda i=index: i.search_vectors(vectors, 10), args.repeats)
            objects = len(vectors) / best_seconds(
                lambda i=index: i.search_vectors(vectors, 10).neighbors(), args.repeats)
            qps[label] = raw
            title = name if label == "auto" else "Flat"
            rows.append((f"batch QPS, 10,000 queries, k=10, {title}: API arrays "
                         "(`search_vectors_arrays`)", f"{arrays:,.0f} q/s",
                         f"raw FAISS {raw:,.0f} q/s; API objects (`search_vectors`) "
                         f"{objects:,.0f} q/s",
                         f"{arrays / raw:.2f}x raw (>= 0.8x)", arrays >= 0.8 * raw))
        qps_gain = qps["auto"] / qps["Flat"]
        rows.append((f"raw FAISS batch QPS, auto ({name}) vs Flat exact",
                     f"{qps['auto']:,.0f} q/s", f"Flat {qps['Flat']:,.0f} q/s",
                     f"{qps_gain:.1f}x (>= 5x)", qps_gain >= 5))
        rows.append(("`build-index`, 60,000 digits, existing model", f"auto {auto_build:.1f} s",
                     f"Flat {flat_build:.1f} s", "reported", None))

    print(f"machine: {os.cpu_count()} cores; median of {args.repeats} runs unless noted\n")
    print("| figure | value | baseline (same run) | ratio (target) | met |")
    print("|---|---|---|---|---|")
    for name, value, baseline, target, met in rows:
        verdict = "-" if met is None else ("yes" if met else "**no**")
        print(f"| {name} | {value} | {baseline} | {target} | {verdict} |")
    if any(met is False for *_, met in rows):
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
