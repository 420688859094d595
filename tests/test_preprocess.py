"""Bringing any picture to the MNIST convention: polarity, image modes and formats, size,
centring, the 20 px box, errors, and exactness for MNIST digits saved as PNG."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from lenet_embed import LenetEmbedError, to_mnist
from lenet_embed.embed import KerasEncoder
from lenet_embed.preprocess import (
    BLANK_CONTRAST,
    BOX,
    SIDE,
    STRONG_LEVEL,
    _near_strong,
    scale_pixels,
    to_batch,
)


def _center_of_mass(image: np.ndarray) -> tuple[float, float]:
    total = image.sum()
    rows = image.sum(axis=1) @ np.arange(image.shape[0]) / total
    cols = image.sum(axis=0) @ np.arange(image.shape[1]) / total
    return float(rows), float(cols)


def _ink_box(image: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero((image > 0).any(axis=1))
    cols = np.flatnonzero((image > 0).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _seven(height: int = 120, width: int = 90, top: int = 20, left: int = 10) -> np.ndarray:
    """A synthetic white-on-black '7' (thick strokes) on a canvas larger than 28x28."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    canvas[top : top + 8, left : left + 50] = 255  # the bar
    for i in range(70):  # the diagonal stroke
        col = left + 50 - i * 30 // 70
        canvas[top + i : top + i + 8, max(col - 8, 0) : col] = 255
    return canvas


@pytest.fixture(scope="module")
def white_on_black() -> np.ndarray:
    return _seven()


@pytest.fixture(scope="module")
def reference(white_on_black) -> np.ndarray:
    return to_mnist(white_on_black)


def test_result_is_mnist_shaped(reference):
    assert reference.shape == (SIDE, SIDE)
    assert reference.dtype == np.float32
    assert reference.min() >= 0.0 and reference.max() <= 1.0
    assert reference.max() == pytest.approx(1.0, abs=0.05)
    # MNIST: dark background all round the frame.
    border = np.concatenate([reference[0], reference[-1], reference[:, 0], reference[:, -1]])
    assert border.max() == 0.0


def test_polarity_does_not_matter(white_on_black, reference):
    black_on_white = 255 - white_on_black
    assert np.abs(to_mnist(black_on_white) - reference).max() < 1e-6


def test_off_centre_digit_is_centred_and_boxed(white_on_black):
    # Same digit pushed into a corner of a bigger, non-square canvas.
    corner = np.zeros((300, 200), dtype=np.uint8)
    corner[: white_on_black.shape[0], : white_on_black.shape[1]] = white_on_black
    result = to_mnist(corner)
    rows, cols = _center_of_mass(result)
    assert abs(rows - (SIDE - 1) / 2) <= 0.6 and abs(cols - (SIDE - 1) / 2) <= 0.6
    assert max(_ink_box(result)) == BOX


@pytest.mark.parametrize("shape", [(10, 60), (60, 10), (45, 45)])
def test_longer_side_is_20_and_aspect_kept(shape):
    canvas = np.zeros((100, 100), dtype=np.uint8)
    height, width = shape
    canvas[7 : 7 + height, 13 : 13 + width] = 200
    result = to_mnist(canvas)
    box_h, box_w = _ink_box(result)
    assert max(box_h, box_w) == BOX
    expected_short = round(min(height, width) * BOX / max(height, width))
    assert abs(min(box_h, box_w) - expected_short) <= 1
    assert (box_h >= box_w) == (height >= width)


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.7, 4.3])
def test_any_size_black_on_white(white_on_black, reference, factor):
    height, width = white_on_black.shape
    size = (round(width * factor), round(height * factor))
    image = Image.fromarray(255 - white_on_black).resize(size, Image.Resampling.BILINEAR)
    result = to_mnist(image)
    assert result.shape == (SIDE, SIDE)
    assert max(_ink_box(result)) == BOX
    assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.9


def _rgba_transparent(ink: np.ndarray) -> Image.Image:
    """Black ink whose background is fully transparent (and white-ish in its RGB channels
    nowhere: RGB is all black, so only compositing on white can reveal the digit)."""
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[..., 3] = ink
    return Image.fromarray(rgba)


def _la_transparent(ink: np.ndarray) -> Image.Image:
    black = Image.fromarray(np.zeros_like(ink))
    return Image.merge("LA", [black, Image.fromarray(ink)])


def _palette_with_transparency(ink: np.ndarray) -> Image.Image:
    """Entry 0 (background) and entry 1 (ink) are both black; only entry 0's transparency,
    composited on white, makes the digit visible."""
    height, width = ink.shape
    image = Image.frombytes("P", (width, height), (ink > 0).astype(np.uint8).tobytes())
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    return image


