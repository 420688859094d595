"""Every commit checked before it is acknowledged; the manifest as untrusted input.

Promises tested here:
- a writer refuses, in one line naming the damaged file, to commit on top of a version whose
  files differ from the manifest (a flipped byte, truncated, deleted, appended to) or that a
  reader could not load, and leaves the bundle as it was;
- ids are checked against the data: the highest stored id is below ``next_id``;
- whatever a resealed manifest holds, ``info --verify``, a query and an add end in success or in
  one line (a LenetEmbedError), never a traceback or a native crash;
- factory strings are parsed against the project's grammar before FAISS sees them;
- labels and ids beyond int64 are refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lenet_embed import SearchIndex
from lenet_embed.ann import check_factory, make_index
from lenet_embed.bundle import (
    HEAD_FEATURES,
    INT64_MAX,
    LOCK_FILE,
    MANIFEST,
    NONDIGIT_FEATURES,
    PLAIN_FEATURES,
    SCRATCH_DIR,
    SEAL,
    read_manifest,
    sealed_json,
)
from lenet_embed.calibration import features
from lenet_embed.errors import LenetEmbedError
from lenet_embed.factory import BadFactory, parse_factory
from lenet_embed.snapshot import check_version, inspect_bundle, open_snapshot
from lenet_embed.updates import add_vectors, compact, label_codes, remove

# --------------------------------------------------------------------------- a bundle of every kind


@pytest.fixture(scope="module")
def every_kind(bundle_dir, bundle_data, tmp_path_factory) -> Path:
    """The session bundle with three digits added and compacted in (a sealed segment with
    sources.json), three more added (an unsealed segment) and two removed (a deletions file)."""
    target = Path(shutil.copytree(bundle_dir, tmp_path_factory.mktemp("kinds") / "index"))
    index = SearchIndex.load(target)
    digits = bundle_data.test.images
    index.add(digits[:3], labels=[7, 2, 1], sources=["/a/7.png", None, "/a/1.png"])
    index.compact()
    added = index.add(digits[3:6], labels=[0, None, 4], sources=["/b/0.png", None, None])
    index.remove([5, int(added[1])])
    return target


@pytest.fixture
def kinds(every_kind, tmp_path) -> Path:
    return Path(shutil.copytree(every_kind, tmp_path / "index"))


def _file(d: Path, kind: str) -> Path:
    manifest = read_manifest(d)
    if kind == "deletions":
        return d / manifest.deletions
    if kind == "added":
        return d / manifest.segments[1].entry
    if kind == "nondigits":
        return d / manifest.calibration.nondigits
    return d / manifest.segments[0].file(kind)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)


DAMAGES = {"flipped": _flip, "truncated": _truncate, "deleted": Path.unlink, "appended": _append}
KINDS = ["vectors.npy", "ids.npy", "labels.npy", "images.npy", "sources.json", "index.faiss",
         "added", "deletions", "nondigits"]


def _state(d: Path) -> dict[str, str]:
    """Every file of the bundle folder and its sha256 (the lock's busy/idle record aside)."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE and SCRATCH_DIR not in p.relative_to(d).parts}


def _stored_vector(d: Path) -> tuple[np.ndarray, np.ndarray]:
    """One stored vector and image of the session bundle, to add without an encoder."""
    segment = read_manifest(d).segments[0]
    where = d / segment.entry
    vectors = np.load(where / "vectors.npy", mmap_mode="r")
    images = np.load(where / "images.npy", mmap_mode="r")
    return np.array(vectors[:1]), np.array(images[:1])


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert isinstance(exc, LenetEmbedError), repr(exc)
    assert message and "\n" not in message, message
    return message


OPERATIONS = {
    "add": lambda d, vector, image: add_vectors(d, vector, image, [3]),
    "remove": lambda d, vector, image: remove(d, [0, 1]),
    "compact": lambda d, vector, image: compact(d),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("kind", KINDS)
def test_commits_refuse_a_damaged_version(kinds, every_kind, kind, damage):
    vector, image = _stored_vector(every_kind)
    path = _file(kinds, kind)
    DAMAGES[damage](path)
    before = _state(kinds)
    for name, operation in OPERATIONS.items():
        with pytest.raises(LenetEmbedError) as caught:
            operation(kinds, vector, image)
        assert str(path) in _one_line(caught.value), (name, str(caught.value))
        assert _state(kinds) == before, name


def test_cli_add_refuses_a_damaged_segment(run, kinds, every_kind, tmp_path):
    from PIL import Image

    image = _stored_vector(every_kind)[1][0]
    png = tmp_path / "digit.png"
    Image.fromarray(image).save(png)
    path = _file(kinds, "images.npy")
    _flip(path)
    before = _state(kinds)
    line = one_line_error(run("add", png, "--index-dir", kinds, "--label", 3))
    assert str(path) in line and "damaged" in line
    assert _state(kinds) == before


def test_a_remembered_check_still_sees_new_damage(kinds):
    """Files are hashed once per identity (path, inode, size, mtime): a rewrite is seen."""
    check_version(kinds, read_manifest(kinds))
    check_version(kinds, read_manifest(kinds))  # remembered: no file changed
    path = _file(kinds, "vectors.npy")
    stamp = path.stat().st_mtime_ns
    _flip(path)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a coarse clock might give the same mtime
    with pytest.raises(LenetEmbedError, match="checksum"):
        check_version(kinds, read_manifest(kinds))


@pytest.mark.parametrize("kind", ["added", "deletions", "nondigits"])
def test_damaged_npy_header_is_one_line(kinds, kind):
    """A flipped byte in an added segment's header made numpy's tokenizer raise. The files read
    whole are checked against their checksums first: a manifest resealed with the damaged
    file's checksum (a hostile bundle) brings the damage to numpy too."""
    path = _file(kinds, kind)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"descr") + 2] = ord("(")
    path.write_bytes(bytes(raw))
    if kind != "added":
        name = path.relative_to(kinds).as_posix()
        _reseal(kinds, lambda data: data["files"][name].update(
            bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    with pytest.raises(LenetEmbedError) as caught:
        open_snapshot(kinds, lambda *paths: None)
    assert str(path) in _one_line(caught.value)


# --------------------------------------------------------------------------- ids against the data


def _reseal(d: Path, edit) -> None:
    data = json.loads((d / MANIFEST).read_text())
    data.pop(SEAL)
    edit(data)
    (d / MANIFEST).write_text(sealed_json(data))


def test_next_id_below_rows_is_refused(run, kinds, every_kind):
    vector, image = _stored_vector(every_kind)
    rows = read_manifest(kinds).rows
    _reseal(kinds, lambda data: data.update(next_id=rows - 1))
    assert "next_id" in one_line_error(run("info", "--index-dir", kinds, "--verify"))
    with pytest.raises(LenetEmbedError, match="next_id"):
        add_vectors(kinds, vector, image, [3])


def test_next_id_below_the_highest_id_is_refused(run, kinds, every_kind):
    """After a compaction ids have gaps: rows <= next_id holds, yet the last id is beyond."""
    vector, image = _stored_vector(every_kind)
    compact(kinds)
    manifest = read_manifest(kinds)
    assert manifest.rows < manifest.next_id
    _reseal(kinds, lambda data: data.update(next_id=manifest.rows))
    before = _state(kinds)
    line = one_line_error(run("info", "--index-dir", kinds, "--verify"))
    assert "next_id" in line
    with pytest.raises(LenetEmbedError, match="next_id"):
        add_vectors(kinds, vector, image, [3])
    assert _state(kinds) == before


# --------------------------------------------------------------------------- labels and ids


@pytest.mark.parametrize("label", [10**20, "99999999999999999999", -1, -2, "-5", 2**63, "1e3",
                                   1.5, "9" * 5000])
def test_out_of_range_labels_are_refused(bundle_dir, label):
    with pytest.raises(LenetEmbedError) as caught:
        label_codes([label], read_manifest(bundle_dir))
    assert "label" in _one_line(caught.value)


def test_label_codes_in_range(bundle_dir):
    codes, _ = label_codes([None, 0, "7", " 8 ", INT64_MAX, str(INT64_MAX)],
                           read_manifest(bundle_dir))
    assert codes.tolist() == [-1, 0, 7, 8, INT64_MAX, INT64_MAX]


@pytest.mark.parametrize("item_id", [2**64, -(2**63) - 1, "x", 1.5, True])
def test_out_of_range_ids_are_refused(kinds, item_id):
    before = _state(kinds)
    with pytest.raises(LenetEmbedError) as caught:
        remove(kinds, [item_id])
    assert "id" in _one_line(caught.value)
    assert _state(kinds) == before


# --------------------------------------------------------------------------- factories


HOSTILE_FACTORIES = [
    "HNSW0", "HNSW1", "IVF4,PQ84x0", "IDMap,Flat", "IDMap2,HNSW32", "HNSW32,PQ12", "IVF0,Flat",
    "IVF99999999,Flat", "IVF4,PQ84x99", "PQ0", "PQ10", "PQ999999999999999999999", "OPQ0,PQ12",
    "OPQ5,PQ12", "OPQ12_0,PQ12", "HNSW" + "9" * 40, "IVF4,PQ12x0", "RFlat", "Flat,RFlat",
    "IVF4,Flat,Refine(Flat)", "LSH", "PCA16,Flat", "", " Flat", "flat", "auto", "Flat\n",
    "Flat\0", "\u0661\u0662", "HNSW\u0663\u0662", "IVF4_HNSW32,Flat", ",", "IVF4,", "x" * 10000,
]


@pytest.mark.parametrize("factory", HOSTILE_FACTORIES)
def test_hostile_factories_are_refused_before_faiss(factory):
    with pytest.raises(BadFactory) as caught:
        check_factory(factory, "cosine", 84)
    assert "factory" in _one_line(caught.value) and len(str(caught.value)) < 400
    with pytest.raises(LenetEmbedError):
        make_index(np.ones((4, 84), np.float32), "cosine", factory)


@pytest.mark.parametrize("factory", [
    "Flat", "HNSW32", "HNSW2", "HNSW256,Flat", "HNSW16,SQ8", "IVF1,Flat", "IVF256,SQ8",
    "IVF16,PQ12x4", "IVF1024,PQ42", "PQ12x4", "PQ84x1", "SQ8", "SQfp16", "OPQ12,IVF256,PQ12",
    "OPQ10_80,PQ10",
])
def test_supported_factories_build(factory):
    check_factory(factory, "cosine", 84)
    assert parse_factory(factory, 84).factory == factory


@pytest.mark.parametrize("factory", ["HNSW0", "HNSW1", "IVF4,PQ84x0", "IDMap,Flat"])
def test_build_index_factory_is_one_line(run, tiny_idx_dir, trained, tmp_path, factory):
    index_dir = tmp_path / "index"
    line = one_line_error(run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                              "--index-dir", index_dir, "--factory", factory))
    assert "factory" in line and not index_dir.exists()


def test_build_index_hnsw0_in_a_process(lenet_embed_cmd, tiny_idx_dir, trained, tmp_path):
    """What used to abort the process (SIGABRT) ends with status 1 and one line."""
    done = subprocess.run([*lenet_embed_cmd, "build-index", "--data", str(tiny_idx_dir),
                           "--model", str(trained.model), "--index-dir", str(tmp_path / "i"),
                           "--factory", "HNSW0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "HNSW0" in done.stderr


# --------------------------------------------------------------------------- calibration features


def test_calibration_features_are_the_closed_set():
    """What bundle.py checks manifests against is exactly what calibration.py computes."""
    distances = np.full((2, 5), 0.1)
    labels = np.zeros((2, 5), np.int64)
    vectors = np.ones((2, 84))
    head = (np.ones((84, 10)), np.zeros(10))
    assert set(features(distances, labels, vectors, None)[1]) == set(PLAIN_FEATURES)
    assert set(features(distances, labels, vectors, head)[1]) == {*PLAIN_FEATURES,
                                                                  *HEAD_FEATURES}
    known = np.eye(3, 84, dtype=np.float32)
    assert set(features(distances, labels, vectors, head, known)[1]) == {
        *PLAIN_FEATURES, *HEAD_FEATURES, *NONDIGIT_FEATURES}


# --------------------------------------------------------------------------- fuzzing the manifest

# Where a value goes: a path of keys (and list positions) into the manifest's JSON.
FIELDS = [
    ("version",), ("count",), ("rows",), ("next_id",), ("dim",), ("metric",), ("factory",),
    ("search_params",), ("search_params", "efSearch"), ("search_params", "nprobe"),
    ("classes",), ("target_recall",), ("deletions",), ("format_version",), ("operation",),
    ("segments", 0, "rows"), ("segments", 0, "name"), ("segments", 0, "sealed"),
    ("segments", 1, "has_sources"), ("encoder",), ("dataset",),
    ("calibration", "k"), ("calibration", "ood", "features"), ("calibration", "ood", "weights"),
    ("calibration", "ood", "features", 0), ("calibration", "confidence", "features", 1),
    ("calibration", "ood", "mean", 0), ("calibration", "ood", "scale", 0),
    ("calibration", "ood", "bias"), ("calibration", "head_weights"),
    ("calibration", "head_weights", 0), ("calibration", "head_weights", 3, 2),
    ("calibration", "head_bias"), ("calibration", "ood_thresholds"),
    ("calibration", "ood_thresholds", "0.995"), ("calibration", "default_keep"),
    ("calibration", "min_confidence"), ("calibration", "fitted_on", "items"),
]
HOSTILE = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, -1, 2, 10, 83, 84, 85, 2**31, 2**53, 2**63 - 1, 2**63, 2**64,
                     -(2**63) - 1, 10**30]),
    st.integers(),
    st.sampled_from([0.0, -0.0, 0.5, 1e-300, 1e308, -1e308]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "Flat", "HNSW0", "HNSW1", "IVF4,PQ84x0", "IDMap,Flat", "HNSW32",
                     "IVF4,Flat", "PQ12x4", "auto", "energy", "msp", "nope", "log_d1", "l2",
                     "cosine", "../x", "segments/../../etc", "0.995"]),
    st.text(max_size=20),
    st.lists(st.sampled_from(["log_d1", "energy", "agree", "bogus", 1, None]), max_size=4),
    st.dictionaries(st.sampled_from(["efSearch", "nprobe", "tuned_recall_at_10", "x"]),
                    st.one_of(st.integers(), st.floats(allow_nan=False)), max_size=2),
)


