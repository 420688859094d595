"""Changing a bundle in place: add, remove and compact through the API and the CLI, on real
digits. New items are found, removed ones never come back (Flat, HNSW and IVF), ids are never
reused, exact search stays exact, compaction changes nothing a user sees, labels follow the
bundle's kind, other processes see commits after ``refresh``, and one writer at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_checks import ok, one_line_error
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex, build_index, inspect_bundle
from lenet_embed.ann import prepare_vectors
from lenet_embed.bundle import MANIFEST, read_manifest
from lenet_embed.search import Query

K = 10


def _ids(results) -> list[list[int]]:
    return [[n.id for n in row] for row in results]


def _png(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(pixels).save(path)
    return path


def _info(run, index_dir: Path) -> dict:
    return json.loads(ok(run("info", "--index-dir", index_dir, "--json")).stdout)


def _exact(snapshot, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in numpy over the live items' stored vectors: ids and cosine distances."""
    rows = snapshot.live_rows()
    vectors = snapshot.vectors(rows).astype(np.float64)
    q = prepare_vectors(queries, "cosine").astype(np.float64)
    distances = 1.0 - q @ vectors.T
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return snapshot.ids[rows][order], np.take_along_axis(distances, order, axis=1)


@pytest.fixture(scope="module")
def new_digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    """Real test digits that are not in the session bundle (it holds training digits)."""
    return mnist.test.images[200:240], mnist.test.labels[200:240]


@pytest.fixture(scope="module")
def factory_bundles(trained, bundle_data, bundle_dir, tmp_path_factory) -> dict[str, Path]:
    """The session bundle (Flat, what ``auto`` builds for 2,000 digits) and the same digits
    under HNSW32, IVF16,Flat and IVF32,SQ8 (what ``auto`` builds within a 500 KB budget)."""
    bundles = {"Flat": bundle_dir}
    for factory, options in (("HNSW32", {"factory": "HNSW32"}),
                             ("IVF16,Flat", {"factory": "IVF16,Flat"}),
                             ("IVF32,SQ8", {"memory_budget": "500KB"})):
        index_dir = tmp_path_factory.mktemp(factory.replace(",", "-")) / "index"
        built = build_index(data=bundle_data, model=trained.model, index_dir=index_dir, **options)
        assert built.manifest.factory == factory
        bundles[factory] = index_dir
    return bundles


@pytest.fixture(params=["Flat", "HNSW32", "IVF16,Flat", "IVF32,SQ8"])
def any_factory(request, factory_bundles, tmp_path) -> Path:
    """A private copy of a bundle of each FAISS factory."""
    return Path(shutil.copytree(factory_bundles[request.param], tmp_path / "index"))


# ------------------------------------------------------------------------------------- add


def test_added_images_are_found_first(bundle_copy, bundle_data, new_digits):
    images, labels = new_digits[0][:3], new_digits[1][:3]
    index = SearchIndex.load(bundle_copy)
    n = len(bundle_data.train)
    before = index.search(images, k=K)
    ids = index.add(images, labels=labels.tolist())
    assert ids.tolist() == [n, n + 1, n + 2]
    assert (index.version, len(index)) == (2, n + 3)
    manifest = read_manifest(bundle_copy)
    assert (manifest.operation, manifest.count, manifest.rows, manifest.next_id) == (
        "add", n + 3, n + 3, n + 3)
    assert [s.sealed for s in manifest.segments] == [True, False]
    assert manifest.segments[1].rows == 3
    for searcher in (index, SearchIndex.load(bundle_copy)):  # this process and a fresh load
        found = searcher.search(images, k=K)
        for row, item_id, label, old in zip(found, ids, labels, before, strict=True):
            assert (row[0].id, row[0].label, row[0].rank) == (item_id, label, 1)
            assert row[0].distance <= 1e-5
            # The rest are the neighbours it had before, pushed down one place.
            assert [n.id for n in row[1:]] == [n.id for n in old[: K - 1]]
    for item_id, image in zip(ids, images, strict=True):
        assert np.array_equal(index.item_image(int(item_id)), image)
    (result,) = index.query([Query(image=images[1], name="new one")], k=3)
    assert result.ok and result.neighbors[0].id == ids[1]


