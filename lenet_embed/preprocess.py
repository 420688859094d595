"""Turn any picture of a digit into what the network was trained on: the MNIST convention.

MNIST digits are white ink on black, the ink's bounding box scaled so its longer side is 20 px,
pasted into a 28x28 frame so the centre of mass sits at the centre. Every query path and
``build-index --images`` go through :func:`to_mnist`, so a picture is seen the same way wherever
it comes from.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import LenetEmbedError
from .files import open_regular

SIDE = 28
BOX = 20
# A 28x28 picture is in MNIST form when its margin stays below a quarter of this (on 0..255) and
# its ink reaches twice this (see _drawn_as_mnist).
INK_THRESHOLD = 32.0

ImageLike = str | os.PathLike | Image.Image | np.ndarray


# The decode budget, one for every path (query, the API, build-index --images, add, the
# service): an image is refused from its header, before any pixel is decoded, when it has more
# pixels than this. Larger allowed images are reduced while or right after decoding, since the
# digit ends up 20 px tall anyway.
MAX_PIXELS = 4096 * 4096
WORK_SIDE = 1024
# The budget of an image whose format Pillow decodes in Python (an RLE-compressed BMP).
PY_DECODER_PIXELS = 1024 * 1024
_LIMIT = f"{MAX_PIXELS / 1e6:.1f} megapixels (e.g. 4096x4096)"


class ImageTooLarge(LenetEmbedError):
    """An image with more pixels than :data:`MAX_PIXELS`."""


def check_pixels(width: int, height: int, name: str) -> None:
    """Refuse an image of more than :data:`MAX_PIXELS` pixels."""
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(
            f"{name}: image is {width}x{height} px, over the limit of {_LIMIT}; scale it down"
        )


def open_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (a path, or the file's bytes) into a loaded PIL image.

    Only the first frame is read (GIF), EXIF orientation is applied, and ``name`` (default: the
    path) names the file in errors. An image over :data:`MAX_PIXELS` is refused from its header
    (:class:`ImageTooLarge`); a large JPEG or JPEG 2000 file is decoded at a reduced scale. Raises
    :class:`LenetEmbedError` for anything that is not a readable image; a path that is not a
    regular file (a FIFO, a device, a folder) is refused before it is opened
    (:func:`.files.open_regular`), so no read can block.
    """
    name = name or str(source)
    if isinstance(source, bytes) and not source:
        raise LenetEmbedError(f"{name}: the file is empty")
    try:
        with warnings.catch_warnings():
            # The budget above is checked first; Pillow's own bomb warning would only be noise,
            # and so are its warnings about damaged files ("Corrupt EXIF data", TIFF tags larger
            # than the file): a file decodes or raises the one error below.
            warnings.simplefilter("ignore")
            with (io.BytesIO(source) if isinstance(source, bytes)
                  else _File(source, name)) as fh, Image.open(fh) as opened:
                check_pixels(*opened.size, name)
                _check_python_decoder(opened, name)
                opened.seek(0)
                pil = _shrink(_decode_reduced(opened, fh))
                # In place: the decoded image is ours, and a copy of it per query cost more
                # than reading its orientation.
                ImageOps.exif_transpose(pil, in_place=True)
    except FileNotFoundError:
        raise LenetEmbedError(f"{name}: no such file") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{name}: image is far over the limit of {_LIMIT}; scale it down"
                            ) from None
    except LenetEmbedError:
        raise
    except Exception as exc:
        # Pillow's plugins fail on damaged files in many ways: OSError (UnidentifiedImageError),
        # SyntaxError, ValueError, EOFError, MemoryError, but also TypeError, KeyError,
        # struct.error... (tests/integration/test_hardening.py fuzzes them). The file is not
        # readable.
        raise LenetEmbedError(
            f"{name}: not a readable image ({exc.__class__.__name__}); "
            "give a PNG, JPEG, BMP or GIF file"
        ) from None
    return pil


