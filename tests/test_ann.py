"""FAISS indexes over real embeddings: the factories, exact search against numpy, distances, the
search-parameter knob and its tuning to a target recall."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from lenet_embed import LenetEmbedError
from lenet_embed.ann import (
    _CANDIDATES,
    TUNING_K,
    apply_search_params,
    exact_search,
    make_index,
    prepare_vectors,
    search_parameter,
    set_threads,
    to_distances,
    tune,
)
from lenet_embed.metrics import recall_at_k
from lenet_embed.preprocess import scale_pixels

# "PQ12" is the plain 8-bit form; FAISS's k-means for 256 centroids per sub-quantizer takes ~11 s
# here whatever the data size, so the same m = 12 (12 | 84) is built with 4-bit codes instead.
FACTORIES = {
    "Flat": (faiss.IndexFlat, None),
    "HNSW32": (faiss.IndexHNSWFlat, "efSearch"),
    "IVF16,Flat": (faiss.IndexIVFFlat, "nprobe"),
    "PQ12x4": (faiss.IndexPQ, None),
}


@pytest.fixture(scope="module")
def vectors(search_index, bundle_data) -> np.ndarray:
    """Embeddings of the 2,000 indexed training digits."""
    return search_index.encoder.embed(scale_pixels(bundle_data.train.images))


@pytest.fixture(scope="module")
def queries(search_index, bundle_data) -> np.ndarray:
    """Embeddings of 100 held-out test digits."""
    return search_index.encoder.embed(scale_pixels(bundle_data.test.images))


@pytest.fixture(scope="module")
def indexes(vectors) -> dict:
    return {factory: make_index(vectors, "cosine", factory) for factory in FACTORIES}


def _numpy_distances(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    v, q = vectors.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return 1.0 - q @ v.T
    return np.sqrt(((q[:, None, :] - v[None, :, :]) ** 2).sum(axis=2))


# ---------------------------------------------------------------------------------- factories


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_make_index(indexes, vectors, factory):
    index = indexes[factory]
    kind, knob = FACTORIES[factory]
    assert isinstance(index, kind)
    assert (index.ntotal, index.d) == (len(vectors), vectors.shape[1])
    assert index.is_trained
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert search_parameter(index) == knob


def test_make_index_details(indexes, vectors):
    # Cosine: the stored vectors are the L2-normalised inputs.
    stored = indexes["Flat"].reconstruct_n(0, len(vectors))
    assert np.allclose(stored, prepare_vectors(vectors, "cosine"), atol=1e-6)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    assert indexes["IVF16,Flat"].nlist == 16
    pq = indexes["PQ12x4"].pq
    assert (pq.M, pq.nbits, pq.dsub) == (12, 4, vectors.shape[1] // 12)
    l2 = make_index(vectors[:50], "l2")
    assert l2.metric_type == faiss.METRIC_L2
    assert np.array_equal(l2.reconstruct_n(0, 50), vectors[:50])  # l2 keeps vectors as they are


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_exact_and_ivf_indexes_find_each_indexed_vector_first(indexes, vectors, factory):
    # An IVF list always holds the vectors nearest its centroid, so nprobe=1 finds an item itself.
    _, rows = indexes[factory].search(prepare_vectors(vectors[:50], "cosine"), 1)
    assert rows[:, 0].tolist() == list(range(50))


def test_pq_needs_m_dividing_the_dimension(vectors):
    with pytest.raises(LenetEmbedError) as caught:
        make_index(vectors, "cosine", "PQ10")
    message = str(caught.value)
    assert "PQ10" in message and "m dividing 84" in message
    # The m values the message suggests really divide 84.
    suggested = [int(m) for m in re.findall(r"\bPQ(\d+)\b", message) if m != "10"]
    assert suggested and all(84 % m == 0 for m in suggested)


# ------------------------------------------------------------------------- exact, distances


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_equals_numpy_brute_force(vectors, queries, metric):
    k = 5
    rows = exact_search(vectors, queries, metric, k)
    expected = _numpy_distances(vectors, queries, metric)
    order = np.argsort(expected, axis=1, kind="stable")[:, :k]
    assert rows.shape == (len(queries), k)
    assert rows.tolist() == order.tolist()
    assert np.allclose(np.take_along_axis(expected, rows, 1),
                       np.take_along_axis(expected, order, 1), atol=1e-6)


def test_to_distances_by_hand():
    # cosine: 1 - cos; cos 1 -> 0, 0.5 -> 0.5, -1 -> 2
    assert to_distances(np.array([1.0, 0.5, -1.0]), "cosine").tolist() == [0.0, 0.5, 2.0]
    # l2: FAISS gives squared distances; 4 -> 2, 0 -> 0, a rounding -1e-7 -> 0 (not NaN)
    assert to_distances(np.array([4.0, 0.0, -1e-7]), "l2").tolist() == [2.0, 0.0, 0.0]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_to_distances_turns_faiss_scores_into_numpy_distances(vectors, queries, metric):
    index = make_index(vectors, metric)
    scores, rows = index.search(prepare_vectors(queries, metric), 4)
    expected = np.take_along_axis(_numpy_distances(vectors, queries, metric), rows, 1)
    assert np.allclose(to_distances(scores, metric), expected, atol=1e-3, rtol=1e-4)
    assert not np.allclose(scores, expected, atol=1e-3)  # the conversion is not a no-op


def test_prepare_vectors(vectors):
    out = prepare_vectors(vectors[:3].astype(np.float64), "cosine")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(prepare_vectors(np.zeros((1, 84)), "cosine"), np.zeros((1, 84)))
    assert np.array_equal(prepare_vectors(vectors[:3], "l2"), vectors[:3])


# ------------------------------------------------------------------------- search parameters


def test_apply_search_params(indexes):
    apply_search_params(indexes["HNSW32"], {"efSearch": 40})
    assert indexes["HNSW32"].hnsw.efSearch == 40
    apply_search_params(indexes["IVF16,Flat"], {"nprobe": 5})
    assert indexes["IVF16,Flat"].nprobe == 5
    apply_search_params(indexes["Flat"], {})  # nothing to set is fine


@pytest.mark.parametrize(("factory", "params"), [
    ("Flat", {"efSearch": 16}),
    ("Flat", {"nprobe": 4}),
    ("HNSW32", {"nprobe": 4}),
    ("IVF16,Flat", {"efSearch": 16}),
    ("PQ12x4", {"nprobe": 2}),
    ("HNSW32", {"efSerach": 16}),
])
def test_apply_search_params_refuses_a_parameter_the_index_lacks(indexes, factory, params):
    (name,) = params
    # Named as the CLI option a user would have typed.
    option = {"efSearch": "--ef-search", "nprobe": "--nprobe"}.get(name, name)
    with pytest.raises(LenetEmbedError, match=rf"{option} does not apply"):
        apply_search_params(indexes[factory], params)


def _recall(index, name, value, vectors, queries) -> float:
    apply_search_params(index, {name: value})
    _, rows = index.search(prepare_vectors(queries, "cosine"), TUNING_K)
    return recall_at_k(rows, exact_search(vectors, queries, "cosine", TUNING_K), TUNING_K)


@pytest.mark.parametrize(("factory", "name", "target"), [
    ("HNSW32", "efSearch", 0.95),
    ("IVF16,Flat", "nprobe", 0.95),
    ("IVF16,Flat", "nprobe", 0.99),
    ("IVF16,Flat", "nprobe", 1.0),
])
def test_tune_picks_the_smallest_value_reaching_the_target(indexes, vectors, queries, factory,
                                                           name, target):
    index = indexes[factory]
    tuned = tune(index, vectors, queries, "cosine", target)
    assert set(tuned) == {name, "tuned_recall_at_10"}
    value, reported = tuned[name], tuned["tuned_recall_at_10"]
    candidates = _CANDIDATES[name]
    assert value in candidates
    reached = _recall(index, name, value, vectors, queries)
    assert reached >= target
    assert reported == pytest.approx(reached, abs=5e-5) and reported >= target
    position = candidates.index(value)
    if position > 0:
        assert _recall(index, name, candidates[position - 1], vectors, queries) < target


def test_tune_on_exact_or_knobless_indexes(indexes, vectors, queries):
    assert tune(indexes["Flat"], vectors, queries, "cosine", 0.9) == {}
    assert tune(indexes["PQ12x4"], vectors, queries, "cosine", 0.9) == {}


@pytest.mark.parametrize("target", [0.0, -0.5, 1.01, 2.0, float("nan")])
def test_tune_refuses_a_bad_target(indexes, vectors, queries, target):
    with pytest.raises(LenetEmbedError, match="target-recall"):
        tune(indexes["HNSW32"], vectors, queries, "cosine", target)


def test_set_threads_refuses_zero():
    with pytest.raises(LenetEmbedError, match="threads"):
        set_threads(0)