def _has(node, key) -> bool:
    if isinstance(node, dict):
        return True
    return isinstance(node, list) and isinstance(key, int) and key < len(node)


def _put(data: dict, path: tuple, value) -> bool:
    """Set ``data`` at ``path``; False when the path is not there."""
    node = data
    for key in path[:-1]:
        if not (_has(node, key) and (isinstance(node, list) or key in node)):
            return False
        node = node[key]
    if not _has(node, path[-1]):
        return False
    node[path[-1]] = value
    return True


@pytest.fixture(scope="module")
def fuzz_base(every_kind, tmp_path_factory) -> Path:
    return Path(shutil.copytree(every_kind, tmp_path_factory.mktemp("fuzz") / "base"))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), HOSTILE), min_size=1, max_size=3))
def test_fuzzed_manifests_end_in_one_line(fuzz_base, every_kind, tmp_path_factory, edits):
    target = Path(shutil.copytree(fuzz_base, tmp_path_factory.mktemp("case") / "index"))
    for path, value in edits:
        _reseal(target, lambda data, p=path, v=value: _put(data, p, v))
    vector, image = _stored_vector(every_kind)
    operations = (
        lambda: inspect_bundle(target, verify=True),
        lambda: SearchIndex.load(target, backend="litert").search_vectors(vector, k=5),
        lambda: SearchIndex.load(target, backend="litert").query([image], k=5),
        lambda: add_vectors(target, vector, image, [3]),
    )
    for operation in operations:
        try:
            operation()
        except LenetEmbedError as exc:
            _one_line(exc)


# Hostile manifests run through the installed command: a native crash is a negative status.
SUBPROCESS_CASES = {
    "next_id 2^64": (("next_id",), 2**64),
    "factory HNSW0": (("factory",), "HNSW0"),
    "factory IVF4,PQ84x0": (("factory",), "IVF4,PQ84x0"),
    "unknown feature": (("calibration", "ood", "features", 0), "energy2"),
    "efSearch 10^12": (("search_params",), {"efSearch": 10**12}),
    "calibration k 10^9": (("calibration", "k"), 10**9),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_hostile_manifests_in_a_process(every_kind, lenet_embed_cmd, tmp_path, case):
    target = Path(shutil.copytree(every_kind, tmp_path / "index"))
    path, value = SUBPROCESS_CASES[case]
    _reseal(target, lambda data: _put(data, path, value))
    png = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(_stored_vector(every_kind)[1][0]).save(png)
    for command in (["info", "--verify"], ["query", str(png)],
                    ["add", str(png), "--label", "3"]):
        done = subprocess.run([*lenet_embed_cmd, *command, "--index-dir", str(target)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, (command, done.returncode, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (command, done.stderr)
