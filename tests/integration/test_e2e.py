"""End to end on the real thing: train the default recipe on all of MNIST, index all 60,000
training digits, query test digits written as PNG files through the installed command, evaluate
the bundle, and query digits rendered from the machine's fonts (outside MNIST)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_embed import SearchIndex, majority_label, write_samples
from lenet_embed.bundle import read_manifest
from lenet_embed.recipes import DEFAULT_RECIPE

N_QUERIES = 200
K = 5
SEED = 1
# The default recipe shortened (its cosine schedule decays over these epochs): the whole
# pipeline on the real data within CI's time. The full recipe's figures (24 epochs) are
# measured by scripts/bench_quality.py and given in docs/benchmarks.md.
EPOCHS = 6
# Guards well inside what these epochs reach, so a regression fails while noise does not.
# Measured at seed 1 with the `pictures` recipe (the default before `fragments`, which passes
# them too): test accuracy 0.9928, 1-NN 0.9905, MAP@R 0.9724, top-1 per degradation 0.9595
# to 0.9955, ECE 0.0034, AUROC 0.9968, digits answered 0.9938, font digits 0.9437 (0.9458
# with the calibration before the known non-digits). The font guard was 0.95, set when the
# recipe was `outlier` and its fonts read 0.9739; the same code then read 0.9458 in a fresh
# environment (most misses are DejaVu sixes).
ACCURACY_GUARD = 0.985
MAP_GUARD = 0.94
DEGRADED_GUARD = 0.95
FONT_GUARD = 0.93
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.e2e
def test_full_mnist_pipeline(mnist_path, mnist, tmp_path, lenet_embed_cmd, quiet_env):
    model = tmp_path / "models" / "lenet.keras"
    index_dir = tmp_path / "index"

    trained = json.loads(_run([*lenet_embed_cmd, "train", "--data", str(mnist_path), "--epochs",
                               str(EPOCHS), "--seed", str(SEED), "--out", str(model), "--json"],
                              quiet_env).stdout)
    assert trained["recipe"] == DEFAULT_RECIPE and trained["epochs"] == EPOCHS
    assert model.is_file()

    built = json.loads(_run([*lenet_embed_cmd, "build-index", "--data", str(mnist_path),
                             "--model", str(model), "--index-dir", str(index_dir), "--json"],
                            quiet_env).stdout)
    assert built["count"] == len(mnist.train) == read_manifest(index_dir).count
    assert read_manifest(index_dir).calibration is not None

    paths = write_samples(tmp_path / "samples", n=N_QUERIES, data=mnist_path)
    assert len(paths) == N_QUERIES
    true_labels = mnist.test.labels[:N_QUERIES]
    named_labels = [int(re.search(r"label-(\d+)\.png$", p.name).group(1)) for p in paths]
    assert named_labels == true_labels.tolist()

    done = _run([*lenet_embed_cmd, "query", *map(str, paths), "--index-dir", str(index_dir),
                 "-k", str(K), "--json"], quiet_env)
    assert done.stderr == ""
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["query"] for r in records] == [str(p) for p in paths]

    top1 = np.array([r["neighbors"][0]["label"] for r in records])
    accuracy = float(np.mean(top1 == true_labels))
    print(f"top-1 label accuracy over {N_QUERIES} test digits: {accuracy:.4f}; "
          f"classifier test accuracy {trained['test_accuracy']:.4f}")
    assert accuracy >= 0.97

    api = SearchIndex.load(index_dir).search(paths, k=K)
    for record, neighbors in zip(records, api, strict=True):
        assert [n["id"] for n in record["neighbors"]] == [n.id for n in neighbors]
        assert [n["label"] for n in record["neighbors"]] == [n.label for n in neighbors]
        # On a match, the majority of the 5 neighbours calibration judges; else null.
        assert record["predicted_label"] in (majority_label(neighbors[:5]), None)
        assert (record["predicted_label"] is None) == (not record["match"])
        cli_distances = [n["distance"] for n in record["neighbors"]]
        assert np.allclose(cli_distances, [n.distance for n in neighbors], atol=1e-6)

    figures = json.loads(_run([*lenet_embed_cmd, "evaluate", "--data", str(mnist_path),
                               "--index-dir", str(index_dir), "--json"], quiet_env).stdout)
    trust = figures["trust"]
    print(f"default recipe, {EPOCHS} epochs: test accuracy {trained['test_accuracy']:.4f}, "
          f"1-NN {figures['nn1_accuracy']:.4f}, MAP@R {figures['map_at_r']:.4f}, "
          f"degraded top-1 {figures['degraded_top1']}, ECE {trust['ece']:.4f}, "
          f"AUROC {trust['auroc']:.4f}, answered {trust['digits_answered']:.4f}, "
          f"rejected {trust['nondigits_rejected']:.4f}")
    assert trained["test_accuracy"] >= ACCURACY_GUARD
    assert figures["nn1_accuracy"] >= ACCURACY_GUARD
    assert figures["map_at_r"] >= MAP_GUARD
    assert min(figures["degraded_top1"].values()) >= DEGRADED_GUARD
    assert trust["ece"] <= 0.02 and trust["digits_answered"] >= 0.98 and trust["auroc"] >= 0.98

    fonts = _run([sys.executable, str(SCRIPTS / "font_digits.py"), str(tmp_path / "fonts"),
                  "--index-dir", str(index_dir)], quiet_env)
    result = json.loads(fonts.stdout)
    print(f"font digits: {result['queries']} queries, top-1 {result['top1_accuracy']:.4f}, "
          f"wrong: {result['wrong'][:10]}")
    assert result["errors"] == []
    assert result["queries"] >= 400
    assert result["top1_accuracy"] >= FONT_GUARD
