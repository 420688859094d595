"""Import TensorFlow/Keras lazily and quietly (see :mod:`lenet_embed._quiet`).

Only training, building an index and the Keras fallbacks need them; querying, serving and updating
a bundle do not, so nothing imports TensorFlow until one of these functions is called. TensorFlow
comes with the ``train`` extra: where it is missing, these functions raise the one error that
says what to install.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from ._quiet import is_verbose, native_stderr_silenced
from .errors import LenetEmbedError

TRAIN_EXTRA = 'pip install "lenet-embed[train]"'


def keras(needed_for: str = "the LeNet-5 model") -> ModuleType:
    """Return the ``keras`` module, importing TensorFlow first without its start-up noise.

    ``needed_for`` names what needs it in the :class:`LenetEmbedError` raised when TensorFlow or
    Keras is not installed (a base install, which only queries and serves).
    """
    if sys.modules.get("keras") is not None and sys.modules.get("tensorflow") is not None:
        return sys.modules["keras"]
    if not is_verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with native_stderr_silenced():
            import keras as keras_module
            import tensorflow as tf

            # Device discovery logs its own CUDA complaints: get it over with while muted.
            tf.config.list_physical_devices()
    except ModuleNotFoundError as exc:
        if exc.name not in ("keras", "tensorflow"):
            raise  # a broken TensorFlow install: its own error says more than ours could
        raise LenetEmbedError(
            f"{needed_for} needs TensorFlow, which this install lacks; {TRAIN_EXTRA}"
        ) from None
    if not is_verbose():
        tf.get_logger().setLevel("ERROR")
    return keras_module


def tensorflow(needed_for: str = "the LeNet-5 model") -> ModuleType:
    """Return the ``tensorflow`` module, imported as quietly (and checked) as :func:`keras`."""
    keras(needed_for)
    return sys.modules["tensorflow"]
