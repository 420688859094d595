"""``evaluate`` and its report: figures checked against a numpy brute force of our own, an HNSW
bundle whose tuned search parameter is stored, applied and overridable, refusal of a bundle from
other data, the report's files, and the ``evaluate`` command."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex, build_index, load_mnist, majority_label
from lenet_embed._quiet import set_verbose
from lenet_embed.ann import _CANDIDATES
from lenet_embed.bundle import read_manifest
from lenet_embed.cli import main
from lenet_embed.data import Dataset, LabeledImages
from lenet_embed.degrade import DEGRADATIONS, degrade, sample
from lenet_embed.embed import KerasEncoder
from lenet_embed.evaluate import (
    DEGRADED_COUNT,
    FINAL_NONDIGITS_EVALUATED,
    NONDIGITS_EVALUATED,
    WORST_SHOWN,
    Evaluation,
    evaluate,
    evaluation_nondigits,
    write_report,
)
from lenet_embed.pictures import montage_size
from lenet_embed.preprocess import open_image, scale_pixels

K = 10
QUALITY = ("nn1_accuracy", "knn_accuracy", "precision_at_1", "precision_at_10",
           "precision_at_100", "r_precision", "map_at_r")
FIGURE_KEYS = {f.name for f in dataclasses.fields(Evaluation)} - {"details"}


# ------------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def keras_index(bundle_dir) -> SearchIndex:
    """The session bundle with the Keras encoder, so our numpy reference sees the same vectors."""
    return SearchIndex.load(bundle_dir, backend="keras")


@pytest.fixture(scope="module")
def evaluation(keras_index, bundle_data) -> Evaluation:
    return evaluate(keras_index, data=bundle_data, k=K)


@pytest.fixture(scope="module")
def reference(bundle_dir, bundle_data) -> dict[str, float]:
    """The quality figures by brute force in numpy, from KerasEncoder embeddings (cosine)."""
    encoder = KerasEncoder.load(bundle_dir / read_manifest(bundle_dir).encoder_path)
    indexed = encoder.embed(scale_pixels(bundle_data.train.images)).astype(np.float64)
    queries = encoder.embed(scale_pixels(bundle_data.test.images)).astype(np.float64)
    indexed /= np.linalg.norm(indexed, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    order = np.argsort(1.0 - queries @ indexed.T, axis=1, kind="stable")
    ranked = bundle_data.train.labels[order]  # labels of every indexed digit, nearest first
    truth = bundle_data.test.labels
    hits = ranked == truth[:, None]
    knn_right, r_precisions, maps = [], [], []
    for row, label, hit in zip(ranked, truth, hits, strict=True):
        votes = {}
        for rank, neighbour in enumerate(row[:K]):
            count, first = votes.get(neighbour, (0, rank))
            votes[neighbour] = (count + 1, first)
        predicted = min(votes, key=lambda lab: (-votes[lab][0], votes[lab][1]))
        knn_right.append(predicted == label)
        r = int(np.sum(bundle_data.train.labels == label))
        r_precisions.append(hit[:r].sum() / r)
        maps.append(sum(hit[: i + 1].sum() / (i + 1) for i in range(r) if hit[i]) / r)
    return {
        "nn1_accuracy": float(hits[:, 0].mean()),
        "precision_at_1": float(hits[:, 0].mean()),
        "knn_accuracy": float(np.mean(knn_right)),
        "precision_at_10": float(hits[:, :10].mean()),
        "precision_at_100": float(hits[:, :100].mean()),
        "r_precision": float(np.mean(r_precisions)),
        "map_at_r": float(np.mean(maps)),
    }


def test_evaluate_flat_bundle(evaluation, bundle_dir, bundle_data):
    figures = evaluation.to_dict()
    assert set(figures) == FIGURE_KEYS
    assert (figures["index_dir"], figures["count"], figures["queries"], figures["k"]) == (
        str(bundle_dir), len(bundle_data.train), len(bundle_data.test), K)
    assert (figures["metric"], figures["factory"], figures["search_params"]) == (
        "cosine", "Flat", {})
    for name in QUALITY:
        assert 0.0 <= figures[name] <= 1.0, name
    assert figures["nn1_accuracy"] == figures["precision_at_1"]
    assert figures["recall_at_10"] is None and figures["index_nn1_accuracy"] is None
    assert figures["batch_qps"] > 0
    for name in ("latency_ms", "latency_with_embedding_ms"):
        assert 0 < figures[f"{name}_p50"] <= figures[f"{name}_p99"]
    # A one-epoch model on 2,000 digits still retrieves far better than chance (0.1).
    assert figures["precision_at_1"] > 0.5


def test_evaluate_agrees_with_numpy_brute_force(evaluation, reference):
    figures = evaluation.to_dict()
    assert figures["precision_at_1"] == pytest.approx(reference["precision_at_1"], abs=1e-12)
    assert figures["knn_accuracy"] == pytest.approx(reference["knn_accuracy"], abs=1e-12)
    # Deep ranks may hold float32/float64 near-ties that swap; allow a hair for those.
    for name in ("precision_at_10", "precision_at_100", "r_precision", "map_at_r"):
        assert figures[name] == pytest.approx(reference[name], abs=2e-3), name


def test_evaluate_with_the_default_litert_encoder_agrees(search_index, bundle_data, evaluation):
    litert = evaluate(search_index, data=bundle_data, k=K).to_dict()
    for name in QUALITY:
        assert litert[name] == pytest.approx(getattr(evaluation, name), abs=2e-3), name


# --------------------------------------------------------------------------------- HNSW


@pytest.fixture(scope="module")
def hnsw_dir(trained, bundle_data, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("hnsw") / "index"
    build_index(data=bundle_data, model=trained.model, index_dir=index_dir, factory="HNSW32",
                target_recall=0.95)
    return index_dir


def test_hnsw_bundle_stores_applies_and_reports_its_tuning(hnsw_dir, bundle_data):
    manifest = read_manifest(hnsw_dir)
    assert manifest.factory == "HNSW32"
    params = manifest.search_params
    assert set(params) == {"efSearch", "tuned_recall_at_10"}
    ef = params["efSearch"]
    assert ef in _CANDIDATES["efSearch"] and params["tuned_recall_at_10"] >= 0.95

    index = SearchIndex.load(hnsw_dir, backend="keras")
    assert index.search_params == {"efSearch": ef}
    (segment,) = index.snapshot.segments
    assert segment.index.hnsw.efSearch == ef

    figures = evaluate(index, data=bundle_data, k=K).to_dict()
    assert (figures["factory"], figures["search_params"]) == ("HNSW32", {"efSearch": ef})
    assert isinstance(figures["recall_at_10"], float)
    assert isinstance(figures["index_nn1_accuracy"], float)
    # The build tuned on these very test digits with the same encoder: same recall.
    assert figures["recall_at_10"] == pytest.approx(params["tuned_recall_at_10"], abs=2e-3)
    assert figures["recall_at_10"] >= 0.95 - 2e-3
    queries = index.encoder.embed(scale_pixels(bundle_data.test.images))
    first = [row[0].label for row in index.search_vectors(queries, k=1)]
    assert figures["index_nn1_accuracy"] == pytest.approx(
        float(np.mean(np.array(first) == bundle_data.test.labels)), abs=1e-12)


def test_hnsw_search_params_override(hnsw_dir, bundle_data):
    tuned = SearchIndex.load(hnsw_dir)
    recall_tuned = evaluate(tuned, data=bundle_data, k=K).recall_at_10
    shallow = SearchIndex.load(hnsw_dir, search_params={"efSearch": 1})
    assert shallow.search_params == {"efSearch": 1}
    assert shallow.snapshot.segments[0].index.hnsw.efSearch == 1
    figures = evaluate(shallow, data=bundle_data, k=K)
    assert figures.search_params == {"efSearch": 1}
    assert figures.recall_at_10 <= recall_tuned
    with pytest.raises(LenetEmbedError, match="nprobe"):
        SearchIndex.load(hnsw_dir, search_params={"nprobe": 4})


# ------------------------------------------------------------------------- wrong data


def test_evaluate_refuses_a_bundle_from_other_data(search_index, mnist, bundle_data):
    fewer = mnist.head(len(bundle_data.train) - 1, 100)
    n = len(bundle_data.train)
    shifted = Dataset(LabeledImages(mnist.train.images[n : 2 * n], mnist.train.labels[n : 2 * n]),
                      bundle_data.test, "the next 2,000 digits")
    assert not np.array_equal(shifted.train.labels, bundle_data.train.labels)
    for data in (fewer, shifted):
        with pytest.raises(LenetEmbedError, match="not built from the training split"):
            evaluate(search_index, data=data)
    with pytest.raises(LenetEmbedError, match=rf"k must be between 1 and {n}\b.*got {n + 1}$"):
        evaluate(search_index, data=bundle_data, k=n + 1)


def test_evaluate_refuses_other_digits_with_the_same_labels(search_index, mnist, bundle_data):
    n = len(bundle_data.train)
    # Swap every indexed digit for a different training digit of the same class.
    labels = bundle_data.train.labels
    pools = {d: list(np.flatnonzero(mnist.train.labels[n:] == d) + n) for d in range(10)}
    rows = np.array([pools[int(label)].pop(0) for label in labels])
    other = Dataset(LabeledImages(mnist.train.images[rows], labels.copy()), bundle_data.test,
                    "same labels, other digits")
    assert np.array_equal(other.train.labels, labels)
    with pytest.raises(LenetEmbedError, match="not built from the training split"):
        evaluate(search_index, data=other)


# ------------------------------------------------------------------------------- report


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def test_write_report(evaluation, keras_index, tmp_path):
    out = tmp_path / "report"
    written = write_report(evaluation, out, keras_index)
    details = evaluation.details
    predicted = keras_index.snapshot.labels[details["rows"][:, 0]]
    n_wrong = int(np.sum(predicted != details["test_labels"]))
    assert n_wrong == round((1 - evaluation.nn1_accuracy) * evaluation.queries) > 0
    names = ["figures.json", "confusion.png", "worst.png", "embedding_map.png",
             "reliability.png"]
    assert written == [out / name for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert json.loads((out / "figures.json").read_text()) == json.loads(
        json.dumps(evaluation.to_dict()))
    for name in names[1:]:
        image = _open(out / name)
        assert image.format == "PNG" and image.mode == "RGB", name
        assert min(image.size) >= 200 and max(image.size) <= 4000, (name, image.size)
    assert _open(out / "worst.png").size == montage_size(min(n_wrong, WORST_SHOWN), evaluation.k)
    trust = evaluation.to_dict()["trust"]
    assert 0 <= trust["ece"] <= 1 and 0.5 < trust["auroc"] <= 1
    assert set(trust["rejected_by_kind"]) == {"letters", "symbols", "textures", "noise", "objects"}
    # Every generated non-digit counts, and every one reaches the model (preprocessing never
    # decides what a digit is): the calibrated score rejects it or not.
    others = evaluation_nondigits()
    assert trust["nondigits"] == len(others) == NONDIGITS_EVALUATED
    assert others.pixels.shape == (len(others), 28, 28)
    assert all(0.0 <= share <= 1.0 for share in trust["rejected_by_kind"].values())
    # The final split's kinds, which no fit and no choice saw, are scored apart.
    assert set(trust["final_rejected_by_kind"]) == {"alphabets", "signs", "garments", "scenes"}
    assert trust["final_nondigits"] == FINAL_NONDIGITS_EVALUATED
    assert 0.5 < trust["final_auroc"] <= 1 and 0.0 <= trust["final_rejected"] <= 1.0


def test_write_report_without_wrong_neighbours_skips_worst(search_index, bundle_data, tmp_path):
    # Query with indexed digits themselves: each finds itself first, so nothing is wrong.
    data = Dataset(bundle_data.train, bundle_data.train.head(30), "indexed digits as queries")
    evaluation = evaluate(search_index, data=data, k=5)
    assert evaluation.nn1_accuracy == 1.0
    written = write_report(evaluation, tmp_path / "report", search_index)
    assert [p.name for p in written] == ["figures.json", "confusion.png", "embedding_map.png",
                                         "reliability.png"]
    assert not (tmp_path / "report" / "worst.png").exists()


# ---------------------------------------------------------------------------------- CLI


def _invoke(*args):
    """Run the CLI in-process, then undo its logging setup (module fixtures outlive the
    per-test restore in conftest)."""
    logger = logging.getLogger("lenet_embed")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        set_verbose(False)


def _ok(result):
    assert result.exception is None, result.output
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def cli_bundle(tiny_idx_dir, trained, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("cli-eval") / "index"
    _ok(_invoke("build-index", "--data", tiny_idx_dir, "--model", trained.model, "--index-dir",
                index_dir, "--json"))
    return index_dir


def test_cli_evaluate_json(cli_bundle, tiny_idx_dir):
    result = _ok(_invoke("evaluate", "--index-dir", cli_bundle, "--data", tiny_idx_dir,
                         "--json"))
    assert len(result.stdout.strip().splitlines()) == 1
    figures = json.loads(result.stdout)
    assert set(figures) == FIGURE_KEYS
    tiny = load_mnist(tiny_idx_dir)
    assert (figures["count"], figures["queries"], figures["k"]) == (
        len(tiny.train), len(tiny.test), 10)
    assert figures["factory"] == "Flat" and figures["recall_at_10"] is None
    expected = evaluate(SearchIndex.load(cli_bundle), data=tiny_idx_dir).to_dict()
    for name in QUALITY:
        assert figures[name] == pytest.approx(expected[name], abs=1e-12), name


def test_cli_evaluate_human_with_report(cli_bundle, tiny_idx_dir, tmp_path):
    report = tmp_path / "report"
    result = _ok(_invoke("evaluate", "--index-dir", cli_bundle, "--data", tiny_idx_dir, "-k", 5,
                         "--report", report))
    rows = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    figures = json.loads((report / "figures.json").read_text())
    assert figures["k"] == 5
    assert rows["MAP@R"] == f"{figures['map_at_r']:.4f}"
    assert rows["R-precision"] == f"{figures['r_precision']:.4f}"
    assert rows["1-NN accuracy"] == f"{figures['nn1_accuracy']:.4f}"
    assert rows["5-NN accuracy"] == f"{figures['knn_accuracy']:.4f}"
    assert "recall@10 vs exact" not in rows  # exact index: nothing to approximate
    scans = figures["degraded_queries"]
    for name, top1 in figures["degraded_top1"].items():
        assert rows[f"top-1, {name} ({scans} scans)"] == f"{top1:.4f}"
    assert len(figures["degraded_top1"]) == len(DEGRADATIONS)
    files = sorted(p.name for p in report.iterdir())
    assert {"figures.json", "confusion.png", "embedding_map.png"} <= set(files)
    assert result.stderr == f"wrote {len(files)} files to {report}\n"
    for name in files:
        if name.endswith(".png"):
            assert _open(report / name).size[0] > 0


def test_top1_per_degradation_is_what_queries_of_the_scans_get(evaluation, keras_index,
                                                               bundle_data):
    """Every degradation is reported, and each figure is the fraction of the degraded scans
    whose k-NN majority label, from the public search on the decoded files, is right."""
    assert list(evaluation.degraded_top1) == list(DEGRADATIONS)
    assert evaluation.degraded_queries == min(DEGRADED_COUNT, len(bundle_data.test))
    chosen = sample(DEGRADED_COUNT, len(bundle_data.test))
    truth = bundle_data.test.labels[chosen]
    for name in ("clean", "salt_pepper", "lowres"):
        files = degrade(bundle_data.test.images[chosen], name)
        hits = keras_index.search([open_image(data, name) for data in files], k=K)
        right = np.mean([majority_label(found) == label for found, label in zip(hits, truth,
                                                                                 strict=True)])
        assert evaluation.degraded_top1[name] == pytest.approx(right, abs=1e-9), name
    # A model trained on 5,000 digits still reads most clean scans, and the 8x8 sensor grid
    # costs it more than a clean scan does.
    assert evaluation.degraded_top1["clean"] > 0.85
    assert evaluation.degraded_top1["lowres"] < evaluation.degraded_top1["clean"]
