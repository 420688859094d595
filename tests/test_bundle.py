"""The on-disk bundle, format 2: the manifest and its file list, the layout on disk, commits that
leave the folder (and anyone's files in it) in place, a bundle of format 1 (refused, rebuilt in
place), and every kind of damage: detected on load (sizes, shapes, the manifest's own
checksum), or by `info --verify` (a changed byte inside a file)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from importlib.metadata import version
from pathlib import Path

import faiss
import msgspec
import numpy as np
import pytest
from cli_checks import ok, one_line_error
from msgspec.structs import replace
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex, build_index
from lenet_embed import writer as writer_module
from lenet_embed.ann import make_index, prepare_vectors
from lenet_embed.bundle import (
    CALIBRATION_DIR,
    DELETIONS_DIR,
    ENCODER_FILE,
    ENCODERS_DIR,
    FORMAT_VERSION,
    IDS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    LABELS_FILE,
    LAYOUT,
    LITERT_FILE,
    MANIFEST,
    SEAL,
    SEGMENT_FILES,
    SEGMENTS_DIR,
    SOURCES_FILE,
    VECTORS_FILE,
    VERSIONS_DIR,
    FileEntry,
    Manifest,
    Segment,
    checked,
    manifest_json,
    parse_manifest,
    read_manifest,
    row_dtype,
    sealed_json,
)
from lenet_embed.calibration import UNCALIBRATED
from lenet_embed.embed import KerasEncoder
from lenet_embed.preprocess import scale_pixels
from lenet_embed.snapshot import inspect_bundle
from lenet_embed.writer import BundleWriter, contents

SMALL_N = 60


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files_on_disk(directory: Path) -> set[str]:
    """Every file under the data folders of a bundle, relative to it."""
    found = set()
    for parent in (SEGMENTS_DIR, ENCODERS_DIR, DELETIONS_DIR, CALIBRATION_DIR):
        if (directory / parent).is_dir():
            found.update(p.relative_to(directory).as_posix()
                         for p in (directory / parent).rglob("*") if p.is_file())
    return found


def _listing(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones too) and its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the session bundle


def test_manifest_fields(built, bundle_dir, bundle_data):
    manifest = read_manifest(bundle_dir)
    assert isinstance(manifest, Manifest)
    assert manifest == built.manifest
    n = len(bundle_data.train)
    assert manifest.format_version == FORMAT_VERSION == 2
    assert (manifest.version, manifest.operation) == (1, "build")
    assert manifest.lenet_embed_version == version("lenet-embed")
    for stamp in (manifest.created_at, manifest.committed_at):
        when = datetime.fromisoformat(stamp)
        assert when.utcoffset() == timedelta(0)
        assert abs(datetime.now(timezone.utc) - when) < timedelta(hours=1)
    assert manifest.created_at <= manifest.committed_at
    assert (manifest.dim, manifest.metric, manifest.factory) == (84, "cosine", "Flat")
    assert (manifest.count, manifest.rows, manifest.next_id, manifest.deleted) == (n, n, n, 0)
    assert manifest.deletions is None
    assert manifest.dataset == {"kind": "idx", "source": bundle_data.source, "split": "train"}
    assert manifest.classes == [] and manifest.search_params == {}
    assert manifest.target_recall is None  # an exact index has nothing to tune
    assert manifest.factory_reason == (
        f"{n} vectors x 84 d: Flat (exact search is fast up to 10000 vectors; "
        f"{n * 84 * 4 // 1000} KB within the 2 GB budget)")
    (segment,) = manifest.segments
    assert isinstance(segment, Segment)
    assert (segment.rows, segment.sealed, segment.has_sources) == (n, True, False)
    assert re.fullmatch(r"s00000001-[0-9a-f]+", segment.name)
    assert re.fullmatch(rf"{ENCODERS_DIR}/e00000001-[0-9a-f]+", manifest.encoder)
    assert manifest.encoder_path == f"{manifest.encoder}/{ENCODER_FILE}"
    assert manifest.litert_path == f"{manifest.encoder}/{LITERT_FILE}"
    assert manifest.encoder_sha256 == _sha256(bundle_dir / manifest.encoder_path)
    # The JSON on disk is exactly the model, with the documented field names, and sealed.
    on_disk = json.loads((bundle_dir / MANIFEST).read_text())
    assert on_disk.pop(SEAL) and on_disk == manifest.to_dict()
    assert set(on_disk) == {f.name for f in msgspec.structs.fields(Manifest)}
    assert (bundle_dir / VERSIONS_DIR / "00000001.json").read_text() == (
        bundle_dir / MANIFEST).read_text()


# A value of the wrong type or out of range, where it is, and the one line that says so.
TYPED_REFUSALS = {
    "a bool for a count": (("segments", 0, "rows"), True,
                           "segments.0.rows: expected `int`, got `bool`"),
    "a float for a count": (("count",), 60.0, "count: expected `int`, got `float`"),
    "a string for a number": (("calibration", "min_confidence"), "0.5",
                              "calibration.min_confidence: expected `float`, got `str`"),
    "a bool for a number": (("calibration", "ood", "weights", 0), False,
                            "calibration.ood.weights.0: expected `float`, got `bool`"),
    "a number for a bool": (("segments", 0, "sealed"), 1,
                            "segments.0.sealed: expected `bool`, got `int`"),
    "a number for a string": (("operation",), 1, "operation: expected `str`, got `int`"),
    "beyond int64": (("next_id",), 2**63, "next_id: expected `int` <= 9223372036854775807"),
    "negative": (("segments", 0, "rows"), -1, "segments.0.rows: expected `int` >= 0"),
    "not finite": (("calibration", "ood", "bias"), float("nan"),
                   "calibration.ood.bias: expected a finite `float`"),
    "infinite": (("calibration", "head_weights", 3, 2), float("inf"),
                 "calibration.head_weights.3.2: expected a finite `float`"),
    "a threshold not finite": (("calibration", "ood_thresholds", "0.995"), float("-inf"),
                               "calibration.ood_thresholds[...]: expected a finite `float`"),
    "a scale of zero": (("calibration", "ood", "scale", 0), 0.0,
                        "calibration.ood.scale.0: expected `float` > 0"),
    "an unknown feature": (("calibration", "ood", "features", 0), "bogus",
                           "calibration: calibration feature 'bogus' is not one of"),
    "an unknown field": (("segments", 0, "extra"), 1,
                         "segments.0: object contains unknown field `extra`"),
    "an unknown top-level field": (("extra",), 1, "object contains unknown field `extra`"),
    "a nested field missing": (("calibration", "ood"), {"features": []},
                               "calibration.ood: object missing required field `mean`"),
    "a string for a list": (("segments",), "segments/x", "segments: expected `array`, got `str`"),
    "an empty head": (("calibration", "head_bias"), [],
                      "calibration.head_bias: expected `array` of length >= 1"),
    "an unknown store": (("store",), {"kind": "elsewhere", "uri": "x", "collection": "c",
                                      "index": "HNSW"},
                         "store: unknown store kind 'elsewhere'; this version knows milvus"),
}


@pytest.mark.parametrize("case", TYPED_REFUSALS.values(), ids=TYPED_REFUSALS)
def test_a_typed_refusal_names_where_and_what(bundle_dir, case):
    """msgspec's ValidationError becomes one line naming the manifest, where the value is and
    what is wrong; a value of another type is not converted (a whole number where a real one
    is wanted is that number: next test)."""
    path, value, expected = case
    data = json.loads((bundle_dir / MANIFEST).read_text())
    data.pop(SEAL)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(LenetEmbedError) as caught:
        parse_manifest(sealed_json(data), "edited.json")
    message = str(caught.value)
    assert message.startswith(f"edited.json: malformed manifest ({expected}")
    assert "\n" not in message and message.endswith("rebuild it with `lenet-embed build-index`")


def test_a_file_entry_needs_a_sha256_in_hex(bundle_dir):
    data = json.loads((bundle_dir / MANIFEST).read_text())
    data.pop(SEAL)
    name, entry = next(iter(data["files"].items()))
    entry["sha256"] = entry["sha256"].upper()
    with pytest.raises(LenetEmbedError) as caught:
        parse_manifest(sealed_json(data), "edited.json")
    assert str(caught.value).startswith(f"edited.json: malformed manifest (files.{name}.sha256: "
                                        f"'{entry['sha256'][:60]}' is not a sha256 in hex)")


def test_every_missing_field_is_named_alone(bundle_dir):
    """A manifest without a field: "lacks" and the field, not a type error."""
    data = json.loads((bundle_dir / MANIFEST).read_text())
    data.pop(SEAL)
    data.pop("files")
    with pytest.raises(LenetEmbedError, match=r"^edited.json: manifest lacks files; rebuild it"):
        parse_manifest(sealed_json(data), "edited.json")


def test_whole_numbers_are_reals_where_reals_are_wanted(bundle_dir):
    data = json.loads((bundle_dir / MANIFEST).read_text())
    data.pop(SEAL)
    data["calibration"]["min_confidence"] = 1
    manifest = parse_manifest(sealed_json(data), "edited.json")
    assert manifest.calibration.min_confidence == 1.0
    assert isinstance(manifest.calibration.min_confidence, float)


def test_file_list_covers_exactly_the_structure(bundle_dir):
    manifest = read_manifest(bundle_dir)
    expected = {manifest.encoder_path, manifest.litert_path, manifest.calibration.nondigits,
                *(f"{SEGMENTS_DIR}/{manifest.segments[0].name}/{name}"
                  for name in (*SEGMENT_FILES, INDEX_FILE))}
    assert manifest.calibration.nondigits.startswith("calibration/")
    assert set(manifest.files) == manifest.required_files() == expected
    assert _files_on_disk(bundle_dir) == expected  # nothing on disk the manifest does not name
    for name, entry in manifest.files.items():
        assert isinstance(entry, FileEntry)
        assert entry.bytes == (bundle_dir / name).stat().st_size, name
        assert entry.sha256 == _sha256(bundle_dir / name), name
    assert {p.name for p in bundle_dir.iterdir()} <= LAYOUT


def test_build_summary(built, bundle_data):
    summary = built.summary()
    assert summary["count"] == len(bundle_data.train)
    assert (summary["dim"], summary["metric"], summary["factory"]) == (84, "cosine", "Flat")
    assert summary["skipped"] == 0 and summary["index_dir"] == built.path
    assert summary["version"] == 1 and summary["search_params"] == {}


def test_segment_files_and_what_loads(bundle_dir, bundle_data, trained, search_index):
    manifest = read_manifest(bundle_dir)
    folder = bundle_dir / manifest.segments[0].entry
    assert folder == bundle_dir / SEGMENTS_DIR / manifest.segments[0].name  # sealed: a folder
    n = len(bundle_data.train)
    arrays = {name: np.load(folder / name, allow_pickle=False) for name in SEGMENT_FILES}
    assert arrays[VECTORS_FILE].dtype == np.float32 and arrays[VECTORS_FILE].shape == (n, 84)
    assert arrays[IDS_FILE].dtype == np.int64 and arrays[LABELS_FILE].dtype == np.int64
    assert arrays[IMAGES_FILE].dtype == np.uint8 and arrays[IMAGES_FILE].shape == (n, 28, 28)
    assert np.array_equal(arrays[IDS_FILE], np.arange(n))
    assert np.array_equal(arrays[LABELS_FILE], bundle_data.train.labels)
    assert np.array_equal(arrays[IMAGES_FILE], bundle_data.train.images)  # as the encoder saw them
    # Row i holds the L2-normalised (cosine) embedding of training image i, in both the vectors
    # file and the FAISS index.
    embeddings = KerasEncoder.load(trained.encoder).embed(scale_pixels(bundle_data.train.images))
    expected = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert np.abs(arrays[VECTORS_FILE] - expected).max() <= 1e-5
    index = faiss.read_index(str(folder / INDEX_FILE))
    assert index.ntotal == n and np.array_equal(index.reconstruct_n(0, n), arrays[VECTORS_FILE])
    # What a SearchIndex loads is what is on disk.
    snapshot = search_index.snapshot
    assert snapshot.manifest == manifest and len(snapshot.segments) == 1
    assert np.array_equal(snapshot.ids, arrays[IDS_FILE])
    assert np.array_equal(snapshot.labels, arrays[LABELS_FILE]) and snapshot.live.all()
    assert snapshot.sources(snapshot.live_rows()) is None
    assert np.array_equal(snapshot.images(np.arange(n)), bundle_data.train.images)
    # The bundle's own encoder is the trained one.
    bundled = KerasEncoder.load(bundle_dir / manifest.encoder_path).embed(
        scale_pixels(bundle_data.test.images))
    reference = KerasEncoder.load(trained.encoder).embed(scale_pixels(bundle_data.test.images))
    assert np.abs(bundled - reference).max() <= 1e-6


def test_too_few_items_to_calibrate_build_a_bundle_that_says_so(trained, bundle_data, tmp_path,
                                                                 caplog):
    """Four items cannot be calibrated: the bundle is built without a calibration, the log
    says why once, and queries are answered without a confidence."""
    with caplog.at_level("WARNING", logger="lenet_embed.build"):
        result = build_index(data=bundle_data.head(4, 10), model=trained.model,
                             index_dir=tmp_path / "index")
    assert result.manifest.calibration is None
    said = [r.getMessage() for r in caplog.records if "no calibration" in r.getMessage()]
    assert len(said) == 1 and "labelled items" in said[0]
    [answer] = SearchIndex.load(tmp_path / "index").query([bundle_data.test.images[0]], k=2)
    assert answer.match and answer.confidence is None and answer.reason == UNCALIBRATED


def test_build_from_an_encoder_file(trained, bundle_dir, bundle_data, tmp_path):
    """``--model`` may be the encoder file as well as the classifier: same vectors. A first build
    creates missing parent folders, with ordinary permissions."""
    n = 300
    progress = []
    target = tmp_path / "nested" / "index"
    result = build_index(data=bundle_data.head(n, 10), model=trained.encoder, index_dir=target,
                         on_progress=lambda *step: progress.append(step))
    assert result.manifest.count == n
    assert [step for step in progress if step[1] == n] == [
        ("embedding", n, n), ("indexing", n, n), ("writing", n, n)]
    ours = SearchIndex.load(target).snapshot.vectors(np.arange(n))
    session = SearchIndex.load(bundle_dir).snapshot.vectors(np.arange(n))
    assert np.abs(ours - session).max() <= 1e-6
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # like a plain mkdir, not private
    assert sorted(p.name for p in target.parent.iterdir()) == ["index"]


def test_a_keras_model_embeds_on_its_litert_export(trained, bundle_data, tmp_path, monkeypatch):
    """A ``.keras`` model is exported to LiteRT before the build embeds (ai-edge-litert is
    installed here): Keras never embeds, and the vectors are what the bundle's own LiteRT
    encoder gives."""
    def no_keras(self, pixels):
        raise AssertionError("the build embedded with Keras")

    monkeypatch.setattr(KerasEncoder, "embed", no_keras)
    n = 200
    target = tmp_path / "index"
    build_index(data=bundle_data.head(n, 10), model=trained.model, index_dir=target)
    index = SearchIndex.load(target, backend="litert")
    again = prepare_vectors(index.encoder.embed(scale_pixels(bundle_data.train.images[:n])),
                            "cosine")
    assert np.abs(index.snapshot.vectors(np.arange(n)) - again).max() <= 1e-6


def test_build_with_a_missing_model(bundle_data, tmp_path):
    missing = tmp_path / "nope.keras"
    with pytest.raises(LenetEmbedError, match=re.escape(str(missing))):
        build_index(data=bundle_data, model=missing, index_dir=tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_missing_bundle(tmp_path):
    missing = tmp_path / "nothing"
    for load in (read_manifest, SearchIndex.load, inspect_bundle):
        with pytest.raises(LenetEmbedError, match="no index bundle there"):
            load(missing)
    from lenet_embed.updates import compact, remove

    for write in (lambda: remove(missing, [1]), lambda: compact(missing)):
        with pytest.raises(LenetEmbedError, match="no index bundle there"):
            write()
    assert not missing.exists()  # writers never create a folder to find no bundle in it


# ------------------------------------------------------------- commits keep the folder


@pytest.fixture
def small_build(trained, bundle_data):
    """``small_build(index_dir)``: a 60-digit bundle, quick to build."""
    def build(index_dir: Path, **options):
        return build_index(data=bundle_data.head(SMALL_N, 10), model=trained.model,
                           index_dir=index_dir, **options)
    return build


def test_readme_and_own_files_survive_every_commit(small_build, bundle_data, tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    (target / "README.md").write_text("# what this folder is\n")
    (target / ".gitkeep").write_text("")
    small_build(target)
    (target / "notes.txt").write_text("mine\n")  # a bundle's folder may hold anyone's files
    kept = {"README.md": b"# what this folder is\n", ".gitkeep": b"", "notes.txt": b"mine\n"}

    def check(operation: str, version: int) -> None:
        manifest = read_manifest(target)
        assert (manifest.operation, manifest.version) == (operation, version)
        for name, content in kept.items():
            assert (target / name).read_bytes() == content, (operation, name)
            assert not any(name in f for f in manifest.files)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]

    check("build", 1)
    index = SearchIndex.load(target)
    (new_id,) = index.add(bundle_data.test.images[:1], labels=[7])
    check("add", 2)
    assert index.remove([new_id, 0]) == 2
    check("remove", 3)
    index.compact()
    check("compact", 4)
    small_build(target, metric="l2")
    check("build", 5)  # a rebuild continues the count
    assert SearchIndex.load(target).metric == "l2"


def test_rebuild_keeps_the_path_and_readers_never_miss_it(small_build, tmp_path):
    target = tmp_path / "index"
    first = small_build(target).manifest
    inode = target.stat().st_ino
    seen: list[int] = []
    errors: list[Exception] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.append(read_manifest(target).version)
            except Exception as exc:  # noqa: BLE001 - any failure to read is what we look for
                errors.append(exc)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        second = small_build(target, factory="HNSW32").manifest
    finally:
        done.set()
        watcher.join()
    assert errors == []
    assert seen and set(seen) <= {first.version, second.version}
    assert second.version == first.version + 1 and second.factory == "HNSW32"
    assert target.stat().st_ino == inode  # the same folder, committed into
    assert second.encoder != first.encoder
    assert not set(second.files) & set(first.files)  # every file of a version is new
    assert SearchIndex.load(target).version == second.version


WEB_MANIFEST = b'{"name": "my app", "start_url": "/"}'
NOT_BUNDLES = {
    "notes": {"notes.txt": b"my notes\n"},
    "a web app": {MANIFEST: WEB_MANIFEST, "index.html": b"<html></html>"},
    "a manifest.json of someone else's": {MANIFEST: WEB_MANIFEST},
    "someone's arrays": {LABELS_FILE: b"my labels", IMAGES_FILE: b"my images"},
    "arrays and a manifest": {MANIFEST: WEB_MANIFEST, INDEX_FILE: b"my index"},
}


@pytest.mark.parametrize("files", NOT_BUNDLES.values(), ids=NOT_BUNDLES)
def test_refuses_a_folder_that_is_not_a_bundle(small_build, run, tmp_path, bundle_data, files,
                                               tiny_idx_dir, trained):
    """Files named like a bundle's (manifest.json, or the flat files of format 1) in a folder
    whose manifest is not a bundle's belong to someone: a build would replace or remove them."""
    target = tmp_path / "precious"
    target.mkdir()
    for name, content in files.items():
        (target / name).write_bytes(content)
    before = _listing(target)
    png = tmp_path / "x.png"
    Image.fromarray(bundle_data.test.images[0]).save(png)
    with pytest.raises(LenetEmbedError, match=re.escape(str(target))) as caught:
        small_build(target)
    assert "not an index bundle" in str(caught.value)
    assert re.search(r"\((.+) is not part of one\)", str(caught.value)).group(1) in files
    line = one_line_error(run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                              "--index-dir", target))
    assert str(target) in line and "not an index bundle" in line
    for args in (("add", "--label", 3, "--index-dir", target, png),
                 ("remove", 1, "--index-dir", target),
                 ("compact", "--index-dir", target),
                 ("info", "--index-dir", target)):
        assert str(target) in one_line_error(run(*args))
    assert _listing(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "precious", "x.png"]


