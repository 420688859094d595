"""More of the ``lenet-embed`` command: query montages, search-parameter and runner options,
approximate bundles from ``build-index --factory``, and their one-line errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import faiss
import numpy as np
import pytest
from cli_checks import ok, one_line_error
from click.testing import CliRunner
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex, build_index, to_mnist, write_samples
from lenet_embed._quiet import set_verbose
from lenet_embed.ann import _CANDIDATES
from lenet_embed.bundle import read_manifest
from lenet_embed.cli import main
from lenet_embed.pictures import SCALE, montage_size, tile_box


@pytest.fixture(scope="module")
def pngs(small, tmp_path_factory) -> list[Path]:
    return write_samples(tmp_path_factory.mktemp("samples"), n=3, data=small)


@pytest.fixture(scope="module")
def hnsw_build(tiny_idx_dir, trained, tmp_path_factory) -> tuple[Path, dict]:
    """``build-index --factory HNSW32 --target-recall 0.95 --json`` on the tiny data folder."""
    index_dir = tmp_path_factory.mktemp("cli-hnsw") / "index"
    logger = logging.getLogger("lenet_embed")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        result = CliRunner().invoke(main, [
            "build-index", "--data", str(tiny_idx_dir), "--model", str(trained.model),
            "--index-dir", str(index_dir), "--factory", "HNSW32", "--target-recall", "0.95",
            "--json"])
    finally:  # module fixtures outlive conftest's per-test restore of the CLI's logging
        logger.handlers[:], logger.level, logger.propagate = saved
        set_verbose(False)
    ok(result)
    return index_dir, json.loads(result.stdout)


# ---------------------------------------------------------------------------------- montage


def test_query_montage(run, bundle_dir, search_index, pngs, tmp_path):
    k = 4
    out = tmp_path / "montage.png"
    result = ok(run("query", *pngs, "--index-dir", bundle_dir, "-k", k, "--json", "--montage",
                    out))
    assert result.stderr == f"wrote {out}\n"
    assert len(result.stdout.strip().splitlines()) == len(pngs)
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == montage_size(len(pngs), k)
        page = np.asarray(picture.convert("RGB"))
    # Row r shows query r as the model saw it, then its neighbours' indexed images, in order.
    for r, (path, neighbors) in enumerate(zip(pngs, search_index.search(pngs, k=k),
                                              strict=True)):
        tiles = [np.round(to_mnist(path).astype(np.float64) * 255).astype(np.uint8)]
        tiles += [search_index.item_image(n.id) for n in neighbors]
        for column, expected in enumerate(tiles):
            left, top, right, bottom = tile_box(r, column)
            shown = page[top:bottom:SCALE, left:right:SCALE, 0]
            assert np.array_equal(shown, expected), (r, column)


def test_query_montage_into_a_missing_folder(run, bundle_dir, pngs, tmp_path):
    out = tmp_path / "no" / "such" / "folder" / "montage.png"
    line = one_line_error(run("query", pngs[0], "--index-dir", bundle_dir, "--montage", out))
    assert str(out) in line and "montage" in line
    assert not out.exists()


# ---------------------------------------------------------------- search-parameter options


@pytest.mark.parametrize("option", ["--ef-search", "--nprobe"])
def test_search_parameter_options_on_a_flat_bundle(run, bundle_dir, pngs, option):
    line = one_line_error(run("query", pngs[0], "--index-dir", bundle_dir, option, 16))
    assert option in line and "does not apply" in line


@pytest.fixture
def faiss_threads():
    """``--threads`` sets FAISS's process-wide thread count: put it back afterwards."""
    saved = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(saved)