def test_cli_add_json_then_query_finds_them(run, bundle_copy, bundle_data, new_digits, tmp_path):
    images, labels = new_digits
    pngs = [_png(tmp_path / "pngs", f"{i}.png", images[i]) for i in range(2)]
    n = len(bundle_data.train)
    result = ok(run("add", *pngs, "--label", 4, "--index-dir", bundle_copy, "--json"))
    assert len(result.stdout.splitlines()) == 1
    payload = json.loads(result.stdout)
    assert payload == {"index_dir": str(bundle_copy), "version": 2, "count": n + 2,
                       "ids": [n, n + 1], "sources": [str(p) for p in pngs]}
    result = ok(run("add", pngs[0], "--index-dir", bundle_copy))
    assert result.stdout == f"{n + 2}\t{pngs[0]}\n"
    assert result.stderr == (f"added 1 item(s); {bundle_copy} is at version 3 with "
                             f"{n + 3} items\n")
    records = [json.loads(line) for line in ok(run(
        "query", *pngs, "--index-dir", bundle_copy, "-k", 3, "--json")).stdout.splitlines()]
    # pngs[0] is in the bundle twice now, pngs[1] once; both were labelled 4 the first time.
    assert {n["id"] for n in records[0]["neighbors"][:2]} == {n, n + 2}
    assert {n["label"] for n in records[0]["neighbors"][:2]} == {4, None}
    assert records[1]["neighbors"][0]["id"] == n + 1
    assert records[1]["neighbors"][0]["label"] == 4
    assert records[1]["neighbors"][0]["source"] == str(pngs[1])
    assert records[1]["neighbors"][0]["distance"] <= 1e-5


def test_cli_add_a_folder(run, bundle_copy, new_digits, tmp_path):
    images, labels = new_digits
    root = tmp_path / "pictures"
    pngs = [_png(root / str(labels[i]), f"{i}.png", images[i]) for i in range(5)]
    payload = json.loads(ok(run("add", "--images", root, "--index-dir", bundle_copy,
                                "--json")).stdout)
    assert sorted(payload["sources"]) == sorted(map(str, pngs))
    index = SearchIndex.load(bundle_copy)
    for item_id, source in zip(payload["ids"], payload["sources"], strict=True):
        (row,) = index.search(source, k=1)
        assert (row[0].id, row[0].source) == (item_id, source)
        assert row[0].label == int(Path(source).parent.name)  # labelled by the subfolder
    line = one_line_error(run("add", pngs[0], "--images", root, "--index-dir", bundle_copy))
    assert "one of them" in line
    assert read_manifest(bundle_copy).version == 2


def test_adds_from_threads_during_a_commit_share_the_next_one(bundle_copy, new_digits):
    """Group commit: eight threads call add while a commit is in flight (here: while the commit
    lock is held); the next commit takes all eight, and each call returns its own id."""
    images, labels = new_digits
    index = SearchIndex.load(bundle_copy)
    before = index.manifest
    found: dict[int, list[int]] = {}

    def add(i: int) -> None:
        found[i] = index.add(images[i], labels=int(labels[i])).tolist()

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    with index._adds._committing:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(index._adds._waiting) < 8:
            assert time.monotonic() < deadline, "the adds did not all arrive"
            time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=120)
    manifest = read_manifest(bundle_copy)
    assert (manifest.version, manifest.count) == (before.version + 1, before.count + 8)
    assert sorted(i for ids in found.values() for i in ids) == list(
        range(before.next_id, before.next_id + 8))
    fresh = SearchIndex.load(bundle_copy)
    for i, ids in found.items():
        top = fresh.search(images[i], k=1)[0][0]
        assert (top.id, top.label) == (ids[0], int(labels[i]))
    with pytest.raises(LenetEmbedError, match="label 'x'"):
        index.add(images[0], labels="x")  # refused alone, before it could join a commit
    assert not index._adds._waiting and read_manifest(bundle_copy).version == manifest.version


