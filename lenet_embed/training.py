"""Train a LeNet-5 classifier on MNIST and save it with its headless encoder.

Training is configured by a :class:`~lenet_embed.recipes.Recipe` (data, not scattered
literals). ``seed`` is the tutorial's recipe, kept exactly: RMSprop(1e-3), batch 32, 5 epochs,
categorical cross-entropy on one-hot labels, pixels scaled to [0, 1]. Batches come through
``tf.data`` so the whole training set never goes through one call (the tutorial ran out of
memory doing that).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._keras import keras, tensorflow
from .augment import redrawn
from .data import Dataset, load_mnist
from .errors import LenetEmbedError
from .model import NUM_CLASSES, build_lenet, encoder_of
from .nondigits import FONT_KINDS, KINDS, MissingFonts, fragments, generate
from .preprocess import SIDE, to_uint8
from .recipes import DEFAULT_MODEL_PATH, DEFAULT_RECIPE, DEFAULT_SEED, Recipe, get_recipe

log = logging.getLogger(__name__)

# Outlier exposure draws at most one non-digit per this many training digits (10,000 for MNIST's
# 60,000), so that a small training set is not swamped by them.
OUTLIER_RATIO = 6


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced and how well the classifier did on the test split."""

    test_accuracy: float
    epochs: int
    seconds: float  # wall-clock time of the training passes (fit), not loading or saving
    # Processor time of those passes, every thread: the work done, which a machine that lends
    # its cores to others (a shared VM) stretches in wall-clock time but not here.
    cpu_seconds: float
    model: str
    encoder: str
    recipe: str
    style: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of every field."""
        return asdict(self)


def encoder_path_for(model_path: str | os.PathLike[str]) -> Path:
    """Where the encoder goes beside a classifier: ``lenet.keras`` -> ``lenet.encoder.keras``."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.encoder.keras")




