"""Write-path benchmark of bundles: adds, search under a stream of adds, reload, load after adds.

    python scripts/bench_updates.py [--data PATH] [--model models/lenet.keras] [--adds 10000]
        [--stream-seconds 10] [--quick]

Every figure is printed beside a baseline measured in this same run, on this machine:

1. one ``SearchIndex.add`` of one MNIST test digit (a durable commit, fsync'd) p50/p99 over 200
   adds vs one ``SearchIndex.search`` of one digit p50, with where the add's time goes (embed,
   commit and its fsyncs, refresh);
2. ``SearchIndex.add`` of 10,000 digits in one call, images/s, vs ``build_index`` of the same
   10,000 digits (goal >= 0.8x). ``build_index`` loads the Keras model, embeds with Keras, builds
   the FAISS index and saves the encoder with its LiteRT export; ``add`` preprocesses, embeds with
   LiteRT and commits one unsealed segment;
3. search p99 (and p50) of one reader that searches single digits in a loop and calls
   ``refresh()`` every 0.2 s, while one writer *process* starts a single durable
   ``SearchIndex.add`` every 10 ms from up to eight threads (as a service does with concurrent
   ``POST /v1/items`` requests: adds that arrive during a commit join the next one), vs the same
   loop with no writer (goal <= 1.5x); the adds/s achieved are reported;
4. time from ``lenet-embed add digit.png`` returning to a running ``lenet-embed serve`` answering
   ``POST /v1/search`` with the new item (polled every 10 ms; goal <= 1 s), median and max of 5;
   "not seen within 10 s" when the service does not pick up new versions;
5. ``SearchIndex.load`` time (median of several) after 10,000 single adds, before and after
   ``compact``, vs a freshly built bundle of the same items (goal after compact <= 1.2x);
6. 10,000 adds alternating 4 and 1 digits: unsealed segments, manifest bytes and add latency p50
   after 400, 2,000 and 10,000 adds, beside the segments the merge policy before the bounded one
   (kept here as ``unbounded_merged_with``) leaves for the same adds, simulated.

The main bundle (figures 1, 3, 4) is a Flat bundle of the 60,000 MNIST training digits; figures 2
and 5 start from a bundle of the first 1,000. Everything is built from ``--model`` in a temporary
folder; when no model is given and ``models/lenet.keras`` does not exist, a one-epoch ``seed``
model is trained there first (about 30 s on two cores). ``--quick`` runs a much smaller version
of everything (a smoke test, under a minute). Missing a goal is a measurement, not a failure: the
exit status is 0 unless the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from harness.running import HOST, health, running_service
from PIL import Image

import lenet_embed.search
import lenet_embed.writer
from lenet_embed import LenetEmbedError, SearchIndex, build_index, load_mnist, train
from lenet_embed.ann import set_threads
from lenet_embed.cli import run_script
from lenet_embed.data import Dataset, LabeledImages
from lenet_embed.store.faiss import MERGE_FACTOR, _tier

CLI = str(Path(sys.executable).with_name("lenet-embed"))
DEFAULT_MODEL = Path("models/lenet.keras")
K = 5
REFRESH_EVERY = 0.2  # seconds between a reader's refresh() calls, as a service would
ADD_EVERY = 0.01  # seconds between the streaming writer's adds (100 adds/s)
STREAM_THREADS = 8  # the streaming writer's threads: adds in flight at most
POLL_EVERY = 0.01  # seconds between polls of the service for a new item
SEEN_WITHIN = 10.0  # seconds to wait for the service to answer with a new item
GOAL_BATCH, GOAL_STREAM, GOAL_VISIBLE, GOAL_LOAD = 0.8, 1.5, 1.0, 1.2


@dataclass(frozen=True)
class Plan:
    """How much of everything to do."""

    main_items: int  # bundle for figures 1, 3 and 4
    base_items: int  # bundle that figures 2 and 5 add to
    single_adds: int  # figure 1
    searches: int  # figure 1 baseline
    batch: int  # figure 2
    stream_seconds: float  # figure 3, each of the two loops
    visibility_repeats: int  # figure 4
    load_adds: int  # figure 5
    loads: int  # figure 5: loads per median
    train_items: int | None  # training subset when a seed model is trained (None = all)
    alternating_adds: int = 10_000  # figure 6


FULL = Plan(main_items=60_000, base_items=1_000, single_adds=200, searches=1_000, batch=10_000,
            stream_seconds=10.0, visibility_repeats=5, load_adds=10_000, loads=15,
            train_items=None)
QUICK = Plan(main_items=2_000, base_items=500, single_adds=30, searches=200, batch=1_000,
             stream_seconds=2.0, visibility_repeats=2, load_adds=200, loads=5,
             train_items=10_000, alternating_adds=400)


@dataclass(frozen=True)
class Row:
    """One line of the final table, under figure ``number``."""

    number: int
    figure: str
    value: str
    baseline: str
    ratio: str
    met: bool | None = None


def say(message: str) -> None:
    """Progress on stderr, so stdout holds the results."""
    print(message, file=sys.stderr, flush=True)


def ms(seconds: list[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile of durations in seconds, in milliseconds."""
    return float(np.percentile(np.asarray(seconds) * 1000, q))


