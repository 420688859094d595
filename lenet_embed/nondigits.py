"""Pictures that are not digits, generated offline and deterministically: the project's own
out-of-distribution set (docs/guide/trust.md, "The non-digit set", gives its provenance).

Five kinds, each drawn in several styles: ``letters`` (Latin letters in the fonts matplotlib
ships, :mod:`.fonts`), ``symbols`` (+ % # @ & ? * = arrows ...), ``textures`` (checkerboards,
stripes, dots, grids, paper), ``noise`` (uniform, Gaussian, salt-and-pepper, blobs) and ``objects``
(procedurally drawn silhouettes: shirts, shoes, bags, houses, faces, stars, hearts, filled
shapes). Every picture is a grayscale PIL image of its own size (24 to 160 px a side), dark on
light or light on dark at random, and goes through :func:`lenet_embed.preprocess.to_mnist` like
any query.

Two disjoint splits keep the evaluation honest. ``fit`` (for calibration and outlier exposure)
uses the DejaVu fonts (Sans, Sans Mono, Serif), a subset of the styles and seeds from one
stream; ``eval`` uses other font families, Computer Modern (Roman, Sans, Typewriter, Bold,
Italic) and STIX General (a Times-like serif; Computer Modern's files map TeX's encoding, not
Unicode, so symbols are drawn in STIX only), every style (so some are never seen in fitting:
:data:`HELD_OUT` lists them) and another seed stream. Only ``eval`` figures are reported.
:data:`FONTS` lists which font files draw which kind and style in which split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from . import fonts as font_files
from .errors import LenetEmbedError
from .fonts import MissingFonts as MissingFonts  # raised here; training and build catch it
from .preprocess import to_mnist, to_uint8

KINDS = ("letters", "symbols", "textures", "noise", "objects")
# The kinds of the ``final`` split, drawn in no other split: scoring only.
FINAL_KINDS = ("alphabets", "signs", "garments", "scenes")
FONT_KINDS = ("letters", "symbols", "alphabets", "signs")  # drawn in matplotlib's fonts
SPLITS = ("fit", "eval", "final")
# The kinds each split draws.
SPLIT_KINDS = {"fit": KINDS, "eval": KINDS, "final": FINAL_KINDS}
# Letters left out because, once cropped and scaled into the MNIST frame, they ARE digits as people
# write them: O o Q D (0), I l i j (1), Z z (2), S s (5), G b (6), T (7), B (8), g q (9). A model
# that called them digits would be right, and a set that counted that as an error would punish it.
DIGIT_LIKE = frozenset("OoQDIlijZzSsGbTBgq")
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                  if c not in DIGIT_LIKE)
# Symbols likewise leave out - / | ( ) [ ] ! (a 1), and o-like rings (° ○) (a 0).
SYMBOLS = "+%#@&?*=<>~$^{}\u2190\u2191\u2192\u2193\u2194\u2195\u00a7\u00b6\u20ac\u00a3\u00a5" \
          "\u00a9\u00ae\u221e\u2211\u221a\u2248\u2260\u00f7\u00d7\u00b1\u2665\u266a\u2663"
# Greek and Cyrillic letters for the ``final`` split, without those that read as digits once in
# the MNIST frame (as for LETTERS): Ζ (2), Β (8), Ι (1), Ο ο (0), Τ (7), Θ θ Φ φ (0 with a
# bar; Ф ф too), β δ σ ζ (6, 8, 2), З з (3), б Ь ь Ъ ъ Ы ы (6), Ч ч (4).
ALPHABETS = "\u0393\u0394\u0395\u039b\u039e\u03a0\u03a3\u03a8\u03a9" \
            "\u03b1\u03b3\u03b5\u03b7\u03ba\u03bb\u03bc\u03bd\u03be\u03c0\u03c1\u03c4\u03c5\u03c7" \
            "\u03c8\u03c9" \
            "\u0414\u0416\u0418\u0419\u041b\u041f\u0426\u0428\u0429\u042d\u042e\u042f" \
            "\u0434\u0436\u0438\u0439\u043b\u043f\u0446\u0448\u0449\u044d\u044e\u044f"
# Signs no other split draws (logic, sets, cards, marks), without ∂ ∫ ¡ † ƒ ♀ ♂ (6, 1, 9).
SIGNS = "\u2200\u2203\u2207\u2295\u2297\u2282\u2283\u2229\u222a\u2227\u2228\u22a5\u2220" \
        "\u2605\u2606\u2666\u2660\u2713\u2030\u00a4\u263a\u2318\u00bf\u2021\u203b"
ALPHABET_OF = {"letters": LETTERS, "symbols": SYMBOLS, "alphabets": ALPHABETS, "signs": SIGNS}
# Styles per kind; those marked False are only in the eval split, to check that what was fitted
# on other styles generalises to styles never seen. The final split's kinds are its own.
STYLES: dict[str, dict[str, bool]] = {
    "letters": {"regular": True, "bold": True, "italic": True, "serif": True},
    "symbols": {"regular": True, "bold": True},
    "textures": {"checkerboard": True, "stripes": True, "dots": True, "grid": False,
                 "paper": False},
    "noise": {"uniform": True, "gaussian": True, "salt_pepper": True, "blobs": False},
    "objects": {"shirt": True, "shoe": True, "house": True, "star": True, "heart": True,
                "square": True, "bag": False, "face": False, "triangle": False, "cross": False},
    "alphabets": {"regular": True, "bold": True, "serif": True},
    "signs": {"regular": True, "bold": True},
    "garments": {"trousers": True, "dress": True, "coat": True, "sandal": True, "hat": True,
                 "sneaker": True},
    "scenes": {"shapes": True, "horizon": True},
}
HELD_OUT = {kind: [s for s, fitted in styles.items() if not fitted]
            for kind, styles in STYLES.items()}
# The seed streams of the two splits never meet: a split's pictures are drawn from
# SeedSequence([stream, seed]).
_STREAMS = {"fit": 11, "eval": 29, "final": 47}

_DEJAVU_BOLD = ("DejaVuSans-Bold", "DejaVuSansMono-Bold", "DejaVuSerif-Bold")
_DEJAVU_ITALIC = ("DejaVuSans-Oblique", "DejaVuSansMono-Oblique", "DejaVuSerif-Italic")
_DEJAVU_BOLD_ITALIC = ("DejaVuSans-BoldOblique", "DejaVuSansMono-BoldOblique",
                       "DejaVuSerif-BoldItalic")
_DEJAVU_SERIF = ("DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic")
_STIX_SERIF = ("STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta")
# The font files (in matplotlib's folder, without ".ttf") each split draws each font kind and
# style in. The splits share no font family: ``eval`` measures letters in fonts never fitted on.
# A character is drawn only in a font whose character map has it (:func:`pick_glyph`).
FONTS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "fit": {
        "letters": {
            "regular": ("DejaVuSans", "DejaVuSansMono"),
            "bold": _DEJAVU_BOLD + _DEJAVU_BOLD_ITALIC,
            "italic": _DEJAVU_ITALIC + _DEJAVU_BOLD_ITALIC,
            "serif": _DEJAVU_SERIF,
        },
        "symbols": {"regular": ("DejaVuSans", "DejaVuSansMono"),
                    "bold": _DEJAVU_BOLD + _DEJAVU_BOLD_ITALIC},
    },
    "eval": {
        "letters": {
            "regular": ("cmss10", "cmtt10"),
            "bold": ("cmb10", "STIXGeneralBol", "STIXGeneralBolIta"),
            "italic": ("cmti10", "STIXGeneralItalic", "STIXGeneralBolIta"),
            "serif": ("cmr10", "cmb10", "cmti10", *_STIX_SERIF),
        },
        "symbols": {"regular": ("STIXGeneral", "STIXGeneralItalic"),
                    "bold": ("STIXGeneralBol", "STIXGeneralBolIta")},
    },
    # Alphabets and signs no other split draws, in both splits' font families.
    "final": {
        "alphabets": {"regular": ("DejaVuSans", "STIXGeneral"),
                      "bold": ("DejaVuSans-Bold", "STIXGeneralBol"),
                      "serif": ("DejaVuSerif", "STIXGeneralItalic")},
        "signs": {"regular": ("DejaVuSans", "STIXGeneral"),
                  "bold": ("DejaVuSans-Bold", "STIXGeneralBol")},
    },
}


@dataclass(frozen=True)
class NonDigits:
    """Generated pictures with the kind and style of each, and each as the encoder sees it
    (``pixels``: (N, 28, 28) float32 from :func:`~lenet_embed.preprocess.to_mnist`, in order:
    every picture reaches the model, which alone decides what is a digit)."""

    images: list[Image.Image]
    pixels: np.ndarray
    kinds: list[str]
    styles: list[str]

    def __len__(self) -> int:
        return len(self.images)


def fonts(split: str) -> list[Path]:
    """The font files of a split (:data:`FONTS`), sorted: DejaVu for ``fit``, Computer Modern
    and STIX for ``eval``. :class:`MissingFonts` when matplotlib or one of them is missing."""
    names = {name for styles in FONTS[split].values() for group in styles.values()
             for name in group}
    return sorted(font_files.font_file(f"{name}.ttf") for name in names)


def generate(split: str, count: int, seed: int = 0,
             kinds: tuple[str, ...] | None = None) -> NonDigits:
    """``count`` pictures of ``split`` (``fit``, ``eval`` or ``final``), spread evenly over
    ``kinds`` (by default all the split draws, :data:`SPLIT_KINDS`) and their styles; the same
    arguments always give the same pictures. A picture that preprocessing finds blank (an error,
    not an answer: a checkerboard whose border is all ink) is drawn again. The kinds drawn in
    fonts (:data:`FONT_KINDS`) need the split's fonts (:class:`MissingFonts` without them)."""
    if split not in SPLITS:
        raise LenetEmbedError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    kinds = SPLIT_KINDS[split] if kinds is None else kinds
    unknown = set(kinds) - set(SPLIT_KINDS[split])
    if unknown or not kinds:
        raise LenetEmbedError(f"unknown kinds {sorted(unknown)} for the {split} split; choose "
                              f"from {', '.join(SPLIT_KINDS[split])}")
    rng = np.random.default_rng(np.random.SeedSequence([_STREAMS[split], seed]))
    families = _families(split) if set(kinds) & set(FONT_KINDS) else {}
    plan = [(kind, style) for kind in SPLIT_KINDS[split]
            for style, fitted in STYLES[kind].items() if fitted or split != "fit"]
    images, pixels, drawn, styles = [], [], [], []
    for i in range(count):
        # Kinds take equal shares, then styles within a kind.
        kind = kinds[i % len(kinds)]
        choices = [style for k, style in plan if k == kind]
        style = choices[(i // len(kinds)) % len(choices)]
        while True:
            side = int(rng.integers(24, 161))
            picture = _DRAW[kind](style, side, rng, families.get(kind, {}))
            if rng.random() < 0.5:
                picture = 255 - picture
            image = Image.fromarray(picture, mode="L")
            try:
                pixels.append(to_mnist(image))
                break
            except LenetEmbedError:
                continue
        images.append(image)
        drawn.append(kind)
        styles.append(style)
    return NonDigits(images, np.stack(pixels) if pixels else np.zeros((0, 28, 28), np.float32),
                     drawn, styles)


# Fragments (:func:`fragments`): a digit's frame cut into FRAGMENT_GRID x FRAGMENT_GRID tiles, of
# which at least FRAGMENT_TILES hold ink (FRAGMENT_INK pixels above a quarter of full scale).
FRAGMENT_GRID = 3
FRAGMENT_TILES = 4
FRAGMENT_INK = 5


def fragments(digits: np.ndarray, seed: int) -> np.ndarray:
    """Non-digits made of digits' own strokes: each of ``digits`` (uint8 (N, 28, 28), MNIST
    form) padded to 30x30, cut into a 3x3 grid of tiles, the tiles shuffled so that at most one
    stays in place, and preprocessed as a query is (uint8 (M, 28, 28), M <= N). A digit's
    pieces rearranged are no digit: they teach a model that strokes alone do not make one.
    Digits with ink in fewer than :data:`FRAGMENT_TILES` tiles are left out: one or two pieces,
    cropped and enlarged, can read as a stroke of a digit. The same digits and seed give the
    same fragments."""
    rng = np.random.default_rng([seed, 13])
    tiles = FRAGMENT_GRID * FRAGMENT_GRID
    side = 30 // FRAGMENT_GRID
    out = []
    for digit in digits:
        padded = np.pad(digit, 1).reshape(FRAGMENT_GRID, side, FRAGMENT_GRID, side)
        pieces = padded.transpose(0, 2, 1, 3).reshape(tiles, side, side)
        order = rng.permutation(tiles)
        while (order == np.arange(tiles)).sum() > 1:
            order = rng.permutation(tiles)
        if ((pieces > 64).sum(axis=(1, 2)) >= FRAGMENT_INK).sum() < FRAGMENT_TILES:
            continue
        shuffled = pieces[order].reshape(FRAGMENT_GRID, FRAGMENT_GRID, side, side)
        out.append(to_uint8(to_mnist(shuffled.transpose(0, 2, 1, 3).reshape(30, 30))))
    return np.stack(out) if out else np.zeros((0, 28, 28), np.uint8)


def _families(split: str) -> dict[str, dict[str, list[Path]]]:
    """:data:`FONTS` of ``split`` as paths: kind -> style -> font files (:class:`MissingFonts`
    before anything is drawn when one is missing)."""
    return {kind: {style: [font_files.font_file(f"{name}.ttf") for name in group]
                   for style, group in styles.items()}
            for kind, styles in FONTS[split].items()}


def _canvas(side: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white canvas to draw black on (inverted later for half the pictures)."""
    image = Image.new("L", (side, side), 255)
    return image, ImageDraw.Draw(image)


def pick_glyph(alphabet: str, paths: list[Path], rng: np.random.Generator) -> tuple[str, Path]:
    """A font of ``paths`` and a character of ``alphabet`` to draw in it, at random: always one
    the font's character map has (a missing glyph would draw as a box, which reads as a 0)."""
    path = paths[int(rng.integers(len(paths)))]
    has = font_files.characters(path)
    drawable = [c for c in alphabet if c in has]
    if not drawable:
        raise MissingFonts(f"{path}: none of {alphabet!r} in this font")
    return drawable[int(rng.integers(len(drawable)))], path


def _glyph(alphabet: str, style: str, side: int, rng: np.random.Generator,
           families: dict[str, list[Path]]) -> np.ndarray:
    """One character of ``alphabet`` in a font of ``style``, filling most of the canvas."""
    text, path = pick_glyph(alphabet, families[style], rng)
    font = ImageFont.truetype(str(path), size=max(8, int(side * rng.uniform(0.55, 0.8))))
    image, draw = _canvas(side)
    draw.text((side / 2, side / 2), text, fill=0, font=font, anchor="mm")
    return np.asarray(image)


def _glyphs(kind: str) -> Callable[[str, int, np.random.Generator, dict[str, list[Path]]],
                                    np.ndarray]:
    def draw(style: str, side: int, rng: np.random.Generator,
             families: dict[str, list[Path]]) -> np.ndarray:
        return _glyph(ALPHABET_OF[kind], style, side, rng, families)

    return draw


def _textures(style: str, side: int, rng: np.random.Generator,
              families: dict[str, list[Path]]) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    period = rng.uniform(4, max(5.0, side / 3))
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if style == "checkerboard":
        ink = ((u // period) + (v // period)) % 2 == 0
    elif style == "stripes":
        ink = (u % period) < period * rng.uniform(0.3, 0.6)
    elif style == "dots":
        radius = period * rng.uniform(0.15, 0.35)
        ink = np.hypot(u % period - period / 2, v % period - period / 2) < radius
    elif style == "grid":
        width = max(1.0, period * rng.uniform(0.1, 0.25))
        ink = ((u % period) < width) | ((v % period) < width)
    else:  # paper: fibres and grain on a light sheet, darkest where the grain gathers
        grain = _smooth_noise(side, rng, rng.uniform(0.5, 2.0))
        fibres = _smooth_noise(side, rng, rng.uniform(3.0, 8.0))
        level = 255 - 160 * (0.6 * grain + 0.4 * fibres)
        return np.clip(level, 0, 255).astype(np.uint8)
    return np.where(ink, 0, 255).astype(np.uint8)


def _smooth_noise(side: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Gaussian noise blurred by ``radius`` px, stretched to [0, 1]."""
    raw = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L")
    smooth = np.asarray(raw.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    span = smooth.max() - smooth.min()
    return (smooth - smooth.min()) / (span if span else 1.0)


def _noise(style: str, side: int, rng: np.random.Generator,
           families: dict[str, list[Path]]) -> np.ndarray:
    if style == "uniform":
        return rng.integers(0, 256, (side, side), dtype=np.uint8)
    if style == "gaussian":
        values = rng.normal(rng.uniform(100, 160), rng.uniform(30, 70), (side, side))
        return np.clip(values, 0, 255).astype(np.uint8)
    if style == "salt_pepper":
        picture = np.full((side, side), 255, dtype=np.uint8)
        picture[rng.random((side, side)) < rng.uniform(0.05, 0.4)] = 0
        return picture
    blobs = _smooth_noise(side, rng, rng.uniform(side / 20, side / 8))
    return np.where(blobs > rng.uniform(0.45, 0.65), 0, 255).astype(np.uint8)


def _objects(style: str, side: int, rng: np.random.Generator,
             families: dict[str, list[Path]]) -> np.ndarray:
    """A filled silhouette, drawn on a unit square with some jitter, then scaled to ``side``."""
    image, draw = _canvas(side)

    def at(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return _jittered(points, side, rng)

    if style == "shirt":
        draw.polygon(at([(0.3, 0.15), (0.42, 0.2), (0.58, 0.2), (0.7, 0.15), (0.95, 0.35),
                         (0.85, 0.47), (0.75, 0.4), (0.75, 0.9), (0.25, 0.9), (0.25, 0.4),
                         (0.15, 0.47), (0.05, 0.35)]), fill=0)
    elif style == "shoe":
        draw.polygon(at([(0.1, 0.35), (0.35, 0.35), (0.45, 0.55), (0.85, 0.62), (0.92, 0.75),
                         (0.92, 0.82), (0.1, 0.82)]), fill=0)
    elif style == "house":
        draw.polygon(at([(0.5, 0.1), (0.9, 0.45), (0.8, 0.45), (0.8, 0.9), (0.2, 0.9),
                         (0.2, 0.45), (0.1, 0.45)]), fill=0)
        draw.rectangle([0.42 * side, 0.62 * side, 0.58 * side, 0.9 * side], fill=255)
    elif style == "star":
        spikes = int(rng.integers(5, 8))
        points = [(0.5 + (0.45 if i % 2 == 0 else 0.2) * math.cos(math.pi * i / spikes),
                   0.5 + (0.45 if i % 2 == 0 else 0.2) * math.sin(math.pi * i / spikes))
                  for i in range(2 * spikes)]
        draw.polygon(at(points), fill=0)
    elif style == "heart":
        draw.ellipse([0.1 * side, 0.15 * side, 0.52 * side, 0.55 * side], fill=0)
        draw.ellipse([0.48 * side, 0.15 * side, 0.9 * side, 0.55 * side], fill=0)
        draw.polygon(at([(0.12, 0.42), (0.88, 0.42), (0.5, 0.9)]), fill=0)
    elif style == "square":
        draw.polygon(at([(0.15, 0.15), (0.85, 0.15), (0.85, 0.85), (0.15, 0.85)]), fill=0)
    elif style == "bag":
        draw.rectangle([0.15 * side, 0.35 * side, 0.85 * side, 0.9 * side], fill=0)
        draw.arc([0.3 * side, 0.1 * side, 0.7 * side, 0.55 * side], 180, 360, fill=0,
                 width=max(2, side // 14))
    elif style == "face":
        draw.ellipse([0.1 * side, 0.1 * side, 0.9 * side, 0.9 * side], fill=0)
        for cx in (0.35, 0.65):
            draw.ellipse([(cx - 0.07) * side, 0.3 * side, (cx + 0.07) * side, 0.44 * side],
                         fill=255)
        draw.chord([0.28 * side, 0.4 * side, 0.72 * side, 0.75 * side], 20, 160, fill=255)
    elif style == "triangle":
        draw.polygon(at([(0.5, 0.1), (0.9, 0.85), (0.1, 0.85)]), fill=0)
    else:  # cross
        draw.polygon(at([(0.38, 0.1), (0.62, 0.1), (0.62, 0.38), (0.9, 0.38), (0.9, 0.62),
                         (0.62, 0.62), (0.62, 0.9), (0.38, 0.9), (0.38, 0.62), (0.1, 0.62),
                         (0.1, 0.38), (0.38, 0.38)]), fill=0)
    return np.asarray(image)


def _jittered(points: list[tuple[float, float]], side: int, rng: np.random.Generator
              ) -> list[tuple[float, float]]:
    """``points`` of the unit square moved by up to 3 % each way, in pixels of ``side``."""
    jitter = rng.uniform(-0.03, 0.03, (len(points), 2))
    return [((px + dx) * side, (py + dy) * side)
            for (px, py), (dx, dy) in zip(points, jitter, strict=True)]


# Garment outlines on the unit square (the final split's ``garments``; a sandal and a hat are
# drawn from parts).
_GARMENTS = {
    "trousers": [(0.28, 0.08), (0.72, 0.08), (0.8, 0.93), (0.58, 0.93), (0.5, 0.32),
                 (0.42, 0.93), (0.2, 0.93)],
    "dress": [(0.4, 0.07), (0.6, 0.07), (0.63, 0.3), (0.88, 0.93), (0.12, 0.93), (0.37, 0.3)],
    "coat": [(0.33, 0.07), (0.67, 0.07), (0.92, 0.22), (0.96, 0.88), (0.8, 0.88), (0.77, 0.38),
             (0.77, 0.94), (0.23, 0.94), (0.23, 0.38), (0.2, 0.88), (0.04, 0.88), (0.08, 0.22)],
    "sneaker": [(0.04, 0.42), (0.3, 0.38), (0.5, 0.52), (0.9, 0.58), (0.96, 0.76), (0.04, 0.8)],
}


def _garments(style: str, side: int, rng: np.random.Generator,
              families: dict[str, list[Path]]) -> np.ndarray:
    """A garment as a photo shows it (as Fashion-MNIST's are): a silhouette filled with cloth
    whose shade varies smoothly, with a fine weave, on plain ground."""
    mask, draw = _canvas(side)
    if style == "sandal":
        draw.polygon(_jittered([(0.04, 0.72), (0.96, 0.66), (0.96, 0.8), (0.04, 0.84)], side,
                               rng), fill=0)
        for start in rng.uniform(0.1, 0.7, size=int(rng.integers(2, 4))):
            draw.line(_jittered([(start, 0.72), (start + 0.15, 0.35), (start + 0.3, 0.7)],
                                side, rng), fill=0, width=max(2, side // 12))
    elif style == "hat":
        draw.ellipse(_box(_jittered([(0.04, 0.6), (0.96, 0.82)], side, rng)), fill=0)
        draw.chord(_box(_jittered([(0.22, 0.15), (0.78, 0.95)], side, rng)), 180, 360, fill=0)
    else:
        draw.polygon(_jittered(_GARMENTS[style], side, rng), fill=0)
    cloth = rng.uniform(0.35, 0.75) + 0.25 * (_smooth_noise(side, rng, side / 6) - 0.5)
    weave = rng.uniform(0.0, 0.12) * (_smooth_noise(side, rng, 0.7) - 0.5)
    shade = np.clip(cloth + weave, 0.05, 1.0)
    return np.where(np.asarray(mask) < 128, 255 * (1 - shade), 255).astype(np.uint8)


def _box(corners: list[tuple[float, float]]) -> list[float]:
    (x0, y0), (x1, y1) = corners
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def _scenes(style: str, side: int, rng: np.random.Generator,
            families: dict[str, list[Path]]) -> np.ndarray:
    """A patch of a photo: ``shapes`` (a few overlapping objects of their own shades on a lit
    background) or ``horizon`` (ground and sky of different textures meeting along a wavy line),
    out of focus and grainy."""
    y, x = np.mgrid[0:side, 0:side] / side
    angle = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(0.3, 0.9) + rng.uniform(-0.3, 0.3) * (math.cos(angle) * x
                                                             + math.sin(angle) * y - 0.5)
    if style == "shapes":
        image = Image.fromarray(np.clip(light * 255, 0, 255).astype(np.uint8), mode="L")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 7))):
            corners = _box(_jittered([tuple(rng.uniform(-0.1, 0.8, 2)),
                                      tuple(rng.uniform(0.2, 1.1, 2))], side, rng))
            shade = int(rng.integers(0, 256))
            if rng.random() < 0.5:
                draw.ellipse(corners, fill=shade)
            else:
                draw.rectangle(corners, fill=shade)
        values = np.asarray(image, dtype=np.float64)
    else:
        wave = rng.uniform(0.3, 0.7) + 0.08 * np.sin(x * rng.uniform(3, 12) + rng.uniform(0, 6))
        sky = light + 0.2 * _smooth_noise(side, rng, side / 5)
        ground = rng.uniform(0.1, 0.6) + 0.4 * _smooth_noise(side, rng, rng.uniform(1, 3))
        values = 255 * np.where(y > wave, ground, sky)
    values = values + rng.normal(0, rng.uniform(2, 10), values.shape)
    blurred = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    return np.asarray(blurred.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5))))


_DRAW = {"letters": _glyphs("letters"), "symbols": _glyphs("symbols"), "textures": _textures,
         "noise": _noise, "objects": _objects, "alphabets": _glyphs("alphabets"),
         "signs": _glyphs("signs"), "garments": _garments, "scenes": _scenes}