def test_threads_and_backend_options(run, bundle_dir, search_index, pngs, faiss_threads):
    expected = search_index.search(pngs, k=3)
    for extra in (("--threads", 1), ("--backend", "keras"), ("--backend", "litert")):
        result = ok(run("query", *pngs, "--index-dir", bundle_dir, "-k", 3, "--json", *extra))
        records = [json.loads(line) for line in result.stdout.splitlines()]
        for record, neighbors in zip(records, expected, strict=True):
            assert [n["id"] for n in record["neighbors"]] == [n.id for n in neighbors], extra
            assert np.allclose([n["distance"] for n in record["neighbors"]],
                               [n.distance for n in neighbors], atol=1e-4), extra
    assert "--threads" in one_line_error(
        run("query", pngs[0], "--index-dir", bundle_dir, "--threads", 0))
    assert "--backend" in one_line_error(
        run("query", pngs[0], "--index-dir", bundle_dir, "--backend", "onnx"))


# ---------------------------------------------------------------------- build-index --factory


def test_build_index_pq10_fails_with_an_error_line(run, tiny_idx_dir, trained, tmp_path):
    index_dir = tmp_path / "index"
    result = run("build-index", "--data", tiny_idx_dir, "--model", trained.model, "--index-dir",
                 index_dir, "--factory", "PQ10")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert "PQ10" in errors[0] and "84" in errors[0]
    assert not index_dir.exists()


def test_build_index_pq10_is_one_line(run, tiny_idx_dir, trained, tmp_path):
    line = one_line_error(run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                              "--index-dir", tmp_path / "index", "--factory", "PQ10"))
    assert "PQ10" in line and "84" in line


def test_build_index_rejects_a_bad_factory_before_embedding(trained, bundle_data, tmp_path):
    progress = []
    with pytest.raises(LenetEmbedError, match="PQ10"):
        build_index(data=bundle_data, model=trained.model, index_dir=tmp_path / "index",
                    factory="PQ10", on_progress=lambda *step: progress.append(step))
    assert progress == []


def test_build_index_bad_target_recall_is_one_line(run, tiny_idx_dir, trained, tmp_path):
    for bad in (0, 1.5):
        assert "--target-recall" in one_line_error(
            run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                "--index-dir", tmp_path / "index", "--target-recall", bad))


def test_build_index_bad_memory_budget_is_one_line_before_embedding(run, tiny_idx_dir, trained,
                                                                   tmp_path):
    for bad in ("lots", "0", "-2GB"):
        line = one_line_error(run("build-index", "--data", tiny_idx_dir, "--model",
                                  trained.model, "--index-dir", tmp_path / "index",
                                  "--memory-budget", bad))
        assert "--memory-budget" in line and repr(bad) in line
        assert "embedding" not in line
    assert not (tmp_path / "index").exists()


def test_auto_within_a_small_memory_budget(run, tiny_idx_dir, trained, tmp_path):
    # 600 digits: Flat 600 x 336 = 202 KB and IVF8,Flat 209 KB are over 100 KB; IVF8,SQ8 (one
    # byte per dimension) is 600 x 92 + 8 x 336 + 8 x 84 = 58.6 KB.
    index_dir = tmp_path / "index"
    result = ok(run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                    "--index-dir", index_dir, "--memory-budget", "100KB"))
    manifest = read_manifest(index_dir)
    params = manifest.search_params
    assert manifest.factory == "IVF8,SQ8" and set(params) == {"nprobe", "tuned_recall_at_10"}
    assert manifest.target_recall == 0.995
    reason = manifest.factory_reason
    assert reason.startswith("600 vectors x 84 d: IVF8,SQ8 (IVF8,Flat (209 KB) is over the 100 KB "
                             f"budget; 58.6 KB within the 100 KB budget), nprobe "
                             f"{params['nprobe']} for recall@10 {params['tuned_recall_at_10']:.4f}")
    # Scalar quantisation may cap the recall below the target; the reason says so when it does,
    # and the tuning stops at visiting all 8 lists.
    assert ("short of the 0.995 target" in reason) == (params["tuned_recall_at_10"] < 0.995)
    assert params["nprobe"] <= 8
    assert f"\nindex: {reason}\n" in result.stdout
    rows = {}
    for line in ok(run("info", "--index-dir", index_dir)).stdout.splitlines():
        key, _, value = line.partition(":")
        rows[key] = value.strip()
    assert rows["factory"] == "IVF8,SQ8" and rows["why this index"] == reason
    report = json.loads(ok(run("info", "--index-dir", index_dir, "--json")).stdout)
    assert report["factory_reason"] == reason


