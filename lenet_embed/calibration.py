"""Answers you can trust: a query's neighbours turned into a calibrated ``confidence`` and an
open-set verdict (``match``, or why not), fitted per bundle and stored in its manifest.

Two small logistic models, fitted in numpy (Newton's method; a dozen lines do not justify
scikit-learn) on data held out from what they judge:

* the **out-of-distribution score** (higher = less like the indexed items), a logistic model of
  digit against non-digit on the features in :data:`OOD_FEATURES_HEAD` (or
  :data:`OOD_FEATURES_PLAIN` without a head), fitted on leave-one-out searches of a sample of
  the bundle's own items (each searched without itself) against the ``fit`` split of
  :mod:`.nondigits`. Those non-digits' embeddings are kept in the bundle (the calibration's
  ``nondigits`` file): how near a query lies to known non-digits is evidence too, beside how
  far it lies from the items (each fitted non-digit is measured against the others). The "no
  match" threshold is the quantile of the held-out items' scores at each operating point of
  :data:`KEEP` (the fraction of in-distribution queries still answered); ``default_keep``
  picks the one in force.
* the **confidence**, P(predicted label is right | the query is like the items), a logistic model
  on :data:`CONFIDENCE_FEATURES` fitted on the same leave-one-out searches, where "right" is
  whether the majority of the neighbours has the item's own label.

A query is answered (``match``) when its OOD score is within the threshold ("not a digit"
otherwise) and its confidence at least ``min_confidence`` ("unsure" otherwise).

The features come from the ``k`` nearest neighbours (distances, labels), the ``k`` nearest
known non-digits (cosine distances, exact) and, when the bundle keeps its classifier's 84->10
head (as arrays in the manifest, run here in numpy), its logits.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from msgspec.structs import replace as replace_struct

from .ann import prepare_vectors
from .bundle import (
    CALIBRATION_DIR,
    DEFAULT_INDEX_DIR,
    Calibration,
    FileEntry,
    LogisticModel,
    Manifest,
)
from .embed import featureless, load_encoder
from .errors import LenetEmbedError
from .lock import check_writable
from .metrics import majority
from .model import find_layer
from .model_choice import ModelFolder, shipped_head_for
from .preprocess import scale_pixels
from .snapshot import Snapshot, open_snapshot
from .writer import DEFAULT_LOCK_TIMEOUT, BundleWriter

# The neighbours a verdict is computed from (and the predicted label their majority): the
# default k of ``query``.
K = 5
# Operating points: the fraction of held-out in-distribution items answered.
KEEP = (0.99, 0.995, 0.999)
DEFAULT_KEEP = 0.995
# Answer only when the predicted label is more likely right than wrong.
DEFAULT_MIN_CONFIDENCE = 0.5
# Items searched leave-one-out, and generated non-digits, to fit on.
SAMPLE = 10_000
NONDIGITS = 3_000
# The non-digits of the fit split drawn for calibration: seed 0 is outlier exposure's.
NONDIGIT_SEED = 1
# Distances of exact duplicates are 0: logs of distances are taken of distance + EPS.
EPS = 1e-6
NOT_A_DIGIT = "not a digit"
UNSURE = "unsure"
UNCALIBRATED = "no calibration in this bundle: run `lenet-embed calibrate`"
OOD_FEATURES_HEAD = ("log_d1", "log_dk", "log_1_minus_msp", "log_n1", "log_nk")
OOD_FEATURES_PLAIN = ("log_d1", "log_dk", "log_n1", "log_nk")
# The name a fitted calibration's non-digits file has until a writer writes it (Fitted.write).
UNWRITTEN = f"{CALIBRATION_DIR}/unwritten.npy"
CONFIDENCE_FEATURES_HEAD = ("agree", "log_d1", "msp", "head_agrees")
CONFIDENCE_FEATURES_PLAIN = ("agree", "log_d1")

# ``search(vectors, k)``: (distances, ids, label codes), each (n, k), nearest first.
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


class CannotCalibrate(LenetEmbedError):
    """The bundle's items cannot support a calibration (too few labelled, or no wrong answer to
    learn from): a build goes on without one."""


@dataclass(frozen=True)
class Verdict:
    """What calibration says of one query: its confidence and out-of-distribution score (None
    without calibration), whether it is answered, and why not."""

    confidence: float | None
    ood_score: float | None
    match: bool
    reason: str | None


# The verdict on a query answered "not a digit" before any search: preprocessing found no pen
# strokes in it, or the model no feature (its embedding all zero).
UNSEARCHED = Verdict(None, None, False, NOT_A_DIGIT)


def features(distances: np.ndarray, labels: np.ndarray, vectors: np.ndarray,
             calibration_head: tuple[np.ndarray, np.ndarray] | None,
             nondigits: np.ndarray | None = None, themselves: bool = False
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The predicted label codes and every feature of ``n`` queries, from their (n, k)
    neighbour distances and labels, their raw (n, 84) embeddings and the known non-digits'
    embeddings (unit rows; ``themselves``: the queries are those non-digits, each measured
    without itself)."""
    predicted = majority(labels)
    found = {
        "log_d1": np.log(distances[:, 0].astype(np.float64) + EPS),
        "log_dk": np.log(distances.astype(np.float64).mean(axis=1) + EPS),
        "agree": (labels == predicted[:, None]).mean(axis=1),
    }
    if nondigits is not None:
        near = nondigit_distances(vectors, nondigits, distances.shape[1], themselves)
        found["log_n1"] = np.log(near[:, 0] + EPS)
        found["log_nk"] = np.log(near.mean(axis=1) + EPS)
    if calibration_head is not None:
        weights, bias = calibration_head
        logits = vectors.astype(np.float64) @ weights + bias
        top = logits.max(axis=1)
        log_total = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        found["energy"] = -log_total  # Liu et al. 2020: higher = less like the training data
        found["msp"] = np.exp(top - log_total)  # Hendrycks & Gimpel 2017
        # log(1 - msp), computed without the cancellation of 1 - msp: the softmax mass of the
        # other classes. It spreads out the digits' max-softmax, all within a hair of 1.
        head_label = logits.argmax(axis=1)
        others = logits - top[:, None]
        others[np.arange(len(logits)), head_label] = -np.inf
        rest = others.max(axis=1)
        found["log_1_minus_msp"] = (rest + np.log(np.exp(others - rest[:, None]).sum(axis=1))
                                    + top - log_total)
        found["head_agrees"] = (head_label == predicted).astype(np.float64)
    return predicted, found


