"""Training digits redrawn as pictures (lenet_embed/augment.py): reproducible by seed whatever the
number of processes, every picture reaches the model as a digit-form array with ink in it, and
the redrawing changes what the model sees (thicker and thinner strokes, coarse grids, crops)."""

from __future__ import annotations

import numpy as np

from lenet_embed.augment import redraw, redrawn

N = 60


def test_redrawn_is_reproducible_and_independent_of_workers(mnist):
    digits = mnist.train.images[:N]
    one = redrawn(digits, seed=3, workers=1)
    assert one.shape == digits.shape and one.dtype == np.uint8
    assert np.array_equal(one, redrawn(digits, seed=3, workers=1))
    assert not np.array_equal(one, redrawn(digits, seed=4, workers=1))
    # Chunks are seeded by their position, so a pool gives the same pictures.
    many = mnist.train.images[:4100]
    assert np.array_equal(redrawn(many, seed=3, workers=1), redrawn(many, seed=3, workers=2))


def test_every_redrawn_digit_has_ink_and_most_change(mnist):
    digits = mnist.train.images[:N]
    out = redrawn(digits, seed=5, workers=1)
    assert (out.max(axis=(1, 2)) >= 128).all()  # stretched: the ink's bright end is bright
    changed = np.abs(out.astype(int) - digits.astype(int)).mean(axis=(1, 2)) > 5
    assert changed.mean() > 0.8


def test_redraw_covers_both_polarities_and_many_sizes(mnist):
    rng = np.random.default_rng(0)
    pictures = [redraw(digit, rng) for digit in mnist.train.images[:N]]
    sizes = {max(p.shape) for p in pictures}
    light_paper = [float(np.median(np.concatenate([p[0], p[-1]]))) > 128 for p in pictures]
    assert len(sizes) > 10 and min(sizes) < 60 < max(sizes)
    assert 0.2 < np.mean(light_paper) < 0.8
