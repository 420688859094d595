"""Draw one example of each picture family, as sent and as the model sees it (docs/assets).

    python scripts/family_pictures.py [--out docs/assets/families.png] [--row 0]

Each column is a family of lenet_embed/families.py drawn from the same MNIST test digit: on top
the picture as a user sends it (scaled to fit), below it the 28x28 array that preprocessing
hands the model.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lenet_embed.cli import run_script
from lenet_embed.data import load_mnist
from lenet_embed.families import FAMILIES, HELD_OUT, family_files
from lenet_embed.fonts import font_dir
from lenet_embed.preprocess import open_image, to_mnist

CELL = 112


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/assets/families.png")
    parser.add_argument("--row", type=int, default=0, help="the MNIST test digit to draw")
    args = parser.parse_args()
    test = load_mnist().test
    digit, label = test.images[args.row : args.row + 1], test.labels[args.row : args.row + 1]
    sheet = Image.new("RGB", (CELL * len(FAMILIES), 2 * CELL + 20), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(font_dir() / "DejaVuSans.ttf"), 11)
    for column, name in enumerate(FAMILIES):
        data = family_files(digit, label, name)[0]
        sent = Image.open(io.BytesIO(data)).convert("RGB")
        sent.thumbnail((CELL - 8, CELL - 8))
        sheet.paste(sent, (column * CELL + (CELL - sent.width) // 2,
                           20 + (CELL - sent.height) // 2))
        seen = to_mnist(open_image(data, name))
        seen_image = Image.fromarray((seen * 255).astype(np.uint8)).resize(
            (CELL - 8, CELL - 8), Image.Resampling.NEAREST)
        sheet.paste(seen_image.convert("RGB"), (column * CELL + 4, CELL + 24))
        title = name + (" *" if name in HELD_OUT else "")
        draw.text((column * CELL + 4, 4), title, fill="black", font=font)
    sheet.save(args.out)
    print(f"wrote {args.out}: {len(FAMILIES)} families (* held out), test digit #{args.row}")


if __name__ == "__main__":
    run_script(main)
