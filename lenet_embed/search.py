"""Nearest-neighbour search over a bundle: :class:`SearchIndex` and its results.

Distances are "smaller is nearer": cosine distance (1 - cos) for the ``cosine`` metric, where the
vectors are L2-normalised and FAISS ranks by inner product; Euclidean distance (not squared) for
``l2``.

A :class:`SearchIndex` is a facade over one bundle: it serves one version at a time (a
:class:`~.store.Snapshot`, whatever store holds the items); every call works on the version that
was current when it started, so a commit by another process never mixes into a search.
:meth:`SearchIndex.refresh` picks up newer versions; the write methods (:mod:`.updates`) commit
one and refresh.

Every search (:meth:`SearchIndex.search` of images, :meth:`SearchIndex.search_vectors` of
embeddings, and :meth:`SearchIndex.query` under them in the CLI and the service) runs one search
and answers with :class:`Results`: ids, labels and distances as (n, k) arrays, the neighbours as
:class:`Neighbor` objects only when they are asked for.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .ann import prepare_vectors, set_threads
from .bundle import DEFAULT_INDEX_DIR, Calibration, Manifest
from .calibration import UNSEARCHED, Verdict, check_min_confidence, judge, verdict
from .embed import Encoder, featureless, load_encoder
from .errors import LenetEmbedError
from .preprocess import ImageLike, open_image, to_batch, to_mnist
from .snapshot import Snapshot, bundle_encoder, open_snapshot
from .updates import GroupCommit, Label, per_image
from .updates import compact as compact_bundle
from .updates import remove as remove_items
from .writer import DEFAULT_LOCK_TIMEOUT


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
        # Spelled out: dataclasses.asdict deep-copies each field, a tenth of a service request.
        return {"rank": self.rank, "id": self.id, "label": self.label, "distance": self.distance,
                "source": self.source}


@dataclass(frozen=True, eq=False)
class Results:
    """The ``k`` nearest neighbours of ``n`` queries, nearest first: what every search returns.

    As arrays, for batch work: ``ids`` (int64 stable item ids), ``labels`` (int64 label codes: the
    digit itself in a bundle of digits, a position in the bundle's class names in a bundle built
    from named folders, -1 for an unlabelled item; :meth:`SearchIndex.label_name` names a code)
    and ``distances`` (float32, smaller is nearer), all (n, k); ``sources``, each query's source
    paths (None when the bundle records none). A bundle with fewer than ``k`` items found pads a
    row with -1 ids.

    As objects, on demand: :meth:`neighbors` (one list of :class:`Neighbor` per query, made on
    first use); indexing and iterating the results go through it, so ``results[0][0].label`` is
    the label of the first query's nearest neighbour.
    """

    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    sources: list[list[str | None]] | None = None
    # Names a label code (the bundle's own, SearchIndex.label_name); by default a code is its
    # own name and -1 none.
    label_name: Callable[[int], int | str | None] = field(default=lambda code: None if code < 0
                                                          else code, repr=False)

    def __len__(self) -> int:
        """The number of queries."""
        return len(self.ids)

    def __getitem__(self, query: int) -> list[Neighbor]:
        """The neighbours of one query."""
        return self.neighbors()[query]

    def __iter__(self) -> Iterator[list[Neighbor]]:
        """The neighbours of each query."""
        return iter(self.neighbors())

    def neighbors(self) -> list[list[Neighbor]]:
        """One list of :class:`Neighbor` per query (without the padding)."""
        return self._neighbors

    @functools.cached_property
    def _neighbors(self) -> list[list[Neighbor]]:
        # Python lists once, not numpy scalars per neighbour: this loop is the objects' whole cost.
        names = {code: self.label_name(code) for code in np.unique(self.labels).tolist()}
        sources = self.sources
        results = []
        for query, (id_list, label_list, distance_list) in enumerate(zip(
                self.ids.tolist(), self.labels.tolist(), self.distances.tolist(), strict=True)):
            neighbors = []
            for rank, (item_id, label, distance) in enumerate(
                    zip(id_list, label_list, distance_list, strict=True), start=1):
                if item_id < 0:
                    break
                source = sources[query][rank - 1] if sources is not None else None
                neighbors.append(Neighbor(rank, item_id, names[label], distance, source))
            results.append(neighbors)
        return results


# The name of the arrays-only result type before :class:`Results` answered every search.
Hits = Results


def majority_label(neighbors: list[Neighbor]) -> int | str | None:
    """The most common label among ``neighbors``; ties go to the label seen nearest first."""
    labels = [n.label for n in neighbors if n.label is not None]
    if not labels:
        return None
    counts = Counter(labels)
    best = max(counts.values())
    return next(label for label in labels if counts[label] == best)


@dataclass(frozen=True)
class Query:
    """One query for :meth:`SearchIndex.query`: an image or an embedding vector.

    ``image`` is a path, a PIL image, a 2-D array, or the bytes of an image file. ``name``
    names it in results and errors.
    """

    image: ImageLike | bytes | None = None
    vector: np.ndarray | Sequence[float] | None = None
    name: str | None = None

    @property
    def title(self) -> str:
        """The name shown for this query."""
        if self.name is not None:
            return self.name
        if isinstance(self.image, (str, os.PathLike)):
            return str(self.image)
        return "vector" if self.vector is not None else "image"

    def pixels(self) -> np.ndarray:
        """The image in the MNIST convention, (28, 28) float32; raises LenetEmbedError."""
        image = self.image
        if isinstance(image, bytes):
            image = open_image(image, self.title)
        return to_mnist(image, name=self.title)


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query: its neighbours and what calibration says of them, or the error
    that stopped it.

    ``candidate`` is the majority label of the neighbours calibration looks at (the first
    ``calibration.k``, or all of them in a bundle without calibration); ``verdict`` says whether
    it is given as the answer (:mod:`.calibration`). ``pixels`` is the query as the model saw it
    (None for a vector query or an error).
    """

    query: str
    neighbors: list[Neighbor]
    error: LenetEmbedError | None = None
    pixels: np.ndarray | None = None
    candidate: int | str | None = None
    verdict: Verdict = Verdict(None, None, True, None)
    calibration: Calibration | None = None

    @property
    def ok(self) -> bool:
        """Whether the query was answered."""
        return self.error is None

    @property
    def match(self) -> bool:
        """Whether the predicted label is given: the query looks like the indexed items and the
        confidence reaches the threshold."""
        return self.verdict.match

    @property
    def confidence(self) -> float | None:
        """P(the candidate label is right), calibrated; None without calibration."""
        return self.verdict.confidence

    @property
    def reason(self) -> str | None:
        """Why there is no match ("not a digit", "unsure"), or a hint when uncalibrated."""
        return self.verdict.reason

    @property
    def predicted_label(self) -> int | str | None:
        """The label given as the answer: the candidate when there is a match, else None."""
        return self.candidate if self.match else None

    def top(self, k: int) -> QueryResult:
        """The same answer cut to the ``k`` nearest neighbours."""
        return replace(self, neighbors=self.neighbors[:k])

    def judged(self, min_confidence: float | None) -> QueryResult:
        """The same answer with ``min_confidence`` instead of the stored threshold."""
        if (min_confidence is None or self.calibration is None
                or self.verdict.confidence is None or self.verdict.ood_score is None):
            return self
        return replace(self, verdict=verdict(self.calibration, self.verdict.confidence,
                                             self.verdict.ood_score, min_confidence))

    def to_dict(self) -> dict[str, Any]:
        """The answer as ``query --json`` and the service print it."""
        confidence = self.confidence
        return {
            "query": self.query,
            "predicted_label": self.predicted_label,
            "match": self.match,
            "confidence": None if confidence is None else round(confidence, 6),
            "reason": self.reason,
            "neighbors": [neighbor.to_dict() for neighbor in self.neighbors],
        }


