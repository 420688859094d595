"""Import TensorFlow/Keras lazily and quietly (see :mod:`lenet_embed._quiet`).

Only training, building an index and the Keras fallback need them; the query path does not, so
nothing imports TensorFlow until one of these functions is called.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from ._quiet import is_verbose, native_stderr_silenced


def keras() -> ModuleType:
    """Return the ``keras`` module, importing TensorFlow first without its start-up noise."""
    if "keras" in sys.modules and "tensorflow" in sys.modules:
        return sys.modules["keras"]
    if not is_verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_silenced():
        import keras as keras_module
        import tensorflow as tf

        # Device discovery logs its own CUDA complaints: get it over with while muted.
        tf.config.list_physical_devices()
    if not is_verbose():
        tf.get_logger().setLevel("ERROR")
    return keras_module


def tensorflow() -> ModuleType:
    """Return the ``tensorflow`` module, imported as quietly as :func:`keras`."""
    keras()
    return sys.modules["tensorflow"]
