"""Retrieval metrics in numpy, as defined by Musgrave, Belongie & Lim, "A Metric Learning Reality
Check" (ECCV 2020).

All functions take the labels of the retrieved items in rank order, one row per query, with -1 (or
any label no query has) for padding, and the query labels. ``R`` for a query is the number of
indexed items sharing its label.
"""

from __future__ import annotations

import numpy as np


def precision_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Mean fraction of the first ``k`` retrieved items whose label equals the query's."""
    hits = retrieved[:, :k] == query_labels[:, None]
    return float(hits.mean())


def knn_accuracy(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Accuracy of a majority vote over the first ``k`` labels; ties go to the nearest label."""
    return float((majority(retrieved[:, :k]) == query_labels).mean())


def majority(labels: np.ndarray) -> np.ndarray:
    """The majority label code of each row of (n, k) codes, ties to the one seen nearest first,
    -1 (no label) never voting; -1 when no neighbour has a label (as ``majority_label`` does
    for a list of neighbours)."""
    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=np.int64)
    rows = max(1, _VOTE_CELLS // max(1, labels.shape[1] ** 2))  # bounded memory for any k
    for start in range(0, len(labels), rows):
        out[start:start + rows] = _majority(labels[start:start + rows])
    return out


_VOTE_CELLS = 1 << 22  # cells of the (rows, k, k) vote table made at once


def _majority(labels: np.ndarray) -> np.ndarray:
    voting = labels >= 0
    # votes[i, j]: how many voting neighbours of query i share neighbour j's label. The first
    # position with the most votes holds the majority label, seen nearest first among ties.
    votes = ((labels[:, :, None] == labels[:, None, :]) & voting[:, None, :]).sum(axis=2)
    votes[~voting] = 0
    best = votes.argmax(axis=1)
    rows = np.arange(len(labels))
    return np.where(votes[rows, best] > 0, labels[rows, best], -1).astype(np.int64)


def r_precision_and_map_at_r(
    retrieved: np.ndarray, query_labels: np.ndarray, relevant_counts: np.ndarray
) -> tuple[float, float]:
    """R-precision and MAP@R, averaged over queries.

    ``relevant_counts[i]`` is R for query i; ``retrieved`` must hold at least max(R) columns.
    R-precision = (relevant items in the first R) / R.
    MAP@R = (1/R) * sum over ranks i <= R of P@i * [item i is relevant].
    """
    if (relevant_counts < 1).any():
        raise ValueError("every query needs at least one relevant indexed item (R >= 1)")
    r_max = int(relevant_counts.max())
    if retrieved.shape[1] < r_max:
        raise ValueError(f"need {r_max} retrieved items per query, got {retrieved.shape[1]}")
    hits = retrieved[:, :r_max] == query_labels[:, None]
    ranks = np.arange(1, r_max + 1)
    within_r = ranks[None, :] <= relevant_counts[:, None]
    hits &= within_r
    cumulative = np.cumsum(hits, axis=1)
    r = relevant_counts.astype(np.float64)
    r_precision = cumulative[np.arange(len(hits)), relevant_counts - 1] / r
    map_at_r = (cumulative / ranks * hits).sum(axis=1) / r
    return float(r_precision.mean()), float(map_at_r.mean())


def recall_at_k(approximate: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Fraction of the exact top-``k`` rows that the approximate search also put in its top k."""
    found = [len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approximate, exact, strict=True)]
    return float(np.sum(found) / (k * len(exact)))


# ------------------------------------------------------------------ trust: OOD and calibration


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of an out-of-distribution score (higher = more out): the
    probability that a random out-of-distribution input scores above a random in-distribution one,
    ties counting half (the Mann-Whitney U statistic over n_in * n_out; Hendrycks & Gimpel 2017
    report it for exactly this task)."""
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average ranks (1-based), so tied scores share their rank.
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    n_in, n_out = len(in_scores), len(out_scores)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The fraction of out-of-distribution inputs let through when the threshold keeps ``tpr`` of
    the in-distribution ones ("FPR at 95 % TPR", Liang et al. 2018, with in-distribution inputs as
    the positives): the threshold is the ``tpr`` quantile of the in-distribution scores."""
    threshold = np.quantile(in_scores, tpr)
    return float((out_scores <= threshold).mean())


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = 15) -> float:
    """ECE (Guo et al. 2017, eq. 3): over ``bins`` equal-width confidence bins, the mean absolute
    gap between accuracy and mean confidence, weighted by the fraction of answers in each."""
    counts, accuracy, mean_confidence = reliability_bins(confidence, correct, bins)
    total = counts.sum()
    return float(np.sum(counts / total * np.abs(accuracy - mean_confidence))) if total else 0.0


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of (0, 1]: the count, the accuracy and the mean confidence (0 in an
    empty bin): the data of a reliability diagram."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    # Bin b holds (b/bins, (b+1)/bins]; a confidence of 0 goes to the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / safe
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / safe
    return counts, accuracy, mean_confidence