def nondigit_distances(vectors: np.ndarray, nondigits: np.ndarray, k: int,
                       themselves: bool = False) -> np.ndarray:
    """The cosine distances (float64, (n, k), nearest first) from each of ``vectors`` (raw
    embeddings) to its ``k`` nearest of ``nondigits`` (unit rows), by exact search;
    ``themselves``: ``vectors`` are ``nondigits``, each measured without itself.

    FAISS's brute-force search, not a numpy matrix product: FAISS runs on the threads the
    process gave it (``--threads``), where numpy's BLAS would start one per core for every
    query batch (the service's processor time per request doubled)."""
    unit = prepare_vectors(vectors, "cosine")
    k = min(k, len(nondigits) - int(themselves))
    similarity, found = faiss.knn(unit, nondigits, k + int(themselves),
                                  metric=faiss.METRIC_INNER_PRODUCT)
    if themselves:  # drop each one's own row (wherever it ranks among exact ties)
        kept = found != np.arange(len(unit))[:, None]
        kept &= np.cumsum(kept, axis=1) <= k
        similarity = similarity[kept].reshape(len(unit), k)
    return np.maximum(1.0 - similarity.astype(np.float64), 0.0)


def logit(model: LogisticModel, found: dict[str, np.ndarray]) -> np.ndarray:
    """The logistic model's log-odds for every query."""
    x = np.stack([found[name] for name in model.features], axis=1)
    z = (x - np.asarray(model.mean)) / np.asarray(model.scale)
    return z @ np.asarray(model.weights) + model.bias


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def judge(calibration: Calibration | None, distances: np.ndarray, labels: np.ndarray,
          vectors: np.ndarray, min_confidence: float | None = None,
          nondigits: np.ndarray | None = None) -> tuple[np.ndarray, list[Verdict]]:
    """The predicted label codes and the :class:`Verdict` of each query, from its first
    ``calibration.k`` neighbours (and the calibration's known ``nondigits``, when it has
    them). ``min_confidence`` overrides the stored threshold."""
    if calibration is None:
        return majority(labels), [Verdict(None, None, True, UNCALIBRATED)] * len(labels)
    k = calibration.k
    if calibration.nondigits is not None and nondigits is None:
        raise LenetEmbedError("this calibration measures queries against its known non-digits; "
                              "give them (the bundle's calibration.nondigits file)")
    predicted, found = features(distances[:, :k], labels[:, :k], vectors,
                                calibration.head_arrays,
                                nondigits if calibration.nondigits is not None else None)
    ood = logit(calibration.ood, found)
    confidence = _sigmoid(logit(calibration.confidence, found))
    verdicts = [verdict(calibration, float(c), float(o), min_confidence)
                for c, o in zip(confidence, ood, strict=True)]
    return predicted, verdicts


