"""Training: the saved classifier and encoder, the reported accuracy, determinism, recipes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_embed import RECIPES, LenetEmbedError, Recipe, encoder_of
from lenet_embed._keras import keras
from lenet_embed.embed import KerasEncoder
from lenet_embed.model import find_layer, load_classifier
from lenet_embed.preprocess import scale_pixels
from lenet_embed.training import encoder_path_for, train


def _accuracy(model, split) -> float:
    probabilities = model.predict(scale_pixels(split.images)[..., None], verbose=0)
    return float(np.mean(probabilities.argmax(axis=1) == split.labels))


@pytest.fixture(scope="module")
def tiny(mnist):
    return mnist.head(400, 100)


def test_training_result_and_files(trained, small):
    model = Path(trained.model)
    assert trained.epochs == 1
    assert (trained.recipe, trained.style) == ("seed", "sequential")
    assert trained.encoder == str(encoder_path_for(model))
    assert trained.encoder.endswith("lenet.encoder.keras")
    assert trained.seconds > 0 and trained.cpu_seconds > 0
    # Saved atomically: exactly the two files, no temporary leftovers beside them.
    assert sorted(p.name for p in model.parent.iterdir()) == ["lenet.encoder.keras", "lenet.keras"]
    assert set(trained.to_dict()) == {f.name for f in dataclasses.fields(trained)}


def test_reported_accuracy_is_the_saved_models(trained, classifier, small):
    accuracy = _accuracy(classifier, small.test)
    assert trained.test_accuracy == pytest.approx(accuracy, abs=1e-6)
    # One epoch on a few thousand digits is far better than guessing among ten classes.
    assert accuracy > 0.8


def test_seed_recipe_is_the_tutorials(classifier, small):
    recipe = RECIPES["seed"]
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size, recipe.epochs) == (
        "rmsprop", 1e-3, 32, 5)
    assert classifier.optimizer.__class__.__name__ == "RMSprop"
    assert float(classifier.optimizer.learning_rate) == pytest.approx(recipe.learning_rate)
    # Trained with the row-by-row conv1, saved with Keras's own layer and the optimizer's state
    # as training left it: one step a batch of 32.
    assert type(find_layer(classifier, "conv1")) is keras().layers.Conv2D
    assert int(classifier.optimizer.iterations) == -(-len(small.train.labels) // 32)


def test_training_with_the_stock_conv1_kernel_trains_the_same_model(tiny, tmp_path):
    """Same seed, either conv1 kernel: the same weights but for float rounding."""
    runs = [train(tiny, epochs=1, seed=5, verbose=0, stock_conv1=stock,
                  out=tmp_path / str(stock) / "m.keras") for stock in (False, True)]
    fast, stock = (load_classifier(run.model).get_weights() for run in runs)
    for got, want in zip(fast, stock, strict=True):
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_saved_encoder_matches_the_classifier(trained, classifier, small):
    pixels = scale_pixels(small.test.images[:200])
    saved = KerasEncoder.load(trained.encoder)
    assert saved.dim == 84
    # Same batch size on both sides: oneDNN's kernels round differently for other batch shapes
    # (a few ulps), and this test is about the saved weights, not about batching.
    # predict() and a direct call may still take different kernels (1.9e-6 was seen on a busy
    # two-core machine); wrong or missing weights would differ by orders of magnitude more.
    expected = encoder_of(classifier).predict(pixels[..., None], batch_size=64, verbose=0)
    assert np.abs(saved.embed(pixels, batch_size=64) - expected).max() <= 1e-5


def test_same_seed_same_weights(tiny, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = train(tiny, style="subclass", epochs=1, seed=seed, verbose=0,
                       out=tmp_path / name / "lenet.keras")
        runs[name] = load_classifier(result.model)  # also: a subclass model reloads
        assert result.test_accuracy == pytest.approx(_accuracy(runs[name], tiny.test), abs=1e-6)
    weights = {name: find_layer(model, "conv2").get_weights()[0] for name, model in runs.items()}
    assert np.array_equal(weights["a"], weights["b"])
    assert not np.array_equal(weights["a"], weights["c"])


def test_epochs_override_and_progress_goes_to_stderr(tiny, tmp_path, capsys):
    result = train(tiny, epochs=2, batch_size=64, seed=1, verbose=2, out=tmp_path / "m.keras")
    captured = capsys.readouterr()
    assert result.epochs == 2
    assert captured.out == ""
    assert "Epoch 2/2" in captured.err


def test_custom_recipe_with_augmentation(tiny, tmp_path, capsys):
    recipe = Recipe(name="busy", description="every knob turned", optimizer="adamw",
                    learning_rate=3e-3, weight_decay=5e-4, schedule="cosine", batch_size=64,
                    epochs=3, label_smoothing=0.1, shift=0.08, rotation=0.03, zoom=0.1,
                    degrade=0.5, clean_finish=0.34)
    result = train(tiny, recipe=recipe, style="functional", seed=3, verbose=2,
                   out=tmp_path / "m.keras")
    model = load_classifier(result.model)
    assert result.recipe == "busy" and result.style == "functional"
    assert result.epochs == recipe.epochs
    assert result.test_accuracy == pytest.approx(_accuracy(model, tiny.test), abs=1e-6)
    assert model.optimizer.__class__.__name__ == "AdamW"
    # Two augmented epochs, then one clean one, numbered as one run; the cosine schedule ran on
    # across the two parts, one step a batch, down to its end.
    err = capsys.readouterr().err
    assert [f"Epoch {n}/3" in err for n in (1, 2, 3)] == [True] * 3
    assert int(model.optimizer.iterations) == 3 * -(-len(tiny.train.labels) // 64)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)


def test_training_phases_end_on_the_images_as_they_are():
    from lenet_embed.recipes import DEFAULT_RECIPE
    from lenet_embed.training import training_phases

    recipe = RECIPES[DEFAULT_RECIPE]
    (moved, start, switch), (plain, again, end) = training_phases(recipe)
    assert (moved, start, end) == (recipe, 0, recipe.epochs) and switch == again
    assert end - switch == round(recipe.clean_finish * recipe.epochs) > 0
    assert (plain.shift, plain.rotation, plain.zoom, plain.degrade, plain.redrawn) == (0,) * 5
    # Everything else, outlier exposure's non-digits included, is the recipe's own.
    assert dataclasses.replace(plain, shift=recipe.shift, rotation=recipe.rotation,
                               zoom=recipe.zoom, degrade=recipe.degrade,
                               redrawn=recipe.redrawn) == recipe
    # The fraction scales with the epochs actually trained, rounded half up.
    halved = dataclasses.replace(recipe, epochs=2, clean_finish=0.25)
    assert [(first, last) for _, first, last in training_phases(halved)] == [(0, 1), (1, 2)]
    for finish, spans in ((0.0, [(0, 4)]), (0.1, [(0, 4)]), (1.0, [(0, 4)])):
        phases = training_phases(dataclasses.replace(recipe, epochs=4, clean_finish=finish))
        assert [(first, last) for _, first, last in phases] == spans
        assert (phases[0][0].shift == 0) == (finish == 1.0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"recipe": "turbo"}, "turbo"),
        ({"style": "recursive"}, "recursive"),
        ({"recipe": Recipe(name="x", description="", optimizer="sgd")}, "sgd"),
        ({"recipe": Recipe(name="x", description="", schedule="step")}, "step"),
        ({"recipe": Recipe(name="x", description="", clean_finish=1.5)}, "clean_finish"),
    ],
)
def test_bad_settings_are_reported(tiny, tmp_path, kwargs, fragment):
    out = tmp_path / "m.keras"
    with pytest.raises(LenetEmbedError, match=fragment):
        train(tiny, verbose=0, out=out, **kwargs)
    assert not out.exists()


def test_encoder_path_for():
    assert encoder_path_for("models/lenet.keras") == Path("models/lenet.encoder.keras")
    assert encoder_path_for(Path("/x/y/best.keras")) == Path("/x/y/best.encoder.keras")


@pytest.mark.parametrize("first", ["build_index", "RECIPES", "Recipe"])
def test_package_level_train_is_the_function(first, quiet_env):
    """README: ``from lenet_embed import ... train`` is the public training function. Checked in
    a fresh interpreter, since whether it works depends on what was imported before."""
    code = f"from lenet_embed import {first}, train; assert callable(train), train"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=quiet_env, timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


def test_default_recipe_is_augmented_with_outlier_exposure_pictures_and_fragments():
    from lenet_embed.recipes import DEFAULT_RECIPE

    recipe = RECIPES[DEFAULT_RECIPE]
    assert DEFAULT_RECIPE == "fragments" and recipe.redrawn == 20_000
    assert recipe.fragments == 5_000
    assert (recipe.optimizer, recipe.schedule, recipe.label_smoothing) == ("adamw", "cosine", 0.1)
    assert recipe.weight_decay > 0
    assert recipe.shift > 0 and recipe.rotation > 0 and recipe.zoom > 0
    assert 0 < recipe.degrade < 1
    assert recipe.outliers == 10_000 and 0 < recipe.outlier_weight <= 1
    assert 0 < recipe.clean_finish < 1


def test_random_affine_is_seeded_and_bounded(mnist):
    from lenet_embed._keras import tensorflow
    from lenet_embed.training import _random_affine

    tf = tensorflow()
    digits = scale_pixels(mnist.test.images[:64])[..., None]
    batch = tf.constant(digits)
    still = dataclasses.replace(RECIPES["seed"], shift=0.0, rotation=0.0, zoom=0.0)
    identity = _random_affine(batch, tf.constant([1, 2], tf.int64), still).numpy()
    assert np.abs(identity - digits).max() < 1e-5

    shifted = dataclasses.replace(RECIPES["seed"], shift=0.1)
    first = _random_affine(batch, tf.constant([1, 2], tf.int64), shifted).numpy()
    again = _random_affine(batch, tf.constant([1, 2], tf.int64), shifted).numpy()
    other = _random_affine(batch, tf.constant([3, 4], tf.int64), shifted).numpy()
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)

    # A pure shift moves each digit's centre of mass by at most 10% of 28 px per axis.
    def centre(images: np.ndarray) -> np.ndarray:
        grid = np.arange(28)
        mass = images[..., 0].sum(axis=(1, 2))
        rows = (images[..., 0].sum(axis=2) * grid).sum(axis=1) / mass
        cols = (images[..., 0].sum(axis=1) * grid).sum(axis=1) / mass
        return np.stack([rows, cols], axis=1)

    moved = np.abs(centre(first) - centre(digits))
    assert moved.max() <= 2.8 + 0.5
    assert moved.mean() > 0.3


def test_outlier_exposure_adds_non_digits_with_uniform_targets(mnist):
    from dataclasses import replace

    from lenet_embed.training import OUTLIER_RATIO, _examples, _pipeline, outlier_images

    recipe = replace(RECIPES["seed"], outliers=24, outlier_weight=0.5, batch_size=512)
    images, labels = mnist.train.images[:300], mnist.train.labels[:300]

    def first_batch(count: int, training: bool) -> tuple:
        examples = _examples(images[:count], labels[:count], recipe, training)
        return next(iter(_pipeline(examples, recipe, training, seed=1)))

    x, y, w = first_batch(300, True)
    # Of the 24 non-digits drawn, those that reach the model (preprocessing answers the rest).
    reached = len(outlier_images(24))
    assert 0 < reached <= 24
    assert x.shape == (300 + reached, 28, 28, 1) and y.shape == (300 + reached, 10)
    y, w = y.numpy(), w.numpy()
    outliers = w == 0.5
    # The non-digits with the uniform target; the 300 digits one-hot at full weight.
    assert outliers.sum() == reached and np.allclose(y[outliers], 0.1)
    assert np.all(w[~outliers] == 1.0) and np.all(y[~outliers].max(axis=1) == 1.0)
    assert set(y[~outliers].argmax(axis=1)) <= set(labels.tolist())
    # Evaluation never sees them.
    _, _, w_test = first_batch(300, False)
    assert len(w_test) == 300 and np.all(w_test.numpy() == 1.0)
    # A training set of 60 digits draws at most 60 / OUTLIER_RATIO non-digits, not 24.
    _, _, w_small = first_batch(60, True)
    few = int((w_small.numpy() == 0.5).sum())
    assert few == len(outlier_images(60 // OUTLIER_RATIO)) and 0 < few <= 60 // OUTLIER_RATIO


def test_fragments_join_the_non_digits_from_the_training_digits(mnist):
    from dataclasses import replace

    from lenet_embed.nondigits import fragments
    from lenet_embed.training import OUTLIER_RATIO, _examples

    recipe = replace(RECIPES["seed"], fragments=30, outlier_weight=0.5)
    images, labels = mnist.train.images[:600], mnist.train.labels[:600]
    x, alternates, y, w = _examples(images, labels, recipe, True, seed=3)
    made = x[600:]
    assert 0 < len(made) <= 30 and np.array_equal(alternates[600:], made)
    assert np.allclose(y[600:], 0.1) and np.all(w[600:] == 0.5) and np.all(w[:600] == 1.0)
    # They are fragments of training digits, the same ones for the same seed.
    assert np.array_equal(made, _examples(images, labels, recipe, True, seed=3)[0][600:])
    rows = np.sort(np.random.default_rng([3, 11]).permutation(600)[:30])
    assert np.array_equal(made, fragments(images[rows], 3))
    # Never more than one per OUTLIER_RATIO digits; none outside training.
    small = _examples(images[:60], labels[:60], recipe, True, seed=3)[0]
    assert 60 < len(small) <= 60 + 60 // OUTLIER_RATIO
    assert len(_examples(images, labels, recipe, False, seed=3)[0]) == 600


def test_redrawn_digits_replace_their_originals_half_the_time(mnist):
    """Recipe ``redrawn``: that many digits have a redrawn picture as their alternate, and each
    batch shows about half of them as it; the other digits, and a pass without ``redrawn``
    (the clean finish, evaluation), are always the images as they are."""
    from dataclasses import replace

    from lenet_embed.training import _examples, _pipeline

    recipe = replace(RECIPES["seed"], redrawn=200, batch_size=300)
    images, labels = mnist.train.images[:300], mnist.train.labels[:300]
    examples = _examples(images, labels, recipe, True, seed=1)
    alternates = examples[1]
    changed = np.flatnonzero((alternates != images).any(axis=(1, 2)))
    assert 150 < len(changed) <= 200  # (a redrawn picture may come back as its digit)
    # The alternates are the redrawn pictures of their rows, the same for the same seed.
    assert np.array_equal(alternates, _examples(images, labels, recipe, True, seed=1)[1])
    pictures = [alternates[row] for row in changed]
    x, y, _ = next(iter(_pipeline(examples, recipe, True, seed=1)))
    x = np.round(x.numpy()[..., 0] * 255).astype(np.uint8)
    originals = {image.tobytes() for image in images}
    redrawn_pictures = {picture.tobytes() for picture in pictures}
    shown_as_picture = 0
    for row in x:
        if row.tobytes() in originals:
            continue  # a digit as it is
        assert row.tobytes() in redrawn_pictures
        shown_as_picture += 1
    assert 0.3 * len(changed) < shown_as_picture < 0.7 * len(changed)
    plain = replace(recipe, redrawn=0)
    x_plain, _, _ = next(iter(_pipeline(examples, plain, True, seed=1)))
    x_plain = np.round(x_plain.numpy()[..., 0] * 255).astype(np.uint8)
    assert all(row.tobytes() in originals for row in x_plain)


def test_random_degradation_is_seeded_and_changes_the_chosen_part(mnist):
    """The first half of the batch is degraded (one way per batch, chosen by the seed), rescaled
    to a maximum of 1; the rest is untouched; the same seed gives the same batch, and over many
    seeds every way shows up: blur and coarse grids soften edges, strokes grow or shrink."""
    from lenet_embed._keras import tensorflow
    from lenet_embed.training import _random_degradation

    tf = tensorflow()
    digits = scale_pixels(mnist.test.images[:32])[..., None]
    batch = tf.constant(digits)

    def degrade(seed: int) -> np.ndarray:
        return _random_degradation(batch, tf.constant([seed, 7], tf.int64), 0.5).numpy()

    first = degrade(1)
    assert np.array_equal(first, degrade(1))
    assert np.array_equal(first[16:], digits[16:])
    assert np.abs(first[:16] - digits[:16]).max() > 0.1
    assert np.allclose(first[:16].max(axis=(1, 2, 3)), 1.0)
    ink = (digits[:16] > 0.5).sum()
    seen = set()
    for seed in range(40):
        out = degrade(seed)[:16]
        steps = np.abs(np.diff(out, axis=2)).max(axis=(1, 2, 3)).mean()
        grown = (out > 0.5).sum() / ink
        seen.add("grown" if grown > 1.3 else "shrunk" if grown < 0.8 else
                 "soft" if steps < 0.6 * np.abs(np.diff(digits[:16], axis=2)).max() else "other")
    assert {"grown", "shrunk", "soft"} <= seen


def test_profile_layers_times_every_layer_that_computes(tmp_path):
    """scripts/profile_layers.py names each layer of the network but flatten, with a positive
    time an image, and shares that sum to one; bad options stop with a usage error."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_layers.py"
    run = subprocess.run([sys.executable, script, "--batch-size", "4", "--repeats", "2", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [row["layer"] for row in rows] == ["conv1", "pool1", "conv2", "pool2", "conv3", "fc2",
                                             "prediction"]
    assert all(row["us_per_image"] > 0 for row in rows)
    assert sum(row["share"] for row in rows) == pytest.approx(1.0, abs=0.01)
    bad = subprocess.run([sys.executable, script, "--batch-size", "0"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "--batch-size" in bad.stderr