def test_ids_are_never_reused(bundle_copy, bundle_data, new_digits):
    index = SearchIndex.load(bundle_copy)
    n = len(bundle_data.train)
    image = new_digits[0][:1]
    (first,) = index.add(image)
    assert index.remove([first]) == 1
    (second,) = index.add(image)
    assert (first, second) == (n, n + 1)
    assert index.remove([second, n - 1]) == 2  # the newest and the last built id
    index.compact()
    assert read_manifest(bundle_copy).next_id == n + 2
    (third,) = index.add(image)
    assert third == n + 2
    assert index.snapshot.ids.max() == third and sorted(index.snapshot.ids.tolist()) == (
        index.snapshot.ids.tolist())


def test_add_does_not_import_tensorflow(bundle_copy, new_digits, tmp_path, quiet_env):
    png = _png(tmp_path, "digit.png", new_digits[0][0])
    code = "\n".join([
        "import json, sys",
        "import numpy as np",
        "from lenet_embed import SearchIndex",
        "from lenet_embed.cli import main",
        "bundle, png = sys.argv[1], sys.argv[2]",
        "index = SearchIndex(bundle)",
        "ids = index.add([png], labels=[3])",
        "main(['add', png, '--index-dir', bundle, '--json'], standalone_mode=False)",
        "print(json.dumps(ids.tolist()))",
        "print(json.dumps(sorted(m for m in sys.modules",
        "                        if m.startswith(('tensorflow', 'keras')))))",
    ])
    done = subprocess.run([sys.executable, "-c", code, str(bundle_copy), str(png)],
                          capture_output=True, text=True, env=quiet_env, timeout=120)
    assert done.returncode == 0, done.stderr
    cli_line, api_line, modules_line = done.stdout.strip().splitlines()
    n = read_manifest(bundle_copy).next_id
    assert json.loads(api_line) == [n - 2] and json.loads(cli_line)["ids"] == [n - 1]
    assert json.loads(modules_line) == []
    assert SearchIndex.load(bundle_copy).search(png, k=2)[0][0].id in (n - 2, n - 1)


# ----------------------------------------------------------------------------------- labels


def test_labels_on_a_digit_bundle(run, bundle_copy, new_digits, tmp_path):
    images = new_digits[0][:3]
    index = SearchIndex.load(bundle_copy)
    ids = index.add(images, labels=[3, "7", None])
    found = [row[0] for row in index.search(images, k=1)]
    assert [n.id for n in found] == ids.tolist()
    assert [n.label for n in found] == [3, 7, None]
    version = index.version
    for bad in ("seven", -1, "3.5"):
        with pytest.raises(LenetEmbedError, match="whole number"):
            index.add(images[:1], labels=[bad])
    png = _png(tmp_path, "digit.png", images[0])
    result = run("add", png, "--label", "seven", "--index-dir", bundle_copy)
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "'seven'" in line and "whole number" in line
    assert read_manifest(bundle_copy).version == version  # nothing was added


@pytest.fixture(scope="module")
def folder_bundle(trained, mnist, tmp_path_factory) -> Path:
    """Real digits filed as ``zero/`` and ``one/`` pictures: a bundle with named classes."""
    base = tmp_path_factory.mktemp("folders")
    for name, digit in (("zero", 0), ("one", 1)):
        for row in np.flatnonzero(mnist.train.labels == digit)[:20]:
            _png(base / "pictures" / name, f"{row:05d}.png", mnist.train.images[row])
    build_index(images=base / "pictures", model=trained.model, index_dir=base / "index")
    return base / "index"