def verdict(calibration: Calibration, confidence: float, ood_score: float,
            min_confidence: float | None = None) -> Verdict:
    """The verdict for one query's scores at the stored thresholds (``min_confidence``
    overriding the stored one)."""
    floor = calibration.min_confidence if min_confidence is None else min_confidence
    if ood_score > calibration.ood_threshold:
        return Verdict(confidence, ood_score, False, NOT_A_DIGIT)
    if confidence < floor:
        return Verdict(confidence, ood_score, False, UNSURE)
    return Verdict(confidence, ood_score, True, None)


def check_min_confidence(value: float | None) -> None:
    """Refuse a ``min_confidence`` outside [0, 1]."""
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise LenetEmbedError(f"min_confidence must be between 0 and 1, got {value}")


# ---------------------------------------------------------------------------- fitting


def fit_logistic(x: np.ndarray, y: np.ndarray, names: tuple[str, ...],
                 weight: np.ndarray | None = None, ridge: float = 1e-3) -> LogisticModel:
    """Weighted L2-regularised logistic regression by Newton's method on standardised
    features (it converges in a few steps on a handful of features)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    weight = np.ones(len(x)) if weight is None else weight
    penalty = ridge * weight.sum() * np.r_[np.ones(z.shape[1] - 1), 0.0]
    for _ in range(50):
        p = _sigmoid(z @ w)
        gradient = z.T @ (weight * (p - y)) + penalty * w
        hessian = (z * (weight * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LogisticModel(features=list(names), mean=mean.tolist(), scale=scale.tolist(),
                         weights=w[:-1].tolist(), bias=float(w[-1]))


@dataclass(frozen=True)
class HeldOut:
    """The leave-one-out searches and the non-digits a calibration is fitted on."""

    digit_features: dict[str, np.ndarray]
    digit_correct: np.ndarray
    nondigit_features: dict[str, np.ndarray]
    nondigits: np.ndarray  # the non-digits' embeddings, unit rows


@dataclass(frozen=True)
class Fitted:
    """A calibration as fitted, and the known non-digits it measures queries against, before
    a writer has written them into a bundle (``calibration.nondigits`` is :data:`UNWRITTEN`
    until then)."""

    calibration: Calibration
    nondigits: np.ndarray

    def write(self, writer: BundleWriter) -> tuple[Calibration, dict[str, FileEntry]]:
        """Write the non-digits into the bundle of ``writer``'s session; return the
        calibration naming them and their file's entry."""
        name, files = writer.new_nondigits(self.nondigits)
        return replace_struct(self.calibration, nondigits=name), files


