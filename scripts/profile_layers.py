"""Where a training step's time goes: processor time per image of each LeNet-5 layer, forward and
backward, measured one layer at a time on random inputs of the layer's own shape.

Training time is the model's arithmetic, not the data pipeline: this names the layers that cost.
Each layer's gradient is taken with respect to its weights and (but for the first layer, whose
input is the image) its input, as a training step does. Processor time counts every thread.
The layers are those `lenet-embed train` runs (conv1 as a row-by-row matmul); ``--stock`` times
Keras's own Conv2D for conv1 instead, the kernel the saved model and the tutorial use.

    python scripts/profile_layers.py [--batch-size 256] [--repeats 50] [--stock] [--json]

Takes about half a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from lenet_embed._keras import keras, tensorflow
from lenet_embed.cli import run_script
from lenet_embed.model import INPUT_SHAPE, build_lenet


def profile(batch_size: int, repeats: int, stock: bool = False) -> list[dict[str, float | str]]:
    """Per-image processor microseconds of each weighted or pooling layer of the classifier
    (the best of five rounds of ``repeats`` steps), as trained or, with ``stock``, in stock
    Keras layers."""
    tf = tensorflow()
    model = build_lenet("sequential", for_training=not stock)
    rows: list[dict[str, float | str]] = []
    shape: tuple[int, ...] = INPUT_SHAPE
    rng = np.random.default_rng(0)
    for number, layer in enumerate(model.layers):
        out_shape = tuple(layer.compute_output_shape((batch_size, *shape))[1:])
        if layer.name == "flatten":
            shape = out_shape
            continue
        inputs = tf.constant(rng.random((batch_size, *shape), dtype=np.float32))
        first = number == 0

        @tf.function
        def step(x: object, layer: object = layer, first: bool = first) -> object:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * y)
            wanted = list(layer.trainable_variables) + ([] if first else [x])
            return tape.gradient(loss, wanted)

        step(inputs)
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(repeats):
                step(inputs)
            best = min(best, (time.process_time() - started) / repeats / batch_size)
        rows.append({"layer": layer.name, "us_per_image": round(best * 1e6, 1)})
        shape = out_shape
    total = sum(float(row["us_per_image"]) for row in rows)
    for row in rows:
        row["share"] = round(float(row["us_per_image"]) / total, 3)
    return rows


def _count(most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``most``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"{value} is not between 1 and {most}")
        return value

    return parse


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=_count(65536), default=256, metavar="N",
                        help="images a step (1-65536) [default: 256]")
    parser.add_argument("--repeats", type=_count(10000), default=50, metavar="N",
                        help="steps a round, best of five rounds (1-10000) [default: 50]")
    parser.add_argument("--stock", action="store_true",
                        help="time Keras's own Conv2D for conv1, not the kernel training uses")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    keras("this profile")
    rows = profile(args.batch_size, args.repeats, args.stock)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| layer | processor µs an image (forward and backward) | share |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['layer']} | {row['us_per_image']} | {row['share']:.1%} |")


if __name__ == "__main__":
    run_script(main)
