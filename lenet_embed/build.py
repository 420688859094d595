"""Build an index bundle: load data, embed it with a trained encoder, index it with FAISS."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import store as stores
from ._keras import keras
from .ann import (
    AUTO,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TARGET_RECALL,
    check_factory,
    check_target_recall,
    parse_size,
    prepare_vectors,
    set_threads,
    to_distances,
)
from .bundle import DEFAULT_INDEX_DIR, Manifest, package_version
from .calibration import CannotCalibrate, Fitted, classifier_head, fit_items, sample_rows
from .data import Dataset, load_image_folder, load_mnist, read_rows
from .embed import (
    BACKENDS,
    Encoder,
    KerasEncoder,
    LiteRTEncoder,
    litert_available,
    load_encoder,
)
from .errors import LenetEmbedError
from .model import EMBEDDING_DIM, encoder_of, load_classifier
from .model_choice import ModelChoice, choose_model
from .nondigits import MissingFonts
from .preprocess import scale_pixels, to_uint8
from .writer import BundleWriter, check_folder, now_iso

log = logging.getLogger(__name__)

TUNING_QUERIES = 5000
# Images scaled and embedded at a time: their float32 copy is 16,384 x 784 x 4 = 51 MB, where all
# of a million digits would be 3 GB. Memory-mapped images are read from disk a chunk at a time.
CHUNK = 16_384
# ``on_progress(stage, done, total)``, one of STAGES in their order ("reading": image files, only
# for ``images``).
STAGES = ("reading", "embedding", "indexing", "calibrating", "writing")
StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BuildResult:
    """A finished build: where the bundle is, its manifest, and how long it took."""

    path: str
    manifest: Manifest
    seconds: float
    skipped: list[str] = field(default_factory=list)
    model: str = ""  # which model embedded, and why that one

    def summary(self) -> dict[str, Any]:
        """The figures worth printing: count, dim, metric, factory, version, seconds, path, and
        the model."""
        m = self.manifest
        return {
            "index_dir": self.path,
            "count": m.count,
            "dim": m.dim,
            "metric": m.metric,
            "factory": m.factory,
            "version": m.version,
            "seconds": self.seconds,
            "skipped": len(self.skipped),
            "search_params": dict(m.search_params),
            "factory_reason": m.factory_reason,
            "model": self.model,
        }


@dataclass(frozen=True)
class _Model:
    """What a build takes from its model: the encoder to embed with, the classifier head the
    calibration scores with, and the encoder to copy into the bundle (a model folder's files,
    or a Keras model saved and exported by the writer)."""

    choice: ModelChoice
    encoder: Encoder
    head: tuple[np.ndarray, np.ndarray] | None
    keras_encoder: Any = None
    litert: bytes | None = None  # the Keras encoder's LiteRT export, when made already

    def save(self, writer: BundleWriter) -> tuple[str, dict[str, Any]]:
        """Write the encoder into the bundle's next version."""
        folder = self.choice.folder
        if folder is not None:
            return writer.copy_encoder(folder.keras_path, folder.litert_path)
        return writer.new_encoder(self.keras_encoder, self.litert)


def _load_model(model: str | os.PathLike[str] | None, backend: str, threads: int | None,
                index_dir: str | os.PathLike[str]) -> _Model:
    """The model :func:`lenet_embed.model_choice.choose_model` picks, loaded: a model folder's
    encoder runs on LiteRT where it can (``backend``), without TensorFlow; a ``.keras`` file
    needs TensorFlow, and its encoder is exported to LiteRT first (staged in the bundle
    ``index_dir``) and embeds there where ai-edge-litert is installed (the bundle keeps that
    export, so its queries run the same program), else with Keras."""
    if backend not in BACKENDS:
        raise LenetEmbedError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    choice = choose_model(model)
    if choice.folder is not None:
        encoder = load_encoder(choice.folder.keras_path, choice.folder.litert_path, backend,
                               threads)
        return _Model(choice, encoder, choice.folder.head())
    if backend == "litert" and not litert_available():
        raise LenetEmbedError("cannot use LiteRT: ai-edge-litert is not installed")
    keras("build-index")  # a .keras file needs it
    classifier = load_classifier(str(choice.path))
    keras_encoder = encoder_of(classifier)
    head = classifier_head(classifier)
    if backend == "keras" or not litert_available():
        return _Model(choice, KerasEncoder(keras_encoder), head, keras_encoder)
    # Staged in a writer's scratch folder of the bundle, which a killed export leaves to the
    # next writer to remove (a session that commits nothing; a full disk is one line there).
    with BundleWriter(index_dir, replacing=True) as writer:
        flatbuffer = writer.export_encoder(keras_encoder)
    encoder = LiteRTEncoder(choice.path, threads, content=flatbuffer)
    return _Model(choice, encoder, head, keras_encoder, flatbuffer)