def leave_one_out(search: Search, vectors: np.ndarray, ids: np.ndarray, k: int = K
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours' distances and labels of indexed items (raw embeddings
    ``vectors``, their ``ids``), each searched without itself."""
    distances, found, labels = search(vectors, k + 1)
    # Drop each item from its own results (it may sit at any rank among exact ties).
    chosen = found != ids[:, None]
    chosen &= np.cumsum(chosen, axis=1) <= k
    return distances[chosen].reshape(len(ids), k), labels[chosen].reshape(len(ids), k)


def held_out(search: Search, sample_vectors: np.ndarray, sample_ids: np.ndarray,
             sample_labels: np.ndarray, nondigit_vectors: np.ndarray,
             head: tuple[np.ndarray, np.ndarray] | None, k: int = K) -> HeldOut:
    """Features of a sample of indexed items searched leave-one-out, and of generated
    non-digits (each measured against the other non-digits)."""
    known = prepare_vectors(nondigit_vectors, "cosine").copy()
    known.setflags(write=False)
    distances, labels = leave_one_out(search, sample_vectors, sample_ids, k)
    predicted, digit = features(distances, labels, sample_vectors, head, known)
    nd_distances, _, nd_labels = search(nondigit_vectors, k)
    _, nondigit = features(nd_distances, nd_labels, nondigit_vectors, head, known,
                           themselves=True)
    return HeldOut(digit, predicted == sample_labels, nondigit, known)


@functools.lru_cache(maxsize=1)
def nondigit_pixels(count: int = NONDIGITS) -> np.ndarray:
    """The generated non-digits calibration is fitted on (``fit`` split, its own seed), read-only.
    Made once per process: they are the same every time, and drawing and preprocessing 3,000
    pictures takes seconds, which every build and ``calibrate`` would pay again."""
    from .nondigits import generate  # (drawing needs fonts and Pillow's text: not for queries)

    pixels = generate("fit", count, NONDIGIT_SEED).pixels
    pixels.setflags(write=False)
    return pixels


def fit(data: HeldOut, head: tuple[np.ndarray, np.ndarray] | None, k: int = K) -> Fitted:
    """Fit the OOD score, its thresholds and the confidence on held-out data."""
    ood_names = OOD_FEATURES_HEAD if head is not None else OOD_FEATURES_PLAIN
    confidence_names = CONFIDENCE_FEATURES_HEAD if head is not None else CONFIDENCE_FEATURES_PLAIN

    def matrix(found: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
        return np.stack([found[name] for name in names], axis=1)

    digits, others = matrix(data.digit_features, ood_names), matrix(data.nondigit_features,
                                                                    ood_names)
    # Both classes weigh the same in the fit, whatever their counts.
    weight = np.r_[np.full(len(digits), 1 / len(digits)), np.full(len(others), 1 / len(others))]
    ood = fit_logistic(np.vstack([digits, others]), np.r_[np.zeros(len(digits)),
                                                          np.ones(len(others))],
                       ood_names, weight * len(weight) / 2)
    digit_scores = logit(ood, data.digit_features)
    thresholds = {str(keep): float(np.quantile(digit_scores, keep)) for keep in KEEP}
    confidence = fit_logistic(matrix(data.digit_features, confidence_names),
                              data.digit_correct.astype(np.float64), confidence_names)
    weights, bias = head if head is not None else (None, None)
    return Fitted(Calibration(
        k=k, ood=ood, confidence=confidence, ood_thresholds=thresholds,
        default_keep=str(DEFAULT_KEEP), min_confidence=DEFAULT_MIN_CONFIDENCE,
        head_weights=None if weights is None else weights.tolist(),
        head_bias=None if bias is None else bias.tolist(),
        fitted_on={"items": int(len(data.digit_correct)),
                   "nondigits": int(len(next(iter(data.nondigit_features.values())))),
                   "items_wrong": int((~data.digit_correct).sum())},
        nondigits=UNWRITTEN,
    ), data.nondigits)



def classifier_head(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The 84->10 ``prediction`` layer of a Keras classifier as (weights, bias), or None for a
    model without one (an encoder file)."""
    try:
        weights, bias = find_layer(model, "prediction").get_weights()
    except LenetEmbedError:
        return None
    return np.asarray(weights, dtype=np.float64), np.asarray(bias, dtype=np.float64)


def sample_rows(labels: np.ndarray, rows: np.ndarray, sample: int = SAMPLE) -> np.ndarray:
    """Up to ``sample`` of ``rows`` whose label is known (``labels`` of those rows), sorted, the
    same ones every time."""
    rows = rows[labels >= 0]
    if len(rows) <= K:
        raise CannotCalibrate(f"calibration needs more than {K} labelled items, there are "
                              f"{len(rows)}")
    return np.sort(np.random.default_rng(0).permutation(rows)[:sample])