def test_refuses_a_file(small_build, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LenetEmbedError, match="not a folder"):
        small_build(a_file)
    assert a_file.read_text() == "x"


def test_another_writers_staged_manifest_is_part_of_the_bundle(bundle_copy):
    """A build checks the folder while another process may be committing: that writer's staged
    manifest is the bundle's own. (Taken for a user's file, it made a writer refuse the folder as
    "not an index bundle" when it was renamed away between listing the folder and looking at it.)"""
    staged = bundle_copy / ".manifest.json.new-0a1b2c3d"
    staged.write_text("{}")
    assert staged in contents(bundle_copy).ours
    with BundleWriter(bundle_copy, replacing=True) as writer:
        assert writer.current == read_manifest(bundle_copy)
    assert staged.exists()  # the lock says its last writer finished: nothing to clean up


def test_an_empty_folder_is_fine(small_build, tmp_path):
    (tmp_path / "index").mkdir()
    small_build(tmp_path / "index")
    assert read_manifest(tmp_path / "index").count == SMALL_N


def test_writer_commit_round_trip(bundle_copy, bundle_data, search_index):
    """A commit through BundleWriter: a sealed segment with sources; what loads is what was
    written, and a manifest that readers would refuse is never committed."""
    images, labels = bundle_data.test.images[:10], bundle_data.test.labels[:10]
    vectors = prepare_vectors(search_index.embed(images), "cosine")
    sources = [f"/pictures/{i}.png" for i in range(len(images))]
    with BundleWriter(bundle_copy) as writer:
        current = writer.current
        assert current == read_manifest(bundle_copy) and writer.next_version == 2
        ids = np.arange(current.next_id, current.next_id + len(images))
        segment, files = writer.new_segment(
            vectors=vectors, ids=ids, labels=labels, images=images, sources=sources,
            index=make_index(vectors, "cosine"))
        assert segment.sealed and segment.has_sources and segment.rows == len(images)
        manifest = current.next("add", segments=[*current.segments, segment],
                                files={**current.files, **files}, count=current.count + 10,
                                rows=current.rows + 10, next_id=current.next_id + 10)
        with pytest.raises(ValueError, match="next version"):
            writer.commit(replace(manifest, version=7))
        unlisted = dict(manifest.files)
        del unlisted[segment.file(SOURCES_FILE)]
        with pytest.raises(ValueError, match="file list does not match"):
            replace(manifest, files=unlisted)  # such a manifest cannot even be made
        # Types are checked at the commit, as a reader checks them: nothing is written.
        with pytest.raises(msgspec.ValidationError, match=r"got `int` - at `\$.operation`"):
            writer.commit(replace(manifest, operation=7))
        with pytest.raises(msgspec.ValidationError, match=r"`bool` - at `\$.segments\[1\].rows`"):
            writer.commit(replace(manifest, segments=[current.segments[0],
                                                      replace(segment, rows=True)],
                                  count=current.count + True, rows=current.rows + True))
        with pytest.raises(ValueError, match="count and rows disagree"):
            current.next("add", count=current.count + 1)
        assert read_manifest(bundle_copy).version == 1
        committed = writer.commit(manifest)
    assert committed == read_manifest(bundle_copy) and committed.version == 2
    assert committed.committed_at >= manifest.committed_at
    assert (bundle_copy / VERSIONS_DIR / "00000002.json").read_text() == (
        bundle_copy / MANIFEST).read_text()
    assert not (bundle_copy / ".tmp").exists()
    index = SearchIndex.load(bundle_copy)
    found = index.search(images, k=1)
    assert [row[0].id for row in found] == ids.tolist()
    assert [row[0].source for row in found] == sources
    assert [row[0].label for row in found] == labels.tolist()
    assert max(row[0].distance for row in found) <= 1e-5
    assert index.item_image(int(ids[3])).tolist() == images[3].tolist()