def _check_python_decoder(opened: Image.Image, name: str) -> None:
    """Refuse an image over :data:`PY_DECODER_PIXELS` whose pixels Pillow decodes in Python (an
    RLE-compressed BMP): at 4096x4096 that takes seconds of CPU where C decoders take
    milliseconds."""
    tiles = getattr(opened, "tile", None) or []
    if (opened.width * opened.height > PY_DECODER_PIXELS
            and any(tile[0] in Image.DECODERS for tile in tiles)):
        raise ImageTooLarge(
            f"{name}: image is {opened.width}x{opened.height} px in a {opened.format} encoding "
            f"decoded slowly; the limit for it is {PY_DECODER_PIXELS // 1024 ** 2} megapixel; "
            "save it as PNG or scale it down")


def _decode_reduced(opened: Image.Image, fh: IO[bytes]) -> Image.Image:
    """Load ``opened`` (read from ``fh``); a large JPEG or JPEG 2000 file at a reduced scale:
    JPEG by a power of two up to 8 (``draft``), JPEG 2000 by dropping resolution levels of its
    wavelet codestream, which cuts the decode of a 4096x4096 file from seconds to a fraction of
    one."""
    side = max(opened.size)
    if side <= WORK_SIDE:
        opened.load()
    elif opened.format == "JPEG":
        opened.draft(opened.mode, (WORK_SIDE, WORK_SIDE))
        opened.load()
    elif opened.format == "JPEG2000":
        # A codestream with fewer levels than asked for fails at once (OpenJPEG checks the
        # header first); it is then decoded at full size.
        levels = max(0, (side // WORK_SIDE).bit_length() - 1)
        opened.reduce = levels  # type: ignore[assignment,method-assign]
        try:
            opened.load()
        except OSError:
            fh.seek(0)
            with Image.open(fh) as again:
                again.load()
                return again.copy()
    else:
        opened.load()
    return opened


class _File(io.BufferedReader):
    """An image file whose ``read(n)`` never asks for more than the file still holds: Pillow
    skips the rest of a damaged PNG chunk by reading its declared length (up to 4 GB) at once,
    and a file's ``read(n)`` allocates ``n`` bytes before reading."""

    def __init__(self, path: str | os.PathLike, name: str) -> None:
        # A regular file only: a FIFO or a device would block the read for ever (see .files).
        super().__init__(open_regular(path, "an image file", name))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(self._size - self.tell(), 0))
        return super().read(size)


def _shrink(pil: Image.Image) -> Image.Image:
    """Reduce an image whose longer side is over :data:`WORK_SIDE` by a whole factor (a box
    filter), so that nothing after decoding works on more than about a megapixel."""
    side = max(pil.size)
    if side <= WORK_SIDE:
        return pil
    if pil.mode == "1":
        pil = pil.convert("L")
    elif pil.mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    elif pil.mode not in ("L", "LA", "RGB", "RGBA", "I", "F", "I;16"):
        pil = pil.convert("RGB")
    factor = -(-side // WORK_SIDE)
    try:
        # Image.reduce itself: a JPEG 2000 file's own ``reduce`` is its resolution setting.
        return Image.Image.reduce(pil, factor)
    except (ValueError, NotImplementedError):
        size = (max(1, pil.width // factor), max(1, pil.height // factor))
        return pil.resize(size, Image.Resampling.BOX)


# Grey levels (of 255) between a picture's faint and bright ends (the INK_TAIL quantiles) under
# which it is blank: sensor noise and JPEG ringing on an empty page stay below it, the faintest
# pencil the suite draws (25 levels) stays above.
BLANK_CONTRAST = 16.0


def to_mnist(image: ImageLike, name: str | None = None) -> np.ndarray:
    """Return ``image`` as a (28, 28) float32 array in [0, 1], white ink on black.

    ``image`` may be a path to any Pillow-readable file, a PIL image, or a 2-D array (uint8 in
    0..255 or float in 0..1). ``name`` names the image in errors (default: its path, or "image").

    The promise: this only *normalises*; it never decides what is a digit. Any picture whose
    levels span at least :data:`BLANK_CONTRAST` comes back as a digit-form array with ink in
    it, and "not a digit" is the calibrated model's answer (the bundle's
    out-of-distribution score), not this function's. Only a blank picture is refused. The steps,
    none of which assumes where the ink is:

    1. a 28x28 picture drawn as MNIST draws digits (a black margin round bright ink) is used as
       it is, so an MNIST digit saved as PNG embeds exactly like its array;
    2. impulse noise (salt and pepper) is median filtered;
    3. polarity: a border lighter than the middle of the picture's range means dark ink on light
       paper, which is inverted;
    4. the background is removed: a grey-level opening on a coarse grid (:func:`_background`),
       capped at the middle of the picture's levels, so uneven light and the plateaus of shadows
       flatten while ink, even ink that touches the frame, stays ink;
    5. the contrast is stretched: 0 at the background, 1 at the ink's bright end;
    6. faint ink far from strong ink is dropped (:func:`_near_strong`): ruled lines, a shadow's
       sliver or a page's edge are no strokes, while a stroke's soft edge (a blurred or coarse
       picture) stays whole;
    7. the crop keeps the ink's mass (pixels above :data:`INK_LEVEL`, stray specks cut off by
       blank rows dropped); the longer side becomes 20 px, centred by centre of mass in 28x28.
    """
    if name is None:
        name = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    ready = _mnist_bytes(image)
    if ready is not None and _drawn_as_mnist(ready):
        return scale_pixels(ready)  # the same values as the whole way below gives them
    gray = _to_gray(image, name)
    mnist_form = gray.shape == (SIDE, SIDE)
    if mnist_form and ready is None and _drawn_as_mnist(gray):  # (a file, a float array)
        return scale_pixels(gray)
    if not mnist_form:
        gray = _despeckle(gray)
    faint, bright = np.percentile(gray, [100 * INK_TAIL, 100 * (1 - INK_TAIL)])
    if bright - faint < BLANK_CONTRAST:
        raise LenetEmbedError(f"{name}: no digit found (the image is blank); draw or crop a digit")
    if float(np.median(_border(gray))) > (faint + bright) / 2:
        gray, faint, bright = 255.0 - gray, 255.0 - bright, 255.0 - faint
    # What the background leaves of the paper is its grain. Ink only ever lies above the
    # background, so what lies below it is grain alone: its root mean square is the grain's
    # spread (zero on clean paper and on smooth upscales), and NOISE_CUT of it is taken off.
    # The background never lies above the middle of the picture's levels: ink wider than the
    # opening (a marker filling a tight crop) still stands out from it, by half the range.
    background = np.minimum(_background(gray), (faint + bright) / 2)
    below = np.minimum(gray - background, 0.0)
    floor = NOISE_CUT * float(np.sqrt(np.mean(below**2)))
    ink = np.clip((gray - background - floor) / np.maximum(bright - background - floor, 1.0),
                  0.0, 1.0)
    ink = _near_strong(ink)
    mask = ink > INK_LEVEL
    if not mask.any():
        # Nothing stands out of the background and its grain (a picture that is all texture):
        # the picture stretched as it is, whose bright end is above INK_LEVEL by construction.
        ink = np.clip((gray - faint) / (bright - faint), 0.0, 1.0)
        mask = ink > INK_LEVEL
    weighted = np.where(mask, ink, 0.0)
    top, bottom = _span(weighted.sum(axis=1), mask.any(axis=1))
    left, right = _span(weighted.sum(axis=0), mask.any(axis=0))
    crop = ink[top : bottom + 1, left : right + 1]
    return _center(_fit_box(crop / max(float(crop.max()), 1e-6)))


# MNIST centres each digit in its 28x28 frame, so nearly all MNIST digits (98.8 % of the training
# split) and pictures drawn like them have a black margin this wide all round.
MNIST_MARGIN = 1


def _drawn_as_mnist(gray: np.ndarray) -> bool:
    """Whether a 28x28 picture is drawn as MNIST draws digits: a black margin (all but a stroke
    or two reaching it: MNIST's own digits touch the frame now and then) round ink that stands
    out from it. Such a picture is used as it is, so an MNIST digit embeds exactly like its
    array wherever it comes from; any other 28x28 picture goes the whole way."""
    margin = np.concatenate([gray[:MNIST_MARGIN].ravel(), gray[-MNIST_MARGIN:].ravel(),
                             gray[:, :MNIST_MARGIN].ravel(), gray[:, -MNIST_MARGIN:].ravel()])
    # At most a tenth of the margin inked (counted, not a percentile: this runs on every digit
    # added or queried, and np.percentile took most of its time).
    return (np.count_nonzero(margin >= INK_THRESHOLD / 4) * 10 <= margin.size
            and float(gray.max()) > INK_THRESHOLD * 2)


def _mnist_bytes(image: ImageLike) -> np.ndarray | None:
    """A 28x28 8-bit grayscale picture (PIL mode "L" or a uint8 array) as its uint8 array, read
    without a float copy; None for anything else."""
    if isinstance(image, Image.Image):
        if image.mode == "L" and image.size == (SIDE, SIDE):
            return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(SIDE, SIDE)
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (SIDE, SIDE):
        return image
    return None


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """Map 0..255 pixel values to float32 in [0, 1], exactly as training does."""
    return pixels.astype(np.float32) / np.float32(255.0)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map [0, 1] floats back to 0..255 bytes (the inverse of :func:`scale_pixels`)."""
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_gray(image: ImageLike, name: str) -> np.ndarray:
    """Decode to a float64 grayscale array on 0..255, alpha composited on white."""
    if isinstance(image, np.ndarray):
        return _array_to_gray(image, name)
    if isinstance(image, (str, os.PathLike)):
        pil = open_image(image, name)
    elif isinstance(image, Image.Image):
        check_pixels(*image.size, name)
        pil = _shrink(image)
    else:
        raise LenetEmbedError(
            f"cannot use a {type(image).__name__} as an image; give a path, PIL image or array"
        )
    if pil.width == 0 or pil.height == 0:
        raise LenetEmbedError(f"{name}: the image is empty (0 pixels)")
    return _pil_to_gray(pil)


def _pil_to_gray(pil: Image.Image) -> np.ndarray:
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(pil, dtype=np.float64)
        top = 65535.0 if pil.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if pil.mode == "F" and values.max() <= 1.0:
            top = 1.0
        return np.clip(values / top * 255.0, 0.0, 255.0)
    has_alpha = pil.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (
        pil.mode == "P" and "transparency" in pil.info
    )
    try:
        if has_alpha:
            rgba = pil.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            pil = Image.alpha_composite(white, rgba)
        elif pil.mode not in ("L", "RGB", "P", "1", "CMYK", "YCbCr"):
            pil = pil.convert("RGB")  # e.g. LAB or HSV, which convert("L") refuses
        return np.asarray(pil.convert("L"), dtype=np.float64)
    except ValueError as exc:
        raise LenetEmbedError(
            f"image in mode {pil.mode!r} cannot be converted to grayscale ({exc}); "
            "save it as PNG or JPEG"
        ) from None


def _array_to_gray(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise LenetEmbedError(f"{name}: expected a 2-D grayscale array, got shape {array.shape}")
    if array.size == 0:
        raise LenetEmbedError(f"{name}: the image is empty (0 pixels)")
    check_pixels(array.shape[1], array.shape[0], name)
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise LenetEmbedError(f"{name}: the array holds NaN or infinite values")
    if array.dtype.kind == "f" and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(values, 0.0, 255.0)


# Impulse noise (salt and pepper): a pixel this far (on 0..255) from all 8 of its neighbours is
# a speck no pen draws; when more than SPECKLE_FRACTION of the pixels are specks, the picture is
# median filtered. A clean picture, even with 1 px lines, has next to none (a line's pixels have
# neighbours along the line).
SPECK_CONTRAST = 64.0
SPECKLE_FRACTION = 0.002
SPECK_ROWS = 4
# The background is estimated on a grid of this many cells on the longer side, opened by a square
# of OPENING cells (see _background): a plateau under 5/16 of the picture's longer side is taken
# for ink. Chosen on the tuning families (docs/guide/evaluate.md: coarse grids and markers against
# photos' shadows), never on the held-out ones.
GRID = 16
OPENING = 5
# A pixel of the stretched picture (background 0, the ink's bright end 1) counts as ink above this.
INK_LEVEL = 0.35
# Strong ink reaches this level of the stretched picture; fainter ink is kept only within
# NEAR_SHARE of the strong ink's extent (its bounding box's longer side) of strong ink (see
# _near_strong). Chosen on the tuning families (photo, lined paper, coarse grids), never on the
# held-out ones.
STRONG_LEVEL = 0.5
NEAR_SHARE = 0.15
# The grain left by the background is cut at this many times its spread.
NOISE_CUT = 3.0
# The crop keeps the rows and columns between these quantiles of the ink's mass, widened over
# every adjacent row or column that has ink (see _span).
MASS_TAILS = 0.02
# The fraction of a picture's pixels taken as its faint and bright ends (of its contrast).
INK_TAIL = 0.001


def _despeckle(gray: np.ndarray) -> np.ndarray:
    """Median filter (3x3) a picture with impulse noise; return any other picture unchanged."""
    height, width = gray.shape
    if height < 3 or width < 3:
        return gray
    # Specks are counted on every SPECK_ROWS-th row only (with both neighbouring rows): noise
    # covers the picture, so a sample says as much, at a fraction of the time.
    centre = gray[1:-1:SPECK_ROWS, 1:-1]
    nearest = np.full(centre.shape, np.inf)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                neighbour = gray[1 + dy : height - 1 + dy : SPECK_ROWS, 1 + dx : width - 1 + dx]
                nearest = np.minimum(nearest, np.abs(centre - neighbour))
    if (nearest > SPECK_CONTRAST).mean() <= SPECKLE_FRACTION:
        return gray
    pil = Image.fromarray(np.round(gray).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.MedianFilter(3)), dtype=np.float64)


def _background(gray: np.ndarray) -> np.ndarray:
    """The background level under every pixel of a light-ink picture: the picture averaged to a
    grid of :data:`GRID` cells on its longer side, opened (each cell the lowest of its
    :data:`OPENING` x :data:`OPENING` neighbourhood, then the highest of those lowest), and
    interpolated back bilinearly. The opening is the classic top-hat background: it keeps every
    plateau at least OPENING cells wide (lit paper, a shadow, the table beside the page) at its
    own level up to its edge, where a minimum alone took the darker side of a shadow's edge for
    the background of the lighter side, which then stood out as ink. A stroke narrower than
    OPENING cells never survives the minimum, so it is never taken for background, wherever it
    lies. (The caller caps the background at the middle of the picture's levels, so that ink
    wider than that is still ink.)"""
    height, width = gray.shape
    scale = GRID / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    cells = Image.fromarray(gray.astype(np.float32)).resize(size, Image.Resampling.BOX)
    opened = cells.filter(ImageFilter.MinFilter(OPENING)).filter(ImageFilter.MaxFilter(OPENING))
    return np.asarray(opened.resize((width, height), Image.Resampling.BILINEAR),
                      dtype=np.float64)


def _near_strong(ink: np.ndarray) -> np.ndarray:
    """``ink`` (the stretched picture, 0..1) with its faint pixels (below :data:`STRONG_LEVEL`)
    set to 0 unless strong ink lies within :data:`NEAR_SHARE` of the strong ink's extent. A
    stroke's soft edge lies next to the stroke's core and stays; a faint structure of its own (a
    ruled line, a shadow's edge, the table beside a page, JPEG haze) lies away from the strokes
    and goes, but for the stubs within reach of a stroke. The reach is measured on a grid of
    cells half as wide, so its cost does not grow with it."""
    strong = ink >= STRONG_LEVEL
    rows, cols = np.flatnonzero(strong.any(axis=1)), np.flatnonzero(strong.any(axis=0))
    if len(rows) == 0:
        return ink
    reach = max(1.0, NEAR_SHARE * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    height, width = ink.shape
    cell = max(1.0, reach / 2)
    # Which cells of a grid of that side hold strong ink (rows and columns of pixels taken
    # cell by cell: each cell's first one, and how many).
    row_starts, row_counts = _cells(height, cell)
    col_starts, col_counts = _cells(width, cell)
    cells = np.logical_or.reduceat(np.logical_or.reduceat(strong, row_starts, axis=0),
                                   col_starts, axis=1)
    # Two cells each way: every cell within the reach of a cell with strong ink.
    near = Image.fromarray(cells.view(np.uint8) * np.uint8(255)).filter(ImageFilter.MaxFilter(5))
    near_pixels = (np.asarray(near) > 0).repeat(row_counts, axis=0).repeat(col_counts, axis=1)
    return np.where(near_pixels | strong, ink, 0.0)


def _cells(length: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """The first pixel and the number of pixels of each cell of side ``cell`` along ``length``
    pixels."""
    starts = np.unique((np.arange(int(np.ceil(length / cell))) * cell).astype(np.intp))
    starts = starts[starts < length]  # (a last start rounded up to the length itself)
    return starts, np.diff(np.append(starts, length))


def _span(mass: np.ndarray, present: np.ndarray) -> tuple[int, int]:
    """First and last row (or column) of the ink, from its mass along one axis and whether each
    row has any ink: the rows between the MASS_TAILS quantiles of the mass, widened over every
    adjacent row with ink. A clean digit keeps its full extent; specks cut off from it by blank
    rows do not widen the crop."""
    cumulative = np.cumsum(mass)
    first = int(np.searchsorted(cumulative, MASS_TAILS * cumulative[-1]))
    last = int(np.searchsorted(cumulative, (1.0 - MASS_TAILS) * cumulative[-1]))
    while first > 0 and present[first - 1]:
        first -= 1
    while last < len(present) - 1 and present[last + 1]:
        last += 1
    return first, last


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def _fit_box(crop: np.ndarray) -> np.ndarray:
    """Scale so the longer side is 20 px, keeping the aspect ratio."""
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


def _center(patch: np.ndarray) -> np.ndarray:
    """Paste ``patch`` into a 28x28 frame with its centre of mass at the frame's centre."""
    height, width = patch.shape
    total = patch.sum()
    com_y = (patch.sum(axis=1) @ np.arange(height)) / total
    com_x = (patch.sum(axis=0) @ np.arange(width)) / total
    # MNIST's centres of mass sit at (14, 14) in pixel-index coordinates (mean over its 60k).
    top = int(np.clip(round(SIDE / 2 - com_y), 0, SIDE - height))
    left = int(np.clip(round(SIDE / 2 - com_x), 0, SIDE - width))
    frame = np.zeros((SIDE, SIDE), dtype=np.float32)
    frame[top : top + height, left : left + width] = patch
    return frame


def to_batch(images: ImageLike | list[ImageLike]) -> np.ndarray:
    """Preprocess one image or many into an (N, 28, 28) float32 batch.

    Accepts a single path, PIL image or 2-D array; a list of those; or a ready batch array of
    shape (N, 28, 28) or (N, 28, 28, 1).
    """
    if isinstance(images, np.ndarray) and (
        images.ndim == 4 or (images.ndim == 3 and images.shape[-1] != 1)
    ):
        return np.stack([to_mnist(item) for item in images]) if len(images) else _empty()
    if isinstance(images, (list, tuple)):
        return np.stack([to_mnist(item) for item in images]) if images else _empty()
    return to_mnist(images)[None]


def _empty() -> np.ndarray:
    return np.zeros((0, SIDE, SIDE), dtype=np.float32)