def build_index(
    data: str | os.PathLike[str] | Dataset | None = None,
    images: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    index_dir: str | os.PathLike[str] = DEFAULT_INDEX_DIR,
    metric: str = "cosine",
    factory: str = AUTO,
    target_recall: float = DEFAULT_TARGET_RECALL,
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    threads: int | None = None,
    on_progress: StageProgress | None = None,
    store_uri: str | None = None,
    store_token: str | None = None,
    backend: str = "auto",
) -> BuildResult:
    """Embed a data set and write a self-contained index bundle to ``index_dir``.

    By default the 60,000 MNIST training images are indexed (ids = their positions in the training
    set). With ``images`` every image file under that folder is indexed instead, labelled by its
    subfolder. ``model`` is a classifier or encoder ``.keras`` file or a model folder (see
    :mod:`lenet_embed.model_choice`); when it is None, ``models/lenet.keras`` if it exists, else
    the default model that ships with the package, which needs no TensorFlow: its encoder embeds
    on LiteRT, or with ``backend="keras"`` on Keras (LiteRT is ``"litert"``, or ``"auto"`` where
    ai-edge-litert is installed). ``factory`` is ``auto`` (chosen from the count, the dimension
    and ``memory_budget``, bytes or a size such as ``"2GB"``; see
    :func:`lenet_embed.ann.choose_index`) or a FAISS ``index_factory`` string that
    :func:`lenet_embed.factory.parse_factory` accepts (checked before FAISS sees it). An approximate
    index's search parameter is tuned to ``target_recall`` (recall@10 against exact search) on
    held-out queries (the test split; for ``images``, a sample of the indexed items) and stored in
    the manifest with the reason for the choice. ``threads`` caps FAISS's and LiteRT's threads.

    Memory stays bounded whatever the count: images are embedded and written a chunk at a time
    (from a memory-mapped IDX file they are never all in memory); only the vectors (336 MB a
    million) and the index are held. ``on_progress(stage, done, total)`` is called as each stage
    (one of ``STAGES``) advances.

    With ``store_uri`` (an external vector store's address, see :mod:`.store`; ``store_token``
    when it needs one) the items go into a new collection there with an index of the factory's
    family, and the bundle keeps the manifest and the encoder.
    """
    report = on_progress or _ignore
    if threads is not None:
        set_threads(threads)
    if factory != AUTO:
        check_factory(factory, metric, EMBEDDING_DIM)
    check_target_recall(target_recall)
    budget = parse_size(memory_budget)
    check_folder(Path(index_dir))
    target = stores.build_target(index_dir, store_uri, store_token)
    started = time.perf_counter()
    classes: list[str] = []
    sources: list[str] | None = None
    skipped: list[str] = []
    held_out: np.ndarray | None = None  # uint8 tuning queries kept out of the index
    if images is not None:
        folder = load_image_folder(
            images, on_progress=lambda done, total: report("reading", done, total))
        # Embedded as preprocessed (float32), stored as bytes.
        pixels, labels = folder.images, folder.labels
        stored = to_uint8(pixels)
        classes, sources, skipped = folder.classes, folder.sources, folder.skipped
        description = {"kind": "images", "root": str(images), "skipped": len(skipped)}
    else:
        dataset = load_mnist(data)
        stored, labels = dataset.train.images, dataset.train.labels
        pixels = stored  # scaled a chunk at a time by _embed
        description = {"kind": "idx", "source": dataset.source, "split": "train"}
        held_out = dataset.test.images[:TUNING_QUERIES]
    # After the data: its errors come first.
    loaded = _load_model(model, backend, threads, index_dir)
    encoder = loaded.encoder
    vectors = _embed(encoder, pixels, report)
    count = len(vectors)

    def held_out_queries() -> np.ndarray:
        if held_out is not None:
            return encoder.embed(scale_pixels(held_out))
        sample = np.random.default_rng(0).permutation(len(vectors))[:TUNING_QUERIES]
        return vectors[sample]

    # The calibration's sample keeps its raw embeddings (the classifier head reads them), taken
    # before the vectors are normalised in place, a chunk at a time, before indexing: the index,
    # the tuning and the bundle then all use them as they are, with no normalised copy of them.
    sample = _calibration_sample(vectors, labels)
    for start in range(0, count, CHUNK):
        vectors[start : start + CHUNK] = prepare_vectors(vectors[start : start + CHUNK], metric)
    report("indexing", 0, count)
    built = target.index(vectors, metric, factory, target_recall, budget, held_out_queries,
                         lambda done, total: report("indexing", done, total))
    report("calibrating", 0, 1)
    fitted = None
    if sample is not None:
        try:
            fitted = _calibration(target.scores(built, vectors, metric), sample, labels,
                                       metric, encoder, loaded.head)
        except (CannotCalibrate, MissingFonts) as exc:
            _no_calibration(exc)
    report("calibrating", 1, 1)
    ids = np.arange(count, dtype=np.int64)
    report("writing", 0, count)
    with BundleWriter(index_dir, replacing=True) as writer:
        replaced = writer.current
        encoder_folder, encoder_files = loaded.save(writer)
        items = target.write(writer, built, ids, vectors, labels, stored, sources, factory,
                             metric, lambda done, total: report("writing", done, total))
        calibration, calibration_files = fitted.write(writer) if fitted else (None, {})
        now = now_iso()
        manifest = writer.commit(Manifest(
            version=writer.next_version, operation="build", created_at=now, committed_at=now,
            lenet_embed_version=package_version(), dim=int(vectors.shape[1]), metric=metric,
            dataset=description, classes=list(classes), encoder=encoder_folder,
            deletions=None, count=len(labels), rows=len(labels), next_id=len(labels),
            calibration=calibration, **target.fields(built, factory),
            **{**items, "files": {**encoder_files, **calibration_files, **items["files"]}},
        ))
    stores.replaced(Path(index_dir), replaced, manifest)
    seconds = round(time.perf_counter() - started, 2)
    return BuildResult(str(index_dir), manifest, seconds, skipped, loaded.choice.describe())


