"""The on-disk bundle: manifest, round trip, atomic replacement, refusal to clobber foreign
folders, and every kind of damage detected on load."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from lenet_embed import LenetEmbedError, SearchIndex, build_index, build_lenet, encoder_of
from lenet_embed import bundle as bundle_module
from lenet_embed.ann import make_index, prepare_vectors
from lenet_embed.bundle import (
    ENCODER_FILE,
    FORMAT_VERSION,
    IDS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    LABELS_FILE,
    MANIFEST,
    read_bundle,
    read_manifest,
    write_bundle,
)
from lenet_embed.embed import KerasEncoder
from lenet_embed.preprocess import scale_pixels


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the session bundle


def test_manifest_fields(built, bundle_dir, bundle_data):
    manifest = read_manifest(bundle_dir)
    assert manifest == built.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["lenet_embed_version"] == version("lenet-embed")
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(hours=1)
    assert manifest["dim"] == 84
    assert (manifest["metric"], manifest["factory"]) == ("cosine", "Flat")
    assert manifest["count"] == len(bundle_data.train)
    assert manifest["dataset"] == {"kind": "idx", "source": bundle_data.source, "split": "train"}
    assert manifest["classes"] == [] and manifest["search_params"] == {}
    assert manifest["encoder_sha256"] == _sha256(bundle_dir / ENCODER_FILE)
    on_disk = {p.name for p in bundle_dir.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert digest == _sha256(bundle_dir / name), name


def test_build_summary(built, bundle_data):
    summary = built.summary()
    assert summary["count"] == len(bundle_data.train)
    assert (summary["dim"], summary["metric"], summary["factory"]) == (84, "cosine", "Flat")
    assert summary["skipped"] == 0 and summary["index_dir"] == built.path


def test_bundle_contents(bundle_dir, bundle_data, trained):
    bundle = read_bundle(bundle_dir)
    assert bundle.labels.dtype == np.int64 and bundle.ids.dtype == np.int64
    assert np.array_equal(bundle.labels, bundle_data.train.labels)
    assert np.array_equal(bundle.ids, np.arange(len(bundle_data.train)))
    assert bundle.sources is None and bundle.classes == []
    assert np.array_equal(bundle.images, bundle_data.train.images)  # as the encoder saw them
    # Row i holds the (normalised, for cosine) embedding of training image i.
    stored = bundle.index.reconstruct_n(0, bundle.index.ntotal)
    embeddings = KerasEncoder.load(trained.encoder).embed(scale_pixels(bundle_data.train.images))
    expected = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert np.abs(stored - expected).max() <= 1e-5
    # The bundle's own encoder is the trained one.
    bundled = KerasEncoder.load(bundle.encoder_path).embed(scale_pixels(bundle_data.test.images))
    reference = KerasEncoder.load(trained.encoder).embed(scale_pixels(bundle_data.test.images))
    assert np.abs(bundled - reference).max() <= 1e-6


def test_build_from_an_encoder_file(trained, bundle_dir, bundle_data, tmp_path):
    """``--model`` may be the encoder file as well as the classifier: same vectors."""
    n = 300
    progress = []
    result = build_index(data=bundle_data.head(n, 10), model=trained.encoder,
                         index_dir=tmp_path / "index",
                         on_progress=lambda done, total: progress.append((done, total)))
    assert result.manifest["count"] == n
    assert progress and progress[-1] == (n, n)
    ours = read_bundle(tmp_path / "index").index.reconstruct_n(0, n)
    session = read_bundle(bundle_dir).index.reconstruct_n(0, n)
    assert np.abs(ours - session).max() <= 1e-6


def test_build_with_a_missing_model(bundle_data, tmp_path):
    missing = tmp_path / "nope.keras"
    with pytest.raises(LenetEmbedError, match=re.escape(str(missing))):
        build_index(data=bundle_data, model=missing, index_dir=tmp_path / "index")
    assert not (tmp_path / "index").exists()


# -------------------------------------------------------------- writing bundles directly


@pytest.fixture
def parts(trained, bundle_data):
    """Everything write_bundle needs, from 50 real digits and the session encoder (fresh per test,
    so tests may break its methods)."""
    encoder = KerasEncoder.load(trained.encoder)
    pixels = scale_pixels(bundle_data.train.images[:50])
    vectors = encoder.embed(pixels)
    return {
        "index": make_index(vectors, "l2"),
        "labels": bundle_data.train.labels[:50],
        "ids": np.arange(100, 150),
        "images": bundle_data.train.images[:50],
        "encoder": encoder.model,
        "metric": "l2",
        "factory": "Flat",
        "dataset": {"kind": "test", "n": 50},
        "vectors": vectors,
    }


def _write(directory: Path, parts: dict, **overrides):
    kwargs = {k: v for k, v in parts.items() if k != "vectors"}
    kwargs.update(overrides)
    return write_bundle(directory, **kwargs)


def test_write_and_read_round_trip(parts, tmp_path):
    target = tmp_path / "nested" / "index"
    sources = [f"/pictures/{i}.png" for i in range(50)]
    manifest = _write(target, parts, classes=["a", "b"], sources=sources,
                      search_params={"efSearch": 16})
    bundle = read_bundle(target)
    assert bundle.manifest == manifest == read_manifest(target)
    assert np.array_equal(bundle.labels, parts["labels"])
    assert np.array_equal(bundle.ids, parts["ids"])
    assert np.array_equal(bundle.images, parts["images"]) and bundle.images.dtype == np.uint8
    assert bundle.sources == sources and bundle.classes == ["a", "b"]
    assert manifest["search_params"] == {"efSearch": 16}
    assert manifest["dataset"] == parts["dataset"]
    stored = bundle.index.reconstruct_n(0, 50)
    assert np.array_equal(stored, prepare_vectors(parts["vectors"], "l2"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # like a plain mkdir, not private
    assert sorted(p.name for p in target.parent.iterdir()) == ["index"]


def test_replacing_keeps_readme_and_leaves_nothing_behind(parts, tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    (target / "README.md").write_text("# what this folder is\n")
    (target / ".gitkeep").write_text("")
    _write(target, parts, dataset={"kind": "first"})
    _write(target, parts, dataset={"kind": "second"})
    assert (target / "README.md").read_text() == "# what this folder is\n"
    assert (target / ".gitkeep").is_file()
    assert read_bundle(target).manifest["dataset"] == {"kind": "second"}
    assert "README.md" not in read_manifest(target)["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def _fail(*args, **kwargs):
    raise RuntimeError("injected failure")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["faiss.write_index", "encoder.save", "rename into place"])
@pytest.mark.parametrize("error", [_fail, _interrupt], ids=["error", "interrupt"])
def test_failed_write_keeps_previous_bundle(parts, tmp_path, monkeypatch, where, error):
    target = tmp_path / "index"
    target.mkdir()
    (target / "README.md").write_text("docs\n")
    _write(target, parts, dataset={"kind": "first"})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    if where == "faiss.write_index":
        monkeypatch.setattr(bundle_module.faiss, "write_index", error)
    elif where == "encoder.save":
        monkeypatch.setattr(parts["encoder"], "save", error)
    else:
        real_rename = os.rename

        def rename(src, dst):
            if Path(src).name.startswith(".index.building-"):
                error()
            real_rename(src, dst)

        monkeypatch.setattr(bundle_module.os, "rename", rename)

    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        _write(target, parts, dataset={"kind": "second"})
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert read_bundle(target).manifest["dataset"] == {"kind": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_refuses_to_replace_a_foreign_folder(parts, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("my notes\n")
    with pytest.raises(LenetEmbedError, match=re.escape(str(target))):
        _write(target, parts)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LenetEmbedError, match="not a folder"):
        _write(a_file, parts)
    assert a_file.read_text() == "x"


def test_an_empty_folder_is_fine(parts, tmp_path):
    (tmp_path / "index").mkdir()
    _write(tmp_path / "index", parts)
    assert read_manifest(tmp_path / "index")["count"] == 50


# --------------------------------------------------------------------------- damage on load


def _edit_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _tamper_labels(d: Path) -> str:
    labels = np.load(d / LABELS_FILE)
    labels[0] = (labels[0] + 1) % 10
    np.save(d / LABELS_FILE, labels)
    return f"{d / LABELS_FILE}: checksum"


def _replace_encoder(d: Path) -> str:
    encoder_of(build_lenet("sequential")).save(d / ENCODER_FILE)
    return f"{d / ENCODER_FILE}: fingerprint"


def _delete_encoder(d: Path) -> str:
    (d / ENCODER_FILE).unlink()
    return f"{d / ENCODER_FILE}: missing"


def _delete_ids(d: Path) -> str:
    (d / IDS_FILE).unlink()
    return f"{d / IDS_FILE}: missing"


def _truncate_images(d: Path) -> str:
    images = np.load(d / IMAGES_FILE)
    np.save(d / IMAGES_FILE, images[:-1])
    files = read_manifest(d)["files"]
    files[IMAGES_FILE] = _sha256(d / IMAGES_FILE)  # consistent checksum: only the count differs
    _edit_manifest(d, files=files)
    return f"{d}: index, labels and ids disagree"


def _delete_manifest(d: Path) -> str:
    (d / MANIFEST).unlink()
    return f"{d}: no {MANIFEST}"


def _garbage_manifest(d: Path) -> str:
    (d / MANIFEST).write_bytes(b"\x00\xffthis is { not json")
    return f"{d / MANIFEST}: unreadable manifest"


def _manifest_not_an_object(d: Path) -> str:
    (d / MANIFEST).write_text("[1, 2, 3]")
    return f"{d / MANIFEST}: manifest lacks required fields"


def _manifest_missing_field(d: Path) -> str:
    manifest = json.loads((d / MANIFEST).read_text())
    del manifest["encoder_sha256"]
    (d / MANIFEST).write_text(json.dumps(manifest))
    return f"{d / MANIFEST}: manifest lacks required fields"


def _future_format(d: Path) -> str:
    _edit_manifest(d, format_version=FORMAT_VERSION + 1)
    return "not supported"


def _wrong_count(d: Path) -> str:
    _edit_manifest(d, count=read_manifest(d)["count"] + 1)
    return f"{d}: index, labels and ids disagree"


def _unreadable_index(d: Path) -> str:
    (d / INDEX_FILE).write_bytes(b"garbage, not a FAISS index" * 10)
    files = read_manifest(d)["files"]
    files[INDEX_FILE] = _sha256(d / INDEX_FILE)  # consistent checksum: only FAISS can tell
    _edit_manifest(d, files=files)
    return f"{d / INDEX_FILE}: unreadable"


DAMAGE = [_tamper_labels, _replace_encoder, _delete_encoder, _delete_ids, _truncate_images,
          _delete_manifest,
          _garbage_manifest, _manifest_not_an_object, _manifest_missing_field, _future_format,
          _wrong_count, _unreadable_index]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_bundle_is_refused(bundle_copy, damage):
    assert read_bundle(bundle_copy).manifest["count"] > 0  # sound before the damage
    expected = damage(bundle_copy)
    with pytest.raises(LenetEmbedError) as info:
        SearchIndex.load(bundle_copy)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and "build-index" in message


def test_missing_bundle(tmp_path):
    with pytest.raises(LenetEmbedError, match="no index bundle there"):
        read_bundle(tmp_path / "nothing")


def test_manifest_with_wrong_field_types_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, files=["index.faiss", "labels.npy"])
    with pytest.raises(LenetEmbedError, match=MANIFEST):
        read_bundle(bundle_copy)
