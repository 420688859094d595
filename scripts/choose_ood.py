"""Choose the out-of-distribution score's features without looking at what is reported.

Leave one kind out, on the ``fit`` split of the generated non-digits only (the ``eval`` split,
which ``evaluate`` reports, is never drawn here): for each kind of non-digit, the OOD model is
fitted on the bundle's items searched leave-one-out (one half of a sample) against the other
kinds, its threshold set on the other half of the items at ``--keep``, and the rejection of the
kind left out measured. The known non-digits that the ``log_n1``/``log_nk`` features measure
against are the other kinds' too, so the kind left out is unknown in every way. Each candidate
feature set prints its mean and worst rejection over the kinds; the one in force
(:data:`lenet_embed.calibration.OOD_FEATURES_HEAD`) is printed first, as the baseline of the
same run. The default model was trained with outlier exposure on this split's kinds, so they
are easy for it (0.99 and more rejected): here the candidates hardly differ.

    python scripts/choose_ood.py --index-dir index --model models/lenet.keras
"""

from __future__ import annotations

import argparse

import numpy as np

from lenet_embed.calibration import (
    OOD_FEATURES_HEAD,
    K,
    features,
    fit_logistic,
    held_out,
    load_head,
    logit,
    sample_rows,
    snapshot_search,
)
from lenet_embed.cli import run_script
from lenet_embed.embed import load_encoder
from lenet_embed.nondigits import KINDS, generate
from lenet_embed.preprocess import scale_pixels
from lenet_embed.snapshot import open_snapshot

CANDIDATES = {
    "in force": OOD_FEATURES_HEAD,
    "no known non-digits": ("log_d1", "log_dk", "log_1_minus_msp"),
    "+energy": (*OOD_FEATURES_HEAD, "energy"),
    "energy, distances": ("log_d1", "log_dk", "energy"),
    "msp only": ("log_1_minus_msp",),
    "distances only": ("log_d1", "log_dk"),
}
# Seeds of the fit split no calibration or training draws (0: outlier exposure, 1: calibration).
SEED = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", default="index")
    parser.add_argument("--model", default="models/lenet.keras", help="classifier with its head")
    parser.add_argument("--nondigits", type=int, default=5000)
    parser.add_argument("--keep", type=float, default=0.995)
    args = parser.parse_args()

    snapshot = open_snapshot(args.index_dir, load_encoder)
    head = load_head(args.model)
    ids, labels = snapshot.labelled()
    rows = sample_rows(labels, np.arange(len(ids)))
    vectors = snapshot.encoder.embed(scale_pixels(snapshot.images_of(ids[rows])))
    search = snapshot_search(snapshot)
    drawn = generate("fit", args.nondigits, SEED)
    others = snapshot.encoder.embed(drawn.pixels)
    kinds = np.array(drawn.kinds)
    # Per kind left out: the items and the other kinds measured against the other kinds, and
    # the kind left out searched and measured against them as a query is.
    data, left_out = {}, {}
    for kind in KINDS:
        known = others[kinds != kind]
        data[kind] = held_out(search, vectors, ids[rows], labels[rows], known, head)
        distances, _, found = search(others[kinds == kind], K)
        left_out[kind] = features(distances, found, others[kinds == kind], head,
                                  data[kind].nondigits)[1]
    half = np.arange(len(rows)) % 2 == 0
    print(f"{len(rows)} items (half fit, half threshold), {len(kinds)} fit-split non-digits, "
          f"keep {args.keep}")
    print(f"{'features':<20} " + " ".join(f"{kind:>9}" for kind in KINDS) + "      mean     worst")
    for label, names in CANDIDATES.items():
        rejected = []
        for kind in KINDS:
            fitted = data[kind]
            x_digit = np.stack([fitted.digit_features[n][half] for n in names], axis=1)
            x_other = np.stack([fitted.nondigit_features[n] for n in names], axis=1)
            weight = np.r_[np.full(len(x_digit), 1 / len(x_digit)),
                           np.full(len(x_other), 1 / len(x_other))]
            model = fit_logistic(np.vstack([x_digit, x_other]),
                                 np.r_[np.zeros(len(x_digit)), np.ones(len(x_other))],
                                 names, weight * len(weight) / 2)
            held = {n: v[~half] for n, v in fitted.digit_features.items()}
            threshold = np.quantile(logit(model, held), args.keep)
            rejected.append(float((logit(model, left_out[kind]) > threshold).mean()))
        print(f"{label:<20} " + " ".join(f"{r:9.3f}" for r in rejected)
              + f" {np.mean(rejected):9.3f} {np.min(rejected):9.3f}")


if __name__ == "__main__":
    run_script(main)
