"""LeNet-5 built three ways: architecture, parameter count, parity between the styles, the
headless 84-d encoder, and saved encoders that load with plain Keras."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lenet_embed import LenetEmbedError, build_lenet, encoder_of
from lenet_embed.model import EMBEDDING_DIM, ENCODER_LAYERS, STYLES, find_layer, load_classifier
from lenet_embed.preprocess import scale_pixels

LAYER_NAMES = (*ENCODER_LAYERS, "prediction")


def _expected_parameter_count() -> int:
    """LeNet-5's parameters from its definition: conv k*k*in*out + out, dense in*out + out."""

    def conv(kernel: int, c_in: int, c_out: int) -> int:
        return kernel * kernel * c_in * c_out + c_out

    def dense(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    side = 28  # conv1 is 'same'
    side //= 2  # pool1
    side -= 4  # conv2 5x5 valid
    side //= 2  # pool2
    side -= 4  # conv3 5x5 valid
    return (conv(5, 1, 6) + conv(5, 6, 16) + conv(5, 16, 120)
            + dense(120 * side * side, 84) + dense(84, 10))


def _leaf_layers(model) -> list:
    leaves = []
    for layer in model.layers:
        if hasattr(layer, "layers"):
            leaves.extend(_leaf_layers(layer))
        elif layer.__class__.__name__ != "InputLayer":
            leaves.append(layer)
    return leaves


def _copy_weights(source, target) -> None:
    for name in LAYER_NAMES:
        find_layer(target, name).set_weights(find_layer(source, name).get_weights())


@pytest.fixture(scope="module")
def pixels(mnist) -> np.ndarray:
    return scale_pixels(mnist.test.images[:64])[..., None]


@pytest.mark.parametrize("style", STYLES)
def test_parameter_count(style):
    expected = _expected_parameter_count()
    assert expected == 61_706  # the figure the README, docs/index.md and the tutorial quote
    assert build_lenet(style).count_params() == expected


@pytest.mark.parametrize("style", STYLES)
def test_layer_names_and_shapes(style):
    model = build_lenet(style)
    leaves = _leaf_layers(model)
    assert tuple(layer.name for layer in leaves) == LAYER_NAMES
    conv1, conv2, conv3 = (find_layer(model, n).get_config() for n in ("conv1", "conv2", "conv3"))
    assert (conv1["filters"], conv1["padding"]) == (6, "same")
    assert (conv2["filters"], conv2["padding"]) == (16, "valid")
    assert (conv3["filters"], conv3["padding"]) == (120, "valid")
    assert all(c["kernel_size"] == (5, 5) and c["activation"] == "relu"
               for c in (conv1, conv2, conv3))
    fc2, head = find_layer(model, "fc2").get_config(), find_layer(model, "prediction").get_config()
    assert (fc2["units"], fc2["activation"]) == (EMBEDDING_DIM, "relu")
    assert (head["units"], head["activation"]) == (10, "softmax")
    assert tuple(model.output_shape) == (None, 10)


def test_unknown_style_and_layer():
    with pytest.raises(LenetEmbedError, match="style"):
        build_lenet("convolutional")
    with pytest.raises(LenetEmbedError, match="fc3"):
        find_layer(build_lenet("functional"), "fc3")


@pytest.fixture(scope="module")
def parity_models(classifier):
    """The session's trained (sequential) classifier copied by layer name into every style."""
    models = {}
    for style in STYLES:
        model = build_lenet(style)
        _copy_weights(classifier, model)
        models[style] = model
    return models


@pytest.mark.parametrize("style", STYLES)
def test_styles_agree_once_weights_are_copied(classifier, pixels, style):
    reference = classifier.predict(pixels, verbose=0)
    model = build_lenet(style)
    fresh = model.predict(pixels, verbose=0)
    assert np.abs(fresh - reference).max() > 1e-3  # untrained: not the same network yet
    _copy_weights(classifier, model)
    assert np.abs(model.predict(pixels, verbose=0) - reference).max() <= 1e-5
    reference_embedding = encoder_of(classifier).predict(pixels, verbose=0)
    embedding = encoder_of(model).predict(pixels, verbose=0)
    assert embedding.shape == (len(pixels), EMBEDDING_DIM)
    assert np.abs(embedding - reference_embedding).max() <= 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_encoder_outputs_fc2(parity_models, pixels, style):
    """The encoder's 84-d output, pushed through the head's weights, gives the predictions."""
    model = parity_models[style]
    embedding = encoder_of(model).predict(pixels, verbose=0).astype(np.float64)
    assert embedding.shape == (len(pixels), EMBEDDING_DIM)
    assert embedding.min() >= 0.0  # relu
    kernel, bias = find_layer(model, "prediction").get_weights()
    logits = embedding @ kernel + bias
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    assert np.abs(softmax - model.predict(pixels, verbose=0)).max() <= 1e-5


def test_encoder_shares_the_classifier_weights(pixels):
    model = build_lenet("subclass")
    encoder = encoder_of(model)
    assert np.abs(encoder.predict(pixels, verbose=0)).max() > 0
    fc2 = find_layer(model, "fc2")
    fc2.set_weights([np.zeros_like(w) for w in fc2.get_weights()])
    assert np.abs(encoder.predict(pixels, verbose=0)).max() == 0


@pytest.mark.parametrize("style", STYLES)
def test_classifier_save_and_load(parity_models, pixels, tmp_path, style):
    path = tmp_path / f"{style}.keras"
    parity_models[style].save(path)
    loaded = load_classifier(str(path))
    expected = parity_models[style].predict(pixels, verbose=0)
    assert np.abs(loaded.predict(pixels, verbose=0) - expected).max() <= 1e-6


def test_load_classifier_rejects_a_bad_file(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a keras archive")
    with pytest.raises(LenetEmbedError, match="broken.keras"):
        load_classifier(str(path))


LOAD_WITH_PLAIN_KERAS = textwrap.dedent(
    """
    import sys

    sys.modules["lenet_embed"] = None  # any import of the package now fails
    import keras
    import numpy as np

    pixels = np.load(sys.argv[1])
    outputs = {}
    for i, path in enumerate(sys.argv[3:]):
        model = keras.models.load_model(path)
        outputs[f"out{i}"] = np.asarray(model.predict(pixels, verbose=0))
    assert sys.modules["lenet_embed"] is None
    np.savez(sys.argv[2], **outputs)
    """
)


def test_saved_encoders_load_with_plain_keras(parity_models, pixels, tmp_path, quiet_env):
    np.save(tmp_path / "pixels.npy", pixels)
    paths, expected = [], []
    for style in STYLES:
        encoder = encoder_of(parity_models[style])
        paths.append(str(tmp_path / f"{style}.encoder.keras"))
        encoder.save(paths[-1])
        expected.append(encoder.predict(pixels, verbose=0))
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITH_PLAIN_KERAS)
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pixels.npy"), str(out), *paths],
        capture_output=True, text=True, env=quiet_env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as outputs:
        for i, want in enumerate(expected):
            got = outputs[f"out{i}"]
            assert got.shape == (len(pixels), EMBEDDING_DIM)
            assert np.abs(got - want).max() <= 1e-5


def _output_and_gradients(model, pixels):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = model(pixels)
        loss = tf.reduce_sum(out * out)
    return np.asarray(out), [np.asarray(g) for g in tape.gradient(loss, model.trainable_weights)]


@pytest.mark.parametrize("style", STYLES)
def test_the_training_network_is_the_same_network(pixels, style):
    """build_lenet(for_training=True) computes conv1 its own way, but with the same weights it
    gives the same outputs and the same gradients as the stock network, so either trains it."""
    fast, plain = build_lenet(style, for_training=True), build_lenet(style)
    assert type(find_layer(fast, "conv1")) is not type(find_layer(plain, "conv1"))
    assert fast.count_params() == 61_706
    plain.set_weights(fast.get_weights())
    out_fast, grads_fast = _output_and_gradients(fast, pixels)
    out_plain, grads_plain = _output_and_gradients(plain, pixels)
    assert np.abs(out_fast - out_plain).max() <= 1e-6
    assert len(grads_fast) == len(grads_plain) == 10
    for got, want in zip(grads_fast, grads_plain, strict=True):
        assert np.abs(want).max() > 0
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize(("kernel", "padding", "strides", "channels"), [
    ((5, 5), "same", 1, 1), ((3, 5), "valid", 1, 1), ((4, 4), "same", 1, 3),
    ((5, 3), "valid", 1, 2), ((3, 3), "same", 2, 1)])
def test_row_convolution_is_keras_convolution(kernel, padding, strides, channels):
    """The row-by-row matmul is Conv2D for any kernel, padding and channel count (even kernels
    pad as TensorFlow does); strided layers fall back to Keras's own convolution."""
    import keras

    from lenet_embed.model import _row_conv_class

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 11, 9, channels)).astype(np.float32)
    settings = dict(filters=5, kernel_size=kernel, padding=padding, strides=strides)
    row, stock = _row_conv_class()(**settings), keras.layers.Conv2D(**settings)
    want = np.asarray(stock(x))
    row(x)
    row.set_weights(stock.get_weights())
    assert (row._rows is None) == (strides != 1)
    assert np.asarray(row(x)).shape == want.shape
    assert np.abs(np.asarray(row(x)) - want).max() <= 1e-5