class SearchIndex:
    """A bundle and its encoder: embed images, find their nearest neighbours, add and remove.

    >>> index = SearchIndex.load("index")
    >>> [n.label for n in index.search("digit.png", k=5)[0]]
    >>> new_ids = index.add(["my7.png"], labels=[7])
    """

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto",
                 threads: int | None = None, search_params: dict[str, int] | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = Path(path)
        self.backend = backend
        self.threads = threads
        self.overrides = dict(search_params or {})
        self.lock_timeout = lock_timeout
        self._refreshing = threading.Lock()
        self._adds = GroupCommit(self.path, lock_timeout)
        self._loaded = open_snapshot(self.path, self._load_encoder, None, self.overrides)
        # The newest version this object committed and has not switched to yet: switching (about
        # a millisecond per commit) waits for the first read, so a process that only writes
        # (`lenet-embed add`, an ingestion script) never pays it.
        self._unread: Manifest | None = None
        self._reading = False  # set by the first read: from then on commits switch at once

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] = DEFAULT_INDEX_DIR,
        backend: str = "auto",
        threads: int | None = None,
        search_params: dict[str, int] | None = None,
    ) -> SearchIndex:
        """Load a bundle written by ``build-index`` (checking its manifest and the sizes of its
        files, memory-mapping them), with its encoder.

        ``backend``: ``auto`` (LiteRT when available, else Keras), ``litert`` or ``keras``; LiteRT
        never imports TensorFlow. ``threads`` caps FAISS's and LiteRT's threads.
        ``search_params`` (e.g. ``{"efSearch": 128}``) override the tuned values in the manifest.
        """
        if threads is not None:
            set_threads(threads)
        return cls(path, backend, threads, search_params)

    def _load_encoder(self, keras_path: Path, litert_path: Path) -> Encoder:
        return load_encoder(keras_path, litert_path, self.backend, self.threads)

    # ------------------------------------------------------------------ the current version

    @property
    def _snapshot(self) -> Snapshot:
        """The version in use for a read; what this object committed is visible to it."""
        self._reading = True
        if self._unread is not None:
            self._switch(None)
        return self._loaded

    @property
    def snapshot(self) -> Snapshot:
        """The version in use: everything one search needs, consistent and immutable."""
        return self._snapshot

    @property
    def manifest(self) -> Manifest:
        """The manifest of the version in use."""
        return self._snapshot.manifest

    @property
    def version(self) -> int:
        """The number of the version in use."""
        return self._snapshot.manifest.version

    @property
    def encoder(self) -> Encoder:
        """The encoder of the version in use."""
        return self._snapshot.encoder

    @property
    def metric(self) -> str:
        """``cosine`` or ``l2``."""
        return self._snapshot.metric

    @property
    def search_params(self) -> dict[str, int]:
        """The search parameters in force (tuned values, overridden by the caller's)."""
        return dict(self._snapshot.search_params)

    def __len__(self) -> int:
        return len(self._snapshot)

    def refresh(self) -> bool:
        """Switch to the newest committed version, if there is one; True when it changed.

        Unchanged segments and the encoder are reused, so this costs little more than reading
        what the new commits added."""
        return self._switch(None)

    def _switch(self, committed: Manifest | None) -> bool:
        """:meth:`refresh`, to ``committed`` (a version this process has just committed) when it
        is newer than the version in use."""
        # One refresh at a time, so a slow one cannot put back a version older than the one a
        # faster one (say, right after this process's own commit) installed meanwhile.
        with self._refreshing:
            old, unread, self._unread = self._loaded, self._unread, None
            if committed is not None and committed.version <= old.manifest.version:
                committed = None  # a newer version is in use already: look at the current one
            new = open_snapshot(self.path, self._load_encoder, old, self.overrides, committed)
            self._loaded = new
        if committed is None and unread is not None:
            # Our own commits not switched to yet are no change found; what is newer than them is.
            return new.identity != (unread.version, unread.committed_at)
        return new is not old

    def _committed(self, committed: Manifest) -> None:
        """After an add: switch to the version it committed now if this object is read from,
        else on its first read (or a remove, a compact, a refresh)."""
        if self._reading:
            self._switch(committed)
            return
        with self._refreshing:
            if self._unread is None or committed.version > self._unread.version:
                self._unread = committed

    # ------------------------------------------------------------------ searching

    def check_k(self, k: int, snapshot: Snapshot | None = None) -> None:
        """Refuse a ``k`` outside 1..(number of live items), with the one message for it."""
        size = len(snapshot or self._snapshot)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= size:
            if size == 0:
                raise LenetEmbedError(f"{self.path}: the index holds no items; add some first")
            raise LenetEmbedError(
                f"k must be between 1 and {size} (the number of items in {self.path}), got {k}"
            )

    def embed(self, images: ImageLike | list[ImageLike]) -> np.ndarray:
        """Preprocess ``images`` to the MNIST convention and embed them: (N, 84) float32."""
        return self._snapshot.encoder.embed(to_batch(images))

    def search(self, images: ImageLike | list[ImageLike], k: int = 5) -> Results:
        """The ``k`` nearest neighbours of each image (path, PIL image, array or batch)."""
        snapshot = self._snapshot
        self.check_k(k, snapshot)
        return self._search(snapshot, snapshot.encoder.embed(to_batch(images)), k)

    def search_vectors(self, vectors: np.ndarray, k: int = 5) -> Results:
        """The ``k`` nearest neighbours of each embedding vector, shape (N, 84) or (84,)."""
        snapshot = self._snapshot
        self.check_k(k, snapshot)
        return self._search(snapshot, self._check_vectors(vectors, snapshot.dim,
                                                          snapshot.metric), k)

    def query(self, queries: Sequence[Query | ImageLike], k: int = 5,
              min_confidence: float | None = None) -> list[QueryResult]:
        """Answer many queries at once, each with its result or its own error.

        One bad image does not stop the others: its result carries the error. Images are
        embedded in one call and every query is searched in one call. This is what ``query``
        and the service use. Each answer carries its calibrated confidence and whether it is a
        match (:mod:`.calibration`); ``min_confidence`` overrides the bundle's threshold.
        """
        check_min_confidence(min_confidence)
        snapshot = self._snapshot
        self.check_k(k, snapshot)
        items = [q if isinstance(q, Query) else Query(image=q) for q in queries]
        errors: dict[int, LenetEmbedError] = {}
        # Answered "not a digit" without a search: the model found no feature in the image (its
        # embedding all zero).
        strokeless: list[int] = []
        pixels: dict[int, np.ndarray] = {}
        vectors = np.zeros((len(items), snapshot.dim), dtype=np.float32)
        for position, item in enumerate(items):
            try:
                if item.vector is not None:
                    vectors[position] = self._check_vectors(item.vector, snapshot.dim,
                                                          snapshot.metric)[0]
                else:
                    pixels[position] = item.pixels()
            except LenetEmbedError as exc:
                errors[position] = exc
        if pixels:
            embedded = list(pixels)
            vectors[embedded] = snapshot.encoder.embed(np.stack(list(pixels.values())))
            strokeless.extend(np.asarray(embedded)[featureless(vectors[embedded])].tolist())
        unanswered = set(errors) | set(strokeless)
        answered = [p for p in range(len(items)) if p not in unanswered]
        results = [QueryResult(item.title, [], errors.get(position), pixels.get(position))
                   for position, item in enumerate(items)]
        for position in strokeless:
            results[position] = replace(results[position],
                                        verdict=UNSEARCHED)
        if not answered:
            return results
        calibration = snapshot.manifest.calibration
        # Calibration judges its own k neighbours, whatever k the caller wants shown.
        searched = max(k, calibration.k) if calibration else k
        searched = min(searched, len(snapshot))
        hits = self._search(snapshot, vectors[answered], searched)
        predicted, verdicts = judge(calibration, hits.distances, hits.labels, vectors[answered],
                                    min_confidence, snapshot.nondigits)
        found = hits.neighbors()
        for row, position in enumerate(answered):
            results[position] = replace(
                results[position], neighbors=found[row][:k],
                candidate=snapshot.label_name(int(predicted[row])), verdict=verdicts[row],
                calibration=calibration)
        return results

    @staticmethod
    def _check_vectors(vectors: Any, dim: int, metric: str) -> np.ndarray:
        """Vectors as float32 (N, dim): numbers only, finite, and not all zero for cosine."""
        raw = np.asarray(vectors)
        if raw.dtype.kind not in "iuf":
            raise LenetEmbedError(f"vectors must hold numbers, not {raw.dtype.name} values")
        with np.errstate(over="ignore"):
            array = raw.astype(np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != dim:
            raise LenetEmbedError(f"vectors must have shape (N, {dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise LenetEmbedError("vectors must hold finite 32-bit floats")
        if metric == "cosine" and not np.abs(array).max(axis=1).all():
            raise LenetEmbedError("a vector of zeros has no direction; cosine search needs a "
                                  "vector with a non-zero value")
        return array

    @staticmethod
    def _search(snapshot: Snapshot, vectors: np.ndarray, k: int) -> Results:
        """The one search every method runs: checked vectors in, :class:`Results` out."""
        # k was checked against the live items, and a snapshot returns k live items whenever
        # there are k; an external store's index may return fewer (-1 ids pad them).
        found = snapshot.hits(prepare_vectors(vectors, snapshot.metric), k)
        if found.labels.size:
            # A load does not read every label: one the manifest's classes do not name is an
            # error of this search, not of the first use of its neighbours.
            snapshot.label_name(int(found.labels.max()))
        return Results(found.ids, found.labels, found.distances, found.sources,
                       snapshot.label_name)

    def item_image(self, item_id: int) -> np.ndarray:
        """The indexed digit with this id, as the encoder saw it: uint8 (28, 28)."""
        image = self._snapshot.image_of(item_id)
        if image is None:
            raise LenetEmbedError(f"no item with id {item_id} in {self.path}")
        return image

    def label_name(self, code: int) -> int | str | None:
        """A stored label code as the user knows it: the digit, the folder name, or None."""
        return self._snapshot.label_name(code)

    # ------------------------------------------------------------------ writing

    def add(self, images: ImageLike | list[ImageLike], labels: Label | Sequence[Label] = None,
            sources: Sequence[str | None] | None = None) -> np.ndarray:
        """Add images to the bundle in one durable commit; return their new ids.

        ``labels`` is one label for every image or one per image (a digit, or a class name in a
        bundle built from folders; None = unlabelled). ``sources`` records where each came from.
        The images are embedded with the bundle's own encoder; ids are never reused.

        Calls from several threads (the service's ``POST /v1/items``) that arrive while a commit
        is being made join the next one (:class:`~.updates.GroupCommit`): one commit, and one set
        of fsyncs, for all of them; each returns once that commit is on disk.
        """
        batch = to_batch(images)
        return self._adds.add(batch, per_image(labels, len(batch)),
                              list(sources) if sources is not None else None,
                              encoder=self._encoder_for, loaded=self._loaded_manifest,
                              committed=self._committed)

    def _loaded_manifest(self) -> Manifest:
        return self._loaded.manifest

    def _encoder_for(self, manifest: Manifest) -> Encoder:
        """The encoder in use when ``manifest`` names it, else the one it names, loaded."""
        if manifest.encoder_sha256 != self._loaded.manifest.encoder_sha256:
            self.refresh()
        if manifest.encoder_sha256 == self._loaded.manifest.encoder_sha256:
            return self._loaded.encoder
        return bundle_encoder(self.path, manifest, self._load_encoder)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove items by id in one durable commit; return how many were live and went."""
        removal, committed = remove_items(self.path, ids, self.lock_timeout)
        self._switch(committed)  # rare, unlike adds: switching at once frees the old files
        return removal.removed

    def compact(self) -> None:
        """Rebuild the bundle's live items into one sealed segment, dropping removed ones."""
        _, committed = compact_bundle(self.path, self.lock_timeout)
        self._switch(committed)