def _fail(*args, **kwargs):
    raise RuntimeError("injected failure")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["index file", "manifest replace"])
@pytest.mark.parametrize("error", [_fail, _interrupt], ids=["error", "interrupt"])
def test_failed_build_keeps_the_previous_version(small_build, tmp_path, monkeypatch, where,
                                                 error):
    target = tmp_path / "index"
    target.mkdir()
    (target / "README.md").write_text("docs\n")
    small_build(target)
    before = _listing(target)
    if where == "index file":
        monkeypatch.setattr(writer_module.faiss, "write_index", error)
    else:
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == MANIFEST:
                error()
            real_replace(src, dst)

        monkeypatch.setattr(writer_module.os, "replace", replace)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        small_build(target, metric="l2")
    monkeypatch.undo()

    # A failed writer removes what it wrote: the folder is as it was, to the byte.
    assert _listing(target) == before
    assert read_manifest(target).version == 1
    assert SearchIndex.load(target).metric == "cosine"
    assert _files_on_disk(target) == set(read_manifest(target).files)
    assert SearchIndex.load(target).remove([0]) == 1  # and the next writer gets in
    assert read_manifest(target).version == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


# ------------------------------------------------------------------------- format 1


def _format_1_bundle(directory: Path, source: Path, bundle_data) -> None:
    """A bundle as lenet-embed wrote it before format 2: one flat folder."""
    directory.mkdir()
    n = 20
    vectors = np.random.default_rng(0).normal(size=(n, 84)).astype(np.float32)
    faiss.write_index(make_index(vectors, "cosine"), str(directory / INDEX_FILE))
    np.save(directory / LABELS_FILE, bundle_data.train.labels[:n].astype(np.int64))
    np.save(directory / IDS_FILE, np.arange(n, dtype=np.int64))
    np.save(directory / IMAGES_FILE, bundle_data.train.images[:n])
    manifest = read_manifest(source)
    shutil.copy(source / manifest.encoder_path, directory / ENCODER_FILE)
    shutil.copy(source / manifest.litert_path, directory / LITERT_FILE)
    files = [INDEX_FILE, LABELS_FILE, IDS_FILE, IMAGES_FILE, LITERT_FILE]
    (directory / MANIFEST).write_text(json.dumps({
        "format_version": 1, "created_at": "2024-05-01T12:00:00+00:00",
        "lenet_embed_version": "0.0.9", "dim": 84, "metric": "cosine", "factory": "Flat",
        "count": n, "dataset": {"kind": "idx"}, "classes": [], "search_params": {},
        "encoder_sha256": _sha256(directory / ENCODER_FILE),
        "encoder_litert_sha256": _sha256(directory / LITERT_FILE),
        "files": {name: _sha256(directory / name) for name in files},
    }))
    (directory / "README.md").write_text("docs\n")


