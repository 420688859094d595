"""Search keeps its recall as items are removed, whatever the index type.

The promise (:func:`lenet_embed.store.faiss._filtered_search`): a sealed segment with a share of its
rows removed is searched with its effort (HNSW's efSearch, IVF's nprobe) scaled by 1 / (live
share), or exactly over its live rows once that is cheaper, so recall@10 against exact search over
the live items stays >= 0.99 (measured here on real MNIST embeddings, up to 95 % removed).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from lenet_embed import SearchIndex, build_index
from lenet_embed.ann import exact_search, prepare_vectors, search_parameter
from lenet_embed.data import Dataset
from lenet_embed.metrics import recall_at_k
from lenet_embed.snapshot import inspect_bundle
from lenet_embed.store import faiss as snapshot_module

K = 10
ITEMS = 6_000
SHARES = (0.0, 0.5, 0.9, 0.95)
FACTORIES = ("Flat", "HNSW32", "IVF64,Flat")


@pytest.fixture(scope="module")
def bundles(trained, mnist, tmp_path_factory):
    """One bundle per factory of the first 6,000 MNIST training digits, tuned on test digits."""
    data = Dataset(mnist.train.head(ITEMS), mnist.test.head(500), "mnist train[:6000]")
    root = tmp_path_factory.mktemp("removed")
    return {factory: build_index(data=data, model=trained.model, factory=factory,
                                 index_dir=root / factory.replace(",", "_")).path
            for factory in FACTORIES}


@pytest.fixture(scope="module")
def queries(mnist):
    return mnist.test.images[500:800]  # not the digits the bundles were tuned on


def live_recall(index: SearchIndex, vectors: np.ndarray) -> float:
    """recall@10 of the index's search against exact search over its live items."""
    snapshot = index.snapshot
    live = snapshot.live_rows()
    exact = live[exact_search(snapshot.vectors(live), vectors, snapshot.metric, K)]
    found = np.searchsorted(snapshot.ids, index.search_vectors(vectors, K).ids)
    return recall_at_k(found, exact, K)


def recalls_as_items_go(bundle, tmp_path, queries) -> list[float]:
    """recall@10 at each share of SHARES removed (at random, each share on top of the last)."""
    copy = shutil.copytree(bundle, tmp_path / "index")
    index = SearchIndex.load(copy)
    vectors = prepare_vectors(index.embed(queries), index.metric)
    order = np.random.default_rng(7).permutation(index.snapshot.ids)
    recalls, removed = [], 0
    for share in SHARES:
        goal = round(share * len(order))
        if goal > removed:
            assert index.remove(order[removed:goal]) == goal - removed
            removed = goal
        assert len(index) == len(order) - removed
        recalls.append(live_recall(index, vectors))
    return recalls


@pytest.mark.parametrize("factory", FACTORIES)
def test_recall_holds_as_items_are_removed(bundles, factory, tmp_path, queries):
    recalls = recalls_as_items_go(bundles[factory], tmp_path, queries)
    assert min(recalls) >= 0.99, dict(zip(SHARES, recalls, strict=True))


@pytest.mark.parametrize("factory", ["HNSW32", "IVF64,Flat"])
def test_the_scaled_filtered_search_alone_holds_recall(bundles, factory, tmp_path, queries,
                                                       monkeypatch):
    """With the switch to exact search turned off, the scaled efSearch / nprobe alone keeps
    recall: what bundles too large for the exact switch rely on."""
    monkeypatch.setattr(snapshot_module, "_EXACT_SPEEDUP", math.inf)
    recalls = recalls_as_items_go(bundles[factory], tmp_path, queries)
    assert min(recalls) >= 0.99, dict(zip(SHARES, recalls, strict=True))


@pytest.mark.parametrize("factory", ["HNSW32", "IVF64,Flat"])
def test_the_indexes_under_test_really_are_approximate(bundles, factory, queries):
    """The tuned graph / lists miss some true neighbours, so the tests above can fail."""
    index = SearchIndex.load(bundles[factory])
    sealed = index.snapshot.segments[0].index
    assert search_parameter(sealed) is not None
    vectors = prepare_vectors(index.embed(queries), index.metric)
    exact = exact_search(index.snapshot.vectors(index.snapshot.live_rows()), vectors,
                         index.metric, K)
    assert recall_at_k(sealed.search(vectors, K)[1], exact, K) < 1.0


def test_the_exact_index_of_live_rows_is_shared_by_later_versions(bundle_copy, mnist):
    index = SearchIndex.load(bundle_copy)
    index.remove(range(0, 2000, 2))  # half removed: Flat searches the live rows exactly
    vectors = index.embed(mnist.test.images[:5])
    first = index.search_vectors(vectors, K)
    cached = index.snapshot.segments[0].live_index
    assert cached is not None and np.all(first.ids % 2 == 1)
    index.add(mnist.test.images[5])  # a new version, the sealed segment unchanged
    again = index.search_vectors(vectors, K)
    assert index.snapshot.segments[0].live_index is cached  # not copied again
    assert np.all((again.ids % 2 == 1) | (again.ids == 2000))
    index.remove([1])  # other removed rows: a new exact index
    index.search_vectors(vectors, K)
    assert index.snapshot.segments[0].live_index is not cached


def test_info_says_when_compact_restores_speed(bundle_copy, run):
    assert inspect_bundle(bundle_copy).compaction_hint is None
    SearchIndex.load(bundle_copy).remove(range(0, 800))  # 40 % of 2,000
    hint = inspect_bundle(bundle_copy).compaction_hint
    assert hint == "40 % of rows removed: `lenet-embed compact` restores search speed"
    shown = run("info", "--index-dir", bundle_copy)
    assert shown.exit_code == 0 and hint in shown.output
    assert run("compact", "--index-dir", bundle_copy).exit_code == 0
    assert inspect_bundle(bundle_copy).compaction_hint is None