MODES = {
    "L": lambda ink: Image.fromarray(255 - ink),
    "RGB": lambda ink: Image.fromarray(255 - ink).convert("RGB"),
    "P": lambda ink: Image.fromarray(255 - ink).convert("P"),
    "P-transparent": _palette_with_transparency,
    "I;16": lambda ink: Image.fromarray((255 - ink).astype(np.uint16) * 257),
    "I": lambda ink: Image.fromarray((255 - ink).astype(np.int32)),
    "RGBA-transparent": _rgba_transparent,
    "LA-transparent": _la_transparent,
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes(white_on_black, reference, mode):
    image = MODES[mode](white_on_black)
    assert image.mode == mode.split("-")[0]
    assert np.abs(to_mnist(image) - reference).max() < 1e-6


@pytest.mark.parametrize("suffix", [".png", ".gif", ".bmp", ".tif", ".webp"])
def test_lossless_files(white_on_black, reference, tmp_path, suffix):
    path = tmp_path / f"digit{suffix}"
    Image.fromarray(255 - white_on_black).save(path, **({"lossless": True} if suffix == ".webp"
                                                        else {}))
    assert np.abs(to_mnist(path) - reference).max() < 1e-6
    assert np.abs(to_mnist(str(path)) - reference).max() < 1e-6


def test_jpeg_is_close(white_on_black, reference, tmp_path):
    path = tmp_path / "digit.jpg"
    Image.fromarray(255 - white_on_black).convert("RGB").save(path, quality=90)
    result = to_mnist(path)
    assert np.abs(result - reference).max() < 0.1
    assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(white_on_black, reference, tmp_path, suffix):
    # A phone stores the sensor's pixels turned and says so in EXIF (Orientation 6: turn the
    # stored picture 90 degrees clockwise to show it); the digit must come out upright.
    path = tmp_path / f"turned{suffix}"
    stored = Image.fromarray(255 - white_on_black).convert("RGB").rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    result = to_mnist(path)
    assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.99
    assert np.corrcoef(to_mnist(stored).ravel(), reference.ravel())[0, 1] < 0.9


@pytest.mark.parametrize("resolutions", [1, 2, 6])
def test_large_jpeg2000_is_decoded_reduced_and_close(white_on_black, reference, tmp_path,
                                                     resolutions):
    # A 2880x2160 JPEG 2000 has its codestream decoded at a quarter of the side when it holds
    # enough resolution levels (6, the default); with fewer (1: none to drop, 2: fewer than
    # asked) it is decoded at full size and then reduced. Either way, the same digit.
    big = np.kron(255 - white_on_black, np.ones((24, 24), dtype=np.uint8))
    path = tmp_path / "digit.jp2"
    Image.fromarray(big).save(path, num_resolutions=resolutions)
    result = to_mnist(path)
    assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.98


def test_float_array_in_unit_range(white_on_black, reference):
    assert np.abs(to_mnist(white_on_black / 255.0) - reference).max() < 1e-6
    assert np.abs(to_mnist(white_on_black[..., None]) - reference).max() < 1e-6


def test_mnist_digit_as_png_embeds_exactly(mnist, trained, tmp_path):
    pixels = mnist.test.images[:4]
    paths = []
    for i, digit in enumerate(pixels):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(digit).save(paths[-1])
    for path, digit in zip(paths, pixels, strict=True):
        assert np.array_equal(to_mnist(path), scale_pixels(digit))
    encoder = KerasEncoder.load(trained.encoder)
    from_files = encoder.embed(to_batch(paths))
    from_arrays = encoder.embed(scale_pixels(pixels))
    assert from_files.shape == (len(paths), 84)
    assert np.array_equal(from_files, from_arrays)


def test_rendered_digits_are_recognised_like_the_originals(mnist, search_index):
    """Real test digits, enlarged, inverted to black-on-white, RGB and pushed off-centre, find
    neighbours of their own label about as often as the originals do."""
    digits, labels = mnist.test.images[:60], mnist.test.labels[:60]
    rendered = []
    for digit in digits:
        big = Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (240, 180), "white")
        canvas.paste(big.convert("RGB"), (110, 15))
        rendered.append(canvas)
    original = [n[0].label for n in search_index.search(digits, k=1)]
    redrawn = [n[0].label for n in search_index.search(rendered, k=1)]
    accuracy_original = np.mean(np.array(original) == labels)
    accuracy_redrawn = np.mean(np.array(redrawn) == labels)
    assert accuracy_redrawn >= accuracy_original - 0.1


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("value", "size"), [(0, (40, 30)), (97, (40, 30)), (255, (40, 30)),
                                             (255, (28, 28))])
