"""Digits from outside MNIST: render 0-9 in the machine's fonts and check that queries land right.

Writes PNG, JPEG and transparent RGBA PNG files at several canvas sizes, glyph sizes, positions
and both polarities (dark ink on light paper and light on dark), named
``<font>-<variant>-label-<d>.<ext>``; with ``--index-dir`` it then runs ``lenet-embed query
--json`` over them and prints one JSON object with the top-1 (majority-vote) label accuracy.

    python scripts/font_digits.py /tmp/font-digits --index-dir index

Fonts: the DejaVu fonts matplotlib ships (Sans, Sans Mono, Serif; no system fonts needed), or
``--fonts DIR``; only fonts whose character map has all ten digits are used.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lenet_embed.cli import run_script
from lenet_embed.errors import LenetEmbedError
from lenet_embed.fonts import characters, font_dir

# (name, canvas side, glyph size as a fraction of the canvas, offset as a fraction, dark ink?, fmt)
VARIANTS = [
    ("small-png", 40, 0.7, (0.0, 0.0), True, "png"),
    ("large-png-offset", 200, 0.45, (-0.2, 0.15), True, "png"),
    ("mid-jpeg-inverse", 96, 0.6, (0.1, -0.1), False, "jpg"),
    ("wide-rgba", 160, 0.5, (0.15, 0.0), True, "rgba.png"),
]


def find_fonts(folder: Path | None = None) -> list[Path]:
    """Every TrueType font in ``folder`` (default: matplotlib's DejaVu fonts) that has the ten
    digits (a missing one would draw as a box), sorted for a stable set."""
    found = sorted(folder.glob("*.ttf")) if folder else sorted(font_dir().glob("DejaVu*.ttf"))
    return [path for path in found if set("0123456789") <= characters(path)]


def render(font_path: Path, digit: int, side: int, scale: float, offset: tuple[float, float],
           dark_ink: bool, fmt: str) -> Image.Image:
    """One digit drawn in one font on a square canvas."""
    font = ImageFont.truetype(str(font_path), size=max(8, int(side * scale)))
    ink, paper = ((20, 20, 20), (235, 235, 235)) if dark_ink else ((240, 240, 240), (15, 15, 15))
    if fmt == "rgba.png":
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        fill: tuple[int, ...] = (*ink, 255)
    else:
        canvas = Image.new("RGB", (side, side), paper)
        fill = ink
    draw = ImageDraw.Draw(canvas)
    centre = (side * (0.5 + offset[0]), side * (0.5 + offset[1]))
    draw.text(centre, str(digit), font=font, fill=fill, anchor="mm")
    return canvas.convert("L") if fmt == "png" else canvas


def write_set(out_dir: Path, folder: Path | None = None) -> list[Path]:
    """Render every digit in every font (:func:`find_fonts`) and variant into ``out_dir``;
    return the paths."""
    fonts = find_fonts(folder)
    if not fonts:
        raise LenetEmbedError(f"no .ttf fonts with the ten digits in {folder or font_dir()}; "
                              "pass --fonts DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for font_path in fonts:
        for name, side, scale, offset, dark_ink, fmt in VARIANTS:
            for digit in range(10):
                image = render(font_path, digit, side, scale, offset, dark_ink, fmt)
                path = out_dir / f"{font_path.stem}-{name}-label-{digit}.{fmt}"
                image.save(path, quality=90) if fmt == "jpg" else image.save(path)
                written.append(path)
    return written


def query_accuracy(paths: list[Path], index_dir: str) -> dict[str, object]:
    """Run ``lenet-embed query --json`` on ``paths``; score predicted vs file-name labels."""
    command = [sys.executable, "-m", "lenet_embed", "query", "--json", "-k", "5",
               "--index-dir", index_dir, *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    if result.returncode and not rows:  # no answer at all: the bundle itself is the problem
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise LenetEmbedError(f"lenet-embed query failed: {lines[-1].removeprefix('Error: ')}")
    wrong = [r["query"] for r in rows
             if r["predicted_label"] != int(re.search(r"label-(\d)", r["query"]).group(1))]
    failed = result.stderr.strip().splitlines() if result.returncode else []
    return {
        "queries": len(paths),
        "top1_accuracy": round((len(rows) - len(wrong)) / len(paths), 4),
        "wrong": sorted(Path(w).name for w in wrong),
        "errors": failed,
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--fonts", type=Path, help="folder of .ttf files [default: matplotlib's "
                        "DejaVu fonts]")
    parser.add_argument("--index-dir", help="query the rendered digits against this bundle")
    args = parser.parse_args()
    paths = write_set(args.out_dir, args.fonts)
    print(f"wrote {len(paths)} images to {args.out_dir}", file=sys.stderr)
    if args.index_dir:
        print(json.dumps(query_accuracy(paths, args.index_dir)))


if __name__ == "__main__":
    run_script(main)
