"""How good is retrieval? Query the MNIST test split against a bundle and measure it.

Quality figures (1-NN, k-NN, precision@k, R-precision, MAP@R) measure the embedding: they come
from exact search over the bundle's own vectors, so an approximate index does not blur them. For an
approximate index, recall@10 against that exact search measures the approximation, and
``index_1nn_accuracy`` what users of the bundle actually get. Speed figures time the bundle's own
index, with and without embedding the query. Robustness is top-1 on test digits drawn as scans
and degraded the ways real scans go wrong (:mod:`lenet_embed.degrade`), each through the same
decoding and preprocessing as a query.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .ann import exact_search, prepare_vectors
from .bundle import DEFAULT_INDEX_DIR
from .calibration import UNSEARCHED
from .data import Dataset, LabeledImages, load_mnist
from .degrade import DEGRADATIONS, degrade, sample
from .embed import featureless
from .errors import LenetEmbedError
from .families import FAMILIES, family_files
from .metrics import (
    auroc,
    expected_calibration_error,
    fpr_at_tpr,
    knn_accuracy,
    precision_at_k,
    r_precision_and_map_at_r,
    recall_at_k,
    reliability_bins,
)
from .nondigits import NonDigits, generate
from .preprocess import open_image, scale_pixels, to_mnist
from .search import Query, QueryResult, SearchIndex

LATENCY_QUERIES = 500
# Generated non-digits (the eval split) the trust figures are measured on, and the bins of ECE
# and the reliability diagram (Guo et al. 2017 use 15).
NONDIGITS_EVALUATED = 3000
# Non-digits of the final split (kinds no other split draws), for scoring only.
FINAL_NONDIGITS_EVALUATED = 2000
RELIABILITY_BINS = 15
RECALL_K = 10
WORST_SHOWN = 40
# Test digits per degradation: at a top-1 of 0.97 the figure's standard error is 0.004.
DEGRADED_COUNT = 2000
# Test digits per picture family (lenet_embed/families.py): standard error 0.005 at 0.97.
FAMILY_COUNT = 1000
FAMILY_SEED = 7


@dataclass
class TrustFigures:
    """How far answers can be trusted (:mod:`.calibration`), on the test digits and the
    ``eval`` split of :mod:`.nondigits`: expected calibration error of ``confidence`` (15 bins),
    AUROC and FPR at 95 % TPR of the out-of-distribution score (non-digits = positives of the
    AUROC; FPR = non-digits let through at the threshold keeping 95 % of digits), and, at the
    bundle's own thresholds, the fraction of digits answered (and how many of those are right)
    and of non-digits rejected, overall and per kind. The ``final`` split's non-digits, of kinds
    no fit and no choice saw, are scored the same way (``final_*``)."""

    ece: float
    auroc: float
    fpr_at_95_tpr: float
    digits_answered: float
    answered_accuracy: float
    nondigits: int
    nondigits_rejected: float
    rejected_by_kind: dict[str, float]
    ood_threshold: float
    min_confidence: float
    final_nondigits: int = 0
    final_auroc: float | None = None
    final_rejected: float | None = None
    final_rejected_by_kind: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Every figure ``evaluate`` measures; ``to_dict`` gives them as one JSON-ready object."""

    index_dir: str
    count: int
    queries: int
    metric: str
    factory: str
    k: int
    nn1_accuracy: float
    knn_accuracy: float
    precision_at_1: float
    precision_at_10: float
    precision_at_100: float
    r_precision: float
    map_at_r: float
    batch_qps: float
    latency_ms_p50: float
    latency_ms_p99: float
    latency_with_embedding_ms_p50: float
    latency_with_embedding_ms_p99: float
    search_params: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None
    index_nn1_accuracy: float | None = None
    trust: TrustFigures | None = None
    # Top-1 (the k-NN majority label, as k_nn_accuracy) on the degraded test set
    # (lenet_embed/degrade.py), per degradation, over `degraded_queries` test digits each.
    degraded_queries: int = 0
    degraded_top1: dict[str, float] = field(default_factory=dict)
    # Top-1 of the answers `query` gives (the calibrated verdict: a refusal counts as wrong) on
    # the picture families of lenet_embed/families.py, over `family_queries` test digits each.
    family_queries: int = 0
    family_top1: dict[str, float] = field(default_factory=dict)
    # Kept for pictures; not part of the JSON figures.
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dictionary (without the per-query details)."""
        figures = asdict(self)
        figures.pop("details")
        return figures


def _percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99])
    return round(float(p50), 4), round(float(p99), 4)


def _time_single_queries(index: SearchIndex, pixels: np.ndarray, vectors: np.ndarray,
                         k: int) -> dict[str, float]:
    n = min(LATENCY_QUERIES, len(vectors))
    search_only, with_embedding = [], []
    for i in range(n):
        started = time.perf_counter()
        index.search_vectors(vectors[i : i + 1], k).neighbors()  # as a caller gets them
        search_only.append(time.perf_counter() - started)
        started = time.perf_counter()
        index.search(pixels[i], k).neighbors()
        with_embedding.append(time.perf_counter() - started)
    p50, p99 = _percentiles_ms(search_only)
    e50, e99 = _percentiles_ms(with_embedding)
    return {
        "latency_ms_p50": p50,
        "latency_ms_p99": p99,
        "latency_with_embedding_ms_p50": e50,
        "latency_with_embedding_ms_p99": e99,
    }


def degraded_top1(index: SearchIndex, indexed: np.ndarray, labels: np.ndarray,
                  test: LabeledImages, k: int,
                  count: int = DEGRADED_COUNT) -> tuple[int, dict[str, float]]:
    """Top-1 per degradation: ``count`` test digits drawn as scans, degraded each way
    (:data:`lenet_embed.degrade.DEGRADATIONS`), decoded and preprocessed as ``query`` does, and
    labelled by the majority of their ``k`` exact nearest ``indexed`` vectors (whose labels are
    ``labels``). Returns the number of digits and the figure per degradation."""
    chosen = sample(count, len(test))
    digits, truth = test.images[chosen], test.labels[chosen]
    figures = {}
    for name, pixels in degraded_pixels(digits, chosen).items():
        rows = exact_search(indexed, index.encoder.embed(pixels), index.metric, k)
        figures[name] = round(knn_accuracy(labels[rows], truth, k), 4)
    return len(chosen), figures


def family_top1(index: SearchIndex, test: LabeledImages, k: int,
                count: int = FAMILY_COUNT) -> tuple[int, dict[str, float]]:
    """Top-1 per picture family (:data:`lenet_embed.families.FAMILIES`): ``count`` test digits
    drawn as pictures of each family, encoded as files and answered as ``query`` answers them
    (decoded, preprocessed, embedded, searched and judged by the bundle's calibration). A
    refusal ("not a digit", "unsure", an error) counts as a wrong answer. The digits are another
    sample than the degraded set's."""
    chosen = sample(count, len(test), seed=FAMILY_SEED)
    digits, truth = test.images[chosen], test.labels[chosen]
    figures = {}
    for name in FAMILIES:
        pictures: list[Query | None] = []
        for number, data in zip(chosen, family_files(digits, truth, name), strict=True):
            try:
                pictures.append(Query(image=open_image(data, f"{name} picture of #{number}")))
            except LenetEmbedError:
                pictures.append(None)  # a file the decoder refuses: a wrong answer
        answers = iter(index.query([q for q in pictures if q is not None], k))
        right = [q is not None and next(answers).predicted_label == label
                 for q, label in zip(pictures, truth.tolist(), strict=True)]
        figures[name] = round(float(np.mean(right)), 4)
    return len(chosen), figures


# Degraded sets already made in this process, by a digest of their digits (see degraded_pixels).
_DEGRADED: dict[str, dict[str, np.ndarray]] = {}
_DEGRADED_KEPT = 4


def degraded_pixels(digits: np.ndarray, numbers: np.ndarray) -> dict[str, np.ndarray]:
    """Each degradation of ``digits`` (uint8 (N, 28, 28); ``numbers`` are their positions in
    the test split, for errors) as a query sees it after decoding and preprocessing: read-only
    (N, 28, 28) float32 per name of :data:`~lenet_embed.degrade.DEGRADATIONS`.

    The set is the same every time for the same digits, and making it (drawing, encoding,
    decoding and preprocessing eight pictures a digit) takes about a minute, so the last few
    sets made in a process are kept and given again."""
    key = hashlib.sha256(np.ascontiguousarray(digits)).hexdigest()
    if key not in _DEGRADED:
        made = {}
        for name in DEGRADATIONS:
            files = degrade(digits, name)
            pixels = np.stack([to_mnist(open_image(data, f"{name} picture of test #{i}"))
                               for i, data in zip(numbers, files, strict=True)])
            pixels.setflags(write=False)
            made[name] = pixels
        while len(_DEGRADED) >= _DEGRADED_KEPT:
            del _DEGRADED[next(iter(_DEGRADED))]
        _DEGRADED[key] = made
    return _DEGRADED[key]


@functools.lru_cache(maxsize=4)
def evaluation_nondigits(count: int = NONDIGITS_EVALUATED, split: str = "eval") -> NonDigits:
    """The non-digits the trust figures are measured on (``split``: ``eval``, or ``final`` for
    kinds no other split draws; seed 0), their arrays read-only. Made once per process: they
    are the same every time, and drawing and preprocessing thousands of pictures takes a
    while."""
    others = generate(split, count, seed=0)
    others.pixels.setflags(write=False)
    return others


def evaluate(
    index: SearchIndex | str | os.PathLike[str] = DEFAULT_INDEX_DIR,
    data: str | os.PathLike[str] | Dataset | None = None,
    k: int = 10,
) -> Evaluation:
    """Query the test split of ``data`` against a bundle and measure retrieval, also on the
    degraded test set (:func:`degraded_top1`).

    ``index`` is a loaded :class:`SearchIndex` or a bundle folder. The bundle must have been built
    from the training split of the same data set (the default ``build-index``); its vectors are
    re-derived from that split for exact search.
    """
    if not isinstance(index, SearchIndex):
        index = SearchIndex.load(index)
    snapshot = index.snapshot
    index_dir = index.path
    dataset = load_mnist(data)
    index.check_k(k, snapshot)
    ids, labels = snapshot.labelled()
    if (
        len(labels) != len(dataset.train)
        or not np.array_equal(labels, dataset.train.labels)
        or not np.array_equal(snapshot.images_of(ids), dataset.train.images)
    ):
        raise LenetEmbedError(
            f"{index_dir}: the bundle was not built from the training split of {dataset.source}; "
            "evaluate needs a bundle from `lenet-embed build-index` on the same data"
        )
    indexed = index.encoder.embed(scale_pixels(dataset.train.images))
    test_pixels = scale_pixels(dataset.test.images)
    test_labels = dataset.test.labels

    started = time.perf_counter()
    queries = index.encoder.embed(test_pixels)
    embed_seconds = time.perf_counter() - started

    counts = np.bincount(labels, minlength=int(test_labels.max()) + 1)
    relevant = counts[test_labels]
    depth = max(int(relevant.max()), 100, k)
    rows = exact_search(indexed, queries, index.metric, depth)
    retrieved = labels[rows]
    r_precision, map_at_r = r_precision_and_map_at_r(retrieved, test_labels, relevant)

    started = time.perf_counter()
    found = snapshot.hits(prepare_vectors(queries, index.metric), k)
    search_seconds = time.perf_counter() - started
    # The items found as positions among the live items (those the exact search ranks).
    index_rows = np.searchsorted(ids, found.ids)

    approximate = snapshot.manifest.factory != "Flat"
    degraded_queries, degraded = degraded_top1(index, indexed, labels, dataset.test, k)
    family_queries, families = family_top1(index, dataset.test, k)
    evaluation = Evaluation(
        index_dir=str(index_dir),
        count=len(index),
        queries=len(test_labels),
        metric=index.metric,
        factory=snapshot.manifest.factory,
        k=k,
        search_params=dict(index.search_params),
        nn1_accuracy=precision_at_k(retrieved, test_labels, 1),
        knn_accuracy=knn_accuracy(retrieved, test_labels, k),
        precision_at_1=precision_at_k(retrieved, test_labels, 1),
        precision_at_10=precision_at_k(retrieved, test_labels, 10),
        precision_at_100=precision_at_k(retrieved, test_labels, 100),
        r_precision=r_precision,
        map_at_r=map_at_r,
        batch_qps=round(len(queries) / search_seconds, 1),
        **_time_single_queries(index, test_pixels, queries, k),
        recall_at_10=(
            recall_at_k(index_rows, rows, min(RECALL_K, k)) if approximate else None
        ),
        index_nn1_accuracy=(
            float((labels[index_rows[:, 0]] == test_labels).mean()) if approximate else None
        ),
        degraded_queries=degraded_queries,
        degraded_top1=degraded,
        family_queries=family_queries,
        family_top1=families,
    )
    reliability = None
    if snapshot.manifest.calibration is not None:
        evaluation.trust, reliability = measure_trust(index, queries, test_labels)
    evaluation.details = {
        "test_labels": test_labels,
        "test_pixels": test_pixels,
        "queries": queries,
        "rows": rows[:, :k],
        "embed_seconds": embed_seconds,
        "reliability": reliability,
    }
    return evaluation


def measure_trust(index: SearchIndex, queries: np.ndarray, labels: np.ndarray,
                  nondigits: int = NONDIGITS_EVALUATED
                  ) -> tuple[TrustFigures, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:class:`TrustFigures` of a calibrated bundle for digit embeddings ``queries`` (raw, as the
    encoder gives them) with true ``labels``, and the reliability diagram's bins."""
    calibration = index.manifest.calibration
    if calibration is None:
        raise LenetEmbedError(f"{index.path}: the bundle has no calibration; run "
                              "`lenet-embed calibrate` first")
    others = evaluation_nondigits(nondigits)
    other_vectors = index.encoder.embed(others.pixels)
    final = evaluation_nondigits(FINAL_NONDIGITS_EVALUATED, "final")

    def answers(vectors: np.ndarray) -> list[QueryResult]:
        return index.query([Query(vector=v) for v in vectors], calibration.k)

    def as_images(vectors: np.ndarray) -> list[QueryResult]:
        """Answers as image queries get them: one whose embedding is all zero is "not a digit"
        unsearched (a zero vector given as such is an error)."""
        blank = featureless(vectors)
        found = iter(answers(vectors[~blank]))
        unsearched = QueryResult("", [], verdict=UNSEARCHED)
        return [unsearched if empty else next(found) for empty in blank]

    digits, rejects = as_images(queries), as_images(other_vectors)
    final_rejects = as_images(index.encoder.embed(final.pixels))
    confidence = np.array([0.0 if r.confidence is None else r.confidence for r in digits])
    correct = np.array([r.candidate == label for r, label in zip(digits, labels.tolist(),
                                                                  strict=True)])
    def scores(results: list[QueryResult]) -> np.ndarray:
        # Unsearched ("not a digit" before any score) is further than any score says.
        return np.array([np.inf if r.verdict.ood_score is None else r.verdict.ood_score
                         for r in results])

    digit_scores = scores(digits)
    other_scores = scores(rejects)
    answered = np.array([r.match for r in digits])

    def rejected_by_kind(results: list[QueryResult], drawn: NonDigits
                         ) -> tuple[np.ndarray, dict[str, float]]:
        rejected = np.array([not r.match for r in results])
        kinds = np.array(drawn.kinds)
        return rejected, {kind: float(rejected[kinds == kind].mean())
                          for kind in sorted(set(drawn.kinds))}

    rejected, by_kind = rejected_by_kind(rejects, others)
    final_rejected, final_by_kind = rejected_by_kind(final_rejects, final)
    figures = TrustFigures(
        ece=expected_calibration_error(confidence, correct, RELIABILITY_BINS),
        auroc=auroc(digit_scores, other_scores),
        fpr_at_95_tpr=fpr_at_tpr(digit_scores, other_scores, 0.95),
        digits_answered=float(answered.mean()),
        answered_accuracy=float(correct[answered].mean()) if answered.any() else 0.0,
        nondigits=len(others),
        nondigits_rejected=float(rejected.mean()),
        rejected_by_kind=by_kind,
        ood_threshold=calibration.ood_threshold,
        min_confidence=calibration.min_confidence,
        final_nondigits=len(final),
        final_auroc=auroc(digit_scores, scores(final_rejects)),
        final_rejected=float(final_rejected.mean()),
        final_rejected_by_kind=final_by_kind,
    )
    return figures, reliability_bins(confidence, correct, RELIABILITY_BINS)


def write_report(evaluation: Evaluation, out_dir: str | os.PathLike[str],
                 index: SearchIndex) -> list[Path]:
    """Write ``figures.json`` and PNG pictures of ``evaluation`` into ``out_dir``."""
    from .pictures import (
        confusion_image,
        embedding_map,
        montage,
        montage_rows,
        pca_2d,
        reliability_diagram,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    details = evaluation.details
    snapshot = index.snapshot
    labels = snapshot.labelled()[1]
    test_labels, rows = details["test_labels"], details["rows"]
    predicted = labels[rows[:, 0]]
    n_classes = int(max(labels.max(), test_labels.max())) + 1
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (test_labels, predicted), 1)
    names = [str(i) for i in range(n_classes)]

    written = [out / "figures.json", out / "confusion.png", out / "worst.png",
               out / "embedding_map.png"]
    written[0].write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n", encoding="utf-8")
    confusion_image(matrix, names, title="1-NN labels on the test set").save(written[1])

    # The worst retrievals: wrong nearest neighbours, the most confidently wrong first.
    wrong = np.flatnonzero(predicted != test_labels)
    vectors = details["queries"]
    results = index.search_vectors(vectors[wrong], evaluation.k) if len(wrong) else []
    ranked = sorted(zip(wrong, results, strict=True), key=lambda pair: pair[1][0].distance)
    shown = [i for i, _ in ranked[:WORST_SHOWN]]
    worst = montage_rows(
        index,
        details["test_pixels"][shown],
        [neighbors for _, neighbors in ranked[:WORST_SHOWN]],
        [f"test #{i} (label {test_labels[i]})" for i in shown],
        [int(test_labels[i]) for i in shown],
    )
    if worst:
        montage(worst).save(written[2])
    else:
        written.remove(written[2])
    points = pca_2d(prepare_vectors(vectors, index.metric))
    embedding_map(points, test_labels, names, title="test embeddings, PCA").save(written[-1])
    if details["reliability"] is not None and evaluation.trust is not None:
        written.append(out / "reliability.png")
        reliability_diagram(*details["reliability"], title=f"confidence on the test digits, "
                            f"ECE {evaluation.trust.ece:.4f}").save(written[-1])
    return written
