"""The default model that ships with the package: its files match its card, its figures hold on
real MNIST, builds choose it when no other model is given, and a base install (no TensorFlow)
builds, queries and calibrates with it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_install import MISSING, run_cli

from lenet_embed import LenetEmbedError, SearchIndex, build_index
from lenet_embed.bundle import read_manifest
from lenet_embed.embed import LiteRTEncoder, litert_available
from lenet_embed.model_choice import (
    CARD_FILE,
    LITERT_FILE,
    MODEL_FILES,
    SHIPPED_DIR,
    choose_model,
    shipped_head_for,
    shipped_model,
    spot_figures,
)

# The card's figures were measured on this project's machine: another processor's float rounding
# may move a few of the 2,000 spot queries (0.0005 each).
TOLERANCE = 0.0015
needs_litert = pytest.mark.skipif(not litert_available(), reason="ai-edge-litert not installed")


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((SHIPPED_DIR / CARD_FILE).read_text())


def test_shipped_files_match_the_card_and_are_small(card):
    total = 0
    for name in MODEL_FILES:
        content = (SHIPPED_DIR / name).read_bytes()
        assert hashlib.sha256(content).hexdigest() == card["files"][name]["sha256"], name
        assert len(content) == card["files"][name]["bytes"], name
        total += len(content)
    assert total < 2_000_000
    assert shipped_model().path == SHIPPED_DIR  # the package's own check agrees
    weights, bias = shipped_model().head()
    assert weights.shape == (84, 10) and bias.shape == (10,)


def test_a_damaged_model_folder_is_refused(tmp_path):
    copy = shutil.copytree(SHIPPED_DIR, tmp_path / "model")
    tflite = copy / LITERT_FILE
    damaged = bytearray(tflite.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    tflite.write_bytes(bytes(damaged))
    with pytest.raises(LenetEmbedError, match=f"{tflite}: does not match .*card.json"):
        choose_model(copy)
    (copy / CARD_FILE).write_text("{")
    with pytest.raises(LenetEmbedError, match="not a model card"):
        choose_model(copy)


@needs_litert
def test_shipped_model_figures_hold_on_mnist(mnist, card):
    model = shipped_model()
    measured = spot_figures(LiteRTEncoder(model.litert_path), model.head(), mnist)
    promised = card["figures"]["spot"]
    assert (measured["queries"], measured["items"]) == (promised["queries"], promised["items"])
    assert abs(measured["head_accuracy"] - promised["head_accuracy"]) <= TOLERANCE
    assert abs(measured["nn1_accuracy"] - promised["nn1_accuracy"]) <= TOLERANCE
    # The full figures the card states are those of a usable model.
    assert card["figures"]["nn1_accuracy"] >= 0.99 and card["training"]["test_accuracy"] >= 0.99


def test_which_model_a_build_chooses(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chosen = choose_model()
    assert chosen.path == SHIPPED_DIR and chosen.folder is not None
    assert "shipped default" in chosen.describe()
    (tmp_path / "models").mkdir()
    shutil.copy(trained.model, tmp_path / "models" / "lenet.keras")
    chosen = choose_model()
    assert chosen.path == Path("models/lenet.keras") and chosen.folder is None
    assert choose_model(trained.model).path == Path(trained.model)
    assert choose_model(SHIPPED_DIR).folder is not None
    with pytest.raises(LenetEmbedError, match="nope.keras: no such model"):
        choose_model(tmp_path / "nope.keras")


@needs_litert
def test_build_with_the_shipped_model_copies_its_encoder(tiny_idx_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = build_index(data=tiny_idx_dir, index_dir=tmp_path / "index")
    assert "shipped default" in result.summary()["model"]
    manifest = read_manifest(tmp_path / "index")
    assert manifest.encoder_sha256 == shipped_model().encoder_sha256
    assert manifest.calibration is not None and manifest.calibration.head_weights is not None
    head = np.asarray(manifest.calibration.head_weights)
    assert np.array_equal(head, shipped_model().head()[0])
    # The bundle answers with the encoder it was built with: an indexed digit finds itself.
    index = SearchIndex.load(tmp_path / "index")
    first = index.snapshot.images(np.array([0]))[0]
    assert index.search_vectors(index.embed(first[None])[0], k=1)[0][0].id == 0


@pytest.fixture(scope="module")
def base_install_bundle(tiny_idx_dir, tmp_path_factory):
    """build-index run as a base install would (no TensorFlow), in a folder without models/."""
    work = tmp_path_factory.mktemp("light")
    done = run_cli("build-index", "--data", tiny_idx_dir, "--index-dir", work / "index",
                   "--json", cwd=work)
    return work, done


@needs_litert
def test_base_install_builds_queries_and_calibrates(base_install_bundle, mnist):
    work, (status, out, err, report) = base_install_bundle
    assert status == 0, err
    assert report == {"tried": [], "loaded": []}  # never even tried to import TensorFlow
    summary = json.loads(out)
    assert summary["count"] == 600 and "shipped default" in summary["model"]
    png = work / "digit.png"
    Image.fromarray(mnist.test.images[0]).save(png)
    status, out, err, report = run_cli("query", png, "--index-dir", work / "index", "-k", 5,
                                       "--json", cwd=work)
    assert status == 0, err
    assert report == {"tried": [], "loaded": []}
    answer = json.loads(out)
    assert answer["predicted_label"] == int(mnist.test.labels[0])
    # The head of a model folder, read without TensorFlow too.
    status, out, err, report = run_cli("calibrate", "--index-dir", work / "index", "--model",
                                       SHIPPED_DIR, "--json", cwd=work)
    assert status == 0, err
    assert report == {"tried": [], "loaded": []} and json.loads(out)["head"] is True


def test_calibrate_finds_the_shipped_head_only_for_the_shipped_encoder():
    weights, bias = shipped_head_for(shipped_model().encoder_sha256)
    assert np.array_equal(weights, shipped_model().head()[0])
    assert shipped_head_for("0" * 64) is None


def test_base_install_says_what_a_keras_model_needs(trained, tiny_idx_dir, tmp_path):
    status, out, err, report = run_cli("build-index", "--data", tiny_idx_dir, "--model",
                                       trained.model, "--index-dir", tmp_path / "index",
                                       cwd=tmp_path)
    assert status == 1 and out == "" and err == f"Error: build-index {MISSING}"
    assert not (tmp_path / "index").exists()