def test_blank_image_raises(value, size):
    with pytest.raises(LenetEmbedError, match="blank"):
        to_mnist(np.full(size, value, dtype=np.uint8))


def test_blank_dark_28x28_image_raises(tmp_path):
    path = tmp_path / "black.png"
    Image.new("L", (28, 28), 0).save(path)
    with pytest.raises(LenetEmbedError, match="blank"):
        to_mnist(path)


def test_blank_file_raises_naming_it(tmp_path):
    path = tmp_path / "white.png"
    Image.new("RGB", (50, 40), "white").save(path)
    with pytest.raises(LenetEmbedError, match=re.escape(str(path))):
        to_mnist(path)


def test_non_image_file_raises(tmp_path):
    path = tmp_path / "digit.png"
    path.write_text("definitely not a PNG\n")
    with pytest.raises(LenetEmbedError) as info:
        to_mnist(path)
    assert str(path) in str(info.value) and "not a readable image" in str(info.value)


def test_missing_file_and_folder_raise(tmp_path):
    with pytest.raises(LenetEmbedError, match="no such file"):
        to_mnist(tmp_path / "nope.png")
    with pytest.raises(LenetEmbedError, match="folder"):
        to_mnist(tmp_path)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.zeros((0, 5)),
                                 np.full((30, 30), np.nan), 42])
def test_unusable_inputs_raise(bad):
    with pytest.raises(LenetEmbedError):
        to_mnist(bad)


def test_to_batch_shapes(mnist):
    digits = mnist.test.images[:3]
    expected = scale_pixels(digits)
    assert np.array_equal(to_batch(digits), expected)
    assert np.array_equal(to_batch(digits[..., None]), expected)
    assert np.array_equal(to_batch(list(digits)), expected)
    assert np.array_equal(to_batch(digits[0]), expected[:1])
    assert to_batch([]).shape == (0, SIDE, SIDE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(2, 160), width=st.integers(2, 160), seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["noise", "blocks", "gradient", "one_corner", "frame", "stripes"]),
    low=st.integers(0, 230), contrast=st.integers(int(BLANK_CONTRAST) + 1, 255),
    invert=st.booleans(),
)
def test_any_picture_with_contrast_reaches_the_model(height, width, seed, kind, low, contrast,
                                                     invert):
    """The promise of to_mnist: it normalises and never decides what is a digit. Every picture
    whose levels span more than BLANK_CONTRAST comes back in digit form, with ink in it —
    whatever its shape, where its ink lies (touching the frame too) and its polarity; "not a
    digit" is the calibrated model's answer."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        pattern = rng.random((height, width))
    elif kind == "blocks":
        cells = rng.random((max(1, height // 8), max(1, width // 8)))
        pattern = np.kron(cells, np.ones((8, 8)))[:height, :width]
        pattern = np.pad(pattern, ((0, height - pattern.shape[0]), (0, width - pattern.shape[1])))
    elif kind == "gradient":
        pattern = np.add.outer(np.arange(height), np.arange(width)) / (height + width)
    elif kind == "one_corner":
        pattern = np.zeros((height, width))
        pattern[: max(1, height // 3), : max(1, width // 3)] = 1.0
    elif kind == "frame":
        pattern = np.ones((height, width))
        pattern[1:-1, 1:-1] = 0.0
    else:
        pattern = (np.arange(width) % 4 < 2)[None, :].repeat(height, axis=0).astype(float)
    pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-9)
    if invert:
        pattern = 1.0 - pattern
    top = min(255, low + contrast)
    picture = np.round(low + pattern * (top - low)).astype(np.uint8)
    if np.percentile(picture, 99.9) - np.percentile(picture, 0.1) < BLANK_CONTRAST:
        return  # a few bright pixels in a large picture: below the picture's own ends
    out = to_mnist(picture, name="pattern.png")
    assert out.shape == (SIDE, SIDE) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() > 0.0


def test_only_a_blank_picture_is_refused():
    """A uniform picture, or one whose levels move less than BLANK_CONTRAST (a page with sensor
    noise), is bad input with one line; a faint digit just above it is not."""
    rng = np.random.default_rng(0)
    for picture in (np.full((64, 64), 200, np.uint8),
                    np.clip(rng.normal(200, 2, (64, 64)), 0, 255).astype(np.uint8)):
        with pytest.raises(LenetEmbedError, match="blank"):
            to_mnist(picture, name="grey.png")
    faint = np.full((64, 64), 200, np.uint8)
    faint[20:44, 30:34] = 200 - int(BLANK_CONTRAST) - 8
    assert to_mnist(faint).max() == pytest.approx(1.0)


def _with_shadow(digit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A digit dark on light paper at 3-6x, and the same page with a shadow's half-plane (its
    edge anywhere near the middle, 60-85 % of the light) across it."""
    scale = int(rng.integers(3, 7))
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale),
                                                   Image.Resampling.BICUBIC), dtype=np.float64)
    page = np.pad(255.0 - 0.85 * big, 10 * scale, constant_values=255.0)
    height, width = page.shape
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    angle, edge = rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.15)
    shadow = np.where(np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) > edge,
                      rng.uniform(0.6, 0.85), 1.0)
    return page, page * shadow


