"""The subprocess side of ``tests/integration/test_durability.py``: writers that get killed, a
writer that keeps committing while readers load, and those readers.

Run as ``python tests/_writer_worker.py MODE ARGS...``. Every line printed on stdout is one JSON
object, flushed at once, so a parent that kills the process still reads every line that was
printed before the kill.

``crash BUNDLE OP SEED POOL BUILD MODEL``
    Import everything, print ``loaded``, wait for ``go`` on stdin, then load the bundle, print
    ``ready`` and repeat the writer operation OP (``add``, ``remove``, ``compact`` -- alternating
    with a small remove so that every compaction commits -- or ``build``) until killed. Before
    each operation it prints an ``intent`` (what it is about to do), after each one returns an
    ``ack`` with the version committed and the ids added or removed.
``fork-server BUNDLE POOL``
    The same writers for add, remove and compact, forked from one process that imported
    everything once (see :func:`fork_server`).
``churn BUNDLE SEED POOL BUILD_A BUILD_B MODEL_A MODEL_B STOP QUERY``
    Commit adds, removes, compactions and (2 s after starting, then every BUILD_EVERY seconds,
    alternating the two data sets and models) rebuilds until the file STOP exists; print one
    ``commit`` line per version with what that version must hold.
``read BUNDLE LOADS SEED POOL BUILD_A BUILD_B QUERY``
    ``SearchIndex.load`` the bundle LOADS times, checking each load for consistency; print one
    ``summary`` line.

Items the churn writer adds get the image ``pool[id % len(pool)]``; built items get image ``id`` of
the build's data set (told apart by the manifest's dataset source), so a reader can check every
live item's image without asking the writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

SOURCES = ("durability-A", "durability-B")
QUERY_K = 5
BUILD_EVERY = 20.0  # seconds between the churning writer's rebuilds


def emit(event: str, **fields) -> None:
    """One JSON line on stdout, in one write (a forked writer shares the pipe with its parent;
    lines this short are never interleaved)."""
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def ids_hash(ids) -> str:
    """A short fingerprint of a set of ids."""
    array = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
    return hashlib.sha1(array.tobytes()).hexdigest()[:16]


def load_dataset(path: str, source: str):
    """A ``Dataset`` from an .npz of train/test images and labels."""
    from lenet_embed.data import Dataset, LabeledImages

    with np.load(path) as arrays:
        return Dataset(LabeledImages(arrays["train_images"], arrays["train_labels"]),
                       LabeledImages(arrays["test_images"], arrays["test_labels"]), source)


def load_pool(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as arrays:
        return arrays["images"], arrays["labels"]


def embed(index, images: np.ndarray) -> np.ndarray:
    """Prepared vectors of uint8 digits, with the index's encoder, as ``add`` stores them."""
    from lenet_embed.ann import prepare_vectors
    from lenet_embed.preprocess import scale_pixels

    return prepare_vectors(index.encoder.embed(scale_pixels(images)), index.metric)


# ------------------------------------------------------------------------------ killed writers

def crash(bundle: str, op: str, seed: str, pool_path: str, build_path: str, model: str) -> None:
    """One writer in a fresh process (what a build needs: TensorFlow is not fork-safe)."""
    import lenet_embed.search  # noqa: F401 - imported before "loaded", like everything else
    import lenet_embed.updates  # noqa: F401

    dataset = None
    if op == "build":
        from lenet_embed._keras import keras

        keras()
        dataset = load_dataset(build_path, "durability-crash")
    pool = load_pool(pool_path)
    emit("loaded")
    if sys.stdin.readline().strip() == "go":
        write_until_killed(bundle, op, int(seed), pool, dataset, model)


