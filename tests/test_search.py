"""Searching a bundle: every query form, k bounds, distances checked against numpy for both
metrics, the majority vote, folder bundles with named classes, FAISS factories, and the array
results beside the objects."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lenet_embed import (
    Hits,
    LenetEmbedError,
    Neighbor,
    Results,
    SearchIndex,
    build_index,
    majority_label,
)
from lenet_embed.ann import make_index
from lenet_embed.preprocess import scale_pixels

K = 10


@pytest.fixture(scope="module")
def l2_index(trained, bundle_data, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("l2") / "index"
    build_index(data=bundle_data, model=trained.model, index_dir=index_dir, metric="l2")
    return SearchIndex.load(index_dir)


@pytest.fixture(scope="module")
def indexed_embeddings(search_index, bundle_data) -> np.ndarray:
    """The embeddings of the indexed digits, computed here (float64 for reference maths)."""
    return search_index.encoder.embed(scale_pixels(bundle_data.train.images)).astype(np.float64)


@pytest.fixture(scope="module")
def queries(mnist) -> np.ndarray:
    return mnist.test.images[:12]


def _ids(results: list[list[Neighbor]]) -> list[list[int]]:
    return [[n.id for n in row] for row in results]


def _distances(results: list[list[Neighbor]]) -> np.ndarray:
    return np.array([[n.distance for n in row] for row in results])


def test_size_and_metric(search_index, l2_index, bundle_data):
    assert len(search_index) == len(l2_index) == len(bundle_data.train)
    assert (search_index.metric, l2_index.metric) == ("cosine", "l2")
    assert search_index.manifest.count == len(bundle_data.train)


def test_cosine_distances_match_numpy(search_index, indexed_embeddings, queries):
    q = search_index.encoder.embed(scale_pixels(queries)).astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        indexed_embeddings / np.linalg.norm(indexed_embeddings, axis=1, keepdims=True)).T
    expected = 1.0 - cos
    order = np.argsort(expected, axis=1, kind="stable")[:, :K]
    results = search_index.search(queries, k=K)
    assert _ids(results) == order.tolist()
    assert np.abs(_distances(results) - np.take_along_axis(expected, order, 1)).max() <= 1e-5
    for row in results:
        assert [n.rank for n in row] == list(range(1, K + 1))
        assert all(a.distance <= b.distance for a, b in zip(row, row[1:], strict=False))


def test_l2_distances_are_euclidean_not_squared(l2_index, indexed_embeddings, queries):
    q = l2_index.encoder.embed(scale_pixels(queries)).astype(np.float64)
    expected = np.linalg.norm(q[:, None, :] - indexed_embeddings[None, :, :], axis=2)
    order = np.argsort(expected, axis=1, kind="stable")[:, :K]
    results = l2_index.search(queries, k=K)
    got = _distances(results)
    want = np.take_along_axis(expected, order, 1)
    assert _ids(results) == order.tolist()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-3)
    assert not np.allclose(got, want**2, rtol=1e-2)


def test_indexed_items_find_themselves(search_index, l2_index, bundle_data):
    n = 15
    for index in (search_index, l2_index):
        results = index.search(bundle_data.train.images[:n], k=3)
        assert [row[0].id for row in results] == list(range(n))
        assert [row[0].label for row in results] == bundle_data.train.labels[:n].tolist()
        self_distances = [abs(row[0].distance) for row in results]
        # Unsquared L2 takes the root of float32 rounding error, so it gets more slack.
        assert max(self_distances) <= (1e-5 if index.metric == "cosine" else 1e-3)


def test_every_query_form_gives_the_same_neighbours(search_index, queries, tmp_path):
    digits = queries[:3]
    expected = search_index.search_vectors(search_index.encoder.embed(scale_pixels(digits)), k=5)
    paths = []
    for i, digit in enumerate(digits):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(digit).save(paths[-1])
    forms = {
        "paths": paths,
        "str paths": [str(p) for p in paths],
        "PIL images": [Image.fromarray(d) for d in digits],
        "2-D arrays": list(digits),
        "float arrays": [scale_pixels(d) for d in digits],
        "batch (N,28,28)": digits,
        "batch (N,28,28,1)": digits[..., None],
        "float batch": scale_pixels(digits),
    }
    for name, images in forms.items():
        results = search_index.search(images, k=5)
        assert _ids(results) == _ids(expected), name
        assert np.abs(_distances(results) - _distances(expected)).max() <= 1e-5, name
    singles = [paths[0], str(paths[0]), Image.fromarray(digits[0]), digits[0], digits[0][..., None]]
    for single in singles:
        (row,) = search_index.search(single, k=5)
        assert [n.id for n in row] == _ids(expected)[0]


def test_embed(search_index, queries):
    vectors = search_index.embed(queries)
    assert vectors.shape == (len(queries), 84) and vectors.dtype == np.float32
    assert np.array_equal(vectors, search_index.encoder.embed(scale_pixels(queries)))


def test_k_bounds(search_index, queries):
    everything = search_index.search(queries[0], k=len(search_index))[0]
    assert len(everything) == len(search_index)
    assert sorted(n.id for n in everything) == sorted(search_index.snapshot.ids.tolist())
    vector = search_index.embed(queries[:1])
    for k in (0, -1, len(search_index) + 1, 2.5, "3"):
        with pytest.raises(LenetEmbedError, match="k must be between 1 and"):
            search_index.search(queries[0], k=k)
        with pytest.raises(LenetEmbedError, match="k must be between 1 and"):
            search_index.search_vectors(vector, k=k)


def test_search_vectors_shapes(search_index, queries):
    vectors = search_index.embed(queries[:4])
    batch = search_index.search_vectors(vectors, k=3)
    assert len(batch) == 4
    (single,) = search_index.search_vectors(vectors[1], k=3)
    assert single == batch[1]
    for bad in (vectors[:, :80], vectors[None], np.zeros(83)):
        with pytest.raises(LenetEmbedError, match="84"):
            search_index.search_vectors(bad, k=3)


def test_neighbor_to_dict():
    neighbor = Neighbor(rank=1, id=7, label=3, distance=0.25, source=None)
    assert neighbor.to_dict() == {"rank": 1, "id": 7, "label": 3, "distance": 0.25,
                                  "source": None}


def test_item_image(search_index, bundle_data):
    for item_id in (0, 17, len(bundle_data.train) - 1):
        assert np.array_equal(search_index.item_image(item_id), bundle_data.train.images[item_id])
    with pytest.raises(LenetEmbedError, match="no item with id"):
        search_index.item_image(len(bundle_data.train) + 5)


def _neighbors(labels: list) -> list[Neighbor]:
    return [Neighbor(rank=i + 1, id=i, label=label, distance=i / 10)
            for i, label in enumerate(labels)]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([4, 4, 9], 4),
        ([9, 4, 4], 4),  # plain majority beats nearest
        ([3, 5, 5, 3], 3),  # tie: the label met first (nearest) wins
        ([5, 3, 3, 5, 8], 5),
        ([None, 2, None, 7, 7, 2], 2),  # no label is no vote
        (["one", "seven", "seven", "one"], "one"),
        ([None, None], None),
        ([], None),
    ],
)
def test_majority_label(labels, expected):
    assert majority_label(_neighbors(labels)) == expected


# -------------------------------------------------------------------- folder bundles


@pytest.fixture(scope="module")
def picture_bundle(trained, mnist, tmp_path_factory):
    """Real training digits filed as ``zero/`` and ``one/`` pictures, plus one unlabelled file
    and one broken file."""
    base = tmp_path_factory.mktemp("pictures")
    root = base / "pictures"
    labels = mnist.train.labels
    chosen = {"zero": np.flatnonzero(labels == 0)[:30], "one": np.flatnonzero(labels == 1)[:30]}
    for name, rows in chosen.items():
        (root / name).mkdir(parents=True)
        for row in rows:
            Image.fromarray(mnist.train.images[row]).save(root / name / f"{row:05d}.png")
    Image.fromarray(mnist.train.images[np.flatnonzero(labels == 7)[0]]).save(root / "odd.png")
    (root / "one" / "broken.png").write_bytes(b"not an image")
    result = build_index(images=root, model=trained.model, index_dir=base / "index")
    return root, result, SearchIndex.load(base / "index")


def test_folder_bundle_manifest(picture_bundle):
    root, result, index = picture_bundle
    manifest = index.manifest
    assert manifest.classes == ["one", "zero"]
    assert manifest.dataset == {"kind": "images", "root": str(root), "skipped": 1}
    assert result.skipped == [str(root / "one" / "broken.png")]
    expected_sources = sorted(str(p) for p in root.rglob("*.png") if p.name != "broken.png")
    snapshot = index.snapshot
    assert snapshot.sources(snapshot.live_rows()) == expected_sources
    assert snapshot.ids.tolist() == list(range(len(expected_sources)))


def test_folder_bundle_search_names_labels_and_sources(picture_bundle, mnist):
    root, _, index = picture_bundle
    sources = index.snapshot.sources(index.snapshot.live_rows())
    first_zero = sorted((root / "zero").glob("*.png"))[0]
    for path in (first_zero, root / "odd.png"):
        (row,) = index.search(path, k=3)
        assert row[0].source == str(path) and row[0].distance <= 1e-5
        assert row[0].id == sources.index(str(path))
        assert row[0].label == (None if path.parent == root else path.parent.name)
    # Unseen test digits of each class: their nearest pictures carry the folder's name.
    for digit, name in ((0, "zero"), (1, "one")):
        tests = mnist.test.images[np.flatnonzero(mnist.test.labels == digit)[:10]]
        votes = [majority_label(row) for row in index.search(tests, k=5)]
        assert np.mean([v == name for v in votes]) >= 0.8


# ------------------------------------------------------------------------------ factories


def test_hnsw_factory_agrees_with_exact_search(trained, bundle_data, search_index, queries,
                                               tmp_path):
    result = build_index(data=bundle_data, model=trained.model, index_dir=tmp_path / "hnsw",
                         factory="HNSW32")
    assert result.manifest.factory == "HNSW32"
    approximate = SearchIndex.load(tmp_path / "hnsw")
    exact_ids = _ids(search_index.search(queries, k=1))
    approx_ids = _ids(approximate.search(queries, k=1))
    agreement = np.mean([a == e for a, e in zip(approx_ids, exact_ids, strict=True)])
    assert agreement >= 0.9


def test_make_index_rejects_bad_settings(indexed_embeddings):
    vectors = indexed_embeddings[:100].astype(np.float32)
    with pytest.raises(LenetEmbedError, match="metric"):
        make_index(vectors, "manhattan")
    with pytest.raises(LenetEmbedError, match="NoSuchIndex"):
        make_index(vectors, "cosine", "NoSuchIndex")
    with pytest.raises(LenetEmbedError, match="IVF4096"):
        make_index(vectors, "l2", "IVF4096,Flat")  # more lists than vectors to train them


# ------------------------------------------------------------------------------- arrays


def _assert_hits_match(hits: Results, results: list[list[Neighbor]], index: SearchIndex,
                       k: int):
    assert hits.ids.shape == hits.labels.shape == hits.distances.shape == (len(results), k)
    assert (hits.ids.dtype, hits.labels.dtype, hits.distances.dtype) == (
        np.int64, np.int64, np.float32)
    assert len(hits) == len(results)
    assert hits.ids.tolist() == _ids(results)
    assert [[index.label_name(code) for code in row] for row in hits.labels.tolist()] == [
        [n.label for n in row] for row in results]
    # The objects are made from these arrays: the same float32 values, not recomputed.
    assert hits.distances.tolist() == [[n.distance for n in row] for row in results]


def test_arrays_are_the_objects_values(search_index, l2_index, queries, bundle_data):
    for index in (search_index, l2_index):
        hits = index.search(queries, k=K)
        assert isinstance(hits, Results) and Hits is Results  # the name before Results
        _assert_hits_match(hits, hits.neighbors(), index, K)
        # Indexing and iterating are the objects, made once.
        assert list(hits) == hits.neighbors() and hits[2] is hits.neighbors()[2]
        assert np.array_equal(hits.labels, bundle_data.train.labels[hits.ids])  # ids = rows here
        vectors = index.embed(queries)
        by_vector = index.search_vectors(vectors, k=K)
        _assert_hits_match(by_vector, by_vector.neighbors(), index, K)
        assert np.array_equal(by_vector.ids, hits.ids)
    (single,) = search_index.search_vectors(search_index.embed(queries[:1])[0], k=3).ids
    assert single.tolist() == _ids(search_index.search(queries[0], k=3))[0]


def test_arrays_of_a_folder_bundle_hold_class_codes(picture_bundle, mnist):
    _, _, index = picture_bundle
    tests = mnist.test.images[np.flatnonzero(mnist.test.labels <= 1)[:6]]
    hits = index.search(tests, k=4)
    _assert_hits_match(hits, hits.neighbors(), index, 4)
    assert set(hits.labels.ravel().tolist()) <= {-1, 0, 1}  # codes into ["one", "zero"]


def test_arrays_check_their_input_like_the_objects(search_index, queries):
    vector = search_index.embed(queries[:1])
    with pytest.raises(LenetEmbedError, match="k must be between 1 and"):
        search_index.search(queries[0], k=0)
    with pytest.raises(LenetEmbedError, match="k must be between 1 and"):
        search_index.search_vectors(vector, k=len(search_index) + 1)
    with pytest.raises(LenetEmbedError, match="84"):
        search_index.search_vectors(vector[:, :80], k=3)