def fit_items(search: Search, vectors: np.ndarray, ids: np.ndarray, labels: np.ndarray,
              encoder: Any, head: tuple[np.ndarray, np.ndarray] | None) -> Fitted:
    """Fit a calibration on leave-one-out searches of indexed items (their raw embeddings
    ``vectors``, ``ids`` and ``labels``; ``search`` over every item) and on :data:`NONDIGITS`
    generated non-digits embedded by ``encoder``: those that reach a search, as queries do (a
    picture the model sees no feature in is answered "not a digit" unsearched, and has no
    direction to be measured by)."""
    others = encoder.embed(nondigit_pixels())
    others = others[~featureless(others)]
    if len(others) <= K:
        raise CannotCalibrate(f"the model sees no feature in all but {len(others)} of the "
                              f"{NONDIGITS} non-digits calibration is fitted on")
    data = held_out(search, vectors, ids, labels, others, head)
    if data.digit_correct.all() or not data.digit_correct.any():
        state = "right" if data.digit_correct.all() else "wrong"
        raise CannotCalibrate(f"every held-out item was {state}: calibration needs right and "
                              "wrong answers to learn from; index more items")
    return fit(data, head)


def fit_snapshot(snapshot: Snapshot, head: tuple[np.ndarray, np.ndarray] | None
                 ) -> Fitted:
    """:func:`fit_items` for a loaded bundle version; the sampled items' stored images are
    embedded again, so that the head sees raw embeddings."""
    ids, labels = snapshot.labelled()
    rows = sample_rows(labels, np.arange(len(ids)))
    vectors = snapshot.encoder.embed(scale_pixels(snapshot.images_of(ids[rows])))
    return fit_items(snapshot_search(snapshot), vectors, ids[rows], labels[rows],
                     snapshot.encoder, head)


def snapshot_search(snapshot: Snapshot) -> Search:
    """A :data:`Search` over every live item of a loaded bundle version."""

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = snapshot.hits(prepare_vectors(queries, snapshot.metric), k)
        return found.distances, found.ids, found.labels

    return search


def load_head(model: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The head of the classifier saved at ``model`` (a ``.keras`` file, or a model folder such
    as the shipped default's, read without TensorFlow); an error when it has none."""
    from .model import load_classifier

    if Path(model).is_dir():
        return ModelFolder.open(model).head()

    head = classifier_head(load_classifier(str(model)))
    if head is None:
        raise LenetEmbedError(f"{model}: has no classifier head (layer 'prediction'); give the "
                              "classifier, not its encoder")
    return head


def calibrate(directory: str | os.PathLike[str] = DEFAULT_INDEX_DIR,
              head: tuple[np.ndarray, np.ndarray] | None = None,
              timeout: float = DEFAULT_LOCK_TIMEOUT) -> Manifest:
    """Fit the calibration of the bundle in ``directory`` again and commit it as a new version
    (e.g. after ``add``); return the manifest committed. ``head`` is the classifier head
    (:func:`load_head`); by default the one the current calibration keeps, else the shipped
    default model's when the bundle's encoder is the shipped one, else none.

    The fit (a minute or two) reads one version as any reader does, without the writer's lock,
    so adds and removes go on meanwhile; only the commit takes the lock. Items committed during
    the fit are not in it (``calibrate`` again to include them); a bundle rebuilt with another
    encoder meanwhile is not given a calibration fitted for the old one (an error)."""
    check_writable(Path(directory))  # before the fit, not a minute later at the commit
    snapshot = open_snapshot(directory, load_encoder)
    fitted = snapshot.manifest
    if head is None and fitted.calibration is not None:
        head = fitted.calibration.head_arrays
    if head is None:
        head = shipped_head_for(fitted.encoder_sha256)
    made = fit_snapshot(snapshot, head)
    with BundleWriter(directory, timeout) as writer:
        current = writer.require_current()
        if (current.encoder_sha256, current.store) != (fitted.encoder_sha256, fitted.store):
            raise LenetEmbedError(f"{directory}: the bundle was rebuilt while it was being "
                                  "calibrated; run `lenet-embed calibrate` again")
        calibration, written = made.write(writer)
        old = current.calibration.nondigits if current.calibration is not None else None
        files = {name: entry for name, entry in current.files.items() if name != old}
        return writer.commit(current.next("calibrate", calibration=calibration,
                                          files={**files, **written}))
