"""The TrueType fonts the project draws text in: matplotlib's own copy, never the system's.

matplotlib (a base dependency) ships DejaVu Sans / Sans Mono / Serif, STIX General and the
Computer Modern fonts in ``mpl-data/fonts/ttf``; :func:`font_dir` finds that folder through its
public :func:`matplotlib.get_data_path`. So the generated non-digits (:mod:`.nondigits`) and the
text of every picture (:mod:`.pictures`) come out the same on any machine with the package
installed, including one whose ``/usr/share/fonts`` is empty.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .errors import LenetEmbedError


class MissingFonts(LenetEmbedError):
    """The fonts letters and symbols are drawn in are not there (matplotlib not installed)."""


def font_dir() -> Path:
    """matplotlib's folder of TrueType fonts (:class:`MissingFonts` without matplotlib).

    matplotlib is imported here, on first use, so commands that draw no text never pay for it.
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingFonts("matplotlib is not installed; letters, symbols and the text of "
                           "pictures are drawn in its fonts: pip install matplotlib") from None
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_file(name: str) -> Path:
    """The font file ``name`` (e.g. ``DejaVuSans.ttf``) in :func:`font_dir`, or
    :class:`MissingFonts` naming the path when it is not there."""
    path = font_dir() / name
    if not path.is_file():
        raise MissingFonts(f"{path}: no such font; reinstall matplotlib "
                           "(pip install --force-reinstall matplotlib)")
    return path


@functools.cache
def characters(path: Path) -> frozenset[str]:
    """The characters ``path``'s Unicode character map has a glyph for (a character it lacks
    would draw as the empty box, which a digit model reads as a 0)."""
    from matplotlib.ft2font import FT2Font

    return frozenset(chr(code) for code in FT2Font(str(path)).get_charmap())
