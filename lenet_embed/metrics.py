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
    top = retrieved[:, :k]
    predictions = np.empty(len(top), dtype=top.dtype)
    for i, row in enumerate(top):
        values, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = counts == counts.max()
        predictions[i] = values[best][np.argmin(first[best])]
    return float((predictions == query_labels).mean())


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