def test_class_names_on_a_folder_bundle(run, folder_bundle, mnist, tmp_path):
    target = Path(shutil.copytree(folder_bundle, tmp_path / "index"))
    assert read_manifest(target).classes == ["one", "zero"]
    twos = mnist.test.images[np.flatnonzero(mnist.test.labels == 2)[:2]]
    zero = mnist.test.images[np.flatnonzero(mnist.test.labels == 0)[0]]
    index = SearchIndex.load(target)
    ids = index.add([twos[0], zero], labels=["two", "zero"])
    assert read_manifest(target).classes == ["one", "zero", "two"]  # new names are appended
    png = _png(tmp_path / "pngs", "two.png", twos[1])
    ok(run("add", png, "--label", "two", "--index-dir", target))
    assert read_manifest(target).classes == ["one", "zero", "two"]
    index.refresh()
    found = [row[0] for row in index.search([twos[0], zero, twos[1]], k=1)]
    assert [n.id for n in found] == [*ids.tolist(), ids[-1] + 1]
    assert [n.label for n in found] == ["two", "zero", "two"]
    # The original items keep their names.
    originals = index.search(mnist.test.images[np.flatnonzero(mnist.test.labels == 1)[:5]],
                             k=1)
    assert {row[0].label for row in originals} == {"one"}


# ----------------------------------------------------------------------------------- remove


