"""LeNet-5 as in the tutorial, built three ways, and the headless 84-d encoder cut from it.

conv1 6@5x5 same relu -> pool1 2/2 -> conv2 16@5x5 valid relu -> pool2 2/2 -> conv3 120@5x5 valid
relu -> flatten -> fc2 Dense 84 relu -> prediction Dense 10 softmax: 61,706 parameters.

The ``sequential`` style is one ``keras.Sequential``; the ``functional`` and ``subclass`` styles
build the headless network (input -> fc2) and wrap it, as the tutorial did, in a ``Sequential``
with the ``Dense(10, softmax)`` head.
"""

from __future__ import annotations

from typing import Any

from ._keras import keras
from .errors import LenetEmbedError

INPUT_SHAPE = (28, 28, 1)
EMBEDDING_DIM = 84
NUM_CLASSES = 10
STYLES = ("sequential", "functional", "subclass")
# The encoder's layers in order; the classifier adds "prediction" after them.
ENCODER_LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "fc2")


def _lenet_layers() -> list[Any]:
    """Fresh encoder layers, named as in the paper, in the order they run."""
    layers = keras().layers
    return [
        layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1"),
        layers.MaxPooling2D(pool_size=2, strides=2, name="pool1"),
        layers.Conv2D(16, 5, padding="valid", activation="relu", name="conv2"),
        layers.MaxPooling2D(pool_size=2, strides=2, name="pool2"),
        layers.Conv2D(120, 5, padding="valid", activation="relu", name="conv3"),
        layers.Flatten(name="flatten"),
        layers.Dense(EMBEDDING_DIM, activation="relu", name="fc2"),
    ]


def _head() -> Any:
    return keras().layers.Dense(NUM_CLASSES, activation="softmax", name="prediction")


def _build_sequential() -> Any:
    k = keras()
    return k.Sequential([k.Input(INPUT_SHAPE), *_lenet_layers(), _head()], name="lenet5")


def _build_functional() -> Any:
    k = keras()
    inputs = k.Input(INPUT_SHAPE, name="image")
    x = inputs
    for layer in _lenet_layers():
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

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            (self.conv1, self.pool1, self.conv2, self.pool2, self.conv3, self.flatten,
             self.fc2) = _lenet_layers()

        def call(self, inputs: Any) -> Any:
            x = self.pool1(self.conv1(inputs))
            x = self.pool2(self.conv2(x))
            return self.fc2(self.flatten(self.conv3(x)))

    _LeNet5 = LeNet5
    return LeNet5


def _build_subclass() -> Any:
    k = keras()
    headless = _lenet5_class()(name="lenet5_headless")
    return k.Sequential([k.Input(INPUT_SHAPE), headless, _head()], name="lenet5")


def build_lenet(style: str = "sequential") -> Any:
    """Build an untrained LeNet-5 classifier (61,706 parameters) in the given style."""
    builders = {
        "sequential": _build_sequential,
        "functional": _build_functional,
        "subclass": _build_subclass,
    }
    if style not in builders:
        raise LenetEmbedError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return builders[style]()


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
    _lenet5_class()
    try:
        return keras().models.load_model(path)
    except Exception as exc:  # Keras raises many types for a bad file
        raise LenetEmbedError(
            f"{path}: cannot load the model ({exc.__class__.__name__}); "
            "train a new one with `lenet-embed train`"
        ) from None
