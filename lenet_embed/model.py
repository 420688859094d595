"""LeNet-5 as in the tutorial, built three ways, and the headless 84-d encoder cut from it.

conv1 6@5x5 same relu -> pool1 2/2 -> conv2 16@5x5 valid relu -> pool2 2/2 -> conv3 120@5x5 valid
relu -> flatten -> fc2 Dense 84 relu -> prediction Dense 10 softmax: 61,706 parameters.

The ``sequential`` style is one ``keras.Sequential``; the ``functional`` and ``subclass`` styles
build the headless network (input -> fc2) and wrap it, as the tutorial did, in a ``Sequential``
with the ``Dense(10, softmax)`` head.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._keras import keras
from .errors import LenetEmbedError
from .files import check_regular

INPUT_SHAPE = (28, 28, 1)
EMBEDDING_DIM = 84
NUM_CLASSES = 10
STYLES = ("sequential", "functional", "subclass")
# The encoder's layers in order; the classifier adds "prediction" after them.
ENCODER_LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "fc2")


_RowConv2D: type | None = None


def _row_conv_class() -> type:
    """Define (once) ``Conv2D`` computed as one matrix product per output row, for training.

    conv1 reads one channel, and TensorFlow's CPU convolution runs such a layer at about 1
    GFLOP/s: it was 54-63 % of a training step (``scripts/profile_layers.py --stock``). Here each
    output row is the input rows under the kernel (kh x width x channels values) times a banded
    matrix built from the kernel, so forward and kernel gradient are each one well-shaped matmul:
    conv1 with its gradients runs about five times faster. The result is the same convolution (to
    float rounding) with the same weights, so a model trained with it is saved as a plain
    ``Conv2D`` (see :func:`build_lenet`). Only conv1 uses it: on conv2 (six channels in, whose
    input gradient is needed too) it measured slower than Keras's own. Strided or dilated layers
    fall back to Keras's convolution.
    """
    global _RowConv2D
    if _RowConv2D is not None:
        return _RowConv2D
    k = keras()
    ops = k.ops

    class RowConv2D(k.layers.Conv2D):
        """``Conv2D`` whose stride-1 convolution runs as a row-by-row matmul."""

        def build(self, input_shape: Any) -> None:
            super().build(input_shape)
            self._rows: tuple[int, int, int, Any] | None = None
            _, height, width, channels = input_shape
            fits = (self.data_format == "channels_last" and tuple(self.strides) == (1, 1)
                    and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
                    and None not in (height, width, channels))
            if not fits:
                return
            kh, kw = self.kernel_size
            top, left = ((kh - 1) // 2, (kw - 1) // 2) if self.padding == "same" else (0, 0)
            out_width = width if self.padding == "same" else width - kw + 1
            # band[i, c, ch, o, f]: which kernel entry (flat, as kernel[i, j, ch, f]) multiplies
            # input column c, channel ch of window row i for output column o and filter f; the
            # last slot holds 0.
            per_tap = channels * self.filters
            taps = np.arange(per_tap).reshape(channels, self.filters)
            band = np.full((kh, width, channels, out_width, self.filters), kh * kw * per_tap,
                           dtype="int32")
            for i in range(kh):
                for o in range(out_width):
                    for j in range(kw):
                        c = o - left + j
                        if 0 <= c < width:
                            band[i, c, :, o] = (i * kw + j) * per_tap + taps
            self._rows = (top, kh - 1 - top if self.padding == "same" else 0, out_width,
                          band.reshape(kh * width * channels, out_width * self.filters))

        def convolution_op(self, inputs: Any, kernel: Any) -> Any:
            if self._rows is None:
                return super().convolution_op(inputs, kernel)
            top, bottom, out_width, band = self._rows
            kh = self.kernel_size[0]
            x = ops.pad(inputs, [[0, 0], [top, bottom], [0, 0], [0, 0]])
            out_height = x.shape[1] - kh + 1
            windows = ops.stack([x[:, i:i + out_height] for i in range(kh)], axis=2)
            entries = ops.concatenate([ops.reshape(kernel, [-1]), ops.zeros([1], kernel.dtype)])
            product = ops.matmul(ops.reshape(windows, [-1, band.shape[0]]),
                                 ops.take(entries, band))
            return ops.reshape(product, [-1, out_height, out_width, self.filters])

    _RowConv2D = RowConv2D
    return RowConv2D


def _lenet_layers(for_training: bool = False) -> list[Any]:
    """Fresh encoder layers, named as in the paper, in the order they run.

    ``for_training`` computes conv1 with :func:`_row_conv_class`: the same layer, trained faster.
    """
    layers = keras().layers
    conv1 = _row_conv_class() if for_training else layers.Conv2D
    return [
        conv1(6, 5, padding="same", activation="relu", name="conv1"),
        layers.MaxPooling2D(pool_size=2, strides=2, name="pool1"),
        layers.Conv2D(16, 5, padding="valid", activation="relu", name="conv2"),
        layers.MaxPooling2D(pool_size=2, strides=2, name="pool2"),
        layers.Conv2D(120, 5, padding="valid", activation="relu", name="conv3"),
        layers.Flatten(name="flatten"),
        layers.Dense(EMBEDDING_DIM, activation="relu", name="fc2"),
    ]


def _head() -> Any:
    return keras().layers.Dense(NUM_CLASSES, activation="softmax", name="prediction")


def _build_sequential(for_training: bool) -> Any:
    k = keras()
    return k.Sequential([k.Input(INPUT_SHAPE), *_lenet_layers(for_training), _head()],
                        name="lenet5")


def _build_functional(for_training: bool) -> Any:
    k = keras()
    inputs = k.Input(INPUT_SHAPE, name="image")
    x = inputs
    for layer in _lenet_layers(for_training):
        x = layer(x)
    headless = k.Model(inputs, x, name="lenet5_headless")
    return k.Sequential([k.Input(INPUT_SHAPE), headless, _head()], name="lenet5")


_LeNet5: type | None = None


def _lenet5_class() -> type:
    """Define (once) the subclassed headless LeNet-5, registered so saved models reload."""
    global _LeNet5
    if _LeNet5 is not None:
        return _LeNet5
    k = keras()

    @k.saving.register_keras_serializable(package="lenet_embed")
    class LeNet5(k.Model):
        """Headless LeNet-5 as a ``keras.Model`` subclass: image -> 84-d ``fc2`` features."""

        def __init__(self, for_training: bool = False, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            (self.conv1, self.pool1, self.conv2, self.pool2, self.conv3, self.flatten,
             self.fc2) = _lenet_layers(for_training)

        def call(self, inputs: Any) -> Any:
            x = self.pool1(self.conv1(inputs))
            x = self.pool2(self.conv2(x))
            return self.fc2(self.flatten(self.conv3(x)))

    _LeNet5 = LeNet5
    return LeNet5


def _build_subclass(for_training: bool) -> Any:
    k = keras()
    # Keras records the arguments a model is built with in its saved config: pass for_training
    # only to the training network, so saved models keep the config they always had.
    extra = {"for_training": True} if for_training else {}
    headless = _lenet5_class()(name="lenet5_headless", **extra)
    return k.Sequential([k.Input(INPUT_SHAPE), headless, _head()], name="lenet5")


def build_lenet(style: str = "sequential", for_training: bool = False) -> Any:
    """Build an untrained LeNet-5 classifier (61,706 parameters) in the given style.

    ``for_training=True`` builds the same network with conv1 computed by a faster kernel for
    training (see :func:`_row_conv_class`); copy its weights into ``build_lenet(style)`` to save.
    """
    builders = {
        "sequential": _build_sequential,
        "functional": _build_functional,
        "subclass": _build_subclass,
    }
    if style not in builders:
        raise LenetEmbedError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return builders[style](for_training)


def find_layer(model: Any, name: str) -> Any:
    """Find the layer called ``name`` in ``model`` or in any model nested inside it."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            try:
                return find_layer(layer, name)
            except LenetEmbedError:
                continue
    raise LenetEmbedError(f"model {model.name!r} has no layer named {name!r}; is it a LeNet-5?")


def encoder_of(model: Any) -> Any:
    """The headless encoder of a LeNet-5 classifier (any style): image -> 84-d ``fc2`` output.

    The encoder is a plain functional model over the classifier's own layer objects, so it shares
    their weights, and once saved it loads with ``keras.models.load_model`` and nothing else.
    """
    k = keras()
    inputs = k.Input(INPUT_SHAPE, name="image")
    x = inputs
    for name in ENCODER_LAYERS:
        x = find_layer(model, name)(x)
    return k.Model(inputs, x, name="lenet5_encoder")


def load_classifier(path: str) -> Any:
    """Load a classifier saved by :func:`lenet_embed.train`, whichever style built it."""
    check_regular(path, "a .keras model file")  # Keras would block for ever on a FIFO
    _lenet5_class()
    try:
        return keras().models.load_model(path)
    except Exception as exc:  # Keras raises many types for a bad file
        raise LenetEmbedError(
            f"{path}: cannot load the model ({exc.__class__.__name__}); "
            "train a new one with `lenet-embed train`"
        ) from None