def test_removed_items_never_come_back(any_factory, bundle_data):
    index = SearchIndex.load(any_factory)
    queries = bundle_data.train.images[:30]
    # Remove every item that was among the 3 nearest of a query, the query itself included.
    removed = sorted({i for row in _ids(index.search(queries, k=3)) for i in row})
    assert set(range(30)) <= set(removed)
    assert index.remove(removed) == len(removed)
    for searcher in (index, SearchIndex.load(any_factory)):
        assert len(searcher) == len(bundle_data.train) - len(removed)
        vectors = searcher.embed(queries)
        for results in (searcher.search(queries, k=K), searcher.search_vectors(vectors, k=K),
                        [r.neighbors for r in searcher.query(list(queries), k=K)]):
            assert all(len(row) == K for row in results)
            assert not {i for row in _ids(results) for i in row} & set(removed)
        for item_id in removed[:5]:
            with pytest.raises(LenetEmbedError, match=f"no item with id {item_id}"):
                searcher.item_image(item_id)
    # Removing them again removes nothing.
    assert index.remove(removed[:3]) == 0


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat", "IVF32,SQ8"])
def test_k_live_results_when_most_items_are_removed(factory, factory_bundles, bundle_data,
                                                     mnist, tmp_path):
    target = Path(shutil.copytree(factory_bundles[factory], tmp_path / "index"))
    index = SearchIndex.load(target)
    n = len(bundle_data.train)
    removed = np.random.default_rng(0).permutation(n)[: n * 95 // 100]
    assert index.remove(removed) == len(removed)
    live = n - len(removed)
    queries = np.concatenate([mnist.test.images[:20], bundle_data.train.images[removed[:20]]])
    vectors = index.embed(queries)
    for k in (50, live):
        results = index.search_vectors(vectors, k=k)
        exact_ids, _ = _exact(index.snapshot, vectors, k)
        for row, exact in zip(results, exact_ids, strict=True):
            ids = [neighbor.id for neighbor in row]
            assert len(ids) == len(set(ids)) == k
            assert not set(ids) & set(removed.tolist())
            distances = [neighbor.distance for neighbor in row]
            assert distances == sorted(distances)
            assert len(set(ids) & set(exact.tolist())) >= 0.9 * k
    with pytest.raises(LenetEmbedError, match=f"k must be between 1 and {live}"):
        index.search_vectors(vectors, k=live + 1)


def test_compact_of_ivf_with_fewer_live_items_than_lists_seals_them_flat(
        factory_bundles, bundle_data, tmp_path):
    """IVF16 needs 16 vectors to train its lists: with 10 live items compact builds an exact Flat
    index instead, and the manifest says so (no nprobe left that Flat would refuse)."""
    target = Path(shutil.copytree(factory_bundles["IVF16,Flat"], tmp_path / "index"))
    index = SearchIndex.load(target)
    n = len(bundle_data.train)
    kept = np.arange(0, n, n // 10)[:10]
    assert index.remove(np.setdiff1d(np.arange(n), kept)) == n - 10
    index.compact()
    manifest = read_manifest(target)
    assert (manifest.factory, manifest.search_params, manifest.target_recall) == ("Flat", {}, None)
    assert manifest.factory_reason == ("compact: 10 live items are too few to train IVF16,Flat; "
                                       "Flat (exact search) instead")
    assert (manifest.count, manifest.rows, len(manifest.segments)) == (10, 10, 1)
    fresh = SearchIndex.load(target)
    for searcher in (index, fresh):
        found = searcher.search(bundle_data.train.images[kept], k=10)
        assert [row[0].id for row in found] == kept.tolist()  # each finds itself first
        assert all(sorted(n.id for n in row) == kept.tolist() for row in found)


def test_exact_search_after_adds_and_removes_is_exact(bundle_copy, new_digits, mnist):
    index = SearchIndex.load(bundle_copy)
    images = new_digits[0]
    added = []
    # Several adds: unsealed segments; four of 1 merged, then the 4 pulls in the smaller 3 and 2.
    for size in (1, 1, 1, 1, 3, 2, 4):
        start = sum(len(a) for a in added)
        added.append(index.add(images[start : start + size]))
    added_ids = np.concatenate(added)
    assert [s.rows for s in index.manifest.segments if not s.sealed] == [4, 9]
    index.remove([*added_ids[::3].tolist(), *range(0, 2000, 7)])
    queries = np.concatenate([images[:20], mnist.test.images[:20]])
    vectors = index.embed(queries)
    expected_ids, expected_distances = _exact(index.snapshot, vectors, K)
    results = index.search_vectors(vectors, k=K)
    assert _ids(results) == expected_ids.tolist()
    assert np.abs(np.array([[n.distance for n in row] for row in results])
                  - expected_distances).max() <= 1e-5
    # The vectors stored for added items are the encoder's, normalised.
    rows = [index.snapshot.row_of(int(i)) for i in added_ids[1::3]]
    stored = index.snapshot.vectors(np.array(rows))
    assert np.abs(stored - prepare_vectors(index.embed(images[1::3][: len(rows)]), "cosine")
                  ).max() <= 1e-5


def test_cli_remove_reports_unknown_ids_and_removes_the_others(run, bundle_copy, bundle_data):
    n = len(bundle_data.train)
    result = run("remove", 3, n + 50, 7, "--index-dir", bundle_copy)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stdout == f"removed 2 item(s); {bundle_copy} is at version 2 with {n - 2} items\n"
    assert result.stderr == f"Error: no item with id {n + 50} in {bundle_copy}\n"
    index = SearchIndex.load(bundle_copy)
    for item_id in (3, 7):
        assert index.snapshot.row_of(item_id) is None
    assert index.search(bundle_data.train.images[3], k=1)[0][0].id != 3
    result = run("remove", 3, 4, "--index-dir", bundle_copy, "--json")  # 3 is gone already
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"index_dir": str(bundle_copy), "version": 3,
                                         "removed": 1, "missing": [3], "count": n - 3}
    line = one_line_error(run("remove", 3, "--index-dir", bundle_copy))
    assert line == f"Error: no item with id 3 in {bundle_copy}"
    assert read_manifest(bundle_copy).version == 3  # a remove that removes nothing commits nothing


# ---------------------------------------------------------------------------------- compact


def test_compact_keeps_ids_labels_and_results(run, bundle_copy, bundle_data, new_digits):
    (bundle_copy / "README.md").write_text("docs\n")
    index = SearchIndex.load(bundle_copy)
    images, labels = new_digits
    index.add(images[:5], labels=labels[:5].tolist())
    index.add(images[5:12], labels=labels[5:12].tolist())
    removed = [2, 11, 2000, 2006]
    index.remove(removed)
    before = _info(run, bundle_copy)
    segments = len(before["segments"])
    assert (before["deleted"], before["count"]) == (4, 2008) and segments >= 2
    assert before["reclaimable_bytes"] > 0
    snapshot = index.snapshot
    live = snapshot.live_rows()
    ids, item_labels = snapshot.ids[live], snapshot.labels[live]
    queries = np.concatenate([images[:12], bundle_data.train.images[:20]])
    expected = index.search(queries, k=K)

    summary = json.loads(ok(run("compact", "--index-dir", bundle_copy, "--json")).stdout)
    assert (summary["reclaimed_rows"], summary["segments_before"], summary["segments_after"],
            summary["count"]) == (4, segments, 1, 2008)
    # The command waits until no reader can be opening the old files, then removes them.
    assert summary["freed_bytes"] > 0
    manifest = read_manifest(bundle_copy)
    on_disk = {p.relative_to(bundle_copy).as_posix()
               for folder in ("segments", "encoders", "deletions", "calibration")
               if (bundle_copy / folder).is_dir()
               for p in (bundle_copy / folder).rglob("*") if p.is_file()}
    assert on_disk == set(manifest.files)
    after = _info(run, bundle_copy)
    assert (after["deleted"], after["count"], after["rows"], after["operation"]) == (
        0, 2008, 2008, "compact")
    assert after["deletions"] is None and after["reclaimable_bytes"] == 0
    assert [s["sealed"] for s in after["segments"]] == [True]
    assert after["bytes"] < before["bytes"]
    assert (bundle_copy / "README.md").read_text() == "docs\n"

    assert index.refresh() is True
    snapshot = index.snapshot
    assert snapshot.live.all()
    assert np.array_equal(snapshot.ids, ids) and np.array_equal(snapshot.labels, item_labels)
    results = index.search(queries, k=K)
    assert _ids(results) == _ids(expected)
    assert np.allclose([[n.distance for n in r] for r in results],
                       [[n.distance for n in r] for r in expected], atol=1e-5)
    assert [[n.label for n in r] for r in results] == [[n.label for n in r] for r in expected]
    for item_id in removed:
        with pytest.raises(LenetEmbedError, match="no item with id"):
            index.item_image(item_id)
    result = ok(run("compact", "--index-dir", bundle_copy))
    assert result.stdout == f"{bundle_copy} is already compact (version 5, 2008 items)\n"


# ------------------------------------------------------------------- readers and writers


def test_refresh_sees_another_writers_commits(bundle_copy, new_digits):
    first, second = SearchIndex.load(bundle_copy), SearchIndex.load(bundle_copy)
    assert second.refresh() is False
    sealed = second.snapshot.segments[0]
    image = new_digits[0][:1]
    (new_id,) = first.add(image)
    assert second.version == 1 and second.search(image, k=1)[0][0].id != new_id
    assert second.refresh() is True
    assert second.version == first.version == 2
    assert second.search(image, k=1)[0][0].id == new_id
    assert second.snapshot.segments[0] is sealed  # unchanged segments are reused
    assert second.refresh() is False
    assert second.remove([new_id]) == 1
    assert first.search(image, k=1)[0][0].id == new_id  # until it refreshes
    assert first.refresh() is True
    assert first.search(image, k=1)[0][0].id != new_id


def test_a_writer_sees_its_own_adds_whether_it_read_before_or_not(bundle_copy, new_digits):
    """A SearchIndex that has only written switches to its commits at its first read (not at
    each commit); one that reads switches at each commit. Either way its adds are visible to
    it at once, and they are no change that refresh() reports."""
    images, labels = new_digits
    writer, reader = SearchIndex.load(bundle_copy), SearchIndex.load(bundle_copy)
    before = len(reader)  # reader has read: it switches at each commit
    written = [int(writer.add(images[i], labels=int(labels[i]))[0]) for i in range(3)]
    assert writer._loaded.manifest.version == 1  # not switched yet: nothing has read
    (read,) = reader.add(images[3], labels=int(labels[3]))
    assert reader._loaded.manifest.version == 5  # switched at its own commit
    assert writer.refresh() is True  # its own adds are no news, the reader's add is
    assert len(writer) == before + 4 and writer.version == reader.version == 5
    assert [writer.search(images[i], k=1)[0][0].id for i in range(4)] == [*written, read]
    assert reader.search(images[3], k=1)[0][0].id == read and reader.refresh() is False
    (more,) = writer.add(images[4], labels=int(labels[4]))
    assert writer._loaded.manifest.version == 6  # it has read now: switched at the commit
    assert writer.search(images[4], k=1)[0][0].id == more


def _mapped_deleted_files() -> set[str]:
    """Files this process still has mapped although they were unlinked (Linux: ``(deleted)``)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5].removesuffix(" (deleted)") for line in lines
            if line.endswith(" (deleted)")}


def test_a_reader_keeps_its_version_after_its_files_are_swept(any_factory, bundle_data,
                                                              new_digits):
    """A load maps the segment files instead of reading them. A compaction and its sweep then
    remove them: the reader that never refreshes keeps answering from its version, unchanged,
    from pages the kernel keeps while they are mapped."""
    from lenet_embed.writer import BundleWriter

    reader, writer = SearchIndex.load(any_factory), SearchIndex.load(any_factory)
    queries = np.concatenate([new_digits[0][:5], bundle_data.train.images[:5]])
    expected = reader.search(queries, k=K)
    old_files = {any_factory / name for name in reader.manifest.files}
    writer.add(new_digits[0][:3], labels=new_digits[1][:3].tolist())
    writer.remove([3, 7])
    writer.compact()
    with BundleWriter(any_factory) as sweeper:
        sweeper.collect_garbage(grace=0, force=True)
    sealed = reader.snapshot.segments[0].info
    old_vectors = any_factory / sealed.file("vectors.npy")
    assert not old_vectors.exists() and not (any_factory / sealed.entry).exists()
    assert str(old_vectors) in _mapped_deleted_files()  # read from the unlinked file
    swept = old_files - {any_factory / name for name in read_manifest(any_factory).files}
    assert swept and not any(path.exists() for path in swept)

    results = reader.search(queries, k=K)
    assert _ids(results) == _ids(expected)
    assert [[n.distance for n in r] for r in results] == [[n.distance for n in r] for r in expected]
    assert np.array_equal(reader.item_image(3), bundle_data.train.images[3])
    assert reader.refresh() is True and len(reader) == len(bundle_data.train) + 1
    with pytest.raises(LenetEmbedError, match="no item with id 3"):
        reader.item_image(3)


def test_verify_follows_a_commit_that_sweeps_its_files(bundle_copy, monkeypatch):
    """`info --verify` reads for a long time. When a commit and its sweep remove the files of the
    version it loaded, it verifies the new version; a file missing with no newer version is
    damage, said in one line."""
    import lenet_embed.snapshot as snapshot_module
    from lenet_embed.writer import BundleWriter

    real, versions = snapshot_module.verify_files, []

    def racing(directory, files):
        versions.append(read_manifest(directory).version)
        if len(versions) == 1:
            index = SearchIndex.load(directory)
            index.remove([1])
            index.compact()
            with BundleWriter(directory) as sweeper:
                sweeper.collect_garbage(grace=0, force=True)
        return real(directory, files)

    monkeypatch.setattr(snapshot_module, "verify_files", racing)
    report = inspect_bundle(bundle_copy, verify=True)
    assert versions == [1, 3] and report.verified
    assert (report.manifest.version, report.manifest.operation) == (3, "compact")

    segment = report.manifest.segments[0]
    victim = bundle_copy / segment.file("labels.npy")

    def vanishing(directory, files):
        victim.unlink()
        return real(directory, files)

    monkeypatch.setattr(snapshot_module, "verify_files", vanishing)
    with pytest.raises(LenetEmbedError) as caught:
        inspect_bundle(bundle_copy, verify=True)
    assert str(caught.value) == (f"{victim}: missing from the bundle; rebuild it with "
                                 "`lenet-embed build-index`")


LOCK_HOLDER = "\n".join([
    "import sys",
    "from pathlib import Path",
    "from lenet_embed.writer import WriterLock",
    "lock = WriterLock(Path(sys.argv[1]), 5)",
    "lock.acquire()",
    "print('locked', flush=True)",
    "sys.stdin.read()",
    "lock.release()",
])


def test_one_writer_at_a_time(run, bundle_copy, new_digits, tmp_path):
    png = _png(tmp_path, "digit.png", new_digits[0][0])
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(bundle_copy)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        manifest = (bundle_copy / MANIFEST).read_bytes()
        expected = (f"Error: {bundle_copy}: another process (pid {holder.pid}) is writing to "
                    "this bundle; waited 0.2 s, try again")
        for args in (("add", png), ("remove", 1), ("compact",)):
            result = run(*args, "--index-dir", bundle_copy, "--wait", 0.2)
            assert result.exit_code == 1
            assert one_line_error(result) == expected
        assert (bundle_copy / MANIFEST).read_bytes() == manifest  # nothing changed
        index = SearchIndex(bundle_copy, lock_timeout=0.2)
        with pytest.raises(LenetEmbedError, match=f"pid {holder.pid}"):
            index.add(new_digits[0][:1])
        assert read_manifest(bundle_copy).version == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Once the holder is gone the next writer gets in.
    payload = json.loads(ok(run("add", png, "--index-dir", bundle_copy, "--wait", 0.2,
                                "--json")).stdout)
    assert payload["version"] == 2


def test_a_stream_of_adds_is_swept_a_bounded_batch_at_a_time(bundle_copy, new_digits):
    """A commit of a stream of adds removes at most SWEEP_LIMIT of the files and folders a sweep
    found unused, so no add holds the writer lock for the whole backlog; in turn they leave
    exactly what one whole sweep leaves, and the bundle answers throughout."""
    import os

    from lenet_embed.writer import SWEEP_LIMIT, VERSIONS_DIR, BundleWriter

    index = SearchIndex.load(bundle_copy)
    for digit, label in zip(new_digits[0][:40], new_digits[1][:40].tolist(), strict=True):
        index.add(digit[None], labels=[label])
    # Every superseded version is long past its grace period.
    for record in (bundle_copy / VERSIONS_DIR).iterdir():
        os.utime(record, (time.time() - 60, time.time() - 60))
    queries = new_digits[0][30:40]
    expected = _ids(index.search(queries, k=3))
    whole = bundle_copy.parent / "whole"
    shutil.copytree(bundle_copy, whole)
    with BundleWriter(whole) as sweeper:
        sweeper.collect_garbage(force=True)
    left = {p.relative_to(whole) for p in whole.rglob("*")}

    def on_disk() -> set[Path]:
        return {p.relative_to(bundle_copy) for p in bundle_copy.rglob("*")
                if p.parent.parent == bundle_copy or p.parent == bundle_copy}

    removed_each = []
    while True:
        before = on_disk()
        with BundleWriter(bundle_copy) as sweeper:
            sweeper.collect_garbage(limit=SWEEP_LIMIT)
        removed = before - on_disk()
        if not removed:
            break
        removed_each.append(len(removed))
        assert _ids(SearchIndex.load(bundle_copy).search(queries, k=3)) == expected
    assert len(removed_each) > 2 and max(removed_each) <= SWEEP_LIMIT, removed_each
    assert {p.relative_to(bundle_copy) for p in bundle_copy.rglob("*")} == left
