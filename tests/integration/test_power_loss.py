"""Power loss, not only SIGKILL: every commit survives losing whatever was not yet durable.

Each kind of commit (the first build, an add, an add that merges segments, a remove, a compaction,
a calibration, a rebuild) runs for real, in this process, while ``_crash_states.Recorder`` notes
what each ``fsync`` made durable. For every moment of it (before the first flush, after each
one, after the call returned) and every variant of what else reached the disk, the tree a power
failure would leave is written out and checked:

- up to the commit's last flush (the bundle folder's, after ``manifest.json`` was replaced) it
  holds exactly the version before the commit, from then on (the call returned included) exactly
  the new one: the same manifest, the same live items, found by a search, and every file intact
  (``inspect_bundle(verify=True)``);
- the next writer succeeds on it (an add; with no bundle yet, the next build's folder check and
  writer session, and one real build on the state that held the most) and leaves nothing of the
  lost commit behind.

What the model covers and does not is said in ``_crash_states.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _crash_states import Recorder, fingerprint, materialize
from test_durability import _leftovers, _live_ids, _unnamed

from lenet_embed import SearchIndex, build_index, inspect_bundle
from lenet_embed.bundle import MANIFEST, parse_manifest, read_manifest
from lenet_embed.calibration import calibrate
from lenet_embed.errors import LenetEmbedError
from lenet_embed.store.faiss import MERGE_FACTOR
from lenet_embed.updates import add_vectors, compact, remove
from lenet_embed.writer import BundleWriter, check_folder

BUNDLE = "index"  # the bundle's folder inside the recorded world


@dataclass(frozen=True)
class Version:
    """What a crash state may hold: a committed version's manifest text, live ids and the files
    it names (with their folders), or no bundle at all (``manifest`` None)."""

    manifest: bytes | None
    live: frozenset[int] = frozenset()
    names: frozenset[str] = frozenset()


def _version(path: Path) -> Version:
    if not (path / MANIFEST).is_file():
        return Version(None)
    text = (path / MANIFEST).read_bytes()
    files = set(parse_manifest(text.decode(), str(path)).files)
    return Version(text, frozenset(_live_ids(SearchIndex.load(path))),
                   frozenset(files | {name.rsplit("/", 1)[0] for name in files}))


def _check_state(path: Path, before: Version, after: Version, history: set[str]) -> Version:
    """Check one crash state of a commit from ``before`` to ``after``; return which version it
    holds. ``history`` names the files of every version up to ``before``."""
    found = (path / MANIFEST).read_bytes() if (path / MANIFEST).exists() else None
    held = next((v for v in (before, after) if v.manifest == found), None)
    assert held is not None, "manifest.json is neither the old version's nor the new one's"
    if held.manifest is None:
        # No bundle yet: a clear error, and the next build may use the folder (its check, then
        # a writer session, which removes what the lost build left).
        with pytest.raises(LenetEmbedError):
            read_manifest(path)
        check_folder(path)
        if path.is_dir():
            with BundleWriter(path, replacing=True):
                pass
            assert [p.name for p in path.rglob("*") if not p.is_dir()] == [".lock"]
        return held
    inspect_bundle(path, verify=True)
    index = SearchIndex.load(path)
    assert _live_ids(index) == held.live
    snapshot = index.snapshot
    row = snapshot.live_rows()[:1]
    nearest = index.search_vectors(snapshot.vectors(row), k=1)[0][0]
    assert nearest.id == int(snapshot.ids[row][0]) and nearest.distance < 1e-5
    # The next writer succeeds and leaves nothing of a lost commit: no file above its version,
    # nothing beside the layout, and under segments/, encoders/ and deletions/ nothing but what
    # a kept manifest names or files of a version up to the one held. Those last are what a
    # power failure undid of the sweeps (their removal, or the record of the version held, was
    # not flushed): named by no manifest, they go at the next sweep.
    ids, committed = add_vectors(path, snapshot.vectors(row), snapshot.images(row), [None])
    assert committed.version == index.version + 1
    assert ids.tolist() == [index.manifest.next_id]
    assert _leftovers(path, committed.version) == []
    assert sorted(set(_unnamed(path)) - history - held.names) == []
    return held


@dataclass
class Outcome:
    """What the crash states of one commit showed."""

    flushes: int = 0
    states: int = 0  # distinct trees checked
    durable_at: str = ""  # the commit's last flush
    problems: list[str] = field(default_factory=list)


def _crash_commit(world: Path, work: Path, commit: Callable[[], object], history: set[str],
                  build_again: Callable[[Path], object] | None = None) -> Outcome:
    """Run ``commit`` on the bundle in ``world`` under a recorder and check every crash state
    of it: up to its last flush each must hold the old version, from then on the new one.
    ``history`` names the files of every version so far, and gets the new one's.
    ``build_again(path)``, for a first build, builds on the lost build's state that left the
    most behind."""
    path = world / BUNDLE
    before = _version(path)
    history.update(before.names)
    recorder = Recorder(world)
    try:
        with recorder:
            commit()
        after = _version(path)
        assert after.manifest not in (None, before.manifest)
        last = len(recorder.moments) - 2  # the last flush (moment 0 is the start, -1 the end)
        outcome = Outcome(last, durable_at=recorder.moments[last].event)
        if outcome.durable_at != f"fsync {BUNDLE}":
            outcome.problems.append(f"the last flush is {outcome.durable_at!r}, not the bundle "
                                    "folder's after the rename")
        checked: dict[str, Version | str] = {}
        debris: dict = {}  # the largest state that holds no bundle
        for moment, variant, tree in recorder.crash_states():
            key = fingerprint(tree)
            if key not in checked:
                folder = materialize(tree, work / f"state{len(checked)}")
                try:
                    checked[key] = _check_state(folder / BUNDLE, before, after, history)
                except Exception as exc:  # noqa: BLE001 - each one is a problem to report
                    checked[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                shutil.rmtree(folder)
                if checked[key] is before and before.manifest is None and \
                        len(tree) > len(debris):
                    debris = tree
            held, expected = checked[key], (after if moment.number >= last else before)
            if held is not expected:
                found = held if isinstance(held, str) else (
                    f"the {'new' if held is after else 'old'} version")
                outcome.problems.append(f"{moment.event} [{variant}]: {found}")
        outcome.states = len(checked)
        if recorder.ignored:
            outcome.problems.append(f"{recorder.ignored} flushes of files outside the bundle")
        if build_again is not None:
            folder = materialize(debris, work / "built again")
            build_again(folder / BUNDLE)
            built = read_manifest(folder / BUNDLE)
            assert _leftovers(folder / BUNDLE, built.version) == []
    finally:
        recorder.close()
    history.update(after.names)
    return outcome


def test_every_commit_survives_losing_what_was_not_flushed(trained, mnist, tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    path = world / BUNDLE

    def add(count: int) -> Callable[[], object]:
        def run() -> object:
            snapshot = SearchIndex.load(path).snapshot
            picked = snapshot.live_rows()[:count]
            return add_vectors(path, snapshot.vectors(picked), snapshot.images(picked),
                               [int(label) for label in snapshot.labels[picked]])
        return run

    def build(data) -> Callable[..., object]:
        return lambda target=path: build_index(data=data, model=trained.model,
                                               index_dir=target)

    def unsealed() -> int:
        return sum(not segment.sealed for segment in read_manifest(path).segments)

    def prepare_merge() -> None:
        while unsealed() < MERGE_FACTOR - 1:  # the next 1-row add then merges them all
            add(1)()

    def merge() -> object:
        result = add(1)()
        assert unsealed() == 1
        return result

    first = build(mnist.head(300, 20))
    # (name, what runs before, unrecorded, and the commit recorded)
    commits: list[tuple[str, Callable[[], object] | None, Callable[[], object]]] = [
        ("add", None, add(2)),
        ("add merging segments", prepare_merge, merge),
        ("remove", None, lambda: remove(path, [3, 4, 5])),
        ("compact", None, lambda: compact(path)),
        ("calibrate", None, lambda: calibrate(path)),
        ("rebuild", None, build(mnist.head(200, 20))),
    ]
    history: set[str] = set()
    outcomes = {"first build": _crash_commit(world, tmp_path / "first build", first, history,
                                             build_again=first)}
    for name, prepare, commit in commits:
        if prepare is not None:
            prepare()
        outcomes[name] = _crash_commit(world, tmp_path / name, commit, history)
    print()
    for name, outcome in outcomes.items():
        print(f"{name}: {outcome.flushes} flushes, {outcome.states} distinct crash states, "
              f"durable at {outcome.durable_at!r}, {len(outcome.problems)} problems")
    problems = [f"{name}: {p}" for name, o in outcomes.items() for p in o.problems]
    assert problems == [], "\n".join(problems[:40])