def test_info_on_a_bundle_from_before_the_reason(run, bundle_copy, bundle_data):
    # A manifest written before the reason (and before the manifest's own checksum) existed.
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["factory_reason"], manifest["manifest_sha256"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(bundle_copy).factory_reason is None
    info = ok(run("info", "--index-dir", bundle_copy)).stdout
    assert re.search(r"^why this index:\s+not recorded", info, re.MULTILINE)
    (row,) = SearchIndex.load(bundle_copy).search(bundle_data.train.images[5], k=1)
    assert row[0].id == 5


def test_build_index_hnsw_summary(hnsw_build):
    index_dir, summary = hnsw_build
    assert (summary["index_dir"], summary["factory"], summary["dim"]) == (
        str(index_dir), "HNSW32", 84)
    params = summary["search_params"]
    assert set(params) == {"efSearch", "tuned_recall_at_10"}
    assert params["efSearch"] in _CANDIDATES["efSearch"]
    assert 0.95 <= params["tuned_recall_at_10"] <= 1.0
    assert read_manifest(index_dir).search_params == params


def test_info_shows_search_params(run, hnsw_build, bundle_dir):
    index_dir, summary = hnsw_build
    rows = {}
    for line in ok(run("info", "--index-dir", index_dir)).stdout.splitlines():
        key, _, value = line.partition(":")
        rows[key] = value.strip()
    assert json.loads(rows["search params"]) == summary["search_params"]
    assert rows["factory"] == "HNSW32"
    manifest = json.loads(ok(run("info", "--index-dir", index_dir, "--json")).stdout)
    assert manifest["search_params"] == summary["search_params"]
    flat = ok(run("info", "--index-dir", bundle_dir)).stdout
    assert re.search(r"^search params:\s+\{\}$", flat, re.MULTILINE)


def test_query_an_hnsw_bundle_with_ef_search(run, hnsw_build, pngs):
    index_dir, _ = hnsw_build
    result = ok(run("query", *pngs, "--index-dir", index_dir, "-k", 5, "--ef-search", 16,
                    "--json"))
    index = SearchIndex.load(index_dir, search_params={"efSearch": 16})
    for line, neighbors in zip(result.stdout.splitlines(), index.search(pngs, k=5),
                               strict=True):
        assert [n["id"] for n in json.loads(line)["neighbors"]] == [n.id for n in neighbors]
    line = one_line_error(run("query", pngs[0], "--index-dir", index_dir, "--nprobe", 2))
    assert "nprobe" in line


def test_evaluate_an_hnsw_bundle(run, hnsw_build, tiny_idx_dir):
    index_dir, summary = hnsw_build
    ef = summary["search_params"]["efSearch"]
    figures = json.loads(ok(run("evaluate", "--index-dir", index_dir, "--data", tiny_idx_dir,
                                "--json")).stdout)
    assert figures["search_params"] == {"efSearch": ef}
    assert 0.0 <= figures["recall_at_10"] <= 1.0
    assert 0.0 <= figures["index_nn1_accuracy"] <= 1.0
    human = ok(run("evaluate", "--index-dir", index_dir, "--data", tiny_idx_dir,
                   "--ef-search", 24)).stdout
    assert re.search(r"^recall@10 vs exact\s+\d\.\d{4} \(efSearch 24\)$", human, re.MULTILINE)
    assert re.search(r"^1-NN accuracy \(this index\)\s+\d\.\d{4}$", human, re.MULTILINE)
