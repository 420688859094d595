"""Fonts come from matplotlib, never the system's; a montage shows a refused query and why.

The promises: the non-digit generator and every picture's text use only the font files
matplotlib ships (so nothing changes when ``/usr/share/fonts`` is empty, proved under a private
mount namespace); the ``fit`` and ``eval`` splits share no font family; a character is drawn
only in a font whose character map has it; and ``query --montage`` gives every query its row, a
refused one a tile with its reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFont

from lenet_embed import fonts as font_files
from lenet_embed import pictures
from lenet_embed.nondigits import (
    ALPHABET_OF,
    FONT_KINDS,
    FONTS,
    LETTERS,
    SPLIT_KINDS,
    SPLITS,
    SYMBOLS,
    MissingFonts,
    fonts,
    generate,
    pick_glyph,
)
from lenet_embed.pictures import PALE, QUERY_BLUE, MontageRow, montage, montage_size, tile_box
from lenet_embed.preprocess import to_mnist

REPO = Path(__file__).resolve().parents[1]
MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _family(path: Path) -> str:
    return ImageFont.truetype(str(path), 12).getname()[0]


# ---------------------------------------------------------------------------- the font table


def test_every_font_is_matplotlibs_and_the_splits_share_no_family():
    for split in SPLITS:
        assert fonts(split) and all(p.parent == MPL_FONTS and p.is_file() for p in fonts(split))
    fit, held_out = ({_family(p) for p in fonts(split)} for split in ("fit", "eval"))
    assert fit == {"DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif"}
    assert held_out and not fit & held_out, held_out


def test_every_letter_font_has_every_letter_and_each_split_every_symbol():
    # (the final split's alphabets and signs in its own fonts: every font kind a split draws)
    for split in SPLITS:
        assert set(FONTS[split]) == set(SPLIT_KINDS[split]) & set(FONT_KINDS), split
        for kind in FONTS[split]:
            letters = kind in ("letters", "alphabets")  # every font has every one of them
            kind_fonts = set()
            for style, names in FONTS[split][kind].items():
                for name in names:
                    path = MPL_FONTS / f"{name}.ttf"
                    kind_fonts.add(path)
                    missing = set(ALPHABET_OF[kind]) - font_files.characters(path)
                    assert not (letters and missing), (split, kind, style, name, missing)
            drawable = set().union(*(font_files.characters(p) for p in kind_fonts))
            assert set(ALPHABET_OF[kind]) <= drawable, (split, kind,
                                                        set(ALPHABET_OF[kind]) - drawable)


def test_the_final_split_draws_no_character_another_split_draws():
    assert not set(ALPHABET_OF["alphabets"] + ALPHABET_OF["signs"]) & set(LETTERS + SYMBOLS)


_SLOTS = [(split, kind, style) for split in SPLITS for kind in FONTS[split]
          for style in FONTS[split][kind]]


@settings(max_examples=200, deadline=None)
@given(slot=st.sampled_from(_SLOTS), seed=st.integers(0, 2**32 - 1))
def test_a_glyph_is_drawn_only_in_a_font_that_has_it(slot, seed):
    split, kind, style = slot
    paths = [MPL_FONTS / f"{name}.ttf" for name in FONTS[split][kind][style]]
    alphabet = ALPHABET_OF[kind]
    text, path = pick_glyph(alphabet, paths, np.random.default_rng(seed))
    assert path in paths and text in alphabet and text in font_files.characters(path)


def test_a_font_without_any_of_the_alphabet_is_refused_by_name():
    italic = MPL_FONTS / "STIXGeneralItalic.ttf"
    assert "\u2665" not in font_files.characters(italic)  # no heart in STIX italic
    with pytest.raises(MissingFonts, match="STIXGeneralItalic.ttf"):
        pick_glyph("\u2665", [italic], np.random.default_rng(0))


def test_without_matplotlib_letters_refuse_in_one_line_and_pictures_still_draw(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    pictures._font_path.cache_clear()
    pictures._font.cache_clear()
    try:
        with pytest.raises(MissingFonts, match="pip install matplotlib"):
            generate("eval", 4, seed=0)
        assert len(generate("eval", 4, seed=0, kinds=("objects",))) == 4
        assert pictures._font_path("DejaVuSans.ttf") is None
        page = montage([MontageRow(None, [], [], None, "x.png", "not a digit")])
        assert page.size == montage_size(1, 0)
    finally:
        pictures._font_path.cache_clear()
        pictures._font.cache_clear()


# ---------------------------------------------- with /usr/share/fonts empty (a private mount)

# Run in a child whose /usr/share/fonts is an empty tmpfs: prints a digest of the non-digits
# of both splits and the font file the pictures' text is drawn in.
_CHILD = """
import hashlib, json, os
from lenet_embed import pictures
from lenet_embed.nondigits import FONTS, generate
digest = hashlib.sha256()
for split in ("fit", "eval", "final"):
    made = generate(split, 60, seed=3, kinds=tuple(sorted(FONTS[split])))
    digest.update(made.pixels.tobytes())
