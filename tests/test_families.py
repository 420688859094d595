"""The picture families of the robustness suite (lenet_embed/families.py): each is reproducible by
seed, decodes as the image file it claims to be, draws what its description says, and the
held-out families are named; the scoring in ``evaluate`` counts refusals as wrong."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lenet_embed.calibration import UNSEARCHED
from lenet_embed.evaluate import family_top1
from lenet_embed.families import FAMILIES, HELD_OUT, family_files, font_files

N = 8


@pytest.fixture(scope="module")
def test_digits(mnist):
    return mnist.test.images[:N], mnist.test.labels[:N]


@pytest.fixture(scope="module")
def files(test_digits) -> dict[str, list[bytes]]:
    digits, labels = test_digits
    return {name: family_files(digits, labels, name, seed=3) for name in FAMILIES}


def _picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_every_family_is_reproducible_and_decodes(files, test_digits):
    digits, labels = test_digits
    for name, family in FAMILIES.items():
        assert family_files(digits, labels, name, seed=3) == files[name], name
        assert family_files(digits, labels, name, seed=4) != files[name], name
        pictures = [_picture(data) for data in files[name]]
        assert {p.format for p in pictures} == {family.format}, name
        for picture in pictures:
            gray = np.asarray(picture.convert("L"), dtype=np.float64)
            assert gray.max() - gray.min() > 20, name  # every picture has visible ink


def test_coarse_grids_fill_their_frame_at_both_polarities(files):
    borders, sizes = [], []
    for data in files["coarse_grid"]:
        gray = np.asarray(_picture(data).convert("L"), dtype=np.float64)
        sizes.append(max(gray.shape))
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        borders.append(float(np.median(border)) > 128)
        # The ink reaches the frame: some border pixel is far from the border's usual level.
        assert np.abs(border - np.median(border)).max() > 40
    assert all(24 <= size <= 200 for size in sizes)
    assert True in borders and False in borders  # dark-on-light and light-on-dark both drawn


def test_colour_is_rgb_and_fonts_come_from_a_package(files):
    assert {_picture(data).mode for data in files["colour"]} == {"RGB"}
    assert font_files() and all("matplotlib" in str(path) for path in font_files())


def test_held_out_families_are_named():
    assert set(HELD_OUT) == {"colour", "font", "chalk"}
    assert all(FAMILIES[name].held_out for name in HELD_OUT)


def test_family_top1_counts_refusals_as_wrong(search_index, mnist, monkeypatch):
    count, figures = family_top1(search_index, mnist.test, k=5, count=20)
    assert count == 20 and set(figures) == set(FAMILIES)
    assert all(0.0 <= value <= 1.0 for value in figures.values())
    # The same answers with every verdict a refusal: every family scores 0.
    real = search_index.query
    monkeypatch.setattr(search_index, "query", lambda queries, k: [
        replace(result, verdict=UNSEARCHED) for result in real(queries, k)])
    _, refused = family_top1(search_index, mnist.test, k=5, count=20)
    assert set(refused.values()) == {0.0}


def _aspect(gray: np.ndarray) -> float:
    ink = gray > 0.3 * gray.max()
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return (rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1)


@pytest.mark.parametrize("name", ["loose_crop", "low_contrast", "colour"])
def test_families_that_only_rescale_keep_the_digits_shape(name, test_digits, files):
    """A picture family scales the digit without distorting it: the ink's aspect ratio is the
    digit's (a square resize once turned every loose crop's "1" into a block)."""
    digits, _ = test_digits
    for digit, data in zip(digits, files[name], strict=True):
        gray = np.asarray(_picture(data).convert("L"), dtype=np.float64)
        if np.median(np.concatenate([gray[0], gray[-1]])) > 128:
            gray = 255.0 - gray  # dark ink on light paper
        gray = gray - np.median(gray)
        assert _aspect(gray) == pytest.approx(_aspect(digit.astype(np.float64)), rel=0.2), name
