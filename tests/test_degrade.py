"""The degraded test set (lenet_embed/degrade.py) and the preprocessing that copes with it: each
degradation does what it claims and is reproducible by seed; specks, impulse noise and textured
paper do not move the crop or flip the polarity; thin pen lines are not filtered away."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lenet_embed import to_mnist
from lenet_embed.degrade import DEGRADATIONS, SCALE, degrade, sample
from lenet_embed.preprocess import BOX, open_image

N = 12


@pytest.fixture(scope="module")
def digits(mnist) -> np.ndarray:
    return mnist.test.images[:N]


@pytest.fixture(scope="module")
def files(digits) -> dict[str, list[bytes]]:
    return {name: degrade(digits, name, seed=7) for name in DEGRADATIONS}


def _gray(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def _ink_area(data: bytes) -> int:
    return int((_gray(data) < 128).sum())


def _sharpness(data: bytes) -> float:
    """The steepest step between horizontal neighbours: a sharp edge makes it large."""
    return float(np.abs(np.diff(_gray(data), axis=1)).max())


def _ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two 28x28 digits, the best over shifts of up to a pixel (centring by
    centre of mass rounds to whole pixels)."""
    return max(float(np.corrcoef(np.roll(a, (dy, dx), axis=(0, 1)).ravel(), b.ravel())[0, 1])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_reproducible_by_seed(digits, files, name):
    assert degrade(digits, name, seed=7) == files[name]
    assert degrade(digits, name, seed=8) != files[name]


def test_pictures_are_scans_of_the_digits(digits, files):
    """Dark ink on white paper, SCALE times MNIST's size plus a margin, and the clean picture
    preprocesses back to (nearly) the MNIST digit itself."""
    for digit, data in zip(digits, files["clean"], strict=True):
        gray = _gray(data)
        assert min(gray.shape) >= 28 * SCALE
        assert gray[0].min() == 255 and gray[-1].min() == 255
        assert gray.min() < 64
        assert _similarity(to_mnist(open_image(data, "clean")), digit) > 0.8


def test_each_degradation_does_what_it_claims(files):
    clean = files["clean"]
    for i in range(N):
        # lowres: an 8x8 grid of cells over the digit, on white paper: at most 64 + 1 levels.
        assert len(np.unique(_gray(files["lowres"][i]))) <= 65
        assert _sharpness(files["blur"][i]) < 0.5 * _sharpness(clean[i])
        # thick strokes: two MNIST pixels wider, so far more ink; thin: far less.
        assert _ink_area(files["thick"][i]) > 1.5 * _ink_area(clean[i])
        assert _ink_area(files["thin"][i]) < 0.7 * _ink_area(clean[i])
        noisy = _gray(files["salt_pepper"][i])
        border = np.concatenate([noisy[0], noisy[-1]])
        assert 0.02 < (border == 0).mean() < 0.08 and (border == 255).mean() > 0.9
        paper = _gray(files["paper"][i])
        border = np.concatenate([paper[0], paper[-1], paper[:, 0], paper[:, -1]])
        assert 100 < np.median(border) < 250 and border.std() > 5  # light, uneven paper
    assert all(data[:2] == b"\xff\xd8" for data in files["jpeg"])  # JPEG files...
    with Image.open(io.BytesIO(files["jpeg"][0])) as image:
        # ... at quality 10: Pillow estimates the quality from the quantisation tables.
        assert max(image.quantization[0]) > 100
    assert all(data[:4] == b"\x89PNG" for name in DEGRADATIONS if name != "jpeg"
               for data in files[name])


def test_sample_is_seeded_sorted_and_bounded():
    assert np.array_equal(sample(5, 100, seed=1), sample(5, 100, seed=1))
    assert not np.array_equal(sample(5, 100, seed=1), sample(5, 100, seed=2))
    chosen = sample(5, 100)
    assert len(set(chosen)) == 5 and np.all(np.diff(chosen) > 0) and chosen.max() < 100
    assert np.array_equal(sample(200, 100), np.arange(100))


def test_salt_and_pepper_digit_is_cropped_like_the_clean_one(mnist):
    """The same picture with and without 10 % impulse noise: the noise is median filtered away,
    so the crop (and the 28x28 result) stays that of the clean digit."""
    for digit in mnist.test.images[:N]:
        picture = 255 - np.asarray(Image.fromarray(digit).resize((84, 84), Image.BICUBIC))
        page = np.full((120, 120), 255, np.uint8)
        page[18:102, 18:102] = picture
        rng = np.random.default_rng(0)
        noisy = page.copy()
        hit = rng.random(page.shape) < 0.10
        noisy[hit] = np.where(rng.random(hit.sum()) < 0.5, 0, 255)
        clean, denoised = to_mnist(page), to_mnist(noisy)
        assert np.abs(np.array(_ink_box(denoised > 0.1)) - _ink_box(clean > 0.1)).max() <= 1
        assert _similarity(clean, denoised) > 0.75


def test_a_speck_away_from_the_digit_does_not_widen_the_crop(mnist):
    digit = mnist.test.images[0]
    page = np.full((100, 100), 255, np.uint8)
    page[20:76, 20:76] = 255 - np.asarray(Image.fromarray(digit).resize((56, 56)))
    specked = page.copy()
    specked[95:97, 2:4] = 0  # a dust speck in the corner: too few pixels to be impulse noise
    assert np.abs(to_mnist(specked) - to_mnist(page)).max() < 1e-6


def test_digit_on_textured_paper_keeps_its_polarity(mnist, files):
    """Grey ink on uneven paper always comes out as white ink on black, with a clean background
    round the digit, and mostly close to the digit's clean picture (a dark blotch of the paper
    beside a thin digit may join its crop: 1 of these 12)."""
    close = 0
    for i in range(N):
        on_paper = to_mnist(open_image(files["paper"][i], "paper"))
        clean = to_mnist(open_image(files["clean"][i], "clean"))
        # Mostly black with some bright ink: a flipped polarity would be mostly bright paper.
        assert np.median(on_paper) == 0 and 0.02 < (on_paper > 0.5).mean() < 0.3
        close += _similarity(on_paper, clean) > 0.7
    assert close >= N - 1


def test_dimly_lit_paper_is_still_paper(mnist):
    """Paper darker than mid-grey (a badly lit photo) with darker ink: the ink is what lies
    farther from the paper's level, so the polarity holds."""
    digit = mnist.test.images[1].astype(np.float64)
    page = np.full((60, 60), 110.0)
    page[16:44, 16:44] *= 1.0 - 0.8 * digit / 255.0
    result = to_mnist(page.astype(np.uint8))
    assert _similarity(result, to_mnist(255 - np.pad(digit, 16).astype(np.uint8))) > 0.95


def test_thin_pen_lines_are_not_taken_for_noise():
    """A drawing in 1 px lines has no isolated pixels, so it is not median filtered (which would
    erase it)."""
    canvas = np.full((200, 200), 255, np.uint8)
    for i in range(150):
        canvas[25 + i, 100 + i // 3] = 0  # a thin, slightly slanted '1'
    result = to_mnist(canvas)
    rows, bottom, _, _ = _ink_box(result > 0)
    assert bottom - rows + 1 == BOX