def test_a_shadow_across_the_page_is_mostly_not_ink(mnist):
    """The background step's promise, measured on 40 drawn shadows: a plateau of another level
    (a shadow's half-plane, wider than the opening) is background, so the digit comes out nearly
    as it does without the shadow (its inked pixels overlap by 70 % or more) in at least 80 % of
    them. (The background's bilinear edge leaves a faint band along the shadow's edge, which
    now and then joins the crop: hence a rate, not every picture. A minimum filter instead of
    the opening kept the digit in about half.)"""
    rng = np.random.default_rng(20261207)
    overlaps = []
    for row in rng.choice(len(mnist.test), 40, replace=False):
        plain, shaded = (to_mnist(page) > 0.3 for page in _with_shadow(mnist.test.images[row],
                                                                          rng))
        overlaps.append((plain & shaded).sum() / (plain | shaded).sum())
    assert np.mean(np.array(overlaps) >= 0.7) >= 0.8
    assert np.median(overlaps) >= 0.85


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       share=st.floats(0.0, 1.0), box=st.integers(1, 300))
def test_faint_ink_is_only_ever_dropped_and_strong_ink_never(height, width, seed, share, box):
    """_near_strong's promise on any stretched picture: a pixel keeps its value or becomes 0,
    and every pixel of strong ink keeps its value (the strong ink's extent, and so the grid the
    reach is measured on, of any size up to the picture's)."""
    rng = np.random.default_rng(seed)
    ink = rng.random((height, width)) * (rng.random((height, width)) < share)
    ink[box:, :] = 0.0
    ink[:, box:] = 0.0
    out = _near_strong(ink)
    assert out.shape == ink.shape
    assert np.all((out == ink) | (out == 0.0))
    strong = ink >= STRONG_LEVEL
    assert np.array_equal(out[strong], ink[strong])


def test_a_soft_stroke_stays_whole():
    """A stroke's soft edge (a blurred or smoothly upscaled picture) lies next to its core: none
    of it is dropped, however far the blur spreads it."""
    for radius in (1, 4, 12):
        stroke = Image.new("L", (200, 200), 0)
        stroke.paste(255, (90, 20, 110, 180))
        ink = np.asarray(stroke.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
        ink = ink / ink.max()
        kept = _near_strong(ink)
        assert kept[ink > 0.05].min() > 0.0, radius


def _on_ruled_paper(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit dark on white at 3-5x with pale ruled lines (a third of the ink's depth, 1-3 px,
    every half digit height or so) across all of the page."""
    scale = int(rng.integers(3, 6))
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale),
                                                   Image.Resampling.BICUBIC), dtype=np.float64)
    ink = np.pad(big / 255.0, 8 * scale)
    spacing = rng.uniform(0.4, 0.8) * 20 * scale
    rows = (np.arange(ink.shape[0]) + rng.uniform(0, spacing)) % spacing < rng.integers(1, 4)
    paper = np.where(rows[:, None], 250.0 - rng.uniform(60, 80), 250.0) * np.ones(ink.shape)
    return paper * (1.0 - ink) + 40.0 * ink


def test_ruled_lines_away_from_the_strokes_are_not_ink(mnist):
    """The faint-ink step's promise, on 40 drawn pages: lines fainter than the ink that run
    across the page leave no ink (nothing above 0.05) more than 4 px from the digit's strong ink
    (above 0.5) in at least 90 % of them. (Without the step, 19 of these 40 pages kept such
    ink, up to 0.24.)"""
    rng = np.random.default_rng(20261208)
    clean = []
    for row in rng.choice(len(mnist.test), 40, replace=False):
        out = to_mnist(_on_ruled_paper(mnist.test.images[row], rng))
        strong = Image.fromarray(((out > 0.5) * 255).astype(np.uint8))
        near = np.asarray(strong.filter(ImageFilter.MaxFilter(9))) > 0
        clean.append(not (out[~near] > 0.05).any())
    assert np.mean(clean) >= 0.9
