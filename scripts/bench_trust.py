"""Which out-of-distribution score tells digits from non-digits best? Every candidate, measured
in one run on the MNIST test digits against the ``eval`` split of the generated non-digits.

Scores (higher = less like a digit): the cosine distance to the nearest neighbour and the mean
over k; that distance over the predicted class's typical one (the median leave-one-out distance
of the class's items); the Mahalanobis distance on the 84-d features to the nearest class mean
with a shared covariance (Lee et al. 2018, fitted on the indexed vectors); the energy (Liu et
al. 2020) and the negated max-softmax (Hendrycks & Gimpel 2017) of the classifier head; the
distance to the nearest of the calibration's known non-digits (negated); and the calibration's
fitted combination (:mod:`lenet_embed.calibration`, what queries use). For
each: AUROC, FPR at 95 % TPR, and the fraction of non-digits rejected when 99.5 % of the
held-out digits are kept, overall and for the styles never fitted on. Then the calibration's
ECE and its answered/rejected fractions at the bundle's own thresholds.

    python scripts/bench_trust.py --index-dir INDEX [--model lenet.keras] [--data PATH] [--json]

The bundle must be built over the MNIST training split (``build-index``); ``--model`` gives the
classifier head when the bundle keeps none. Takes about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lenet_embed import SearchIndex, load_mnist
from lenet_embed.ann import prepare_vectors
from lenet_embed.calibration import (
    K,
    features,
    fit_snapshot,
    leave_one_out,
    load_head,
    logit,
    sample_rows,
)
from lenet_embed.cli import run_script
from lenet_embed.embed import featureless
from lenet_embed.evaluate import NONDIGITS_EVALUATED, evaluation_nondigits, measure_trust
from lenet_embed.metrics import auroc, fpr_at_tpr
from lenet_embed.nondigits import HELD_OUT
from lenet_embed.preprocess import scale_pixels

KEEP = 0.995


def mahalanobis(fitted: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The smallest Mahalanobis distance of each query to a class mean (shared covariance)."""
    classes = np.unique(labels)
    means = np.stack([fitted[labels == c].mean(axis=0) for c in classes])
    centred = fitted - means[np.searchsorted(classes, labels)]
    precision = np.linalg.pinv(centred.T @ centred / len(fitted))
    diff = queries[:, None, :] - means[None]
    return np.einsum("nck,kl,ncl->nc", diff, precision, diff).min(axis=1)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", default="index")
    parser.add_argument("--model", help="the classifier, for its head")
    parser.add_argument("--data", help="MNIST folder or mnist.npz")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    dataset = load_mnist(args.data)  # first: a missing data set stops before anything else
    index = SearchIndex.load(args.index_dir)
    snapshot = index.snapshot
    calibration = snapshot.manifest.calibration
    head = load_head(args.model) if args.model else (
        calibration.head_arrays if calibration else None)
    known = snapshot.nondigits
    if calibration is None or (args.model and calibration.head_weights is None):
        fitted = fit_snapshot(snapshot, head)  # in memory only: the bundle is not changed
        calibration, known = fitted.calibration, fitted.nondigits
    digits = index.encoder.embed(scale_pixels(dataset.test.images))
    others_set = evaluation_nondigits(NONDIGITS_EVALUATED)
    others = index.encoder.embed(others_set.pixels)
    unseen = np.array([style in HELD_OUT[kind]
                       for kind, style in zip(others_set.kinds, others_set.styles, strict=True)])

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        distances, ids, labels, _ = snapshot.hits(prepare_vectors(queries, index.metric), k)
        return distances, ids, labels

    # Typical distances per class and Mahalanobis are fitted on indexed items only.
    live = snapshot.live_rows()
    rows = sample_rows(snapshot.labels[live], live)
    sample = index.encoder.embed(scale_pixels(snapshot.images(rows)))
    nearest, _ = leave_one_out(search, sample, snapshot.ids[rows])
    sample_labels = snapshot.labels[rows]
    typical = {int(c): float(np.median(nearest[sample_labels == c, 0]))
               for c in np.unique(sample_labels)}

    def scores(vectors: np.ndarray) -> dict[str, np.ndarray]:
        distances, _, labels = search(vectors, K)
        predicted, found = features(distances, labels, vectors, head,
                                    known if calibration.nondigits else None)
        out = {
            "kNN distance (top-1)": distances[:, 0],
            f"kNN distance (mean of {K})": distances.mean(axis=1),
            "top-1 / class typical": distances[:, 0] / np.array(
                [typical.get(int(p), np.inf) for p in predicted]),
            "Mahalanobis (84-d)": mahalanobis(sample, sample_labels, vectors),
        }
        if head is not None:
            out["energy"] = found["energy"]
            out["max softmax (negated)"] = -found["msp"]
        if "log_n1" in found:
            out["nearest known non-digit (negated)"] = -found["log_n1"]
        out["calibration (fitted combination)"] = logit(calibration.ood, found)
        return out

    inside = scores(digits)
    # Non-digits whose embedding is all zero never reach a score (queries answer them
    # unsearched): rejected.
    blank = featureless(others)
    outside = {name: np.where(blank, np.inf, values)
               for name, values in scores(others).items()}
    rows_out = []
    for name in inside:
        threshold = np.quantile(inside[name], KEEP)
        rejected = outside[name] > threshold
        rows_out.append({
            "score": name,
            "auroc": round(auroc(inside[name], outside[name]), 4),
            "fpr_at_95_tpr": round(fpr_at_tpr(inside[name], outside[name]), 4),
            f"rejected_at_{KEEP}": round(float(rejected.mean()), 4),
            "rejected_unseen_styles": round(float(rejected[unseen].mean()), 4),
        })
    trust = None
    if snapshot.manifest.calibration is not None:
        trust, _ = measure_trust(index, digits, dataset.test.labels)
    if args.json:
        print(json.dumps({"scores": rows_out, "bundle": trust and trust.__dict__}, indent=2))
        return
    print(f"{len(digits)} test digits vs {len(others_set)} generated non-digits (eval split; "
          f"{int(unseen.sum())} in styles never fitted on; "
          f"{int(blank.sum())} embedded to all zeros, "
          "answered unsearched)")
    print(f"{'score':<34} {'AUROC':>7} {'FPR@95':>7} {'rej@99.5':>9} {'unseen':>7}")
    for row in rows_out:
        print(f"{row['score']:<34} {row['auroc']:>7.4f} {row['fpr_at_95_tpr']:>7.4f} "
              f"{row[f'rejected_at_{KEEP}']:>9.4f} {row['rejected_unseen_styles']:>7.4f}")
    if trust is not None:
        print(f"bundle at its thresholds: ECE {trust.ece:.4f}, test digits answered "
              f"{trust.digits_answered:.4f} (right {trust.answered_accuracy:.4f}), non-digits "
              f"rejected {trust.nondigits_rejected:.4f}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in trust.rejected_by_kind.items()))


if __name__ == "__main__":
    run_script(main)