class Probe:
    """Time the calls of functions patched in place for the length of a ``with`` block.

    Targets are ``(owner, attribute)``; calls are summed per attribute name, and targets the
    package does not have (it changes) are skipped: ``found`` says which names were timed.
    """

    def __init__(self, *targets: tuple[Any, str]) -> None:
        self.targets = [(owner, name) for owner, name in targets if hasattr(owner, name)]
        self.found = {name for _, name in self.targets}
        self.seconds = {name: 0.0 for _, name in targets}
        self.calls = {name: 0 for _, name in targets}
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def __enter__(self) -> Probe:
        for owner, name in self.targets:
            original = getattr(owner, name)
            own = isinstance(owner, type) or name in vars(owner)
            self._saved.append((owner, name, vars(owner).get(name, original), own))

            def timed(*args: Any, _original: Any = original, _name: str = name,
                      **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_name] += time.perf_counter() - started
                    self.calls[_name] += 1

            setattr(owner, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original, own in reversed(self._saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()

    def per_call_ms(self, name: str, per: int) -> float:
        """Milliseconds spent in ``name`` per one of ``per`` outer operations."""
        return self.seconds[name] / max(per, 1) * 1000

    def part(self, name: str, label: str, per: int = 1, unit: str = "ms") -> str:
        """``"label 1.23 ms"`` per outer operation, or ``"label n/a"`` when it was not found."""
        if name not in self.found:
            return f"{label} n/a"
        value = self.per_call_ms(name, per) if unit == "ms" else self.seconds[name] / per
        return f"{label} {value:.2f} {unit}"


def labelled(images: np.ndarray, labels: np.ndarray, source: str) -> Dataset:
    """A data set whose training split is ``images`` (what ``build_index`` indexes)."""
    return Dataset(LabeledImages(images, labels), LabeledImages(images[:1], labels[:1]), source)


def build(dataset: Dataset, start: int, stop: int, model: Path, index_dir: Path) -> float:
    """Build a Flat bundle of training digits ``start:stop``; return the seconds it took."""
    subset = labelled(dataset.train.images[start:stop], dataset.train.labels[start:stop],
                      f"{dataset.source} train[{start}:{stop}]")
    started = time.perf_counter()
    build_index(data=subset, model=model, index_dir=index_dir, factory="Flat")
    return time.perf_counter() - started


def median_load_seconds(paths: list[Path], loads: int) -> list[float]:
    """Median wall time of ``SearchIndex.load`` of each bundle over ``loads`` loads, after one
    warm-up load each; the bundles take turns, so a change in the machine's load hits all."""
    times: list[list[float]] = [[] for _ in paths]
    for attempt in range(loads + 1):
        for position, path in enumerate(paths):
            started = time.perf_counter()
            index = SearchIndex.load(path, threads=1)
            elapsed = time.perf_counter() - started
            del index
            if attempt:
                times[position].append(elapsed)
    return [statistics.median(series) for series in times]


# --------------------------------------------------------------------------- figure 1


def add_probe(index: SearchIndex) -> Probe:
    """Timers on the parts of ``SearchIndex.add``: preprocessing, embedding, the commit (and the
    fsyncs inside it) and the switch to the version it committed (a refresh that reads nothing
    back)."""
    import lenet_embed.updates

    return Probe((lenet_embed.search, "to_batch"), (lenet_embed.updates, "to_batch"),
                 (index.encoder, "embed"),
                 (lenet_embed.search, "add_vectors"), (lenet_embed.updates, "add_vectors"),
                 (os, "fsync"), (index, "_switch"))


def breakdown(probe: Probe, total_seconds: float, per: int, unit: str = "ms") -> str:
    """Where the time of ``per`` adds went, per add."""
    scale = 1000 / per if unit == "ms" else 1 / per
    known = sum(probe.seconds[name] for name in ("to_batch", "embed", "add_vectors", "_switch")
                if name in probe.found)
    fsyncs = probe.calls["fsync"] / per
    return (f"{probe.part('to_batch', 'preprocess', per, unit)}, "
            f"{probe.part('embed', 'embed', per, unit)}, "
            f"{probe.part('add_vectors', 'commit', per, unit)} (of which "
            f"{fsyncs:.1f} fsyncs {probe.seconds['fsync'] * scale:.2f} "
            f"{unit}), {probe.part('_switch', 'refresh', per, unit)}, other "
            f"{(total_seconds - known) * scale:.2f} {unit}")


def single_adds(index: SearchIndex, queries: np.ndarray, digits: np.ndarray, labels: np.ndarray,
                plan: Plan) -> list[Row]:
    """Figure 1: one-image adds against one-image searches, on the same bundle."""
    say(f"[1] {plan.searches} single searches, then {plan.single_adds} single adds")
    for i in range(20):
        index.search(queries[i % len(queries)], k=K)
    searches, embeds = [], []
    for i in range(plan.searches):
        query = queries[i % len(queries)]
        started = time.perf_counter()
        index.search(query, k=K).neighbors()
        searches.append(time.perf_counter() - started)
        started = time.perf_counter()
        index.embed(query)
        embeds.append(time.perf_counter() - started)
    warmup = 5
    for i in range(warmup):
        index.add(digits[i], labels=int(labels[i]))
    adds = []
    with add_probe(index) as probe:
        for i in range(warmup, warmup + plan.single_adds):
            started = time.perf_counter()
            index.add(digits[i], labels=int(labels[i]))
            adds.append(time.perf_counter() - started)
    n = plan.single_adds
    search_p50, add_p50 = ms(searches, 50), ms(adds, 50)
    parts = breakdown(probe, sum(adds), n)
    say(f"    single add mean {np.mean(adds) * 1000:.2f} ms: {parts}")
    return [
        Row(1, f"1. single `SearchIndex.add` (1 digit, durable), {n} adds",
            f"p50 {add_p50:.2f} ms, p99 {ms(adds, 99):.2f} ms",
            f"single `search` p50 {search_p50:.2f} ms (p99 {ms(searches, 99):.2f})",
            f"{add_p50 / search_p50:.1f}x (reported)"),
        Row(1, "   where a single add's time goes (mean per add)", parts,
            f"search: embedding p50 {ms(embeds, 50):.2f} of {search_p50:.2f} ms", "-"),
    ]


# --------------------------------------------------------------------------- figure 2


def batch_add(dataset: Dataset, base: Path, model: Path, scratch: Path, plan: Plan) -> list[Row]:
    """Figure 2: one ``add`` of many digits against ``build_index`` of the same digits."""
    start, stop = plan.base_items, plan.base_items + plan.batch
    images, labels = dataset.train.images[start:stop], dataset.train.labels[start:stop]
    say(f"[2] adding {plan.batch} digits in one call, then build-index of the same digits")
    set_threads(os.cpu_count() or 1)  # the readers above capped FAISS at one thread
    target = scratch / "batch-add"
    shutil.copytree(base, target)
    index = SearchIndex.load(target)
    with add_probe(index) as probe:
        started = time.perf_counter()
        index.add(images, labels=labels.tolist())
        add_seconds = time.perf_counter() - started
    del index
    with Probe((lenet_embed.writer.BundleWriter, "new_encoder")) as build_probe:
        build_seconds = build(dataset, start, stop, model, scratch / "batch-build")
    add_rate, build_rate = plan.batch / add_seconds, plan.batch / build_seconds
    ratio = add_rate / build_rate
    return [
        Row(2, f"2. `SearchIndex.add` of {plan.batch:,} digits in one call",
            f"{add_rate:,.0f} images/s ({add_seconds:.2f} s)",
            f"`build_index` of the same: {build_rate:,.0f} images/s ({build_seconds:.2f} s)",
            f"{ratio:.2f}x (>= {GOAL_BATCH}x)", ratio >= GOAL_BATCH),
        Row(2, "   what each includes (seconds)", "add: " + breakdown(probe, add_seconds, 1, "s"),
            "build: load Keras model, Keras embed, FAISS index, write; "
            + build_probe.part("new_encoder", "saving the encoder + LiteRT export", 1, "s"),
            "-"),
    ]


# --------------------------------------------------------------------------- figure 3


def stream_writer(path: str, digits: np.ndarray, labels: list[int], ready: Any, go: Any,
                  stop: Any, results: Any) -> None:
    """In its own process: start one single-digit add every ``ADD_EVERY`` s while ``go`` is set,
    until ``stop`` is set; then put ``(adds, latencies)`` or an error string on ``results``.

    Adds are started on schedule from a few threads, not one after another, as a service's
    concurrent ``POST /v1/items`` requests are: an add that arrives while a commit is being
    made joins the next one (group commit), so a slow fsync delays adds but does not lower
    the rate. A latency runs from an add's due time to its durable return."""
    try:
        index = SearchIndex.load(path, threads=1)
        index.add(digits[-1], labels=labels[-1])  # warm-up: the first add opens everything
        ready.set()
        latencies: list[float] = []
        errors: list[str] = []

        # At most one add in flight per thread: a backlog would spill into the quiet windows.
        free = threading.Semaphore(STREAM_THREADS)

        def one(i: int, due: float) -> None:
            try:
                index.add(digits[i % (len(digits) - 1)], labels=labels[i % (len(digits) - 1)])
                latencies.append(time.perf_counter() - due)
            except Exception as exc:  # noqa: BLE001 - reported by the parent
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                free.release()

        i = 0
        due = 0.0
        with ThreadPoolExecutor(STREAM_THREADS) as pool:
            while not stop.is_set() and not errors:
                if not go.wait(0.05):
                    due = 0.0
                    continue
                # The schedule holds through a window: adds that fall due during a slow commit
                # go out as soon as a thread is free, as queued requests would.
                due = due or time.perf_counter()
                time.sleep(max(0.0, due - time.perf_counter()))
                free.acquire()
                pool.submit(one, i, due)
                i += 1
                due += ADD_EVERY
        results.put(errors[0] if errors else (len(latencies), latencies))
    except Exception as exc:  # reported by the parent as one line
        ready.set()
        results.put(f"{type(exc).__name__}: {exc}")


@dataclass
class LoopFigures:
    """What the reader saw in one kind of window (quiet or loaded)."""

    latencies: list[float]
    refreshes: list[float]
    changed: int = 0
    seconds: float = 0.0


def search_loop(index: SearchIndex, queries: np.ndarray, seconds: float, into: LoopFigures
                ) -> None:
    """Search single digits for ``seconds``, refreshing every ``REFRESH_EVERY`` s; add the search
    latencies, refresh times and refreshes that found a new version to ``into``."""
    started = time.perf_counter()
    next_refresh = started
    i = 0
    while (now := time.perf_counter()) - started < seconds:
        if now >= next_refresh:
            into.changed += index.refresh()
            into.refreshes.append(time.perf_counter() - now)
            next_refresh += REFRESH_EVERY
        begun = time.perf_counter()
        index.search(queries[i % len(queries)], k=K).neighbors()
        into.latencies.append(time.perf_counter() - begun)
        i += 1
    into.seconds += time.perf_counter() - started


def streaming(index: SearchIndex, queries: np.ndarray, digits: np.ndarray, labels: np.ndarray,
              plan: Plan) -> list[Row]:
    """Figure 3: a reader's search latency while another process adds 100 digits/s, in windows
    that take turns with quiet ones (so a change in the machine's other load hits both)."""
    rounds = max(1, round(plan.stream_seconds / 2))
    window = plan.stream_seconds / rounds
    context = multiprocessing.get_context("spawn")
    go, stop, ready, results = (context.Event(), context.Event(), context.Event(),
                                context.Queue())
    writer = context.Process(target=stream_writer, args=(
        str(index.path), digits, [int(x) for x in labels], ready, go, stop, results))
    writer.start()
    quiet, loaded = LoopFigures([], []), LoopFigures([], [])
    try:
        if not ready.wait(120):
            raise LenetEmbedError("the streaming writer process did not start within 120 s")
        say(f"[3] {rounds} x ({window:g} s of single searches with no writer, then {window:g} s "
            f"while a writer process adds one digit every {ADD_EVERY * 1000:.0f} ms)")
        search_loop(index, queries, 1.0, LoopFigures([], []))  # warm-up
        for _ in range(rounds):
            search_loop(index, queries, window, quiet)
            go.set()
            search_loop(index, queries, window, loaded)
            go.clear()
        stop.set()
        outcome = results.get(timeout=120)
    finally:
        stop.set()
        writer.join(timeout=60)
        if writer.is_alive():
            writer.terminate()
            writer.join()
    if isinstance(outcome, str):
        raise LenetEmbedError(f"the streaming writer failed: {outcome}")
    adds, add_latencies = outcome
    ratio = ms(loaded.latencies, 99) / ms(quiet.latencies, 99)
    return [
        Row(3, f"3. search p99 while {1 / ADD_EVERY:.0f} adds/s stream in (one writer "
            f"process), refresh every {REFRESH_EVERY:g} s",
            f"p99 {ms(loaded.latencies, 99):.2f} ms, p50 {ms(loaded.latencies, 50):.2f} ms "
            f"({len(loaded.latencies):,} searches in {loaded.seconds:.0f} s)",
            f"no writer: p99 {ms(quiet.latencies, 99):.2f} ms, p50 "
            f"{ms(quiet.latencies, 50):.2f} ms ({len(quiet.latencies):,} searches)",
            f"{ratio:.2f}x (<= {GOAL_STREAM}x)", ratio <= GOAL_STREAM),
        Row(3, "   the writer and the reader's refreshes",
            f"{adds / loaded.seconds:.0f} adds/s achieved (asked {1 / ADD_EVERY:.0f}, from "
            f"{STREAM_THREADS} threads), add p50 {ms(add_latencies, 50):.1f} ms, p99 "
            f"{ms(add_latencies, 99):.1f} ms; "
            f"{loaded.changed} refreshes found a new version, refresh p50 "
            f"{ms(loaded.refreshes, 50):.2f} ms, max {ms(loaded.refreshes, 100):.1f} ms "
            "(not in the search latencies)",
            f"no writer: refresh p50 {ms(quiet.refreshes, 50):.3f} ms", "-"),
    ]


# --------------------------------------------------------------------------- figure 4


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field ``file``, and its content type."""
    boundary = "lenet-embed-bench-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data + tail, f"multipart/form-data; boundary={boundary}"


def wait_until_served(port: int, body: tuple[bytes, str], item_id: int) -> float | None:
    """Seconds until ``POST /v1/search?k=1`` with ``body`` answers ``item_id`` (polled every
    ``POLL_EVERY`` s), or None when it does not within ``SEEN_WITHIN`` s."""
    started = time.perf_counter()
    connection: http.client.HTTPConnection | None = None
    while (elapsed := time.perf_counter() - started) < SEEN_WITHIN:
        try:
            if connection is None:
                connection = http.client.HTTPConnection(HOST, port, timeout=5)
            connection.request("POST", "/v1/search?k=1", body=body[0],
                               headers={"Content-Type": body[1]})
            response = connection.getresponse()
            payload = response.read()
            if response.status == 200:
                neighbors = json.loads(payload).get("neighbors") or []
                if neighbors and neighbors[0].get("id") == item_id:
                    connection.close()
                    return time.perf_counter() - started
        except (OSError, http.client.HTTPException, ValueError):
            if connection is not None:
                connection.close()
            connection = None
        time.sleep(max(0.0, POLL_EVERY - (time.perf_counter() - started - elapsed)))
    if connection is not None:
        connection.close()
    return None


def visibility(bundle: Path, digits: np.ndarray, labels: np.ndarray, scratch: Path, plan: Plan
               ) -> tuple[list[Row], list[str]]:
    """Figure 4: from ``lenet-embed add`` returning to the running service answering with the
    new item."""
    title = "4. `lenet-embed add` returned -> service answers with the new item"
    goal = f"max <= {GOAL_VISIBLE:g} s"
    log_path = scratch / "serve.log"
    notes: list[str] = []
    say(f"[4] starting `lenet-embed serve`, then {plan.visibility_repeats} `lenet-embed add` runs")
    with ExitStack() as stack:
        try:
            service = stack.enter_context(running_service(
                lambda port: [CLI, "serve", "--index-dir", str(bundle), "--host", HOST, "--port",
                              str(port)], log_path))
        except LenetEmbedError as exc:
            tail = [line for line in log_path.read_text().splitlines() if line.strip()][-1:]
            reason = f"{exc}: {tail[0][:160] if tail else 'no log'}"
            return [Row(4, title, "service did not start", "-", goal, False)], [f"4: {reason}"]
        health_before = health(service.port) or {}
        seen: list[float | None] = []
        cli_seconds = []
        for r in range(plan.visibility_repeats):
            png = scratch / f"digit-{r}.png"
            Image.fromarray(digits[r]).save(png)
            started = time.perf_counter()
            done = subprocess.run(
                [CLI, "add", str(png), "--label", str(int(labels[r])), "--json",
                 "--index-dir", str(bundle)], capture_output=True, text=True)
            cli_seconds.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise LenetEmbedError(f"`lenet-embed add` failed: "
                                      f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
            item_id = json.loads(done.stdout)["ids"][0]
            body = multipart(png.name, png.read_bytes())
            after = wait_until_served(service.port, body, item_id)
            seen.append(after)
            say(f"    add {r + 1}: id {item_id}, "
                + (f"served after {after * 1000:.0f} ms" if after is not None
                   else f"not seen within {SEEN_WITHIN:g} s"))
            if after is None and not any(s is not None for s in seen):
                notes.append(f"4: stopped after {r + 1} add(s): the service never showed "
                             "a new item")
                break
        health_after = health(service.port) or {}
    notes.append(f"4: `lenet-embed add` (a new process) took {statistics.median(cli_seconds):.2f}"
                 f" s median; /healthz before {json.dumps(health_before)}, after "
                 f"{json.dumps(health_after)}")
    times = [s for s in seen if s is not None]
    missed = len(seen) - len(times)
    if not times:
        value = f"not seen within {SEEN_WITHIN:g} s ({missed} of {len(seen)} adds)"
        return [Row(4, title, value, "-", goal, False)], notes
    value = (f"median {statistics.median(times):.3f} s, max {max(times):.3f} s "
             f"({len(times)} adds, polled every {POLL_EVERY * 1000:.0f} ms)")
    if missed:
        value += f"; {missed} not seen within {SEEN_WITHIN:g} s"
    return [Row(4, title, value, "-", goal, not missed and max(times) <= GOAL_VISIBLE)], notes


# --------------------------------------------------------------------------- figure 5


def load_after_adds(dataset: Dataset, base: Path, model: Path, scratch: Path, plan: Plan
                    ) -> list[Row]:
    """Figure 5: load time after many single adds, before and after compact, vs a fresh build."""
    n = plan.load_adds
    start, stop = plan.base_items, plan.base_items + n
    images, labels = dataset.train.images[start:stop], dataset.train.labels[start:stop]
    target = scratch / "many-adds"
    shutil.copytree(base, target)
    index = SearchIndex.load(target, threads=1)
    say(f"[5] {n:,} single adds to a bundle of {plan.base_items:,} digits")
    latencies = []
    step = max(n // 10, 1)
    started = time.perf_counter()
    for i in range(n):
        begun = time.perf_counter()
        index.add(images[i], labels=int(labels[i]))
        latencies.append(time.perf_counter() - begun)
        if (i + 1) % step == 0 or i + 1 == n:
            elapsed = time.perf_counter() - started
            say(f"    {i + 1:,}/{n:,} adds, {elapsed:.0f} s, last {step:,} p50 "
                f"{ms(latencies[-step:], 50):.1f} ms, eta {elapsed / (i + 1) * (n - i - 1):.0f} s")
    manifest = index.manifest
    del index
    fresh_dir = scratch / "fresh"
    say(f"    building a fresh bundle of the same {stop:,} digits; timing loads")
    build(dataset, 0, stop, model, fresh_dir)
    before, fresh_before = median_load_seconds([target, fresh_dir], plan.loads)
    started = time.perf_counter()
    SearchIndex.load(target, threads=1).compact()
    compact_seconds = time.perf_counter() - started
    after, fresh = median_load_seconds([target, fresh_dir], plan.loads)
    base_line = f"fresh bundle of the same {stop:,} items {{:.1f}} ms"
    unsealed = sum(not segment.sealed for segment in manifest.segments)
    return [
        Row(5, f"5. `SearchIndex.load` after {n:,} single adds ({len(manifest.segments)} "
            f"segments, {unsealed} unsealed)", f"{before * 1000:.1f} ms",
            base_line.format(fresh_before * 1000), f"{before / fresh_before:.2f}x (reported)"),
        Row(5, "   ... after `compact`", f"{after * 1000:.1f} ms (compact took "
            f"{compact_seconds:.2f} s)", base_line.format(fresh * 1000),
            f"{after / fresh:.2f}x (<= {GOAL_LOAD}x)", after / fresh <= GOAL_LOAD),
        Row(5, f"   single add latency over those {n:,} adds (version {manifest.version})",
            f"p50 {ms(latencies, 50):.2f} ms, p99 {ms(latencies, 99):.2f} ms, max "
            f"{ms(latencies, 100):.1f} ms ({n / sum(latencies):.0f} adds/s)", "-", "reported"),
    ]


# --------------------------------------------------------------------------- figure 6


def unbounded_merged_with(sizes: list[int], rows: int) -> int:
    """The merge policy before the bounded one, on the unsealed segments' sizes: while the newest
    four share a tier they become one (alternating adds of 4 and 1 never merge)."""
    sizes = [*sizes, rows]
    merged = 0
    while len(sizes) >= MERGE_FACTOR and len({_tier(size) for size in
                                             sizes[-MERGE_FACTOR:]}) == 1:
        sizes[-MERGE_FACTOR:] = [sum(sizes[-MERGE_FACTOR:])]
        merged += MERGE_FACTOR - 1
    return merged


def alternating_adds(dataset: Dataset, base: Path, scratch: Path, plan: Plan) -> list[Row]:
    """Figure 6: segments, manifest size and add latency under adds of 4 and 1 digits in turn."""
    target = scratch / "alternating"
    shutil.copytree(base, target)
    index = SearchIndex.load(target, threads=1)
    images, labels = dataset.train.images, dataset.train.labels
    checkpoints = [n for n in (400, 2_000, 10_000) if n < plan.alternating_adds]
    checkpoints.append(plan.alternating_adds)
    say(f"[6] {plan.alternating_adds:,} adds of 4 and 1 digits in turn")
    old: list[int] = []
    latencies: list[float] = []
    rows, start = [], 0
    for i in range(plan.alternating_adds):
        size = 4 if i % 2 == 0 else 1
        chunk = np.arange(start, start + size) % len(images)
        start += size
        begun = time.perf_counter()
        index.add(images[chunk], labels=labels[chunk].tolist())
        latencies.append(time.perf_counter() - begun)
        merged = unbounded_merged_with(old, size)
        old[len(old) - merged:] = [sum(old[len(old) - merged:]) + size]
        if i + 1 in checkpoints:
            manifest = index.manifest
            unsealed = sum(not segment.sealed for segment in manifest.segments)
            manifest_bytes = (target / "manifest.json").stat().st_size
            window = latencies[-min(200, len(latencies)):]
            rows.append(Row(6, f"6. after {i + 1:,} adds of 4, 1, 4, ... digits ({start:,} rows)",
                            f"{unsealed} unsealed segments, manifest {manifest_bytes / 1000:.1f} "
                            f"KB, add p50 {ms(window, 50):.2f} ms (last {len(window)})",
                            f"previous policy: {len(old)} unsealed segments (simulated)",
                            f"bound 3(floor(log4 {start})+1) = {3 * (_tier(start) + 1)}",
                            unsealed <= 3 * (_tier(start) + 1)))
    return rows


# --------------------------------------------------------------------------- main


@contextmanager
def step(number: int, name: str, rows: list[Row], notes: list[str]) -> Iterator[None]:
    """Run one figure; a failure becomes a row and a one-line note instead of ending the run."""
    try:
        yield
    except Exception as exc:  # any failure is reported and the run goes on
        text = str(exc).strip()
        message = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        rows.append(Row(number, f"{number}. {name}", "failed", "-", "-", False))
        notes.append(f"{number}: failed: {message}")
        say(f"    failed: {message}")


def ensure_model(model: Path | None, dataset: Dataset, scratch: Path, plan: Plan) -> Path:
    """The model to embed with: ``--model``, else ``models/lenet.keras``, else a one-epoch seed
    model trained into ``scratch``."""
    if model is not None:
        if not model.exists():
            raise LenetEmbedError(f"{model}: no such model")
        return model
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL
    out = scratch / "lenet.keras"
    data = dataset if plan.train_items is None else dataset.head(plan.train_items, 1_000)
    say(f"no --model and no {DEFAULT_MODEL}: training a 1-epoch seed model on "
        f"{len(data.train):,} digits")
    train(data, recipe="seed", epochs=1, seed=1, verbose=0, out=out)
    return out


def run(args: argparse.Namespace) -> tuple[list[Row], list[str], str]:
    """Every figure, in a temporary folder; the table rows, notes and a header line."""
    plan = QUICK if args.quick else FULL
    if args.adds is not None:
        plan = replace(plan, load_adds=args.adds)
    if args.stream_seconds is not None:
        plan = replace(plan, stream_seconds=args.stream_seconds)
    load_start = os.getloadavg()[0]
    dataset = load_mnist(args.data)
    if plan.base_items + max(plan.batch, plan.load_adds) > len(dataset.train):
        raise LenetEmbedError(f"--adds must be at most {len(dataset.train) - plan.base_items}")
    if plan.load_adds < 1 or plan.stream_seconds <= 0:
        raise LenetEmbedError("--adds and --stream-seconds must be positive")
    test_images, test_labels = dataset.test.images, dataset.test.labels
    queries = test_images[:200]
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-updates-") as tmp:
        scratch = Path(tmp)
        model = ensure_model(args.model, dataset, scratch, plan)
        say(f"building a Flat bundle of {plan.main_items:,} training digits and one of "
            f"{plan.base_items:,} with {model}")
        main_dir, base_dir = scratch / "main", scratch / "base"
        build(dataset, 0, plan.main_items, model, main_dir)
        build(dataset, 0, plan.base_items, model, base_dir)
        index = SearchIndex.load(main_dir, threads=1)
        with step(1, "single add", rows, notes):
            rows += single_adds(index, queries, test_images[200:], test_labels[200:], plan)
        with step(3, "search while adds stream in", rows, notes):
            rows += streaming(index, queries, test_images[2000:4000], test_labels[2000:4000],
                              plan)
        del index
        with step(4, "add -> served", rows, notes):
            found, found_notes = visibility(main_dir, test_images[9000:], test_labels[9000:],
                                            scratch, plan)
            rows += found
            notes += found_notes
        with step(2, "batch add", rows, notes):
            rows += batch_add(dataset, base_dir, model, scratch, plan)
        with step(5, "load after adds", rows, notes):
            rows += load_after_adds(dataset, base_dir, model, scratch, plan)
        with step(6, "alternating adds", rows, notes):
            rows += alternating_adds(dataset, base_dir, scratch, plan)
    header = (f"machine: {os.cpu_count()} cores, load average {load_start:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end (other work moves every figure); model "
              f"{model if model.parent != scratch else 'seed, 1 epoch (trained in this run)'}; "
              f"main bundle Flat, {plan.main_items:,} MNIST training digits; k={K}"
              + ("; --quick" if args.quick else ""))
    rows.sort(key=lambda row: row.number)  # stable: a figure's rows keep their order
    notes.sort(key=lambda note: note.split(":")[0])
    return rows, notes, header


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder or mnist.npz (default: $LENET_EMBED_MNIST)")
    parser.add_argument("--model", type=Path,
                        help=f"classifier .keras file (default: {DEFAULT_MODEL} if it exists, "
                             "else a 1-epoch seed model is trained first)")
    parser.add_argument("--adds", type=int,
                        help="single adds before the load-time figure (default 10,000)")
    parser.add_argument("--stream-seconds", type=float,
                        help="seconds of each search loop in figure 3 (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller run of every figure, as a smoke test")
    args = parser.parse_args()
    started = time.perf_counter()
    rows, notes, header = run(args)  # errors: one line from run_script, as in the CLI
    print(header + f"; whole run {time.perf_counter() - started:.0f} s\n")
    print("| figure | value | baseline (same run) | ratio (goal) | met |")
    print("|---|---|---|---|---|")
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "**NO**")
        print(f"| {row.figure} | {row.value} | {row.baseline} | {row.ratio} | {met} |")
    if notes:
        print()
        for note in notes:
            print(f"note {note}")
    judged = [row for row in rows if row.met is not None]
    missed = sorted({str(row.number) for row in judged if not row.met})
    print(f"\ngoals met: {len(judged) - len(missed)} of {len(judged)}"
          + (f"; MISSED in figure(s) {', '.join(missed)}" if missed else ""))


if __name__ == "__main__":
    run_script(main)