def fork_server(bundle: str, pool_path: str) -> None:
    """Import once, then fork one writer per ``fork OP SEED TMPDIR`` line (starting Python and
    importing take longer than a killed writer lives); ``wait PID`` reaps one and reports how
    it ended. Nothing here starts a thread before forking (the parent sets
    ``OPENBLAS_NUM_THREADS=1``, and FAISS and LiteRT start theirs on first use)."""
    import lenet_embed.search  # noqa: F401
    import lenet_embed.updates  # noqa: F401

    pool = load_pool(pool_path)
    emit("loaded")
    for line in sys.stdin:
        command, *args = line.split()
        if command == "wait":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            emit("reaped", pid=pid,
                 signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
            continue
        op, seed, tmpdir = args
        pid = os.fork()
        if pid:
            emit("forked", pid=pid)
            continue
        try:  # the child: a writer until it is killed, never back into this loop
            os.environ["TMPDIR"] = tmpdir
            tempfile.tempdir = None
            write_until_killed(bundle, op, int(seed), pool, None, "")
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(1)


def write_until_killed(bundle: str, op: str, seed: int, pool: tuple[np.ndarray, np.ndarray],
                       dataset, model: str) -> None:
    """Repeat the writer operation ``op``: an ``intent`` line before each, an ``ack`` line with
    the version committed after each returns."""
    from lenet_embed.search import SearchIndex
    from lenet_embed.updates import add_vectors, compact, remove

    pool_images, pool_labels = pool
    rng = np.random.default_rng(seed)
    index = SearchIndex.load(bundle)
    snapshot = index.snapshot
    live = {int(i) for i in snapshot.ids[snapshot.live_rows()]}
    emit("ready", version=index.version)
    step = 0
    while True:
        step += 1
        kind = op
        if op == "compact" and step % 2:
            kind = "remove"  # so that every compaction has removed rows to drop
        if kind == "remove" and len(live) < 50:
            kind = "add"
        started = time.perf_counter()
        if kind == "add":
            picks = rng.integers(0, len(pool_images), int(rng.integers(1, 6)))
            images = pool_images[picks]
            labels = [int(label) for label in pool_labels[picks]]
            vectors = embed(index, images)
            emit("intent", op="add", n=len(picks))
            ids, manifest = add_vectors(bundle, vectors, images, labels,
                                        encoder_sha256=index.manifest.encoder_sha256)
            live.update(int(i) for i in ids)
            emit("ack", op="add", version=manifest.version, ids=[int(i) for i in ids],
                 seconds=time.perf_counter() - started)
        elif kind == "remove":
            chosen = rng.choice(sorted(live), size=int(rng.integers(1, 4)), replace=False)
            chosen = [int(i) for i in chosen]
            emit("intent", op="remove", ids=chosen)
            removal, manifest = remove(bundle, chosen)
            if removal.removed != len(chosen) or removal.missing:
                raise SystemExit(f"remove of live ids {chosen} removed {removal}")
            live.difference_update(chosen)
            emit("ack", op="remove", version=manifest.version, ids=chosen,
                 seconds=time.perf_counter() - started)
        elif kind == "calibrate":
            from lenet_embed.calibration import calibrate

            emit("intent", op="calibrate")
            manifest = calibrate(bundle)
            emit("ack", op="calibrate", version=manifest.version,
                 seconds=time.perf_counter() - started)
        elif kind == "compact":
            emit("intent", op="compact")
            before, after = compact(bundle)
            if after.version != before.version + 1:
                raise SystemExit("compact after a remove did not commit")
            emit("ack", op="compact", version=after.version,
                 seconds=time.perf_counter() - started)
        else:
            from lenet_embed.build import build_index

            emit("intent", op="build", n=len(dataset.train))
            result = build_index(data=dataset, model=model, index_dir=bundle)
            live = set(range(len(dataset.train)))
            emit("ack", op="build", version=result.manifest.version,
                 seconds=time.perf_counter() - started)
            index = SearchIndex.load(bundle)


# ------------------------------------------------------------------------------ busy writer

def churn(bundle: str, seed: str, pool_path: str, build_a: str, build_b: str, model_a: str,
          model_b: str, stop: str, query_path: str) -> None:
    from lenet_embed._keras import keras
    from lenet_embed.build import build_index
    from lenet_embed.search import SearchIndex
    from lenet_embed.updates import add_vectors, compact, remove

    keras()
    datasets = [load_dataset(build_a, SOURCES[0]), load_dataset(build_b, SOURCES[1])]
    models = [model_a, model_b]
    pool_images, pool_labels = load_pool(pool_path)
    query = np.load(query_path)
    rng = np.random.default_rng(int(seed))
    index = SearchIndex.load(bundle)
    snapshot = index.snapshot
    live = {int(i) for i in snapshot.ids[snapshot.live_rows()]}
    which = SOURCES.index(index.manifest.dataset["source"])
    counts = {"add": 0, "remove": 0, "compact": 0, "build": 0}

    def log(op: str) -> None:
        """Record what the version just committed holds (from this writer's own bookkeeping),
        and the answer to the fixed query as a quiescent reader gets it."""
        manifest = index.manifest
        found = index.search(query, k=QUERY_K)[0]
        emit("commit", op=op, version=manifest.version, committed_at=manifest.committed_at,
             encoder=manifest.encoder_sha256, source=manifest.dataset["source"],
             count=len(live), ids=ids_hash(live),
             query=[[n.id, n.distance] for n in found])
        if manifest.count != len(live):
            raise SystemExit(f"version {manifest.version}: {manifest.count} live, expected "
                             f"{len(live)}")

    log("initial")
    # A build's calibration draws its generated non-digits once per process: drawn here, so
    # that the rebuilds the readers must see are not held up by it.
    from lenet_embed.calibration import nondigit_pixels
    nondigit_pixels()
    emit("ready", version=index.version)
    next_build = time.monotonic() + 2.0
    while not Path(stop).exists():
        time.sleep(0.08)  # leave the readers most of the CPU
        if time.monotonic() > next_build:
            which = 1 - which
            build_index(data=datasets[which], model=models[which], index_dir=bundle)
            live = set(range(len(datasets[which].train)))
            next_build = time.monotonic() + BUILD_EVERY
            op = "build"
        else:
            roll = rng.random()
            size = len(live)
            if size < 150 or (roll < 0.4 and size < 600):
                nxt = index.manifest.next_id
                ids = np.arange(nxt, nxt + int(rng.integers(1, 6)))
                images = pool_images[ids % len(pool_images)]
                labels = [int(label) for label in pool_labels[ids % len(pool_images)]]
                added, _ = add_vectors(bundle, embed(index, images), images, labels,
                                       encoder_sha256=index.manifest.encoder_sha256)
                if not np.array_equal(added, ids):
                    raise SystemExit(f"add gave ids {added}, expected {ids}")
                live.update(int(i) for i in ids)
                op = "add"
            elif roll < 0.75:
                chosen = rng.choice(sorted(live), size=int(rng.integers(1, 4)), replace=False)
                removal, _ = remove(bundle, chosen)
                if removal.removed != len(chosen):
                    raise SystemExit(f"remove of live ids {chosen} removed {removal}")
                live.difference_update(int(i) for i in chosen)
                op = "remove"
            else:
                before, after = compact(bundle)
                if after.version == before.version:
                    continue
                op = "compact"
        index.refresh()
        counts[op] += 1
        log(op)
    emit("done", counts=counts, cpu=time.process_time())


# ------------------------------------------------------------------------------ readers

def same_neighbors(a: list, b: list, tolerance: float = 1e-5) -> bool:
    """Whether two result lists [[id, distance], ...] agree: same distances, and the same ids
    except where distances tie."""
    if len(a) != len(b):
        return False
    da, db = np.array([d for _, d in a]), np.array([d for _, d in b])
    if not np.allclose(da, db, atol=tolerance, rtol=0):
        return False
    for rank, ((ia, dist), (ib, _)) in enumerate(zip(a, b, strict=True)):
        if ia != ib:
            others = np.delete(da, rank)
            if not (np.abs(others - dist) <= 2 * tolerance).any():
                return False
    return True


def read(bundle: str, loads: str, seed: str, pool_path: str, build_a: str, build_b: str,
         query_path: str) -> None:
    from lenet_embed.search import SearchIndex

    pool_images, _ = load_pool(pool_path)
    base = {SOURCES[0]: load_dataset(build_a, SOURCES[0]).train.images,
            SOURCES[1]: load_dataset(build_b, SOURCES[1]).train.images}
    query = np.load(query_path)
    rng = np.random.default_rng(int(seed))
    failures, mixed, problems = 0, 0, []
    seen: dict[int, dict] = {}
    started = time.perf_counter()

    def problem(text: str) -> None:
        if len(problems) < 10:
            problems.append(text)

    for _ in range(int(loads)):
        try:
            index = SearchIndex.load(bundle)
            snapshot = index.snapshot
            manifest = snapshot.manifest
            rows = snapshot.live_rows()
            ids = snapshot.ids[rows]
            images = snapshot.images(rows)
            row = int(rng.integers(len(rows)))
            stored = snapshot.vectors(rows[row : row + 1])
            nearest = index.search_vectors(stored, k=1)[0][0]
            again = embed(index, images[row : row + 1])
            found = [[n.id, n.distance] for n in index.search(query, k=QUERY_K)[0]]
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            failures += 1
            problem(f"load failed: {exc.__class__.__name__}: {exc}")
            continue
        wrong = []
        state = {"committed_at": manifest.committed_at, "encoder": manifest.encoder_sha256,
                 "source": manifest.dataset.get("source"), "count": len(ids),
                 "ids": ids_hash(ids), "query": found}
        first = seen.setdefault(manifest.version, state)
        if {k: v for k, v in first.items() if k != "query"} != {
                k: v for k, v in state.items() if k != "query"} or not same_neighbors(
                first["query"], found):
            wrong.append("two loads of one version differ")
        if len(ids) != manifest.count:
            wrong.append(f"{len(ids)} live rows, manifest count {manifest.count}")
        built = base.get(state["source"])
        if built is None:
            wrong.append(f"unknown data set {state['source']!r}")
        else:
            expected = pool_images[ids % len(pool_images)]
            inside = ids < len(built)
            expected[inside] = built[ids[inside]]
            if not np.array_equal(images, expected):
                wrong.append("an item's image is not the one written for its id")
        if nearest.id != int(ids[row]) and nearest.distance > 1e-6:
            wrong.append(f"stored vector of id {ids[row]} finds id {nearest.id} first")
        # The encoder belongs to the vectors: it turns a stored image back into its vector.
        gap = float(1.0 - again[0] @ stored[0])
        if gap > 1e-4:
            wrong.append(f"encoder disagrees with the stored vector of id {ids[row]} "
                         f"(cosine distance {gap:.3g})")
        if wrong:
            mixed += 1
            problem(f"version {manifest.version}: {'; '.join(wrong)}")
    emit("summary", loads=int(loads), failures=failures, mixed=mixed, problems=problems,
         seen={str(v): s for v, s in seen.items()}, seconds=time.perf_counter() - started,
         cpu=time.process_time())


if __name__ == "__main__":
    modes = {"crash": crash, "fork-server": fork_server, "churn": churn, "read": read}
    modes[sys.argv[1]](*sys.argv[2:])