def test_a_format_1_bundle_asks_for_a_rebuild_and_build_index_replaces_it(
        run, bundle_dir, bundle_data, trained, tmp_path, tiny_idx_dir):
    """Format 1 is not read (a format that lived a few hours): every command but a build asks
    for a rebuild, and a build writes a bundle of format 2 beside the old flat files, which it
    leaves alone (``info`` lists them as files the bundle does not use)."""
    target = tmp_path / "index"
    _format_1_bundle(target, bundle_dir, bundle_data)
    before = _listing(target)
    expected = (f"{target / MANIFEST}: bundle format 1 is not supported by this lenet-embed "
                "(format 2); rebuild it with `lenet-embed build-index`")
    with pytest.raises(LenetEmbedError) as caught:
        SearchIndex.load(target)
    assert str(caught.value) == expected
    png = tmp_path / "digit.png"
    Image.fromarray(bundle_data.test.images[0]).save(png)
    for args in (("info", "--index-dir", target), ("query", png, "--index-dir", target),
                 ("add", png, "--index-dir", target), ("remove", 1, "--index-dir", target),
                 ("compact", "--index-dir", target)):
        assert one_line_error(run(*args)) == f"Error: {expected}"
    # Nothing but a build touches it: the writers refuse before they create their lock file.
    assert _listing(target) == before

    ok(run("build-index", "--data", tiny_idx_dir, "--model", trained.model, "--index-dir",
           target))
    old = {name: data for name, data in before.items() if name != MANIFEST}
    assert {name: (target / name).read_bytes() for name in old} == old
    names = {p.name for p in target.iterdir()}
    assert names - LAYOUT == set(old)
    manifest = read_manifest(target)
    assert (manifest.format_version, manifest.version, manifest.count) == (2, 1, 600)
    assert _files_on_disk(target) == set(manifest.files)
    assert len(SearchIndex.load(target).search(png, k=3)[0]) == 3
    assert set(inspect_bundle(target).unknown_files) == set(old)