def _examples(images: np.ndarray, labels: np.ndarray, recipe: Recipe, training: bool,
              seed: int | None = None) -> tuple[np.ndarray, ...]:
    """What a pass over the data trains on: images, their alternates (the pictures of
    :func:`redrawn_alternates`, or the images themselves), one-hot targets and sample weights,
    with outlier exposure's non-digits (uniform targets) after the digits when training."""
    targets = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    weights = np.ones(len(labels), dtype=np.float32)
    alternates = images
    if training and recipe.redrawn:
        alternates = redrawn_alternates(images, recipe.redrawn, 0 if seed is None else seed)
    if training and (recipe.outliers or recipe.fragments):
        # At most one drawn per OUTLIER_RATIO digits: a small training set is not swamped.
        most = -(-len(labels) // OUTLIER_RATIO)
        outliers = outlier_images(min(recipe.outliers, most)) if recipe.outliers else images[:0]
        if recipe.fragments:
            rows = np.random.default_rng([0 if seed is None else seed, 11]).permutation(
                len(images))[:min(recipe.fragments, most)]
            outliers = np.concatenate([outliers, fragments(images[np.sort(rows)],
                                                           0 if seed is None else seed)])
        images = np.concatenate([images, outliers])
        alternates = np.concatenate([alternates, outliers])
        targets = np.concatenate([targets, np.full((len(outliers), NUM_CLASSES),
                                                   1.0 / NUM_CLASSES, dtype=np.float32)])
        weights = np.concatenate([weights, np.full(len(outliers), recipe.outlier_weight,
                                                   dtype=np.float32)])
    return images, alternates, targets, weights


def redrawn_alternates(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A copy of ``images`` (uint8 (N, 28, 28)) in which ``count`` of them, chosen at random by
    ``seed``, are redrawn as pictures and preprocessed (:func:`lenet_embed.augment.redrawn`)."""
    rows = np.sort(np.random.default_rng([seed, 7]).permutation(len(images))[:count])
    started = time.perf_counter()
    alternates = images.copy()
    alternates[rows] = redrawn(images[rows], seed)
    log.info("redrew %d training digits as pictures in %.1f s", len(rows),
             time.perf_counter() - started)
    return alternates


def training_phases(recipe: Recipe) -> list[tuple[Recipe, int, int]]:
    """The parts of a training run: ``(recipe as trained, first epoch, end epoch)``, epochs
    counted from 0, in order. The last ``clean_finish`` of the epochs (rounded, half up) train
    without shift, rotation, zoom, degradation or redrawn pictures; the schedule runs on across
    the parts."""
    clean = min(recipe.epochs, int(recipe.clean_finish * recipe.epochs + 0.5))
    plain = replace(recipe, shift=0.0, rotation=0.0, zoom=0.0, degrade=0.0, redrawn=0)
    phases = [(recipe, 0, recipe.epochs - clean), (plain, recipe.epochs - clean, recipe.epochs)]
    return [(phase, first, end) for phase, first, end in phases if end > first]


def _pipeline(examples: tuple[np.ndarray, ...], recipe: Recipe, training: bool,
              seed: int | None) -> Any:
    tf = tensorflow()
    augmenting = training and (recipe.shift or recipe.rotation or recipe.zoom or recipe.degrade)
    swapping = training and recipe.redrawn
    # The alternates are read only when swapping: other passes (the clean finish, evaluation)
    # slice the images alone, not a second copy of them.
    images, alternates, *rest = examples
    ds = tf.data.Dataset.from_tensor_slices((images, alternates, *rest) if swapping
                                            else (images, *rest))
    if training:
        # A buffer as long as the data: a full shuffle, non-digits included.
        ds = ds.shuffle(len(examples[0]), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(recipe.batch_size if training else 1024)
    if not (augmenting or swapping):
        ds = ds.map(lambda x, y, w: (_scaled(x), y, w), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def prepare(batch: tuple[Any, ...], pair: Any) -> tuple[Any, Any, Any]:
        x, *y_w = batch
        swap_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(pair, 2))
        if swapping:  # each digit as its redrawn picture or as it is, half and half
            alternate, *y_w = y_w
            coin = tf.random.stateless_uniform(tf.shape(x)[:1], seed=swap_seed) < 0.5
            x = tf.where(coin[:, None, None], alternate, x)
        y, w = y_w
        x = _scaled(x)
        return (_augment(x, augment_seed, recipe) if augmenting else x), y, w

    # One stateless random seed pair per batch: reproducible under --seed, new every epoch, and
    # safe to run in parallel (Keras's stateful random layers are not).
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _scaled(x: Any) -> Any:
    """A uint8 (B, 28, 28) batch as float32 (B, 28, 28, 1) in [0, 1]."""
    tf = tensorflow()
    return tf.cast(x, tf.float32)[..., None] / 255.0


@functools.lru_cache(maxsize=2)
def outlier_images(count: int, seed: int = 0) -> np.ndarray:
    """Those of ``count`` non-digits of the ``fit`` split that reach the model (about three in
    four: preprocessing answers the rest itself), as the encoder sees them: read-only uint8
    (N, 28, 28). Calibration draws the same split with other seeds, so it never sees these
    pictures. Made once per process: the same arguments give the same pictures."""
    try:
        drawn = generate("fit", count, seed)
    except MissingFonts as exc:
        # Training still works on a machine without the fonts, on the other kinds only.
        log.warning("outlier exposure without letters and symbols: %s", exc)
        drawn = generate("fit", count, seed,
                         kinds=tuple(kind for kind in KINDS if kind not in FONT_KINDS))
    pixels = to_uint8(drawn.pixels)
    pixels.setflags(write=False)
    return pixels


def _augment(images: Any, seed_pair: Any, recipe: Recipe) -> Any:
    """A (B, 28, 28, 1) batch moved (:func:`_random_affine`), then part of it degraded
    (:func:`_random_degradation`), each with its own seed drawn from the batch's."""
    tf = tensorflow()
    affine_seed, degrade_seed = tf.unstack(tf.random.experimental.stateless_split(seed_pair, 2))
    if recipe.shift or recipe.rotation or recipe.zoom:
        images = _random_affine(images, affine_seed, recipe)
    if recipe.degrade:
        images = _random_degradation(images, degrade_seed, recipe.degrade)
    return images


def _random_degradation(images: Any, seed_pair: Any, fraction: float) -> Any:
    """Degrade the first ``fraction`` of a shuffled (B, 28, 28, 1) batch (so a random part of
    the data) as a scan would, one way per batch, drawn at random, each image at its own random
    strength: a coarse grid of 7-20 cells blown back up smoothly (blur, or a low-resolution
    sensor) or of 7-12 cells in blocks, strokes thicker or thinner by up to one pixel each side,
    or ink of uneven darkness with texture specks. The result is rescaled to a maximum of 1, as
    preprocessing does with its crop.

    Strengths and draws are this function's own, independent of the evaluation set's
    (lenet_embed/degrade.py), so that set measures what the model learnt, not what it saw.
    """
    tf = tensorflow()
    count = tf.cast(tf.round(fraction * tf.cast(tf.shape(images)[0], tf.float32)), tf.int32)
    # The shifted-copy filter below slices by the static image size, which the affine loses.
    chosen = tf.ensure_shape(images[:count], (None, SIDE, SIDE, 1))
    seeds = tf.random.experimental.stateless_split(seed_pair, 4)
    strength = tf.random.stateless_uniform((count, 1, 1, 1), seed=seeds[0])

    def grid(low: int, high: int, method: str) -> Any:
        cells = tf.random.stateless_uniform((), seed=seeds[1], minval=low, maxval=high + 1,
                                            dtype=tf.int32)
        coarse = tf.image.resize(chosen, tf.stack([cells, cells]), method="area")
        return tf.image.resize(coarse, (SIDE, SIDE), method=method)

    def stroke(sign: float) -> Any:
        return chosen + (sign * _max3(sign * chosen) - chosen) * (0.3 + 0.7 * strength)

    def textured() -> Any:
        field = tf.image.resize(tf.random.stateless_uniform((count, 5, 5, 1), seed=seeds[2]),
                                (SIDE, SIDE))
        specks = tf.nn.relu(tf.random.stateless_normal(tf.shape(chosen), seed=seeds[3]) - 2.0)
        return chosen * (1.0 - 0.5 * strength * field) + 0.3 * strength * specks

    branches = [lambda: grid(7, 20, "bilinear"), lambda: grid(7, 12, "nearest"),
                lambda: stroke(1.0), lambda: stroke(-1.0), textured]
    kind = tf.random.stateless_uniform((), seed=seeds[0] + 1, maxval=len(branches),
                                       dtype=tf.int32)
    degraded = tf.clip_by_value(tf.switch_case(kind, branches), 0.0, 1.0)
    degraded /= tf.maximum(tf.reduce_max(degraded, axis=[1, 2, 3], keepdims=True), 1e-3)
    return tf.concat([degraded, images[count:]], axis=0)


def _max3(images: Any) -> Any:
    """The maximum over each pixel's 3x3 neighbourhood (a dilation by one pixel), as maxima of
    shifted copies: on one channel TensorFlow's max_pool2d took several times longer on CPU."""
    tf = tensorflow()
    for axis in (1, 2):
        padded = tf.pad(images, [[0, 0], [1, 1] if axis == 1 else [0, 0],
                                 [1, 1] if axis == 2 else [0, 0], [0, 0]])
        window = [slice(None)] * 4
        copies = []
        for offset in range(3):
            window[axis] = slice(offset, offset + SIDE)
            copies.append(padded[tuple(window)])
        images = tf.reduce_max(tf.stack(copies), axis=0)
    return images


def _random_affine(images: Any, seed_pair: Any, recipe: Recipe) -> Any:
    """Rotate, zoom and shift each image of a (B, 28, 28, 1) batch by its own random amounts.

    All three are folded into one projective transform per image, which maps each output pixel
    back to the input point it samples: centre + R(-angle) (out - centre - shift) / scale.
    """
    tf = tensorflow()
    batch = tf.shape(images)[0]
    u = tf.random.stateless_uniform((batch, 4), seed=seed_pair, minval=-1.0, maxval=1.0)
    angle = u[:, 0] * recipe.rotation * 2.0 * np.pi
    scale = 1.0 + u[:, 1] * recipe.zoom
    side = tf.cast(tf.shape(images)[1], tf.float32)
    shift_x, shift_y = u[:, 2] * recipe.shift * side, u[:, 3] * recipe.shift * side
    centre = (side - 1.0) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    zeros = tf.zeros_like(cos)
    transforms = tf.stack(
        [
            cos, sin, centre - cos * (centre + shift_x) - sin * (centre + shift_y),
            -sin, cos, centre + sin * (centre + shift_x) - cos * (centre + shift_y),
            zeros, zeros,
        ],
        axis=1,
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def _optimizer(recipe: Recipe, steps_per_epoch: int, epochs: int) -> Any:
    k = keras()
    rate: Any = recipe.learning_rate
    if recipe.schedule == "cosine":
        rate = k.optimizers.schedules.CosineDecay(recipe.learning_rate, steps_per_epoch * epochs)
    elif recipe.schedule != "constant":
        raise LenetEmbedError(f"recipe {recipe.name!r}: unknown schedule {recipe.schedule!r}")
    ema = {"use_ema": True, "ema_momentum": recipe.ema} if recipe.ema else {}
    if recipe.optimizer == "rmsprop":
        return k.optimizers.RMSprop(rate, **ema)
    if recipe.optimizer == "adamw":
        return k.optimizers.AdamW(rate, weight_decay=recipe.weight_decay, **ema)
    raise LenetEmbedError(f"recipe {recipe.name!r}: unknown optimizer {recipe.optimizer!r}")


def _progress_of(epochs: int) -> Any:
    """Keras's progress output, counting epochs out of the whole run's ``epochs`` when a run is
    fitted in parts (:func:`training_phases`): "Epoch 19/24", not "Epoch 1/6"."""
    k = keras()

    class RunProgress(k.callbacks.ProgbarLogger):
        def set_params(self, params: dict[str, Any]) -> None:
            super().set_params({**params, "epochs": epochs})

    return RunProgress()


def _save_atomically(model: Any, path: Path) -> None:
    """Write a .keras file beside its final name, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train(
    data: str | os.PathLike[str] | Dataset | None = None,
    recipe: str | Recipe = DEFAULT_RECIPE,
    style: str = "sequential",
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int | None = DEFAULT_SEED,
    out: str | os.PathLike[str] = DEFAULT_MODEL_PATH,
    verbose: int | None = None,
    stock_conv1: bool = False,
) -> TrainResult:
    """Train LeNet-5 on ``data`` and save the classifier to ``out`` and its encoder beside it.

    ``verbose`` is passed to Keras (1: a progress bar per epoch, 2: one line per epoch, 0: quiet;
    None: a progress bar on a terminal, one line per epoch otherwise); Keras's output goes to
    stderr so stdout stays free for results. ``seed`` makes the run
    deterministic (same seed, same data, same machine: same weights); by default every run uses
    the same seed, so a model can be rebuilt exactly. ``seed=None`` trains without a fixed seed.
    conv1 is trained as a row-by-row matmul, the same convolution as Keras's to float rounding,
    which cuts an epoch of the default recipe's processor time by about 40 % on a CPU (README
    "Training recipes"); ``stock_conv1`` trains with Keras's kernel (``scripts/bench_quality.py``
    times the seed recipe both ways). Either way the saved model is the plain LeNet-5.
    """
    chosen = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if epochs is not None:
        chosen = replace(chosen, epochs=epochs)
    if batch_size is not None:
        chosen = replace(chosen, batch_size=batch_size)
    if chosen.epochs < 1 or chosen.batch_size < 1:
        raise LenetEmbedError("--epochs and --batch-size must be at least 1")
    if not 0.0 <= chosen.clean_finish <= 1.0:
        raise LenetEmbedError(f"recipe {chosen.name!r}: clean_finish must be between 0 and 1, "
                              f"got {chosen.clean_finish}")
    k, tf = keras("train"), tensorflow()  # before loading data: fail at once without TensorFlow
    dataset = load_mnist(data)
    if seed is not None:
        k.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()

    images, labels = dataset.train.images, dataset.train.labels
    model = build_lenet(style, for_training=not stock_conv1)
    examples = _examples(images, labels, chosen, True, seed)
    # The schedule spans every step actually taken, outlier exposure's non-digits included.
    steps = -(-len(examples[0]) // chosen.batch_size)
    def compile_(network: Any) -> None:
        network.compile(
            optimizer=_optimizer(chosen, steps, chosen.epochs),
            loss=k.losses.CategoricalCrossentropy(label_smoothing=chosen.label_smoothing),
            metrics=["accuracy"],
        )

    compile_(model)
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2
    started, cpu_started = time.perf_counter(), time.process_time()
    progress = _progress_of(chosen.epochs)  # one progress line per epoch across the parts
    with contextlib.redirect_stdout(sys.stderr):
        for phase, first, last in training_phases(chosen):
            model.fit(
                # Each phase's own shuffle and augmentation seeds (the first phase's are seed's).
                _pipeline(examples, phase, True, None if seed is None else seed + first),
                initial_epoch=first,
                epochs=last,
                shuffle=False,  # the tf.data pipeline already reshuffles every epoch
                verbose=verbose,
                callbacks=[progress],
            )
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    # Saved as the plain network: the trained weights (and the optimizer's state) in stock layers,
    # which is what everyone loads.
    trained = build_lenet(style)
    trained.set_weights(model.get_weights())
    compile_(trained)
    trained.optimizer.build(trained.trainable_variables)
    for mine, theirs in zip(trained.optimizer.variables, model.optimizer.variables, strict=True):
        mine.assign(theirs)
    test = _pipeline(_examples(dataset.test.images, dataset.test.labels, chosen, False), chosen,
                     False, seed)
    _, accuracy = trained.evaluate(test, verbose=0)
    out = Path(out)
    encoder_path = encoder_path_for(out)
    _save_atomically(trained, out)
    _save_atomically(encoder_of(trained), encoder_path)
    return TrainResult(
        test_accuracy=float(accuracy),
        epochs=chosen.epochs,
        seconds=round(seconds, 2),
        cpu_seconds=round(cpu_seconds, 2),
        model=str(out),
        encoder=str(encoder_path),
        recipe=chosen.name,
        style=style,
    )
