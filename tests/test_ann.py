"""FAISS indexes over real embeddings: the factories, exact search against numpy, distances, the
search-parameter knob and its tuning to a target recall, and what ``auto`` chooses."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from lenet_embed import LenetEmbedError
from lenet_embed.ann import (
    _CANDIDATES,
    TUNING_K,
    _candidates,
    apply_search_params,
    build_tuned_index,
    choose_index,
    exact_search,
    format_size,
    make_index,
    parse_size,
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


# ------------------------------------------------------------------------------- auto choice


@pytest.mark.parametrize(("text", "expected"), [
    ("2GB", 2_000_000_000),
    ("2 GiB", 2 * 1024**3),
    ("500mb", 500_000_000),
    ("1.5MB", 1_500_000),
    (".5KiB", 512),
    ("100", 100),
    ("100B", 100),
    (7, 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2 PB", "-1GB", "0", "0.0001", "two GB", True])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(LenetEmbedError, match="--memory-budget"):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (999, 672_000, 36_480_000, 2_000_000_000)] == [
        "999 B", "672 KB", "36.5 MB", "2 GB"]


@pytest.mark.parametrize(("count", "budget", "factory"), [
    # 10,000 x 84 x 4 bytes = 3.36 MB of Flat: small enough to scan for every query.
    (10_000, "2GB", "Flat"),
    # One more and HNSW32: 608 bytes per vector (336 of vector, 65 x 4 of links, 12 of levels
    # and offsets), 6.08 MB.
    (10_001, "2GB", "HNSW32"),
    (60_000, "2GB", "HNSW32"),
    # 1M: HNSW32 608 MB. 10M: HNSW32 6.08 GB and IVF-Flat (344 B/vector) 3.44 GB are over 2 GB,
    # IVF-SQ8 (92 B/vector) 0.92 GB fits; lists = 2^round(log2(4 sqrt(1e7))) = 16384.
    (1_000_000, "2GB", "HNSW32"),
    (10_000_000, "2GB", "IVF16384,SQ8"),
    # 2,000 x 84 x 4 = 672 KB of Flat over a 500 KB budget: IVF-Flat (2000 x 344 + 32 lists of
    # 336 bytes = 699 KB) too, IVF-SQ8 (195 KB) fits; 4 sqrt(2000) = 179 -> 128 lists, halved
    # until each has 39 vectors to train on: 32.
    (2_000, "500KB", "IVF32,SQ8"),
    # 1M within 50 MB: PQ42 (50 B/vector, 51 MB) is over, PQ28 (36 B/vector, 37.5 MB) fits.
    (1_000_000, "50MB", "IVF4096,PQ28"),
])
def test_choose_index(count, budget, factory):
    choice = choose_index(count, 84, parse_size(budget))
    assert choice.factory == factory
    assert choice.bytes <= parse_size(budget)
    assert format_size(parse_size(budget)) in choice.why


def test_choose_index_threshold_is_a_parameter():
    assert choose_index(500, 84, 10**9, flat_max_count=499).factory == "HNSW32"
    assert choose_index(500, 84, 10**9, flat_max_count=500).factory == "Flat"


def test_choose_index_refuses_a_budget_nothing_fits():
    # The smallest candidate for 60,000 vectors is IVF1024,PQ4: 60,000 x 12 + 1024 x 336 +
    # 256 x 84 x 4 bytes = 1.15 MB.
    with pytest.raises(LenetEmbedError, match=r"--memory-budget 500 KB is too small .* "
                                              r"IVF1024,PQ4, needs about 1\.15 MB"):
        choose_index(60_000, 84, parse_size("500KB"))


@pytest.mark.parametrize("factory", ["HNSW32", "IVF32,Flat", "IVF32,SQ8"])
def test_estimated_sizes_are_what_faiss_writes(vectors, factory):
    estimated = dict(_candidates(len(vectors), vectors.shape[1]))[factory]
    written = len(faiss.serialize_index(make_index(vectors, "cosine", factory)))
    assert abs(estimated - written) <= 0.05 * written, (estimated, written)


@pytest.fixture(scope="module")
def more_queries(search_index, mnist) -> np.ndarray:
    """Embeddings of 500 other test digits, held out from the index and from the tuning."""
    return search_index.encoder.embed(scale_pixels(mnist.test.images[1000:1500]))


def test_auto_keeps_a_small_set_exact(vectors):
    asked = []
    built = build_tuned_index(vectors, "cosine", "auto", 0.995, 2 * 10**9,
                              lambda: asked.append(1) or vectors[:10])
    assert isinstance(built.index, faiss.IndexFlat) and built.factory == "Flat"
    assert built.search_params == {} and built.target_recall is None
    assert asked == []  # nothing to tune, so no queries were embedded
    assert built.reason == ("2000 vectors x 84 d: Flat (exact search is fast up to 10000 vectors; "
                            "672 KB within the 2 GB budget)")


def test_auto_goes_to_a_graph_and_meets_the_target_on_held_out_queries(vectors, queries,
                                                                       more_queries):
    target = 0.995
    built = build_tuned_index(vectors, "cosine", "auto", target, 2 * 10**9, lambda: queries,
                              flat_max_count=1000)
    assert isinstance(built.index, faiss.IndexHNSWFlat) and built.factory == "HNSW32"
    assert set(built.search_params) == {"efSearch", "tuned_recall_at_10"}
    assert built.target_recall == target
    assert built.reason.startswith(
        "2000 vectors x 84 d: HNSW32 (exact search is slow beyond 1000 vectors; 1.22 MB within "
        f"the 2 GB budget), efSearch {built.search_params['efSearch']} for recall@10 ")
    # Queries neither indexed nor used for tuning reach the target too.
    _, rows = built.index.search(prepare_vectors(more_queries, "cosine"), TUNING_K)
    exact = exact_search(vectors, more_queries, "cosine", TUNING_K)
    assert recall_at_k(rows, exact, TUNING_K) >= target


def test_an_explicit_factory_is_built_as_asked(vectors, queries):
    built = build_tuned_index(vectors, "cosine", "IVF16,Flat", 0.99, 1, lambda: queries)
    assert built.factory == "IVF16,Flat"  # the budget only steers auto
    assert built.reason.startswith(f"IVF16,Flat as asked (--factory), nprobe "
                                   f"{built.search_params['nprobe']} for recall@10 ")