def _calibration_sample(vectors: np.ndarray, labels: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows the calibration samples and a copy of their raw vectors, or None (said in the
    log) when the items cannot be calibrated."""
    try:
        rows = sample_rows(np.asarray(labels), np.arange(len(labels)))
    except CannotCalibrate as exc:
        _no_calibration(exc)
        return None
    return rows, vectors[rows]


def _no_calibration(reason: Exception) -> None:
    log.warning("no calibration (queries get no confidence): %s", reason)


def _calibration(search_scores: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                 sample: tuple[np.ndarray, np.ndarray], labels: np.ndarray, metric: str,
                 encoder: Encoder, head: tuple[np.ndarray, np.ndarray] | None
                 ) -> Fitted:
    """Fit the new bundle's calibration (:mod:`.calibration`) on the ``sample`` of rows and
    their raw vectors; ``search_scores(prepared queries, k)`` gives FAISS's (scores, rows) over
    every item (ids = row numbers)."""
    rows, raw = sample
    labels = np.asarray(labels)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, found = search_scores(prepare_vectors(queries, metric), k)
        return to_distances(scores, metric), found, np.where(found >= 0, labels[found], -1)

    return fit_items(search, raw, rows.astype(np.int64), labels[rows], encoder, head)


def _ignore(stage: str, done: int, total: int) -> None:
    """The progress callback of a build nobody watches."""


def _embed(encoder: Encoder, pixels: np.ndarray, report: StageProgress) -> np.ndarray:
    """The (N, dim) float32 embeddings of ``pixels`` (uint8 bytes, scaled a chunk at a time, or
    floats in [0, 1]), reporting each chunk as the "embedding" stage."""
    count = len(pixels)
    vectors = np.empty((count, encoder.dim), dtype=np.float32)
    report("embedding", 0, count)
    for start in range(0, count, CHUNK):
        chunk = read_rows(pixels, start, start + CHUNK)
        if chunk.dtype == np.uint8:
            chunk = scale_pixels(chunk)
        vectors[start : start + len(chunk)] = encoder.embed(chunk)
        report("embedding", start + len(chunk), count)
    return vectors
