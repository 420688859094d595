"""Test digits the way real scans go wrong: a reproducible degraded test set.

Each MNIST test digit is drawn as a picture a user would feed the tool (dark ink on white paper at
:data:`SCALE` times MNIST's resolution, with a margin), then degraded one way and encoded as an
image file (PNG, or JPEG for ``jpeg``). The files go through :func:`lenet_embed.preprocess.to_mnist`
like any query, so the set measures preprocessing and model together. Everything is drawn from a
``numpy`` generator seeded per (seed, degradation), so the same seed gives the same bytes.

The training augmentation (``lenet_embed.training``) imitates these degradations with its own
random draws and parameter ranges, on 28x28 arrays in TensorFlow; nothing here is used to train.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# A scan resolution: one MNIST pixel becomes SCALE x SCALE picture pixels.
SCALE = 3
# The white margin around the digit's 28x28 frame, in picture pixels, drawn per picture.
MARGIN = (4, 24)
DEFAULT_SEED = 20261126


@dataclass(frozen=True)
class Degradation:
    """One way a scan goes wrong: a name, what it does (README), and the function doing it."""

    name: str
    description: str
    # (picture as float 0..255, dark ink on light, generator) -> degraded picture, same scale.
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    format: str = "PNG"
    quality: int | None = None


def _pil(picture: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(picture), 0, 255).astype(np.uint8))


def _lowres(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 sensor grid aimed at the digit (a square round its ink box, 10 % margin), each cell
    the mean of the light it sees, blown back up to the picture's size as blocks."""
    ink = picture < 128
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    height, width = picture.shape
    side = min(int(max(rows[-1] - rows[0], cols[-1] - cols[0]) * 1.2) + 1, height, width)
    # Centred on the ink, moved inside the picture where the margin is narrower than 10 %.
    top = int(np.clip((rows[0] + rows[-1] - side) // 2, 0, height - side))
    left = int(np.clip((cols[0] + cols[-1] - side) // 2, 0, width - side))
    page = _pil(picture)
    box = (left, top, left + side, top + side)
    grid = page.resize((8, 8), Image.Resampling.BOX, box=box)
    page.paste(grid.resize((side, side), Image.Resampling.NEAREST), (left, top))
    return np.asarray(page, dtype=np.float64)


def _blur(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma 1.5 MNIST pixels (an out-of-focus camera)."""
    blurred = _pil(picture).filter(ImageFilter.GaussianBlur(1.5 * SCALE))
    return np.asarray(blurred, dtype=np.float64)


def _salt_pepper(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """10 % of the pixels set to black or white (half each): dust and sensor dropouts."""
    hit = rng.random(picture.shape) < 0.10
    out = picture.copy()
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0.0, 255.0)
    return out


def _thick(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes 2 MNIST pixels thicker (dark ink grown by one MNIST pixel each side: a felt pen)."""
    grown = _pil(picture).filter(ImageFilter.MinFilter(2 * SCALE + 1))
    return np.asarray(grown, dtype=np.float64)


def _thin(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes about 1.3 MNIST pixels thinner (ink eroded by 2/3 of an MNIST pixel each side: a
    fine pen)."""
    eroded = _pil(picture).filter(ImageFilter.MaxFilter(2 * (2 * SCALE // 3) + 1))
    return np.asarray(eroded, dtype=np.float64)


def _paper(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey ink on textured, unevenly lit paper: paper brightness 160-230, a lighting gradient of
    20-50 levels across the picture, blotches (sigma 15) and grain (sigma 8); the ink absorbs
    60-85 % of the light."""
    height, width = picture.shape
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(20, 50) * ((np.cos(angle) * xx + np.sin(angle) * yy) - 0.5)
    blotches = Image.fromarray(rng.normal(0, 15, (6, 6)).astype(np.float32))
    blotches = np.asarray(blotches.resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 8, picture.shape)
    paper = rng.uniform(160, 230) + gradient + blotches + grain
    ink = 1.0 - picture / 255.0
    return paper * (1.0 - rng.uniform(0.6, 0.85) * ink)


def _unchanged(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return picture


DEGRADATIONS: dict[str, Degradation] = {
    d.name: d
    for d in (
        Degradation("clean", "the picture itself, no degradation (the baseline)", _unchanged),
        Degradation("lowres", "8x8 sensor grid over the digit, blown back up in blocks",
                    _lowres),
        Degradation("blur", "Gaussian blur, sigma 1.5 MNIST px", _blur),
        Degradation("jpeg", "saved as JPEG at quality 10", _unchanged, "JPEG", 10),
        Degradation("salt_pepper", "10 % of pixels black or white", _salt_pepper),
        Degradation("thick", "strokes 2 MNIST px thicker", _thick),
        Degradation("thin", "strokes about 1.3 MNIST px thinner", _thin),
        Degradation("paper", "grey ink on textured, unevenly lit paper", _paper),
    )
}


def picture_of(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a 28x28 MNIST digit (white on black, uint8) as a scan: dark ink on white paper,
    enlarged :data:`SCALE` times (bicubic), with a random margin on each side."""
    side = digit.shape[0] * SCALE
    big = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)
    top, bottom, left, right = rng.integers(MARGIN[0], MARGIN[1] + 1, size=4)
    page = np.full((side + top + bottom, side + left + right), 255.0)
    page[top : top + side, left : left + side] = np.asarray(big, dtype=np.float64)
    return page


def degrade(digits: np.ndarray, name: str, seed: int = DEFAULT_SEED) -> list[bytes]:
    """The image files (bytes) of ``digits`` (N, 28, 28 uint8) drawn as scans and degraded by
    the degradation ``name``; the same seed gives the same bytes."""
    degradation = DEGRADATIONS[name]
    rng = np.random.default_rng([seed, list(DEGRADATIONS).index(name)])
    files = []
    for digit in digits:
        picture = degradation.apply(picture_of(digit, rng), rng)
        out = io.BytesIO()
        options = {"quality": degradation.quality} if degradation.quality else {}
        _pil(picture).save(out, degradation.format, **options)
        files.append(out.getvalue())
    return files


def sample(count: int, total: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Which ``count`` of ``total`` test digits the degraded set uses (sorted, seeded)."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
