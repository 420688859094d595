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

import numpy as np

from .ann import (
    SEARCH_PARAMETERS,
    apply_search_params,
    prepare_vectors,
    set_threads,
    to_distances,
)
from .bundle import DEFAULT_INDEX_DIR, Bundle, read_bundle
from .embed import Encoder, load_encoder
from .errors import LenetEmbedError
from .preprocess import ImageLike, to_batch


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


def majority_label(neighbors: list[Neighbor]) -> int | str | None:
    """The most common label among ``neighbors``; ties go to the label seen nearest first."""
    labels = [n.label for n in neighbors if n.label is not None]
    if not labels:
        return None
    counts = Counter(labels)
    best = max(counts.values())
    return next(label for label in labels if counts[label] == best)


def query_result(query: str, neighbors: list[Neighbor]) -> dict[str, Any]:
    """One query's answer as ``query --json`` and the service print it: the query's name, the
    predicted (majority) label and the neighbours."""
    return {
        "query": query,
        "predicted_label": majority_label(neighbors),
        "neighbors": [neighbor.to_dict() for neighbor in neighbors],
    }


class SearchIndex:
    """A loaded bundle and its encoder: embed images and find their nearest indexed neighbours.

    >>> index = SearchIndex.load("index")
    >>> [n.label for n in index.search("digit.png", k=5)[0]]
    """

    def __init__(self, bundle: Bundle, encoder: Encoder,
                 search_params: dict[str, int] | None = None) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.metric: str = bundle.manifest["metric"]
        stored = {
            name: value for name, value in bundle.manifest.get("search_params", {}).items()
            if name in SEARCH_PARAMETERS
        }
        self.search_params = {**stored, **(search_params or {})}
        apply_search_params(bundle.index, self.search_params)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] = DEFAULT_INDEX_DIR,
        backend: str = "auto",
        threads: int | None = None,
        search_params: dict[str, int] | None = None,
    ) -> SearchIndex:
        """Load and verify a bundle written by ``build-index``, with its encoder.

        ``backend``: ``auto`` (LiteRT when available, else Keras), ``litert`` or ``keras``; LiteRT
        never imports TensorFlow. ``threads`` caps FAISS's and LiteRT's threads.
        ``search_params`` (e.g. ``{"efSearch": 128}``) override the tuned values in the manifest.
        """
        if threads is not None:
            set_threads(threads)
        bundle = read_bundle(path)
        encoder = load_encoder(bundle.encoder_path, bundle.litert_path, backend, threads)
        return cls(bundle, encoder, search_params)

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

    def montage_rows(
        self,
        queries: np.ndarray,
        results: list[list[Neighbor]],
        titles: list[str],
        reference_labels: list[int | str | None] | None = None,
    ) -> list[Any]:
        """Rows for :func:`lenet_embed.pictures.montage`: each query as the model saw it, then its
        neighbours' images. Neighbours are judged against ``reference_labels`` (the true labels,
        when known), else against each query's predicted (majority) label."""
        from .pictures import MontageRow

        if reference_labels is None:
            reference_labels = [majority_label(neighbors) for neighbors in results]
        return [
            MontageRow(
                query=query,
                neighbors=neighbors,
                neighbor_images=[self.item_image(n.id) for n in neighbors],
                reference_label=reference,
                title=title,
            )
            for query, neighbors, title, reference in zip(
                queries, results, titles, reference_labels, strict=True
            )
        ]

    def label_name(self, code: int) -> int | str | None:
        """A stored label code as the user knows it: the digit, the folder name, or None."""
        if code < 0:
            return None
        return self.bundle.classes[code] if self.bundle.classes else code
