"""End to end on the real thing: train one epoch on all of MNIST, index all 60,000 training
digits, and query 200 test digits written as PNG files through the installed command."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from lenet_embed import SearchIndex, majority_label, write_samples
from lenet_embed.bundle import read_manifest

N_QUERIES = 200
K = 5
SEED = 2024


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.e2e
def test_full_mnist_pipeline(mnist_path, mnist, tmp_path, lenet_embed_cmd, quiet_env):
    model = tmp_path / "models" / "lenet.keras"
    index_dir = tmp_path / "index"

    trained = json.loads(_run([*lenet_embed_cmd, "train", "--data", str(mnist_path), "--epochs",
                               "1", "--seed", str(SEED), "--out", str(model), "--json"],
                              quiet_env).stdout)
    assert trained["epochs"] == 1 and model.is_file()

    built = json.loads(_run([*lenet_embed_cmd, "build-index", "--data", str(mnist_path),
                             "--model", str(model), "--index-dir", str(index_dir), "--json"],
                            quiet_env).stdout)
    assert built["count"] == len(mnist.train) == read_manifest(index_dir)["count"]

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
        assert record["predicted_label"] == majority_label(neighbors)
        cli_distances = [n["distance"] for n in record["neighbors"]]
        assert np.allclose(cli_distances, [n.distance for n in neighbors], atol=1e-6)
