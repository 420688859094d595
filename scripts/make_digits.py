"""Scale data: N distinct digits made by randomly deforming the MNIST training digits.

Output digit i is training digit ``i mod 60,000`` under a deformation of its own: a small affine
map (rotation, scale, shear, shift) composed with an elastic distortion (Simard, Steinkraus and
Platt 2003: a uniform random displacement field smoothed by a Gaussian of ``sigma`` 4 pixels and
scaled by ``alpha``), resampled bilinearly. That is the recipe behind infiMNIST / MNIST8M
(Loosli, Canu and Bottou 2007); a deformed digit keeps its label. The same N, seed and source
data give the same bytes.

``OUT`` receives the four standard IDX files: the N digits as the training split, uncompressed
(so ``build-index`` memory-maps them instead of reading 784 MB per million into memory), and the
real MNIST test split, so that tuning and evaluation use real digits none of the N came from::

    python scripts/make_digits.py 1000000 /tmp/digits1m --seed 0
    lenet-embed build-index --data /tmp/digits1m --index-dir /tmp/index1m
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path

import numpy as np

from lenet_embed.cli import run_script
from lenet_embed.data import IMAGE_SIDE, load_mnist
from lenet_embed.errors import LenetEmbedError
from lenet_embed.progress import bar

# Digits deformed at a time: 8192 x 784 float32 temporaries of ~26 MB each, a few hundred MB in all.
CHUNK = 8192
# Strengths: Simard's alpha 34 with a 2-pixel shift on top changed the label a classifier trained
# on plain MNIST saw in 1 digit out of 5; these keep it at about 19 out of 20 (measured on 3,000).
MAX_ROTATION = np.deg2rad(10.0)
MAX_SCALE_CHANGE = 0.10
MAX_SHEAR = 0.10
MAX_SHIFT = 1.0  # pixels
ELASTIC_ALPHA = 16.0
ELASTIC_SIGMA = 4.0
# What the deformed pixels are sampled from: the digit inside a border of zeros, so that samples
# falling outside it read background.
_PAD = 2
_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _gaussian_matrix(side: int, sigma: float) -> np.ndarray:
    """The (side, side) matrix that smooths a row with a Gaussian, zeros outside (scipy's
    ``gaussian_filter(mode="constant")``, truncated at 4 sigma), so that ``G @ F @ G`` smooths a
    2-D field as two matrix products instead of a convolution."""
    offsets = np.arange(side)[:, None] - np.arange(side)[None, :]
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) / taps.sum()
    weights[np.abs(offsets) > radius] = 0.0
    return weights.astype(np.float32)


_SMOOTH = _gaussian_matrix(IMAGE_SIDE, ELASTIC_SIGMA)


def deform(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each of the (n, 28, 28) uint8 ``images`` under its own random affine map and elastic
    distortion; returns (n, 28, 28) uint8."""
    n, side = len(images), IMAGE_SIDE
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, n)
    scale = rng.uniform(1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE, n)
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2)).astype(np.float32)
    field = rng.random((n, 2, side, side), dtype=np.float32)  # uniform on [-1, 1] below
    field = (2 * ELASTIC_ALPHA) * (_SMOOTH @ (field - np.float32(0.5)) @ _SMOOTH)
    # Each output pixel p reads the source at M (p - centre) + centre - shift + field(p), where M
    # is the inverse of rotation x shear x scale: sampling backwards leaves no holes.
    cos, sin = np.cos(angle), np.sin(angle)
    m = np.stack([cos + shear * sin, sin - shear * cos, -sin, cos], axis=1) / scale[:, None]
    m = m.astype(np.float32)
    centre = np.float32((side - 1) / 2)
    grid = np.arange(side, dtype=np.float32) - centre
    ys, xs = grid[None, :, None], grid[None, None, :]
    src_x = (m[:, 0, None, None] * xs + m[:, 1, None, None] * ys
             + (centre - shift[:, 0, None, None]) + field[:, 0])
    src_y = (m[:, 2, None, None] * xs + m[:, 3, None, None] * ys
             + (centre - shift[:, 1, None, None]) + field[:, 1])
    return _bilinear(images, src_x, src_y)


