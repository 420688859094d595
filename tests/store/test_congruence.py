"""The two stores answer alike: the same scenario run on a bundle that keeps its items itself
(FAISS) and on one whose items are in Milvus (Lite, embedded), and their answers compared.

Both bundles index the same 600 real MNIST training digits with exact search (FAISS ``Flat``,
Milvus ``FLAT``), so every step must give the same answer: build, search, add, remove, compact,
calibrate, ``info --verify``. Each step also checks what the answer should be, so that two
stores wrong in the same way fail too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _compare import difference
from click.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lenet_embed import LenetEmbedError, SearchIndex, build_index, calibrate  # noqa: E402
from lenet_embed.bundle import read_manifest  # noqa: E402
from lenet_embed.cli import main  # noqa: E402
from lenet_embed.store import kept_in_folder  # noqa: E402
from lenet_embed.updates import remove  # noqa: E402

BACKENDS = ("faiss", "milvus")
N = 600
K = 5


def _scenario(index_dir: Path, queries: np.ndarray, added: np.ndarray) -> dict[str, Any]:
    """Every step on one bundle, and what each answered."""
    answers: dict[str, Any] = {}
    index = SearchIndex.load(index_dir)
    manifest = index.manifest
    answers["build"] = {"count": manifest.count, "next_id": manifest.next_id,
                        "calibrated": manifest.calibration is not None,
                        "calibration": manifest.calibration.json_data}
    answers["search"] = index.search(queries, k=K)
    answers["query"] = [r.to_dict() for r in index.query(list(queries), k=K)]

    new_ids = index.add(list(added), labels=[7, 8, 9]).tolist()
    answers["add"] = {"ids": new_ids, "count": len(index),
                      "found": index.search(added, k=1),
                      "label": [index.snapshot.label_of(i) for i in new_ids]}

    # Two items of the build, one added, and ids that are not there (one beyond next_id).
    removal, _ = remove(index_dir, [3, 10, new_ids[1], 10_000, -1])
    index.refresh()
    gone = []
    for item in (3, 10, new_ids[1]):
        with pytest.raises(LenetEmbedError, match=f"no item with id {item}"):
            index.item_image(item)
        gone.append(item)
    answers["remove"] = {"removed": removal.removed, "missing": removal.missing,
                         "count": len(index), "gone": gone,
                         "search": index.search(queries, k=K),
                         "removed_again": index.remove([3])}

    index.compact()
    answers["compact"] = {"count": len(index), "deleted": index.manifest.deleted,
                          "search": index.search(queries, k=K)}

    committed = calibrate(index_dir)
    index.refresh()
    answers["calibrate"] = {"operation": committed.operation,
                            "calibration": committed.calibration.json_data,
                            "query": [r.to_dict() for r in index.query(list(queries), k=K)]}

    # The CLI sets up the package's logger: put it back (a module fixture runs outside the
    # per-test restore of tests/conftest.py, and later tests count their log records).
    logger = logging.getLogger("lenet_embed")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        result = CliRunner().invoke(main, ["info", "--verify", "--json", "--index-dir",
                                           str(index_dir)])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    answers["info"] = {key: report[key] for key in ("count", "deleted", "next_id", "checks",
                                                     "verified", "classes", "dim", "metric")}
    return answers


@pytest.fixture(scope="module")
def answers(trained, mnist, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The scenario's answers on each store, over the same digits and model."""
    data = mnist.head(N, 40)
    queries = data.test.images[:30]
    added = data.test.images[30:33]
    found = {}
    for backend in BACKENDS:
        root = tmp_path_factory.mktemp(f"congruence-{backend}")
        build_index(data=data, model=trained.model, index_dir=root / "index", factory="Flat",
                    store_uri=str(root / "index" / "items.db") if backend == "milvus" else None)
        manifest = read_manifest(root / "index")
        assert (manifest.store is None) == (backend == "faiss")
        assert kept_in_folder(manifest) == ({"items.db"} if backend == "milvus" else set())
        found[backend] = _scenario(root / "index", queries, added)
    return found


