"""Training digits redrawn as pictures users send, then preprocessed as queries are.

The model learns what preprocessing cannot normalise away (a marker's thick strokes, a pen's thin
ones, the soft blocks of a coarse thumbnail scaled up, a crop into the ink) only by seeing it. This
module redraws a training digit the way such pictures are made, at a picture's resolution, and
hands the result to :func:`lenet_embed.preprocess.to_mnist`, so that the model trains on exactly
what a query of that kind reaches it as.

The transforms are generic and drawn here, with their own parameters and random draws: none calls
:mod:`lenet_embed.families`, and none imitates a held-out family (colour, font, lined paper) or
the photo family: no colour, perspective, shadow, ruled lines, JPEG or typeset glyph. The suite's
tuning families (marker, pen, coarse grid, tight and loose crops, low contrast) guided which
transforms exist; their scores are therefore "seen", and the held-out families measure what the
model learnt.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageFilter

from .errors import LenetEmbedError
from .preprocess import to_mnist, to_uint8

# Each transform a redrawn digit goes through, with the share of digits it is applied to.
STROKE_SHARE = 0.5   # strokes thickened (a marker) or thinned (a fine pen)
GRID_SHARE = 0.35    # averaged to a coarse grid and scaled back up smoothly (a thumbnail)
TIGHT_SHARE = 0.4    # cropped to the ink or into it (strokes touch the frame)
FAINT_SHARE = 0.3    # low contrast with sensor noise
BLUR_SHARE = 0.25    # out of focus


def _ink_rows_cols(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ink = picture > 0.1 * picture.max()
    return np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))


def redraw(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One MNIST-form digit (uint8 (28, 28), white on black) redrawn as a picture of random kind:
    enlarged 2-6x, its strokes thickened or thinned, cropped tight or with a margin, averaged to a
    coarse grid and scaled up, made faint and noisy or blurred, in either polarity. Returns the
    picture as a float array in 0..255 (any size), before preprocessing."""
    scale = int(rng.integers(2, 7))
    picture = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    if rng.random() < STROKE_SHARE:
        # Up to 2.5 MNIST pixels thicker each side, or down to the strokes' core.
        if rng.random() < 0.65:
            size = 2 * int(rng.integers(1, max(2, int(2.5 * scale)) + 1)) + 1
            picture = picture.filter(ImageFilter.MaxFilter(size))
        else:
            size = 2 * int(rng.integers(1, max(2, scale // 2 + 1) + 1)) + 1
            picture = picture.point(lambda v: 255 if v > 90 else 0).filter(
                ImageFilter.MinFilter(size))
    values = np.asarray(picture, dtype=np.float64)
    rows, cols = _ink_rows_cols(values)
    if len(rows) == 0:
        return digit.astype(np.float64)
    if rng.random() < TIGHT_SHARE:
        cut = rng.integers(-scale, scale + 1, size=4)
    else:
        cut = rng.integers(scale, 6 * scale, size=4)
    pad = int(max(0, cut.max()))
    values = np.pad(values, pad)
    top, bottom = max(0, rows[0] + pad - cut[0]), rows[-1] + pad + cut[1] + 1
    left, right = max(0, cols[0] + pad - cut[2]), cols[-1] + pad + cut[3] + 1
    values = values[top:bottom, left:right]
    if values.size == 0 or values.max() <= 0:
        return digit.astype(np.float64)
    coarse = rng.random() < GRID_SHARE
    if coarse:
        cells = int(rng.integers(6, 15))
        height, width = values.shape
        factor = cells / max(height, width)
        small = Image.fromarray(values.astype(np.float32)).resize(
            (max(1, round(width * factor)), max(1, round(height * factor))),
            Image.Resampling.BOX)
        side = int(rng.integers(24, 201))
        factor = side / max(small.size)
        method = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
        values = np.asarray(small.resize((max(1, round(small.width * factor)),
                                          max(1, round(small.height * factor))), method),
                            dtype=np.float64)
    if not coarse and rng.random() < BLUR_SHARE:  # (a coarse grid is soft enough)
        # Up to an MNIST pixel: the picture is about 20 MNIST pixels on its longer side.
        radius = float(rng.uniform(0.3, 1.0)) * max(values.shape) / 20
        eight_bit = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
        values = np.asarray(eight_bit.filter(ImageFilter.GaussianBlur(radius)), np.float64)
    values = np.clip(values, 0.0, 255.0) / 255.0
    paper, ink = 0.0, 255.0
    if rng.random() < FAINT_SHARE:
        paper = float(rng.uniform(0, 200))
        ink = paper + float(rng.uniform(24, 80))
    values = paper + (ink - paper) * values
    if paper or ink != 255.0:
        values = values + rng.normal(0.0, float(rng.uniform(0.5, 3.0)), values.shape)
    if rng.random() < 0.5:
        values = 255.0 - values
    return np.clip(values, 0.0, 255.0)


def _redrawn(args: tuple[np.ndarray, int]) -> np.ndarray:
    digits, seed = args
    rng = np.random.default_rng(seed)
    out = np.empty(digits.shape, dtype=np.uint8)
    for i, digit in enumerate(digits):
        picture = redraw(digit, rng)
        try:
            out[i] = to_uint8(to_mnist(picture))
        except LenetEmbedError:  # a picture gone blank: the digit as it is
            out[i] = digit
    return out


def redrawn(digits: np.ndarray, seed: int, workers: int | None = None) -> np.ndarray:
    """Every digit of ``digits`` (uint8 (N, 28, 28)) redrawn by :func:`redraw` and preprocessed
    by :func:`~lenet_embed.preprocess.to_mnist`, as uint8 (N, 28, 28). The same digits and seed
    give the same pictures, whatever the number of ``workers`` (processes; default: the CPUs)."""
    chunk = 2000
    parts = [(digits[start:start + chunk], seed * 1_000_003 + start)
             for start in range(0, len(digits), chunk)]
    workers = workers or min(len(parts), os.cpu_count() or 1)
    if workers <= 1 or len(parts) <= 1:
        results = [_redrawn(part) for part in parts]
    else:
        # Spawned, not forked: the caller may hold TensorFlow's threads, which a fork breaks.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_redrawn, parts))
    return np.concatenate(results) if results else np.empty((0, 28, 28), np.uint8)
