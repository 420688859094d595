"""The Milvus store: a bundle whose items live in a Milvus collection answers like a FAISS bundle.

Run against Milvus Lite embedded (a ``.db`` file opened in this process) and against
``python -m milvus_lite server`` in a subprocess, reached over gRPC as a Milvus cluster would be.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _compare import close
from PIL import Image

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lenet_embed import LenetEmbedError, SearchIndex, build_index  # noqa: E402
from lenet_embed.bundle import read_manifest  # noqa: E402
from lenet_embed.snapshot import inspect_bundle  # noqa: E402
from lenet_embed.store.milvus import index_type, open_store  # noqa: E402


@pytest.fixture(scope="module")
def lite_bundle(trained, bundle_data, tmp_path_factory) -> Path:
    """The session's 2,000 digits, built into a Milvus Lite file beside the bundle."""
    root = tmp_path_factory.mktemp("milvus-lite")
    build_index(data=bundle_data, model=trained.model, index_dir=root / "index",
                store_uri=str(root / "digits.db"), factory="Flat")
    return root / "index"


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """``python -m milvus_lite server`` on a free local port; yields its URI."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path_factory.mktemp("milvus-server") / "data.db"
    server = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("the Milvus Lite server did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def _test_digits(bundle_data) -> np.ndarray:
    return bundle_data.test.images


def test_manifest_names_the_collection_and_no_segments(lite_bundle):
    manifest = read_manifest(lite_bundle)
    assert manifest.store is not None and manifest.store.kind == "milvus"
    assert manifest.store.uri == "../digits.db"  # relative: bundle and file move together
    assert manifest.store.index == "FLAT"
    assert manifest.segments == [] and manifest.count == 2000 == manifest.next_id
    # The bundle's own files: the encoder and the calibration's known non-digits.
    assert set(manifest.files) == {manifest.encoder_path, manifest.litert_path,
                                   manifest.calibration.nondigits}


def test_answers_like_the_faiss_bundle(lite_bundle, search_index, bundle_data):
    milvus = SearchIndex.load(lite_bundle)
    digits = _test_digits(bundle_data)
    ours = milvus.search(digits, k=5)
    theirs = search_index.search(digits, k=5)
    same_top1 = np.mean([a[0].label == b[0].label for a, b in zip(ours, theirs, strict=True)])
    assert same_top1 >= 0.99
    # Both exact: the same neighbours, at the same distances.
    for a, b in zip(ours, theirs, strict=True):
        assert [n.id for n in a][:3] == [n.id for n in b][:3]
        assert np.allclose([n.distance for n in a], [n.distance for n in b], atol=1e-4)
    item = ours[0][0].id
    assert np.array_equal(milvus.item_image(item), search_index.item_image(item))


def test_answers_are_calibrated_like_the_faiss_bundle(lite_bundle, search_index, bundle_data):
    """A Milvus bundle is calibrated at build time too (on exact searches of the same vectors):
    the same confidence and verdicts as the FAISS bundle of the same items."""
    from lenet_embed.nondigits import generate

    milvus = SearchIndex.load(lite_bundle)
    calibration = milvus.manifest.calibration
    assert calibration is not None and calibration.head_weights is not None
    # The same fit up to rounding: the two engines sum the distances in their own order (the
    # FAISS bundle's with as many threads as earlier tests left), and the fit amplifies it.
    # (Each writer names its file of known non-digits afresh.)
    ours, theirs = (dict(c.json_data) for c in (calibration, search_index.manifest.calibration))
    assert ours.pop("nondigits") != theirs.pop("nondigits")
    assert close(ours, theirs)
    digits = list(_test_digits(bundle_data))
    queries = digits + list(generate("eval", 30, seed=5).images)
    ours, theirs = milvus.query(queries, k=5), search_index.query(queries, k=5)
    assert [a.match for a in ours] == [b.match for b in theirs]
    assert np.allclose([a.confidence or 0 for a in ours], [b.confidence or 0 for b in theirs],
                       atol=1e-3)
    # The session model is small: most digits answered, some non-digits refused.
    answered = [a.match for a in ours]
    assert np.mean(answered[:len(digits)]) > 0.8 and not all(answered[len(digits):])


def test_add_remove_and_ids_never_reused(lite_bundle, bundle_data):
    index = SearchIndex.load(lite_bundle)
    digit = _test_digits(bundle_data)[7]
    [new_id] = index.add([digit], labels=[3]).tolist()
    assert new_id == 2000
    top = index.search(digit, k=1)[0][0]
    assert (top.id, top.label, top.distance) == (new_id, 3, pytest.approx(0.0, abs=1e-5))
    assert index.remove([new_id, 999_999]) == 1
    assert index.search(digit, k=3)[0][0].id != new_id
    with pytest.raises(LenetEmbedError, match="no item with id 2000"):
        index.item_image(new_id)
    [again] = index.add([digit]).tolist()
    assert again == 2001
    assert index.search(digit, k=1)[0][0].label is None
    assert index.remove([again]) == 1
    manifest = read_manifest(lite_bundle)
    assert (manifest.count, manifest.next_id, manifest.version) == (2000, 2002, 5)


def test_uncommitted_rows_of_a_killed_writer_are_dropped(lite_bundle, bundle_data):
    manifest = read_manifest(lite_bundle)
    store = open_store(lite_bundle, manifest)
    stray = np.arange(manifest.next_id, manifest.next_id + 3)
    index = SearchIndex.load(lite_bundle)
    query = index.embed(_test_digits(bundle_data)[:1])
    # Rows a killed writer inserted, exactly where a search looks: no reader sees them.
    store.insert(stray, np.repeat(query / np.linalg.norm(query), 3, axis=0).astype(np.float32),
                 np.zeros(3, np.int64), np.zeros((3, 28, 28), np.uint8))
    assert not set(index.search_vectors(query, k=10)[0][i].id for i in range(10)) & set(
        stray.tolist())
    [new_id] = index.add([_test_digits(bundle_data)[0]], labels=[1]).tolist()
    assert new_id == manifest.next_id
    assert len(store.present(stray)) == 1  # only the id the add itself just used
    index.remove([new_id])


def test_a_removal_killed_before_its_commit_is_counted_by_the_next_write(
        trained, bundle_data, tmp_path, caplog):
    bundle = tmp_path / "index"
    build_index(data=bundle_data, model=trained.model, index_dir=bundle,
                store_uri=str(tmp_path / "digits.db"), factory="Flat")
    manifest = read_manifest(bundle)
    store = open_store(bundle, manifest)
    store.delete(np.array([5, 6]))  # applied in Milvus; the writer died before its commit
    report = inspect_bundle(bundle)  # loads, with a warning rather than "rebuild it"
    assert report.manifest.count == manifest.count
    assert "a removal was stopped before its commit" in caplog.text
    index = SearchIndex.load(bundle)
    assert index.remove([7]) == 1
    after = read_manifest(bundle)
    assert after.count == manifest.count - 3 == len(index)
    assert store.count(f"id < {after.next_id}") == after.count


def test_cli_query_info_add_remove(lite_bundle, bundle_data, run, tmp_path):
    png = tmp_path / "digit.png"
    Image.fromarray(_test_digits(bundle_data)[3]).save(png)
    result = run("query", png, "--index-dir", lite_bundle, "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.splitlines()[0])
    assert len(answer["neighbors"]) == 3 and answer["predicted_label"] == bundle_data.test.labels[3]
    result = run("add", png, "--label", "5", "--index-dir", lite_bundle, "--json")
    assert result.exit_code == 0, result.output
    [new_id] = json.loads(result.output)["ids"]
    assert run("remove", new_id, "--index-dir", lite_bundle).exit_code == 0
    result = run("info", "--index-dir", lite_bundle)
    assert result.exit_code == 0, result.output
    assert "Milvus collection lenet_embed_v1_" in result.output and "2000 live" in result.output
    result = run("evaluate", "--index-dir", lite_bundle)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "not built from the training split" in result.output


def test_a_second_process_gets_one_line_while_the_file_is_open(lite_bundle, lenet_embed_cmd,
                                                                bundle_data, tmp_path):
    SearchIndex.load(lite_bundle)  # this process holds the Milvus Lite file
    png = tmp_path / "digit.png"
    Image.fromarray(_test_digits(bundle_data)[0]).save(png)
    done = subprocess.run([*lenet_embed_cmd, "query", str(png), "--index-dir", str(lite_bundle),
                           "--milvus-uri", str(lite_bundle.parent / "digits.db")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "python -m milvus_lite server" in lines[0], done.stderr


def test_server_over_grpc(milvus_server, trained, bundle_data, search_index, tmp_path,
                          lenet_embed_cmd):
    bundle = tmp_path / "index"
    build_index(data=bundle_data, model=trained.model, index_dir=bundle,
                store_uri=milvus_server)  # the default factory, auto: Milvus's AUTOINDEX
    manifest = read_manifest(bundle)
    assert manifest.store.uri == milvus_server and manifest.store.index == "AUTOINDEX"
    index = SearchIndex.load(bundle)
    digits = _test_digits(bundle_data)
    same = np.mean([a[0].label == b[0].label for a, b in zip(
        index.search(digits, k=1), search_index.search(digits, k=1), strict=True)])
    assert same >= 0.99
    # Another process writes while this one has the bundle open; refresh picks it up.
    png = tmp_path / "digit.png"
    Image.fromarray(digits[11]).save(png)
    done = subprocess.run([*lenet_embed_cmd, "add", str(png), "--label", "4", "--index-dir",
                           str(bundle), "--milvus-uri", milvus_server, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [new_id] = json.loads(done.stdout)["ids"]
    assert index.refresh() and len(index) == 2001
    assert index.search(digits[11], k=1)[0][0].id == new_id
    # A rebuild makes a new collection and drops the old one.
    old = manifest.store.collection
    build_index(data=bundle_data.head(500, 10), model=trained.model, index_dir=bundle,
                store_uri=milvus_server)
    from pymilvus import MilvusClient

    names = MilvusClient(uri=milvus_server).list_collections()
    assert old not in names and read_manifest(bundle).store.collection in names


def test_unreachable_server_is_one_line(trained, bundle_data, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LenetEmbedError, match="cannot reach Milvus at http://127.0.0.1"):
        build_index(data=bundle_data.head(100, 10), model=trained.model,
                    index_dir=tmp_path / "index", store_uri=f"http://127.0.0.1:{port}")
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_without_pymilvus_the_error_names_the_extra(lite_bundle):
    code = ("import sys; sys.modules['pymilvus'] = None\n"
            "from lenet_embed.cli import main\n"
            f"main(['info', '--index-dir', {str(lite_bundle)!r}, "
            f"'--milvus-uri', {str(lite_bundle.parent / 'digits.db')!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        'Error: the Milvus store needs pymilvus and milvus-lite; '
        'pip install "lenet-embed[milvus]"']


@pytest.mark.parametrize(("factory", "expected"), [
    ("Flat", "FLAT"), ("HNSW32", "HNSW"), ("IVF256,Flat", "IVF_FLAT"), ("IVF256,PQ12", "IVF_PQ"),
    ("OPQ12,IVF256,PQ12", "AUTOINDEX"), ("IVF64,SQ8", "IVF_SQ8"), ("auto", "AUTOINDEX"),
])
def test_index_type_follows_the_factory(factory, expected):
    assert index_type(factory) == expected