def _bilinear(images: np.ndarray, src_x: np.ndarray, src_y: np.ndarray) -> np.ndarray:
    """Sample each image at (src_y, src_x) (float32, one pair per output pixel) bilinearly, with
    zeros outside the image; round to uint8."""
    n, side = len(images), IMAGE_SIDE
    padded_side = side + 2 * _PAD
    padded = np.zeros((n, padded_side, padded_side), dtype=np.float32)
    padded[:, _PAD:-_PAD, _PAD:-_PAD] = images
    flat = padded.reshape(-1)
    # Clipped into [-1, side]: beyond that every neighbour is border, and the sample is zero.
    x = np.clip(src_x, -1.0, float(side))
    y = np.clip(src_y, -1.0, float(side))
    x0, y0 = np.floor(x), np.floor(y)
    wx, wy = x - x0, y - y0
    base = (np.arange(n) * padded_side * padded_side)[:, None, None]
    top_left = base + (y0.astype(np.int64) + _PAD) * padded_side + (x0.astype(np.int64) + _PAD)
    top = flat[top_left] * (1 - wx) + flat[top_left + 1] * wx
    bottom = flat[top_left + padded_side] * (1 - wx) + flat[top_left + padded_side + 1] * wx
    values = top * (1 - wy) + bottom * wy
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _idx_header(code: int, shape: tuple[int, ...]) -> bytes:
    """The header of an IDX file: magic 0, 0, type code, ndim, then big-endian dimensions."""
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as one IDX file."""
    path.write_bytes(_idx_header(0x08, array.shape) + np.ascontiguousarray(array).tobytes())


def make_digits(n: int, out: Path, seed: int = 0,
                data: str | os.PathLike[str] | None = None) -> None:
    """Write ``n`` deformed training digits and the real test split to ``out`` as IDX files."""
    if not 1 <= n < 2**32:
        raise LenetEmbedError(f"N must be between 1 and {2**32 - 1}, got {n}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LenetEmbedError(f"{out}: exists and is not an empty folder; choose a new OUT (its "
                              "files would replace a data set's, e.g. MNIST's own)")
    source = load_mnist(data)
    train = source.train
    out.mkdir(parents=True, exist_ok=True)
    images_path = out / _NAMES[("train", "images")]
    partial = images_path.with_name(images_path.name + ".partial")
    labels = np.empty(n, dtype=np.uint8)
    # One generator per chunk, derived from (seed, chunk number): a chunk's digits depend on
    # nothing but the seed and its position, so chunks could be made in any order or in parallel.
    progress = bar(n, "deforming", "digits")
    with open(partial, "wb") as fh, progress:
        fh.write(_idx_header(0x08, (n, IMAGE_SIDE, IMAGE_SIDE)))
        for number, start in enumerate(range(0, n, CHUNK)):
            rows = np.arange(start, min(start + CHUNK, n)) % len(train)
            rng = np.random.default_rng([seed, number])
            fh.write(deform(train.images[rows], rng).tobytes())
            labels[start : start + len(rows)] = train.labels[rows]
            progress.update(len(rows))
    os.replace(partial, images_path)
    _write_idx(out / _NAMES[("train", "labels")], labels)
    _write_idx(out / _NAMES[("test", "images")], source.test.images)
    _write_idx(out / _NAMES[("test", "labels")], source.test.labels.astype(np.uint8))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="how many digits to write")
    parser.add_argument("out", type=Path, help="folder for the four IDX files")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same digits")
    parser.add_argument("--data", help="MNIST to deform [default: $LENET_EMBED_MNIST]")
    args = parser.parse_args()
    make_digits(args.n, args.out, args.seed, args.data)
    print(f"wrote {args.n} digits to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