def _same_neighbours(ours: Any, theirs: Any) -> None:
    """The same ids and labels, nearest first, at the same distances (up to float sums)."""
    assert ours.ids.tolist() == theirs.ids.tolist()
    assert ours.labels.tolist() == theirs.labels.tolist()
    assert np.allclose(ours.distances, theirs.distances, atol=1e-5)
    assert [[n.label for n in row] for row in ours] == [[n.label for n in row] for row in theirs]


def same_calibration(ours: dict, theirs: dict) -> bool:
    """Two fitted calibrations alike: numbers within a relative 1e-4, or 1e-4 apart (the
    logistic fit's coefficients are O(1), and one near zero differs by the solver's tolerance
    on distances that the two engines sum in different orders)."""
    # The known non-digits' files are named afresh by each writer: both have one.
    ours, theirs = dict(ours), dict(theirs)
    assert ours.pop("nondigits").startswith("calibration/")
    assert theirs.pop("nondigits").startswith("calibration/")
    found = difference(ours, theirs, atol=1e-4)
    assert found is None, found
    return True


def test_build(answers):
    faiss, milvus = answers["faiss"]["build"], answers["milvus"]["build"]
    assert faiss["count"] == milvus["count"] == N == faiss["next_id"] == milvus["next_id"]
    assert faiss["calibrated"] and milvus["calibrated"]
    assert same_calibration(faiss["calibration"], milvus["calibration"])


def test_search(answers, mnist):
    faiss, milvus = answers["faiss"]["search"], answers["milvus"]["search"]
    _same_neighbours(faiss, milvus)
    assert faiss.ids.shape == (30, K) and (faiss.ids >= 0).all() and (faiss.ids < N).all()
    # Exact search of real digits: the nearest training digit mostly has the query's label.
    assert np.mean(faiss.labels[:, 0] == mnist.test.labels[:30]) > 0.8
    assert difference(answers["faiss"]["query"], answers["milvus"]["query"], atol=1e-5) is None


def test_add(answers):
    faiss, milvus = answers["faiss"]["add"], answers["milvus"]["add"]
    assert faiss["ids"] == milvus["ids"] == [N, N + 1, N + 2]
    assert faiss["count"] == milvus["count"] == N + 3
    assert faiss["label"] == milvus["label"] == [7, 8, 9]
    _same_neighbours(faiss["found"], milvus["found"])
    # Each added digit is its own nearest neighbour.
    assert faiss["found"].ids[:, 0].tolist() == faiss["ids"]
    assert np.allclose(faiss["found"].distances[:, 0], 0, atol=1e-5)


def test_remove(answers):
    faiss, milvus = answers["faiss"]["remove"], answers["milvus"]["remove"]
    assert faiss["removed"] == milvus["removed"] == 3
    assert faiss["missing"] == milvus["missing"] == [-1, 10_000]
    assert faiss["count"] == milvus["count"] == N
    assert faiss["removed_again"] == milvus["removed_again"] == 0
    _same_neighbours(faiss["search"], milvus["search"])
    assert not set(faiss["search"].ids.ravel().tolist()) & set(faiss["gone"])


def test_compact(answers):
    faiss, milvus = answers["faiss"]["compact"], answers["milvus"]["compact"]
    assert faiss["count"] == milvus["count"] == N
    assert faiss["deleted"] == milvus["deleted"] == 0
    _same_neighbours(faiss["search"], milvus["search"])
    _same_neighbours(faiss["search"], answers["faiss"]["remove"]["search"])


def test_calibrate(answers):
    faiss, milvus = answers["faiss"]["calibrate"], answers["milvus"]["calibrate"]
    assert faiss["operation"] == milvus["operation"] == "calibrate"
    assert same_calibration(faiss["calibration"], milvus["calibration"])
    assert difference(faiss["query"], milvus["query"], atol=1e-5) is None
    assert any(answer["match"] for answer in faiss["query"])


def test_info_verify(answers):
    faiss, milvus = answers["faiss"]["info"], answers["milvus"]["info"]
    assert faiss == milvus
    assert faiss["count"] == N and faiss["checks"] == "ok" and faiss["verified"] is True
