"""Retrieval metrics on tiny hand-made inputs: every expected value is worked out by hand in the
comment beside its assertion (Musgrave, Belongie & Lim 2020 for R-precision and MAP@R)."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_embed.metrics import (
    auroc,
    expected_calibration_error,
    fpr_at_tpr,
    knn_accuracy,
    majority,
    precision_at_k,
    r_precision_and_map_at_r,
    recall_at_k,
    reliability_bins,
)


def _a(rows) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# ------------------------------------------------------------------------------ precision@k


def test_precision_at_k():
    retrieved = _a([[1, 2, 1, 3],
                    [0, 0, 5, 0]])
    labels = _a([1, 0])
    # rank 1: q0 1==1 hit, q1 0==0 hit -> (1 + 1) / 2 = 1.0
    assert precision_at_k(retrieved, labels, 1) == pytest.approx(1.0)
    # first 2: q0 [1, 2] -> 1/2, q1 [0, 0] -> 2/2 -> (0.5 + 1.0) / 2 = 0.75
    assert precision_at_k(retrieved, labels, 2) == pytest.approx(0.75)
    # first 4: q0 [1, 2, 1, 3] -> 2/4, q1 [0, 0, 5, 0] -> 3/4 -> (0.5 + 0.75) / 2 = 0.625
    assert precision_at_k(retrieved, labels, 4) == pytest.approx(0.625)


def test_precision_at_k_counts_padding_as_a_miss():
    # q0 label 4: [4, -1] -> 1 hit of 2 = 0.5 (-1 pads a short result and is never relevant)
    assert precision_at_k(_a([[4, -1]]), _a([4]), 2) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- k-NN accuracy


def test_knn_accuracy_majority_and_ties():
    retrieved = _a([[7, 7, 2, 2],   # label 7: 7 and 2 tie 2-2, nearest is 7 -> 7, right
                    [9, 7, 7, 9],   # label 7: 9 and 7 tie 2-2, nearest is 9 -> 9, wrong
                    [3, 5, 5, 5],   # label 3: 5 has 3 votes -> 5, wrong
                    [4, 9, 1, 6]])  # label 4: four 1-vote ties, nearest is 4 -> 4, right
    labels = _a([7, 7, 3, 4])
    # right, wrong, wrong, right -> 2 / 4 = 0.5. (Breaking ties by the smallest label instead of
    # the nearest would flip rows 0 and 1: 2 -> wrong, 7 -> right.)
    assert knn_accuracy(retrieved, labels, 4) == pytest.approx(0.5)


def test_majority_skips_unlabelled_neighbours_and_keeps_memory_bounded(monkeypatch):
    labels = _a([[-1, 3, 5, 5], [-1, -1, -1, -1], [2, -1, 2, 8]])
    assert majority(labels).tolist() == [5, -1, 2]
    # Many rows at a large k are voted on a few rows at a time, with the same answers.
    rng = np.random.default_rng(0)
    many = rng.integers(-1, 4, size=(300, 60))
    monkeypatch.setattr("lenet_embed.metrics._VOTE_CELLS", 60 * 60 * 7)
    expected = []
    for row in many.tolist():
        voting = [x for x in row if x >= 0]
        best = max((voting.count(x) for x in voting), default=0)
        expected.append(next((x for x in voting if voting.count(x) == best), -1))
    assert majority(many).tolist() == expected


def test_knn_accuracy_uses_only_the_first_k():
    retrieved = _a([[5, 1, 1, 1]])
    labels = _a([5])
    # k=1: vote [5] -> 5, right -> 1/1 = 1.0
    assert knn_accuracy(retrieved, labels, 1) == pytest.approx(1.0)
    # k=3: vote [5, 1, 1] -> 1 (2 votes), wrong -> 0/1 = 0.0
    assert knn_accuracy(retrieved, labels, 3) == pytest.approx(0.0)
    # k=2: vote [5, 1] ties 1-1, nearest is 5 -> right -> 1.0
    assert knn_accuracy(retrieved, labels, 2) == pytest.approx(1.0)


def test_knn_accuracy_with_k_1_is_precision_at_1():
    retrieved = _a([[3, 1], [2, 2], [0, 3]])
    labels = _a([3, 1, 0])
    # rank-1 labels 3, 2, 0 vs 3, 1, 0 -> right, wrong, right -> 2/3 for both
    assert knn_accuracy(retrieved, labels, 1) == pytest.approx(2 / 3)
    assert precision_at_k(retrieved, labels, 1) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------ R-precision, MAP@R


def test_r_precision_and_map_at_r_single_query():
    # label 5, R = 3; ranks 1 and 3 relevant (rank 4 is past R and ignored).
    # R-precision = 2 relevant in the first 3 / 3 = 0.6667
    # MAP@R = 1/3 * (P@1 * 1 + P@2 * 0 + P@3 * 1) = 1/3 * (1/1 + 2/3) = 5/9 = 0.5556
    r_prec, map_r = r_precision_and_map_at_r(_a([[5, 0, 5, 5]]), _a([5]), _a([3]))
    assert r_prec == pytest.approx(2 / 3)
    assert map_r == pytest.approx(5 / 9)


def test_map_at_r_ignores_hits_past_r():
    # label 1, R = 2; ranks 1 and 3 relevant, but only ranks 1..2 count.
    # R-precision = 1/2 = 0.5; MAP@R = 1/2 * (P@1 * 1 + P@2 * 0) = 1/2 * 1 = 0.5
    r_prec, map_r = r_precision_and_map_at_r(_a([[1, 0, 1, 0]]), _a([1]), _a([2]))
    assert (r_prec, map_r) == (pytest.approx(0.5), pytest.approx(0.5))


def test_r_precision_and_map_at_r_with_r_differing_between_queries():
    # R is the number of indexed items sharing the query's label: indexed labels
    # [1, 2, 2, 2, 3, 3, 3, 3] -> R(1) = 1, R(2) = 3, R(3) = 4, taken the way evaluate takes it.
    indexed = _a([1, 2, 2, 2, 3, 3, 3, 3])
    labels = _a([1, 2, 3])
    relevant = np.bincount(indexed)[labels]
    assert relevant.tolist() == [1, 3, 4]
    retrieved = _a([[2, 1, 1, 1],   # q0, R=1: rank 1 wrong; ranks 2-4 are past R.
                    [2, 2, 0, 2],   # q1, R=3: ranks 1, 2 relevant, rank 3 not.
                    [0, 3, 3, 3]])  # q2, R=4: ranks 2, 3, 4 relevant.
    # R-precision: q0 0/1 = 0, q1 2/3, q2 3/4 -> (0 + 2/3 + 3/4) / 3 = (17/12) / 3 = 17/36
    #   = 0.4722
    # MAP@R: q0 = 1/1 * 0 = 0
    #        q1 = 1/3 * (1/1 + 2/2) = 2/3
    #        q2 = 1/4 * (1/2 + 2/3 + 3/4) = 1/4 * 23/12 = 23/48
    #   mean = (0 + 32/48 + 23/48) / 3 = 55/144 = 0.3819
    r_prec, map_r = r_precision_and_map_at_r(retrieved, labels, relevant)
    assert r_prec == pytest.approx(17 / 36)
    assert map_r == pytest.approx(55 / 144)


def test_r_precision_and_map_at_r_perfect_and_worthless():
    labels = _a([0, 1])
    relevant = _a([2, 3])
    # every one of the first R relevant: R-precision = 1, MAP@R = 1/R * sum(i/i) = 1
    perfect = _a([[0, 0, 9, 9, 9], [1, 1, 1, 9, 9]])
    assert r_precision_and_map_at_r(perfect, labels, relevant) == (
        pytest.approx(1.0), pytest.approx(1.0))
    # nothing relevant in the first R (the hits at ranks 3-5 come too late): 0 and 0
    late = _a([[9, 9, 0, 0, 0], [9, 9, 9, 1, 1]])
    assert r_precision_and_map_at_r(late, labels, relevant) == (
        pytest.approx(0.0), pytest.approx(0.0))


def test_r_precision_and_map_at_r_needs_max_r_columns():
    # R = [1, 3] needs 3 columns; 2 given -> ValueError naming 3
    with pytest.raises(ValueError, match="need 3"):
        r_precision_and_map_at_r(_a([[0, 0], [1, 1]]), _a([0, 1]), _a([1, 3]))


def _naive_r_metrics(retrieved, labels, relevant):
    """The textbook definitions, one query at a time."""
    r_precisions, maps = [], []
    for row, label, r in zip(retrieved, labels, relevant, strict=True):
        hits = [row[i] == label for i in range(r)]
        r_precisions.append(sum(hits) / r)
        maps.append(sum(sum(hits[: i + 1]) / (i + 1) for i in range(r) if hits[i]) / r)
    return np.mean(r_precisions), np.mean(maps)


def test_r_precision_and_map_at_r_match_the_textbook_loop():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=40)
    relevant = rng.integers(1, 12, size=40)
    retrieved = rng.integers(0, 3, size=(40, 15))
    got = r_precision_and_map_at_r(retrieved, labels, relevant)
    assert got == pytest.approx(_naive_r_metrics(retrieved, labels, relevant), abs=1e-12)


# ---------------------------------------------------------------------------------- recall@k


def test_recall_at_k():
    approximate = _a([[1, 2, 3], [4, 5, 6]])
    exact = _a([[1, 3, 9], [7, 8, 4]])
    # k=3: q0 {1,2,3} & {1,3,9} = 2, q1 {4,5,6} & {7,8,4} = 1 -> 3 / (3 * 2) = 0.5
    assert recall_at_k(approximate, exact, 3) == pytest.approx(0.5)
    # k=2: q0 {1,2} & {1,3} = 1, q1 {4,5} & {7,8} = 0 -> 1 / (2 * 2) = 0.25
    assert recall_at_k(approximate, exact, 2) == pytest.approx(0.25)


def test_recall_at_k_ignores_order_and_counts_padding_as_missing():
    # same three rows in another order -> 3/3 = 1.0
    assert recall_at_k(_a([[3, 1, 9]]), _a([[1, 3, 9]]), 3) == pytest.approx(1.0)
    # approximate found only row 1 and padded with -1 -> 1/3
    assert recall_at_k(_a([[1, -1, -1]]), _a([[1, 2, 3]]), 3) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ trust


def test_auroc_counts_ordered_pairs_and_ties_as_half():
    inside = np.array([0.1, 0.2, 0.3])
    outside = np.array([0.25, 0.3, 0.9])
    # pairs (out > in): 0.25 beats 0.1, 0.2 (2); 0.3 beats 0.1, 0.2 and ties 0.3 (2.5);
    # 0.9 beats all 3 -> (2 + 2.5 + 3) / 9 = 0.8333
    assert auroc(inside, outside) == pytest.approx(7.5 / 9)
    assert auroc(inside, inside + 1) == 1.0 and auroc(inside + 1, inside) == 0.0


def test_fpr_at_tpr_counts_outliers_under_the_in_distribution_quantile():
    inside = np.arange(1.0, 21.0)  # 1..20: the 0.95 quantile is 19.05
    outside = np.array([5.0, 19.0, 19.5, 30.0])
    # 5 and 19 are <= 19.05 -> 2 of 4 let through
    assert fpr_at_tpr(inside, outside, 0.95) == pytest.approx(0.5)


def test_expected_calibration_error_and_its_bins():
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # 15 bins of width 1/15: 0.95 -> bin 14 (accuracy 3/4), 0.55 -> bin 8 (accuracy 1/2)
    # ECE = 4/6 * |0.75 - 0.95| + 2/6 * |0.5 - 0.55| = 0.1333 + 0.0167 = 0.15
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.15)
    counts, accuracy, mean_confidence = reliability_bins(confidence, correct)
    assert counts[14] == 4 and counts[8] == 2 and counts.sum() == 6
    assert accuracy[14] == pytest.approx(0.75) and mean_confidence[8] == pytest.approx(0.55)
