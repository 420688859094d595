"""Crash safety and concurrency of bundle commits, as the issue's acceptance checks ask:

- writers killed (SIGKILL) at random moments of add, remove, compact, calibrate and build-index
  leave the bundle loadable, holding exactly the acknowledged writes (plus, at most, the one
  operation in flight, applied completely), and the next write leaves nothing of theirs behind;
  two moments too rare to hit at random are checked on purpose: a build's temporary files, and
  a writer killed in the middle of sweeping superseded versions;
- a stateful property test: any sequence of add / remove / compact / refresh keeps exact search
  over the bundle equal to brute force over the live items' stored vectors;
- readers in other processes load and search thousands of times while a writer commits and
  rebuilds with another encoder, and never fail nor see a mix of two versions.

The subprocess side lives in ``_writer_worker.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _writer_worker import SOURCES, same_neighbors
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from lenet_embed import SearchIndex, build_index, inspect_bundle
from lenet_embed.ann import prepare_vectors
from lenet_embed.data import Dataset, LabeledImages
from lenet_embed.model_choice import SHIPPED_DIR
from lenet_embed.updates import add_vectors

WORKER = Path(__file__).resolve().parents[1] / "_writer_worker.py"
SEED = 20240611
LAYOUT = {"manifest.json", "versions", "segments", "encoders", "deletions", "calibration",
          ".lock"}
VERSIONED = re.compile(r"[sedn](\d{8})-[0-9a-f]+(\.npy)?")


# ------------------------------------------------------------------------------ helpers

def _save_dataset(path: Path, dataset: Dataset) -> Path:
    np.savez(path, train_images=dataset.train.images, train_labels=dataset.train.labels,
             test_images=dataset.test.images, test_labels=dataset.test.labels)
    return path


def _live_ids(index: SearchIndex) -> set[int]:
    snapshot = index.snapshot
    return {int(i) for i in snapshot.ids[snapshot.live_rows()]}


def _leftovers(path: Path, version: int) -> list[str]:
    """What a writer that died before committing may leave: scratch space, files named after a
    version above the current one, anything else beside the layout."""
    found = [p.name for p in path.iterdir() if p.name not in LAYOUT]
    for parent in ("segments", "encoders", "deletions", "calibration"):
        if (path / parent).is_dir():
            for entry in (path / parent).iterdir():
                match = VERSIONED.fullmatch(entry.name)
                if match is None or int(match.group(1)) > version:
                    found.append(f"{parent}/{entry.name}")
    for entry in (path / "versions").iterdir():
        if not re.fullmatch(r"\d{8}\.json", entry.name) or int(entry.name[:8]) > version:
            found.append(f"versions/{entry.name}")
    return found


def _unnamed(path: Path) -> list[str]:
    """Files and folders under segments/, encoders/, deletions/ and calibration/ that no manifest
    kept in versions/ names (the current one must be among them)."""
    named: set[str] = set()
    for entry in (path / "versions").glob("*.json"):
        named.update(json.loads(entry.read_text())["files"])
    current = json.loads((path / "manifest.json").read_text())
    assert (path / "versions" / f"{current['version']:08d}.json").read_text() == \
        (path / "manifest.json").read_text()
    folders = {name.rsplit("/", 1)[0] for name in named}
    found = []
    for parent in ("segments", "encoders", "deletions", "calibration"):
        if not (path / parent).is_dir():
            continue
        for entry in sorted((path / parent).rglob("*")):
            relative = entry.relative_to(path).as_posix()
            if relative not in (named if entry.is_file() else folders):
                found.append(relative)
    return found


class Worker:
    """A ``_writer_worker.py`` subprocess whose stdout lines (JSON) are read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path) -> None:
        self.stderr_path = stderr
        self._stderr = open(stderr, "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        self.events: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def expect(self, event: str, timeout: float = 120.0) -> dict:
        """Wait for the next line of kind ``event`` (every line read is kept in ``events``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no {event!r} from the worker in {timeout} s; stderr:\n"
                                     f"{self.stderr()}") from None
            if line is None:
                self.proc.wait()
                raise AssertionError(f"the worker exited ({self.proc.returncode}) before "
                                     f"{event!r}; stderr:\n{self.stderr()}")
            self.events.append(line)
            if line["event"] == event:
                return line

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, then collect every line printed before it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = 60.0) -> None:
        self.proc.wait(timeout)
        self._reader.join(timeout)
        while True:
            line = self._lines.get_nowait() if not self._lines.empty() else None
            if line is None:
                break
            self.events.append(line)
        self._stderr.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def pool(mnist) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST test digits that writers add."""
    return mnist.test.images[1000:3000], mnist.test.labels[1000:3000]


@pytest.fixture(scope="module")
def files(mnist, pool, tmp_path_factory) -> dict[str, Path]:
    """What the workers read: digits to add, data sets to build from, a query digit."""
    folder = tmp_path_factory.mktemp("durability-data")
    np.savez(folder / "pool.npz", images=pool[0], labels=pool[1])
    train, test = mnist.train, mnist.test
    small_a = Dataset(LabeledImages(train.images[:300], train.labels[:300]),
                      LabeledImages(test.images[:10], test.labels[:10]), SOURCES[0])
    small_b = Dataset(LabeledImages(train.images[300:600], train.labels[300:600]),
                      LabeledImages(test.images[10:20], test.labels[10:20]), SOURCES[1])
    np.save(folder / "query.npy", test.images[0])
    return {"pool": folder / "pool.npz", "a": _save_dataset(folder / "a.npz", small_a),
            "b": _save_dataset(folder / "b.npz", small_b), "query": folder / "query.npy"}


def _libraries_own(path: Path) -> bool:
    """Whether ``path`` in a writer's TMPDIR is TensorFlow's or Keras's own temporary file."""
    if path.is_dir():
        return not any(path.iterdir())
    return re.fullmatch(r"__autograph_generated_file\w+\.py", path.name) is not None


def _worker_env(tmpdir: Path) -> dict[str, str]:
    tmpdir.mkdir(parents=True)
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONDONTWRITEBYTECODE": "1"}


# ------------------------------------------------------------------------------ 1. crashes

# Operations the killed writers repeat (compact alternates with a remove) and how many of each.
KILLS = {"add": 18, "remove": 12, "compact": 24, "build": 5, "calibrate": 6}
BUILDERS_AHEAD = 2  # build-index writers (fresh processes, TensorFlow) started in advance


def _apply(state: dict, op: dict, build_size: int) -> dict:
    """The state after ``op`` (an intent or ack line) commits."""
    live, next_id = set(state["live"]), state["next_id"]
    if op["op"] == "add":
        live.update(range(next_id, next_id + op["n"]))
        next_id += op["n"]
    elif op["op"] == "remove":
        assert set(op["ids"]) <= live
        live.difference_update(op["ids"])
    elif op["op"] == "build":
        live, next_id = set(range(build_size)), build_size
    # calibrate: a new version with the same items
    return {"version": state["version"] + 1, "live": live, "next_id": next_id}


def _replay(events: list[dict], state: dict, build_size: int) -> tuple[dict, dict | None]:
    """Apply a killed worker's acknowledged operations to ``state``; return the new state and
    the operation it was in (an intent without an ack), if any."""
    pending = None
    for event in events:
        if event["event"] == "intent":
            pending = event
        elif event["event"] == "ack":
            expected = _apply(state, pending, build_size)
            assert event["version"] == expected["version"], event
            if event["op"] == "add":  # ids are handed out in order and never reused
                assert event["ids"] == list(range(state["next_id"], expected["next_id"]))
            state, pending = expected, None
    return state, pending


def test_killed_writers_leave_acknowledged_versions_and_no_leftovers(
        bundle_copy, trained, files, tmp_path):
    path, build_size = bundle_copy, 300
    rng = random.Random(SEED)
    schedule = [op for op, count in KILLS.items() for _ in range(count)]
    rng.shuffle(schedule)
    index = SearchIndex.load(path)
    state = {"version": index.version, "live": _live_ids(index),
             "next_id": index.manifest.next_id}
    in_flight = dict.fromkeys((*KILLS, "none"), 0)  # the operation each kill interrupted
    debris = dict.fromkeys(in_flight, 0)  # kills that left files for the next writer to remove
    landed = 0  # kills after the commit of the operation in flight, before its ack
    acknowledged = 0
    build_seconds: list[float] = []
    durations = {op: [0.05] for op in KILLS}  # how long each operation took, to aim the kills

    # add / remove / compact writers are forked from one process that imported everything
    # (starting Python takes longer than such a writer lives); builds get fresh processes.
    server = Worker(["fork-server", str(path), str(files["pool"])],
                    {**_worker_env(tmp_path / "tmp" / "server"), "OPENBLAS_NUM_THREADS": "1"},
                    tmp_path / "server.err")
    builds = [number for number, op in enumerate(schedule) if op == "build"]

    def spawn_builder(number: int) -> Worker:
        # Builds alternate between a .keras model (its encoder saved and exported to LiteRT by
        # the writer) and the shipped model folder (its files copied as they are).
        model = trained.model if builds.index(number) % 2 == 0 else SHIPPED_DIR
        args = ["crash", str(path), "build", str(SEED + number), str(files["pool"]),
                str(files["a"]), str(model)]
        return Worker(args, _worker_env(tmp_path / "tmp" / f"w{number}"),
                      tmp_path / f"w{number}.err")

    builders = {number: spawn_builder(number) for number in builds[:BUILDERS_AHEAD]}
    alive: list[int] = []  # the writer being killed, should the test fail first
    started = time.perf_counter()
    try:
        server.expect("loaded")
        for number, op in enumerate(schedule):
            tmpdir = tmp_path / "tmp" / f"w{number}"
            if op == "build":
                worker = builders.pop(number)
                alive[:] = [worker.proc.pid]
                later = builds.index(number) + BUILDERS_AHEAD
                if later < len(builds):
                    builders[builds[later]] = spawn_builder(builds[later])
                worker.expect("loaded")
                worker.send("go")
                worker.expect("ready")
                if not build_seconds:  # how long a build takes here: let the first one finish
                    build_seconds.append(worker.expect("ack", timeout=300)["seconds"])
                time.sleep(rng.uniform(0, build_seconds[0]))
                worker.kill()
                alive.clear()
                assert worker.proc.returncode == -signal.SIGKILL, worker.stderr()
                events = worker.events
            else:
                tmpdir.mkdir(parents=True)
                server.send(f"fork {op} {SEED + number} {tmpdir}")
                pid = server.expect("forked")["pid"]
                alive[:] = [pid]
                assert server.expect("ready")["pid"] == pid
                # A random moment of the k-th operation ``op``, or just after it.
                for _ in range(rng.randint(1, 4)):
                    while server.expect("intent")["op"] != op:
                        pass
                time.sleep(rng.uniform(0, 1.2 * statistics.median(durations[op])))
                os.kill(pid, signal.SIGKILL)
                server.send(f"wait {pid}")
                reaped = server.expect("reaped")
                alive.clear()
                assert reaped["signal"] == signal.SIGKILL, server.stderr()
                events = [e for e in server.events if e["pid"] == pid]
            acks = [e for e in events if e["event"] == "ack"]
            acknowledged += len(acks)
            for ack in acks:
                durations[ack["op"]].append(ack["seconds"])
            state, pending = _replay(events, state, build_size)
            interrupted = pending["op"] if pending else "none"
            in_flight[interrupted] += 1

            inspect_bundle(path, verify=True)  # every file matches its checksum
            index = SearchIndex.load(path)
            manifest = index.manifest
            if pending is not None and manifest.version == state["version"] + 1:
                state = _apply(state, pending, build_size)  # committed, then killed
                assert manifest.operation == pending["op"]
                landed += 1
            assert manifest.version == state["version"], (manifest.version, state, op)
            assert _live_ids(index) == state["live"], f"version {manifest.version} after {op}"
            assert (manifest.count, manifest.next_id) == (len(state["live"]), state["next_id"])
            debris[interrupted] += bool(_leftovers(path, manifest.version))

            # The next write removes whatever the killed writer left.
            snapshot = index.snapshot
            row = snapshot.live_rows()[:1]
            ids, committed = add_vectors(path, snapshot.vectors(row), snapshot.images(row),
                                         [None])
            state = _apply(state, {"op": "add", "n": 1}, build_size)
            assert committed.version == state["version"]
            assert ids.tolist() == [state["next_id"] - 1]
            assert _leftovers(path, committed.version) == []
            assert _unnamed(path) == []
            # Only what the libraries make there themselves and remove when the process ends
            # or the call returns, placed by no public API: TensorFlow's autograph modules, and
            # Keras's empty staging folder of a .keras save. Nothing of lenet-embed's.
            assert [p for p in tmpdir.rglob("*") if not _libraries_own(p)] == [], \
                "the killed writer left files in its TMPDIR"
    finally:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for worker in builders.values():
            worker.kill()
        server.proc.stdin.close()
        server.finish()
    seconds = time.perf_counter() - started

    print(f"\ncrash test: {len(schedule)} kills in {seconds:.1f} s; operation interrupted: "
          f"{in_flight}; of which left debris: {debris}; {landed} kills between a commit and "
          f"its ack; {acknowledged} acknowledged commits; median seconds per operation "
          f"{ {op: round(statistics.median(d), 3) for op, d in durations.items()} }; a build "
          f"takes {build_seconds[0]:.1f} s")
    assert len(schedule) >= 50
    assert min(in_flight[name] for name in ("add", "remove", "compact")) >= 6, in_flight
    assert min(in_flight[name] for name in ("build", "calibrate")) >= 3, in_flight
    assert sum(debris.values()) >= 10  # the cleanup was exercised, not only the happy path
    assert _live_ids(SearchIndex.load(path)) == state["live"]


def test_a_build_keeps_its_temporary_files_in_the_bundle(trained, mnist, tmp_path,
                                                        monkeypatch):
    """What a build stages in temporary folders (the LiteRT exporter's SavedModel) goes to the
    bundle's scratch folder, which the next writer empties. The one exception is the empty folder
    Keras's .keras save stages assets in (no public Keras API places it): it is in the system's
    temp folder, and gone when the save returns. Python's tempfile.tempdir is never changed."""
    created: list[Path] = []
    seen_tempdirs: set[str | None] = set()

    def recording(make):
        def made(*args, **kwargs):
            seen_tempdirs.add(tempfile.tempdir)
            result = make(*args, **kwargs)
            created.append(Path(result if isinstance(result, str) else result[1]))
            return result
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", recording(tempfile.mkdtemp))
    monkeypatch.setattr(tempfile, "mkstemp", recording(tempfile.mkstemp))
    before = tempfile.tempdir
    path = tmp_path / "index"
    build_index(data=mnist.head(100, 10), model=trained.model, index_dir=path)
    assert created  # the test sees the temporary folders it is about
    assert seen_tempdirs == {before}
    outside = [p for p in created if not p.is_relative_to(path / ".tmp")]
    assert len(outside) <= 1 and not any(p.exists() for p in outside), outside
    assert not (path / ".tmp").exists()


class _Killed(BaseException):
    """Stands for SIGKILL at one precise moment of an in-process writer."""


def test_a_writer_killed_while_collecting_garbage_leaves_nothing_unnamed(
        bundle_dir, tmp_path, monkeypatch):
    """Kill the sweep that removes a superseded version after each of its removals in turn:
    whatever it has not removed yet is still named by a manifest in versions/ (so the next
    sweep finds it), also when the next write is too soon to sweep again."""
    from lenet_embed import garbage
    from lenet_embed.updates import compact, remove

    real_remove = garbage._unlink
    for kill_at in range(1, 10):
        path = Path(shutil.copytree(bundle_dir, tmp_path / f"index{kill_at}"))
        remove(path, [0])  # version 2: a deletions file
        compact(path)  # version 3: version 1's segment and 2's deletions are no longer needed
        remove(path, [1])  # version 4
        old = time.time() - 100  # as if versions 1 to 3 had been committed long ago
        for number in (1, 2, 3):
            os.utime(path / "versions" / f"{number:08d}.json", (old, old))
        removals = []

        def dying(target: Path, removals=removals, kill_at=kill_at) -> int:
            freed = 0
            if target.exists():
                removals.append(target)
                freed = real_remove(target)
                if len(removals) == kill_at:
                    raise _Killed
            return freed

        monkeypatch.setattr(garbage, "_unlink", dying)
        try:
            compact(path)  # version 5 sweeps away versions 1 and 2
        except _Killed:
            pass
        else:
            break
        finally:
            monkeypatch.setattr(garbage, "_unlink", real_remove)
        assert _unnamed(path) == [], f"killed after removing {removals}"
        index = SearchIndex.load(path)
        row = index.snapshot.live_rows()[:1]
        add_vectors(path, index.snapshot.vectors(row), index.snapshot.images(row), [None])
        assert _unnamed(path) == [] and _leftovers(path, index.version + 1) == []
        assert len(SearchIndex.load(path)) == len(index) + 1
    # The sweep unlinked a segment's five files, a deletions file and two manifests.
    assert kill_at == 9


# ------------------------------------------------------------------------------ 2. properties

class BundleMachine(RuleBasedStateMachine):
    """add / remove / compact / refresh on a small bundle, checked against a model of it.

    The model keeps every item's stored vector as first seen (they never change, compaction
    included) and the live ids of every version, so a reader left on an old version is checked
    against that version."""

    template: Path
    workspace: Path
    exact: bool
    pool: tuple[np.ndarray, np.ndarray]
    queries: np.ndarray

    def __init__(self) -> None:
        super().__init__()
        self.path = Path(tempfile.mkdtemp(dir=self.workspace)) / "index"
        shutil.copytree(self.template, self.path)
        self.index = SearchIndex.load(self.path)
        self.reader = SearchIndex.load(self.path)
        snapshot = self.index.snapshot
        rows = snapshot.live_rows()
        self.vectors = dict(zip(snapshot.ids[rows].tolist(), snapshot.vectors(rows),
                                strict=True))
        self.live = set(self.vectors)
        self.removed: set[int] = set()
        self.issued = self.index.manifest.next_id
        self.states = {self.index.version: frozenset(self.live)}

    def teardown(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)

    def _committed(self, changed: bool, before: int) -> None:
        assert self.index.version == before + changed
        self.states[self.index.version] = frozenset(self.live)

    @rule(picks=st.lists(st.integers(0, 1999), min_size=1, max_size=5))
    def add(self, picks: list[int]) -> None:
        images, labels = self.pool[0][picks], self.pool[1][picks]
        before = self.index.version
        ids = self.index.add(images, labels=labels.tolist())
        assert ids.tolist() == list(range(self.issued, self.issued + len(picks)))  # never reused
        self.issued += len(picks)
        snapshot = self.index.snapshot
        rows = np.array([snapshot.row_of(i) for i in ids.tolist()])
        stored = snapshot.vectors(rows)
        embedded = prepare_vectors(self.index.embed(list(images)), "cosine")
        assert np.abs(stored - embedded).max() < 1e-5
        assert np.array_equal(snapshot.images(rows), images)
        assert snapshot.labels[rows].tolist() == labels.tolist()
        self.vectors.update(zip(ids.tolist(), stored, strict=True))
        self.live.update(ids.tolist())
        self._committed(True, before)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        some_live = st.sampled_from(sorted(self.live)) if self.live else st.nothing()
        live = data.draw(st.lists(some_live, max_size=4, unique=True))
        unknown = data.draw(st.lists(
            st.sampled_from([*sorted(self.removed), self.issued, self.issued + 5, 10**9]),
            max_size=2, unique=True))
        before = self.index.version
        assert self.index.remove([*live, *unknown]) == len(live)
        self.live.difference_update(live)
        self.removed.update(live)
        self._committed(bool(live), before)

    @rule()
    def compact(self) -> None:
        manifest = self.index.manifest
        needed = manifest.deleted or len(manifest.segments) > 1 or not all(
            s.sealed for s in manifest.segments)
        self.index.compact()
        after = self.index.manifest
        if needed:
            assert after.operation == "compact" and after.deletions is None
            assert after.rows == after.count == len(self.live)
            assert [s.sealed for s in after.segments] == [True] * bool(self.live)
        self._committed(bool(needed), manifest.version)

    @rule()
    def refresh(self) -> None:
        assert self.index.refresh() is False  # the writer is always on the newest version
        stale = self.reader.version != self.index.version
        assert self.reader.refresh() is stale
        assert self.reader.version == self.index.version

    @invariant()
    def searches_agree_with_brute_force(self) -> None:
        for index in (self.index, self.reader):
            self._check(index, self.states[index.version])

    @invariant()
    def nothing_is_left_behind(self) -> None:
        assert _leftovers(self.path, self.index.version) == []
        assert _unnamed(self.path) == []

    def _check(self, index: SearchIndex, live: frozenset[int]) -> None:
        assert len(index) == len(live) == index.manifest.count
        snapshot = index.snapshot
        rows = snapshot.live_rows()
        ids = snapshot.ids[rows]
        assert set(ids.tolist()) == live
        stored = snapshot.vectors(rows)
        expected_vectors = np.stack([self.vectors[i] for i in ids.tolist()]) if len(ids) else \
            np.zeros((0, 84), np.float32)
        assert np.array_equal(stored, expected_vectors)  # stored vectors never change
        if not live:
            return
        k = min(10, len(live))
        queries = np.concatenate([self.queries, stored[:2]])
        found = index.search_vectors(queries, k=k)
        # Brute force, in float64, over the live items' stored vectors.
        prepared = prepare_vectors(queries, "cosine").astype(np.float64)
        distances = 1.0 - prepared @ stored.astype(np.float64).T
        position = {int(i): p for p, i in enumerate(ids.tolist())}
        for q, neighbors in enumerate(found):
            got = [n.id for n in neighbors]
            got_distances = np.array([n.distance for n in neighbors])
            # k distinct live items: removed ones never come back
            assert len(got) == k and len(set(got)) == k and set(got) <= live, (got, k)
            true = distances[q, [position[i] for i in got]]
            assert np.abs(got_distances - true).max() < 1e-5  # each distance is that item's
            assert (np.diff(got_distances) >= -1e-6).all()
            if self.exact:  # the k nearest, ties in any order
                best = np.sort(distances[q])[:k]
                assert np.abs(got_distances - best).max() < 1e-5


@pytest.fixture(scope="module")
def small_bundles(trained, mnist, tmp_path_factory) -> dict[str, Path]:
    """200-digit bundles, Flat and HNSW32, that each state machine run copies."""
    data = mnist.head(200, 10)
    folder = tmp_path_factory.mktemp("small-bundles")
    return {factory: Path(build_index(data=data, model=trained.model, factory=factory,
                                      index_dir=folder / factory).path)
            for factory in ("Flat", "HNSW32")}


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_any_sequence_of_writes_keeps_search_exact(factory, small_bundles, pool, mnist,
                                                   tmp_path):
    machine = type(f"BundleMachine{factory}", (BundleMachine,), {
        "template": small_bundles[factory], "workspace": tmp_path, "exact": factory == "Flat",
        "pool": pool,
        "queries": SearchIndex.load(small_bundles[factory]).embed(list(mnist.test.images[:3])),
    })
    run_state_machine_as_test(machine, settings=settings(
        max_examples=15, stateful_step_count=12, deadline=None, database=None,
        derandomize=True, suppress_health_check=[HealthCheck.too_slow]))


# ------------------------------------------------------------------------------ 3. readers

READERS, LOADS = 2, 5000


def _second_model(trained, path: Path) -> Path:
    """Another encoder: the trained one with the 84 outputs of fc2 permuted, so that pairing
    one model's vectors with the other's encoder cannot go unnoticed."""
    from lenet_embed.model import find_layer, load_classifier

    classifier = load_classifier(trained.model)
    layer = find_layer(classifier, "fc2")
    kernel, bias = layer.get_weights()
    order = np.random.default_rng(SEED).permutation(kernel.shape[1])
    layer.set_weights([kernel[:, order], bias[order]])
    classifier.save(path)
    return path


def test_readers_never_fail_nor_mix_versions_while_a_writer_commits(
        trained, files, pool, tmp_path):
    from lenet_embed.model import encoder_of, load_classifier

    model_b = _second_model(trained, tmp_path / "model-b.keras")
    # The check has teeth: the two encoders disagree on every digit.
    sample = pool[0][:50, :, :, None].astype(np.float32) / 255.0
    a, b = (prepare_vectors(np.asarray(encoder_of(load_classifier(str(m)))(sample)), "cosine")
            for m in (trained.model, model_b))
    assert (1.0 - (a * b).sum(axis=1)).min() > 1e-2

    path = tmp_path / "index"
    with np.load(files["a"]) as arrays:
        first = Dataset(LabeledImages(arrays["train_images"], arrays["train_labels"]),
                        LabeledImages(arrays["test_images"], arrays["test_labels"]), SOURCES[0])
    build_index(data=first, model=trained.model, index_dir=path)
    stop = tmp_path / "stop"
    writer = Worker(["churn", str(path), str(SEED), str(files["pool"]), str(files["a"]),
                     str(files["b"]), str(trained.model), str(model_b), str(stop),
                     str(files["query"])], _worker_env(tmp_path / "tmp-writer"),
                    tmp_path / "writer.err")
    try:
        writer.expect("ready", timeout=600)  # it draws the calibration's non-digits first
        readers = [Worker(["read", str(path), str(LOADS), str(SEED + n), str(files["pool"]),
                           str(files["a"]), str(files["b"]), str(files["query"])],
                          _worker_env(tmp_path / f"tmp-reader{n}"), tmp_path / f"reader{n}.err")
                   for n in range(READERS)]
        summaries = [reader.expect("summary", timeout=600) for reader in readers]
        for reader in readers:
            reader.finish()
    finally:
        stop.touch()
    writer.expect("done", timeout=120)
    writer.finish()
    commits = {e["version"]: e for e in writer.events if e["event"] == "commit"}

    loads = sum(s["loads"] for s in summaries)
    failures = sum(s["failures"] for s in summaries)
    mixed = sum(s["mixed"] for s in summaries)
    problems = [p for s in summaries for p in s["problems"]]
    seen: dict[int, list[dict]] = {}
    for summary in summaries:
        for version, state in summary["seen"].items():
            seen.setdefault(int(version), []).append(state)
    unlike = []  # versions a reader saw otherwise than the writer committed them
    for version, states in seen.items():
        logged = commits.get(version)
        for state in states:
            if logged is None or any(state[key] != logged[key] for key in
                                     ("committed_at", "encoder", "source", "count", "ids")) \
                    or not same_neighbors(state["query"], logged["query"]):
                unlike.append(version)
    encoders = {states[0]["encoder"] for states in seen.values()}
    models = {states[0]["source"] for states in seen.values()}  # data set A: model A, B: B
    builds = sum(e["op"] == "build" for e in commits.values())
    print(f"\nreaders: {loads} loads in {max(s['seconds'] for s in summaries):.1f} s "
          f"(CPU {sum(s['cpu'] for s in summaries):.0f} s, writer's "
          f"{writer.events[-1]['cpu']:.0f} s), "
          f"{failures} failures, {mixed} inconsistent loads, {len(unlike)} versions seen "
          f"otherwise than committed; {len(seen)} of {len(commits)} versions seen, "
          f"{len(encoders)} encoders of {len(models)} models; writer: "
          f"{writer.events[-1]['counts']}")
    assert loads >= 10_000
    assert failures == 0 and mixed == 0 and unlike == [], problems[:5] or unlike[:5]
    assert builds >= 1 and models == set(SOURCES)  # readers saw versions of both models
