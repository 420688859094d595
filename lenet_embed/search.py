"""Nearest-neighbour search over a bundle: :class:`SearchIndex` and its :class:`Neighbor` results.

Distances are "smaller is nearer": cosine distance (1 - cos) for the ``cosine`` metric, where the
vectors are L2-normalised and FAISS ranks by inner product; Euclidean distance (not squared) for
``l2``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from .bundle import DEFAULT_INDEX_DIR, Bundle, read_bundle
from .embed import KerasEncoder
from .errors import LenetEmbedError
from .preprocess import ImageLike, to_batch

METRICS = ("cosine", "l2")


@dataclass(frozen=True)
class Neighbor:
    """One search result: its rank (1 = nearest), stable id, label, distance and source path."""

    rank: int
    id: int
    label: int | str | None
    distance: float
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of every field."""
        return asdict(self)


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as FAISS wants them: contiguous float32, L2-normalised for ``cosine``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return vectors


def make_index(vectors: np.ndarray, metric: str, factory: str = "Flat") -> Any:
    """Build a FAISS index from ``vectors`` with ``faiss.index_factory(dim, factory, metric)``."""
    if metric not in METRICS:
        raise LenetEmbedError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    vectors = prepare_vectors(vectors, metric)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss_metric)
        if not index.is_trained:
            index.train(vectors)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise LenetEmbedError(
            f"FAISS factory {factory!r} failed for {len(vectors)} vectors of dim "
            f"{vectors.shape[1]} ({reason}); try 'Flat' or 'HNSW32'"
        ) from None
    index.add(vectors)
    return index


def to_distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """FAISS scores to smaller-is-nearer distances (1 - cos, or unsquared L2)."""
    if metric == "cosine":
        return 1.0 - scores
    return np.sqrt(np.maximum(scores, 0.0))


def majority_label(neighbors: list[Neighbor]) -> int | str | None:
    """The most common label among ``neighbors``; ties go to the label seen nearest first."""
    labels = [n.label for n in neighbors if n.label is not None]
    if not labels:
        return None
    counts = Counter(labels)
    best = max(counts.values())
    return next(label for label in labels if counts[label] == best)


class SearchIndex:
    """A loaded bundle and its encoder: embed images and find their nearest indexed neighbours.

    >>> index = SearchIndex.load("index")
    >>> [n.label for n in index.search("digit.png", k=5)[0]]
    """

    def __init__(self, bundle: Bundle, encoder: KerasEncoder) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.metric: str = bundle.manifest["metric"]

    @classmethod
    def load(cls, path: str | os.PathLike[str] = DEFAULT_INDEX_DIR) -> SearchIndex:
        """Load and verify a bundle written by ``build-index``, with its encoder."""
        bundle = read_bundle(path)
        return cls(bundle, KerasEncoder.load(bundle.encoder_path))

    @property
    def manifest(self) -> dict[str, Any]:
        """The bundle's manifest (format, metric, factory, count, data set, checksums)."""
        return self.bundle.manifest

    def __len__(self) -> int:
        return int(self.bundle.index.ntotal)

    def embed(self, images: ImageLike | list[ImageLike]) -> np.ndarray:
        """Preprocess ``images`` to the MNIST convention and embed them: (N, 84) float32."""
        return self.encoder.embed(to_batch(images))

    def search(self, images: ImageLike | list[ImageLike], k: int = 5) -> list[list[Neighbor]]:
        """The ``k`` nearest neighbours of each image (path, PIL image, array or batch)."""
        self._check_k(k)
        return self.search_vectors(self.embed(images), k)

    def search_vectors(self, vectors: np.ndarray, k: int = 5) -> list[list[Neighbor]]:
        """The ``k`` nearest neighbours of each embedding vector, shape (N, 84) or (84,)."""
        self._check_k(k)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.bundle.index.d:
            raise LenetEmbedError(
                f"vectors must have shape (N, {self.bundle.index.d}), got {vectors.shape}"
            )
        scores, rows = self.bundle.index.search(prepare_vectors(vectors, self.metric), k)
        distances = to_distances(scores, self.metric)
        return [self._neighbors(r, d) for r, d in zip(rows, distances, strict=True)]

    def _check_k(self, k: int) -> None:
        if not isinstance(k, (int, np.integer)) or k < 1 or k > len(self):
            raise LenetEmbedError(f"k must be between 1 and {len(self)} (the index size), got {k}")

    def _neighbors(self, rows: np.ndarray, distances: np.ndarray) -> list[Neighbor]:
        bundle = self.bundle
        out = []
        for rank, (row, distance) in enumerate(zip(rows, distances, strict=True), start=1):
            if row < 0:
                continue
            out.append(
                Neighbor(
                    rank=rank,
                    id=int(bundle.ids[row]),
                    label=self.label_name(int(bundle.labels[row])),
                    distance=float(distance),
                    source=bundle.sources[row] if bundle.sources else None,
                )
            )
        return out

    def item_image(self, item_id: int) -> np.ndarray:
        """The indexed digit with this id, as the encoder saw it: uint8 (28, 28)."""
        rows = np.flatnonzero(self.bundle.ids == item_id)
        if len(rows) == 0:
            raise LenetEmbedError(f"no item with id {item_id} in {self.bundle.path}")
        return np.asarray(self.bundle.images[rows[0]])

    def label_name(self, code: int) -> int | str | None:
        """A stored label code as the user knows it: the digit, the folder name, or None."""
        if code < 0:
            return None
        return self.bundle.classes[code] if self.bundle.classes else code