# --------------------------------------------------------------------------- damage on load


@pytest.fixture(scope="module")
def rich_bundle(bundle_dir, bundle_data, tmp_path_factory) -> Path:
    """Every kind of file a bundle has: the session bundle with three added digits compacted into
    it (a sealed segment with sources.json), three more added (an unsealed segment: one file of
    records, with sources) and two items removed (a deletions file)."""
    target = Path(shutil.copytree(bundle_dir, tmp_path_factory.mktemp("rich") / "index"))
    index = SearchIndex.load(target)
    digits = bundle_data.test.images
    index.add(digits[:3], labels=[7, 2, 1], sources=["/a/7.png", None, "/a/1.png"])
    index.compact()
    added = index.add(digits[3:6], labels=[0, None, 4], sources=["/b/0.png", "/b/x.png", None])
    index.remove([5, int(added[1])])
    return target


@pytest.fixture
def rich(rich_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(rich_bundle, tmp_path / "index"))


def test_rich_bundle_structure(rich_bundle, bundle_data):
    manifest = read_manifest(rich_bundle)
    n = len(bundle_data.train)
    assert (manifest.version, manifest.operation) == (5, "remove")
    assert (manifest.rows, manifest.count, manifest.deleted, manifest.next_id) == (
        n + 6, n + 4, 2, n + 6)
    sealed, added = manifest.segments
    assert (sealed.sealed, sealed.has_sources, sealed.rows) == (True, True, n + 3)
    assert (added.sealed, added.has_sources, added.rows) == (False, True, 3)
    assert added.entry == f"{SEGMENTS_DIR}/{added.name}.npy" and added.files() == [added.entry]
    assert re.fullmatch(rf"{DELETIONS_DIR}/d00000005-[0-9a-f]+\.npy", manifest.deletions)
    assert set(manifest.files) == manifest.required_files()
    assert set(manifest.files) <= _files_on_disk(rich_bundle)
    assert np.load(rich_bundle / manifest.deletions).tolist() == [5, n + 4]
    sources = json.loads((rich_bundle / sealed.file(SOURCES_FILE)).read_text())
    assert sources == [None] * n + ["/a/7.png", None, "/a/1.png"]
    records = np.load(rich_bundle / added.entry, allow_pickle=False)
    assert records.dtype == row_dtype(84, records.dtype["source"].itemsize // 4)
    assert records["id"].tolist() == [n + 3, n + 4, n + 5]
    assert records["label"].tolist() == [0, -1, 4]
    assert records["source"].tolist() == ["/b/0.png", "/b/x.png", ""]
    assert np.array_equal(records["image"], bundle_data.test.images[3:6])
    snapshot = SearchIndex.load(rich_bundle).snapshot
    assert snapshot.sources(np.array([n, n + 1, n + 3, n + 5])) == [
        "/a/7.png", None, "/b/0.png", None]


def _path(d: Path, kind: str) -> Path:
    """A file of the rich bundle: ``sealed/<file>``, ``added`` (the records), ``encoder/<file>``
    or ``deletions``."""
    manifest = read_manifest(d)
    if kind == "deletions":
        return d / manifest.deletions
    if kind == "added":
        return d / manifest.segments[1].entry
    where, name = kind.split("/")
    if where == "encoder":
        return d / manifest.encoder / name
    return d / manifest.segments[0].file(name)


def _edit_manifest(d: Path, edit) -> None:
    """Edit the manifest and seal it again (as a faulty writer would), so that only the checks
    of its contents can tell."""
    data = json.loads((d / MANIFEST).read_text())
    data.pop(SEAL)
    edit(data)
    (d / MANIFEST).write_text(sealed_json(data))


def _rehash(d: Path, path: Path) -> None:
    """Make the manifest agree with a file again, so only a deeper check can tell."""
    name = path.relative_to(d).as_posix()

    def edit(data):
        data["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    _edit_manifest(d, edit)


ALL_FILES = [f"sealed/{name}" for name in (*SEGMENT_FILES, INDEX_FILE, SOURCES_FILE)] + [
    "added", f"encoder/{ENCODER_FILE}", f"encoder/{LITERT_FILE}", "deletions"]


def _flip_byte(kind: str, expected: str = f"{{path}}: does not match {MANIFEST} (checksum)"):
    """Change one bit in the middle of a file: same size, another checksum."""
    def damage(d: Path) -> str:
        path = _path(d, kind)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
        return expected.format(path=path, where=path.parent)
    damage.__name__ = f"flipped byte in {kind}"
    return damage


def _truncate(kind: str):
    def damage(d: Path) -> str:
        path = _path(d, kind)
        path.write_bytes(path.read_bytes()[:-16])
        return f"{path}: does not match {MANIFEST} (size: "
    damage.__name__ = f"truncated {kind}"
    return damage


def _missing(kind: str):
    def damage(d: Path) -> str:
        path = _path(d, kind)
        path.unlink()
        return f"{path}: missing from the bundle"
    damage.__name__ = f"missing {kind}"
    return damage


def _rewrite_array(kind: str, change, name: str, expected: str):
    """Replace an array file with ``change(array)`` and fix its checksum; ``expected`` is the
    error, with {where} for the segment (its folder, or its records file) and {d} the bundle."""
    def damage(d: Path) -> str:
        path = _path(d, kind)
        array = change(np.load(path, allow_pickle=False))
        with open(path, "wb") as fh:
            np.save(fh, array, allow_pickle=array.dtype == object)
        _rehash(d, path)
        where = path if kind == "added" else path.parent
        return expected.format(where=where, d=d)
    damage.__name__ = f"{name} in {kind}"
    return damage


DISAGREE = "{where}: arrays disagree with {where.stem}'s entry in the manifest"
UNREADABLE = "{where}: unreadable segment"
ORDER = "{d}: item ids are not in increasing order"
COUNT = "{d}: removed ids disagree with the manifest's count"


def _swap_first_ids(ids: np.ndarray) -> np.ndarray:
    ids = ids.copy()
    ids[[0, 1]] = ids[[1, 0]]
    return ids


def _records(change):
    """A change to an unsealed segment's records."""
    def apply(records: np.ndarray) -> np.ndarray:
        records = records.copy()
        change(records)
        return records
    return apply


def _records_as(dtype_of):
    """The records converted to another record layout."""
    def apply(records: np.ndarray) -> np.ndarray:
        dtype = dtype_of(records)
        out = np.zeros(len(records), dtype=dtype)
        for name in dtype.names:
            if name == "vector":
                out[name] = records[name][:, : dtype[name].shape[0]]
            else:
                out[name] = records[name]
        return out
    return apply


def _sources_of_wrong_length(d: Path) -> str:
    path = _path(d, f"sealed/{SOURCES_FILE}")
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    _rehash(d, path)
    return f"{path.parent}: arrays disagree with"


def _garbage_index(d: Path) -> str:
    path = _path(d, f"sealed/{INDEX_FILE}")
    path.write_bytes(b"garbage, not a FAISS index" * 10)
    _rehash(d, path)
    return f"{path}: unreadable"


def _index_of_other_rows(d: Path) -> str:
    path = _path(d, f"sealed/{INDEX_FILE}")
    vectors = np.load(_path(d, f"sealed/{VECTORS_FILE}"))
    faiss.write_index(make_index(vectors[:-1], "cosine"), str(path))
    _rehash(d, path)
    return f"{path.parent}: arrays disagree with"


def _count_off_by_one(d: Path) -> str:
    _edit_manifest(d, lambda data: data.update(count=data["count"] + 1))
    return f"{d}: removed ids disagree with the manifest's count"


def _rows_off_by_one(d: Path) -> str:
    _edit_manifest(d, lambda data: data["segments"][1].update(rows=4))
    return "count and rows disagree with the segments"


def _deletions_dropped(d: Path) -> str:
    def edit(data):
        del data["files"][data["deletions"]]
        data["deletions"] = None
    _edit_manifest(d, edit)
    return "removed rows need a deletions file"


def _entry_dropped(d: Path) -> str:
    name = _path(d, f"sealed/{LABELS_FILE}").relative_to(d).as_posix()
    _edit_manifest(d, lambda data: data["files"].pop(name))
    return f"its file list does not match its contents; unlisted: {name}"


def _records_entry_dropped(d: Path) -> str:
    name = _path(d, "added").relative_to(d).as_posix()
    _edit_manifest(d, lambda data: data["files"].pop(name))
    return f"its file list does not match its contents; unlisted: {name}"


def _entry_added(d: Path) -> str:
    extra = _path(d, f"sealed/{LABELS_FILE}").with_name("extra.npy")
    shutil.copy(_path(d, f"sealed/{LABELS_FILE}"), extra)
    name = extra.relative_to(d).as_posix()
    _edit_manifest(d, lambda data: data["files"].update(
        {name: {"bytes": extra.stat().st_size, "sha256": _sha256(extra)}}))
    return f"not needed: {name}"


def _outside_entry(name: str):
    def damage(d: Path) -> str:
        _edit_manifest(d, lambda data: data["files"].update(
            {name: {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}}))
        return f"{name!r} is not a name inside the bundle"
    damage.__name__ = f"entry {name}"
    return damage


def _segment_outside(d: Path) -> str:
    _edit_manifest(d, lambda data: data["segments"][1].update(name="../../x"))
    return "segments.1: '../../x' is not a name inside the bundle"


def _encoder_outside(d: Path) -> str:
    _edit_manifest(d, lambda data: data.update(encoder="encoders/../../models"))
    return "encoder: 'encoders/../../models' is not a folder under encoders/"


def _sealed_flag_flipped(d: Path) -> str:
    """The manifest calls the sealed segment unsealed: it now needs a records file instead."""
    _edit_manifest(d, lambda data: data["segments"][0].update(sealed=False))
    return "its file list does not match its contents"


def _manifest_edited_unsealed(d: Path) -> str:
    """One value changed by hand, the manifest's own checksum left as it was."""
    data = json.loads((d / MANIFEST).read_text())
    data["next_id"] += 1
    (d / MANIFEST).write_text(json.dumps(data, indent=2))
    return f"{d / MANIFEST}: does not match its own checksum ({SEAL})"


def _manifest_seal_not_a_string(d: Path) -> str:
    data = json.loads((d / MANIFEST).read_text())
    data[SEAL] = 0
    (d / MANIFEST).write_text(json.dumps(data))
    return f"{d / MANIFEST}: does not match its own checksum"


def _delete_manifest(d: Path) -> str:
    (d / MANIFEST).unlink()
    return f"{d}: no {MANIFEST}, so not an index bundle"


def _garbage_manifest(d: Path) -> str:
    (d / MANIFEST).write_bytes(b"\x00\xffthis is { not json")
    return f"{d / MANIFEST}: unreadable manifest"


def _manifest_not_an_object(d: Path) -> str:
    (d / MANIFEST).write_text("[1, 2, 3]")
    return f"{d / MANIFEST}: not a manifest"


def _manifest_missing_field(d: Path) -> str:
    _edit_manifest(d, lambda data: data.pop("next_id"))
    return f"{d / MANIFEST}: manifest lacks next_id"


def _future_format(d: Path) -> str:
    _edit_manifest(d, lambda data: data.update(format_version=FORMAT_VERSION + 1))
    return f"bundle format {FORMAT_VERSION + 1} is not supported"


def _files_not_an_object(d: Path) -> str:
    _edit_manifest(d, lambda data: data.update(files=sorted(data["files"])))
    return f"{d / MANIFEST}: malformed manifest (files: expected `object`, got `array`)"


def _count_a_string(d: Path) -> str:
    _edit_manifest(d, lambda data: data.update(count=str(data["count"])))
    return "malformed manifest (count: expected `int`, got `str`)"


def _unknown_metric(d: Path) -> str:
    _edit_manifest(d, lambda data: data.update(metric="manhattan"))
    return "malformed manifest (metric: 'manhattan' is not one of cosine, l2)"


# Files a load reads whole, so it checks them whole: the encoder (a constant size) and the
# removed ids (as many as were removed); and sources.json, whose JSON breaks when a bit flips.
READ_WHOLE = [f"encoder/{ENCODER_FILE}", f"encoder/{LITERT_FILE}", "deletions"]
# Files a load maps but does not read: a changed byte inside them is for `info --verify` to find.
MAPPED = [kind for kind in ALL_FILES if kind not in (*READ_WHOLE, f"sealed/{SOURCES_FILE}")]

DAMAGE = [
    *(_flip_byte(kind) for kind in READ_WHOLE),
    _flip_byte(f"sealed/{SOURCES_FILE}", "{where}: unreadable segment"),
    _truncate(f"sealed/{IMAGES_FILE}"), _truncate(f"sealed/{INDEX_FILE}"), _truncate("added"),
    _truncate(f"encoder/{LITERT_FILE}"), _truncate("deletions"),
    _missing(f"sealed/{IDS_FILE}"), _missing(f"sealed/{SOURCES_FILE}"), _missing("added"),
    _missing(f"encoder/{LITERT_FILE}"), _missing(f"encoder/{ENCODER_FILE}"),
    _missing("deletions"),
    _rewrite_array(f"sealed/{IMAGES_FILE}", lambda a: a[:-1], "one row fewer", DISAGREE),
    _rewrite_array(f"sealed/{VECTORS_FILE}", lambda a: a[:, :80], "wrong width", DISAGREE),
    _rewrite_array(f"sealed/{LABELS_FILE}", lambda a: a.astype(np.int32), "int32", DISAGREE),
    _rewrite_array(f"sealed/{IDS_FILE}", lambda a: a.astype(object), "pickle", UNREADABLE),
    _rewrite_array("added", lambda a: a[:-1], "one record fewer", DISAGREE),
    _rewrite_array("added", _records_as(lambda r: row_dtype(80, r.dtype["source"].itemsize // 4)),
                   "vectors of 80", UNREADABLE),
    _rewrite_array("added", _records_as(lambda r: row_dtype(84)), "no sources", UNREADABLE),
    _rewrite_array("added", lambda a: a["id"].copy(), "plain ids", UNREADABLE),
    # Ids out of order: here the removed id n + 4 is no longer found, so the count disagrees.
    _rewrite_array("added", _records(lambda r: r.__setitem__("id", r["id"] - 10)), "order",
                   COUNT),
    _rewrite_array("deletions", lambda a: np.append(a, 7), "one more id", COUNT),
    _rewrite_array("deletions", lambda a: np.array([a[0], 10**6]), "unknown id", COUNT),
    _rewrite_array("deletions", lambda a: a.astype(np.float64), "float ids",
                   "{d}/deletions/"),
    _sources_of_wrong_length, _garbage_index, _index_of_other_rows,
    _count_off_by_one, _rows_off_by_one, _deletions_dropped, _entry_dropped,
    _records_entry_dropped, _entry_added, _sealed_flag_flipped,
    _outside_entry("../../etc/passwd"), _outside_entry("segments/../../x"),
    _outside_entry("deletions/../../x.npy"), _outside_entry("segments/../x.npy"),
    _segment_outside, _encoder_outside,
    _manifest_edited_unsealed, _manifest_seal_not_a_string,
    _delete_manifest, _garbage_manifest, _manifest_not_an_object, _manifest_missing_field,
    _future_format, _files_not_an_object, _count_a_string, _unknown_metric,
]


# Same sizes, same shapes: what only reading every byte or every row can find.
FOUND_BY_VERIFY = [
    *(_flip_byte(kind) for kind in MAPPED),
    _rewrite_array(f"sealed/{IDS_FILE}", _swap_first_ids, "order", ORDER),
]


def _refused(load, path: Path) -> str:
    with pytest.raises(LenetEmbedError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and "rebuild it with `lenet-embed build-index`" in message
    return message


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_bundle_is_refused(rich, damage):
    assert len(SearchIndex.load(rich)) > 0  # sound before the damage
    expected = damage(rich)
    for load in (SearchIndex.load, inspect_bundle, partial(inspect_bundle, verify=True)):
        assert expected in _refused(load, rich), load


@pytest.mark.parametrize("damage", FOUND_BY_VERIFY, ids=lambda f: f.__name__.strip("_"))
def test_damage_inside_a_file_is_found_by_verify(rich, damage):
    """A load checks sizes, not every byte (it costs O(files)): the bundle still loads and plain
    `info` says so; `info --verify` names what is damaged."""
    expected = damage(rich)
    assert len(SearchIndex.load(rich)) == read_manifest(rich).count
    assert inspect_bundle(rich).verified is False
    assert expected in _refused(partial(inspect_bundle, verify=True), rich)


def test_verify_names_every_damaged_file(rich):
    paths = [_path(rich, f"sealed/{name}") for name in (VECTORS_FILE, IMAGES_FILE)]
    for path in paths:
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01
        path.write_bytes(bytes(raw))
    message = _refused(partial(inspect_bundle, verify=True), rich)
    first, second = (p.relative_to(rich).as_posix() for p in paths)  # in the manifest's order
    assert message.startswith(f"{rich / first}: does not match {MANIFEST} (checksum); "
                              f"neither do {second}; the bundle is damaged")


def test_manifest_checksum_is_of_its_canonical_json(rich):
    """As index/README.md defines it; and a manifest written before manifests carried one loads."""
    data = json.loads((rich / MANIFEST).read_text())
    body = {key: value for key, value in data.items() if key != SEAL}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert data[SEAL] == hashlib.sha256(canonical.encode()).hexdigest()
    assert list(data)[-1] == SEAL
    (rich / MANIFEST).write_text(json.dumps(body, indent=2))
    assert read_manifest(rich).to_dict() == body
    assert len(SearchIndex.load(rich)) == body["count"]


MANIFESTS = sorted((Path(__file__).parent / "data" / "manifests").glob("*.json"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifests_written_before_read_and_write_the_same_bytes(path):
    """Manifests committed by earlier versions (pydantic's models, before msgspec): every kind of
    segment, removed rows, a tuned HNSW, an external store, class names, no calibration, a
    calibration without a head. Each parses, and serialises again to exactly its text (key
    order, numbers, seal), also when checked as a commit checks it."""
    text = path.read_text()
    manifest = parse_manifest(text, str(path))
    assert manifest_json(manifest) == text
    again = checked(manifest)
    assert again == manifest and manifest_json(again) == text
    body = json.loads(text)
    body.pop(SEAL)
    assert manifest.to_dict() == body


def test_manifests_of_every_version_on_disk_serialise_again_the_same(rich):
    for path in sorted((rich / VERSIONS_DIR).glob("*.json")):
        text = path.read_text()
        assert manifest_json(parse_manifest(text, str(path))) == text, path.name


def test_the_cli_reports_damage_in_one_line(run, rich):
    """A changed byte in an added segment: `info` loads the bundle, `info --verify` names the file,
    and `compact` (which would copy the rows under new checksums) refuses it."""
    path = _path(rich, "added")
    raw = bytearray(path.read_bytes())
    raw[-200] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert "info --verify" in ok(run("info", "--index-dir", rich)).stdout
    for args in (("info", "--verify"), ("compact",)):
        line = one_line_error(run(*args, "--index-dir", rich))
        assert f"{path}: does not match {MANIFEST} (checksum)" in line and "build-index" in line
    assert read_manifest(rich).version == 5


@pytest.mark.parametrize("name", ["deletions/../../secret.npy", "segments/../../secret.npy"])
def test_info_never_reads_outside_the_bundle(rich, lenet_embed_cmd, quiet_env, name):
    """The manifest names a file outside the bundle that exists and matches its entry (empty).
    It is a FIFO: anything that opened it for reading would hang until the timeout."""
    secret = rich / name
    os.mkfifo(secret.resolve())
    assert secret.resolve() == (rich.parent / "secret.npy")

    def edit(data):
        data["files"][name] = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
        if name.startswith(DELETIONS_DIR):
            data["files"].pop(data["deletions"])
            data["deletions"] = name
    _edit_manifest(rich, edit)
    done = subprocess.run([*lenet_embed_cmd, "info", "--index-dir", str(rich)],
                          capture_output=True, text=True, env=quiet_env, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"Error: {rich / MANIFEST}: malformed manifest (files: {name!r} is not a name inside "
        "the bundle); rebuild it with `lenet-embed build-index`"]


def test_vectors_on_disk_are_prepared(rich_bundle):
    """Every segment stores its vectors as indexed: unit length for cosine."""
    snapshot = SearchIndex.load(rich_bundle).snapshot
    vectors = snapshot.vectors(np.arange(len(snapshot.ids)))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(prepare_vectors(vectors, "cosine"), vectors, atol=1e-6)