print(json.dumps({"fonts": os.listdir("/usr/share/fonts"), "digest": digest.hexdigest(),
                  "text_font": pictures._font(12).path}))
"""


def test_nondigits_and_picture_text_need_no_system_fonts():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to hide /usr/share/fonts")
    hide = "mkdir -p /usr/share/fonts && mount -t tmpfs tmpfs /usr/share/fonts && exec \"$@\""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["unshare", "-m", "sh", "-c", hide, "sh", sys.executable, "-c", _CHILD],
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode and "unshare" in done.stderr and "ermission" in done.stderr:
        pytest.skip(f"no mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["fonts"] == []
    assert Path(child["text_font"]) == MPL_FONTS / "DejaVuSans.ttf"
    # The very same pictures as here, where the system's fonts (if any) are in sight.
    digest = hashlib.sha256()
    for split in ("fit", "eval", "final"):
        digest.update(generate(split, 60, seed=3,
                               kinds=tuple(sorted(FONTS[split]))).pixels.tobytes())
    assert child["digest"] == digest.hexdigest()


# ------------------------------------------------------------------------ refused in a montage


def _ink_in_tile(page: np.ndarray, row: int) -> np.ndarray:
    left, top, right, bottom = tile_box(row, 0)
    return page[top:bottom, left:right]


def test_query_montage_draws_refused_queries_with_their_reason(run, bundle_dir, small, tmp_path):
    digit = tmp_path / "digit.png"
    Image.fromarray(small.test.images[0]).save(digit)
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    noise = tmp_path / "noise.png"  # not an image at all: refused before the model
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    missing = tmp_path / "missing.png"
    out = tmp_path / "montage.png"
    k = 3
    result = run("query", digit, blank, noise, missing, "--index-dir", bundle_dir, "-k", k,
                 "--montage", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == f"wrote {out}"
    with Image.open(out) as picture:
        assert picture.size == montage_size(4, k)
        page = np.asarray(picture.convert("RGB"))
    left, top, right, bottom = tile_box(0, 0)
    expected = np.round(to_mnist(digit).astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(page[top:bottom:3, left:right:3, 0], expected)
    for row in (1, 2, 3):  # blank, unreadable, missing: a pale tile with words, framed as a query
        tile = _ink_in_tile(page, row)
        pale = np.all(tile == PALE, axis=-1).mean()
        assert 0.5 < pale < 0.99, (row, pale)
        assert (tile.sum(axis=-1) < 3 * 128).any(), row  # dark text
        left, top, _, _ = tile_box(row, 0)
        assert tuple(page[top - 1, left]) == QUERY_BLUE
        neighbours = page[top:top + 84, tile_box(row, 1)[0]:]
        assert (neighbours == 255).all(), row  # no neighbour cells


@settings(max_examples=60, deadline=None)
@given(reason=st.text(st.characters(codec="utf-8", exclude_characters="."), max_size=400),
       title=st.text(st.characters(codec="utf-8"), max_size=80))
def test_any_reason_fits_its_tile(reason, title):
    # Any text draws, line breaks (which Pillow's one-line layout fails on) as spaces.
    page = montage([MontageRow(None, [], [], None, title, reason)])
    assert page.size == montage_size(1, 0)
    font = pictures._font(11)
    lines = pictures._wrap(reason, font, 70, 5)
    assert len(lines) <= 5
    assert all(pictures._text_width(line, font) <= 70 or len(line) == 1 for line in lines)
    if not (lines and lines[-1].endswith("...")):  # nothing cut: every character is there
        assert "".join(lines).replace(" ", "") == "".join(reason.split())
