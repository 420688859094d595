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

from .ann import (
    AUTO,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TARGET_RECALL,
    build_tuned_index,
    check_factory,
    check_target_recall,
    parse_size,
    prepare_vectors,
    set_threads,
)
from .bundle import DEFAULT_INDEX_DIR, Manifest, package_version
from .data import Dataset, load_image_folder, load_mnist
from .embed import KerasEncoder
from .errors import LenetEmbedError
from .model import EMBEDDING_DIM, encoder_of, load_classifier
from .preprocess import scale_pixels, to_uint8
from .training import DEFAULT_MODEL_PATH, DEFAULT_RECIPE, train
from .writer import BundleWriter, check_folder, now_iso

log = logging.getLogger(__name__)

TUNING_QUERIES = 5000


@dataclass(frozen=True)
class BuildResult:
    """A finished build: where the bundle is, its manifest, and how long it took."""

    path: str
    manifest: Manifest
    seconds: float
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The figures worth printing: count, dim, metric, factory, version, seconds, path."""
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
        }


def _load_encoder(model: str | os.PathLike[str] | None, data: Any) -> Any:
    """The Keras encoder of ``model``, training one with the default recipe if it is missing."""
    path = Path(model) if model is not None else DEFAULT_MODEL_PATH
    if not path.exists():
        if model is not None:
            raise LenetEmbedError(
                f"{path}: no such model; train one with `lenet-embed train --out {path}`"
            )
        log.info("no model at %s: training one with the %r recipe first", path, DEFAULT_RECIPE)
        train(data=data, out=path)
    return encoder_of(load_classifier(str(path)))


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
    on_progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Embed a data set and write a self-contained index bundle to ``index_dir``.

    By default the 60,000 MNIST training images are indexed (ids = their positions in the training
    set). With ``images`` every image file under that folder is indexed instead, labelled by its
    subfolder. ``model`` is a classifier or encoder ``.keras`` file; when it is None and
    ``models/lenet.keras`` does not exist, one is trained first. ``factory`` is ``auto`` (chosen
    from the count, the dimension and ``memory_budget``, bytes or a size such as ``"2GB"``; see
    :func:`lenet_embed.ann.choose_index`) or any FAISS ``index_factory`` string. An approximate
    index's search parameter is tuned to ``target_recall`` (recall@10 against exact search) on
    held-out queries (the test split; for ``images``, a sample of the indexed items) and stored in
    the manifest with the reason for the choice. ``threads`` caps FAISS's threads.
    ``on_progress(done, total)`` is called as images are embedded.
    """
    if threads is not None:
        set_threads(threads)
    if factory != AUTO:
        check_factory(factory, metric, EMBEDDING_DIM)
    check_target_recall(target_recall)
    budget = parse_size(memory_budget)
    check_folder(Path(index_dir))
    started = time.perf_counter()
    classes: list[str] = []
    sources: list[str] | None = None
    skipped: list[str] = []
    held_out: np.ndarray | None = None  # uint8 tuning queries kept out of the index
    if images is not None:
        folder = load_image_folder(images)
        pixels, labels = folder.images, folder.labels
        stored = to_uint8(pixels)
        classes, sources, skipped = folder.classes, folder.sources, folder.skipped
        description = {"kind": "images", "root": str(images), "skipped": len(skipped)}
        encoder_model = _load_encoder(model, data)
    else:
        dataset = load_mnist(data)
        encoder_model = _load_encoder(model, dataset)
        stored, labels = dataset.train.images, dataset.train.labels
        pixels = scale_pixels(stored)
        description = {"kind": "idx", "source": dataset.source, "split": "train"}
        held_out = dataset.test.images[:TUNING_QUERIES]
    encoder = KerasEncoder(encoder_model)
    vectors = encoder.embed(pixels, on_progress=on_progress)

    def held_out_queries() -> np.ndarray:
        if held_out is not None:
            return encoder.embed(scale_pixels(held_out))
        sample = np.random.default_rng(0).permutation(len(vectors))[:TUNING_QUERIES]
        return vectors[sample]

    built = build_tuned_index(vectors, metric, factory, target_recall, budget, held_out_queries)
    index = built.index
    prepared = prepare_vectors(vectors, metric)
    with BundleWriter(index_dir, replacing=True) as writer:
        encoder_folder, encoder_files = writer.new_encoder(encoder_model)
        segment, segment_files = writer.new_segment(
            vectors=prepared, ids=np.arange(len(labels), dtype=np.int64), labels=labels,
            images=stored, sources=sources, index=index,
        )
        now = now_iso()
        manifest = writer.commit(Manifest(
            version=writer.next_version, operation="build", created_at=now, committed_at=now,
            lenet_embed_version=package_version(), dim=int(index.d), metric=metric,
            factory=built.factory, search_params=built.search_params, dataset=description,
            classes=list(classes), encoder=encoder_folder, segments=[segment], deletions=None,
            count=len(labels), rows=len(labels), next_id=len(labels),
            files={**encoder_files, **segment_files}, target_recall=built.target_recall,
            factory_reason=built.reason,
        ))
    seconds = round(time.perf_counter() - started, 2)
    return BuildResult(str(index_dir), manifest, seconds, skipped)
