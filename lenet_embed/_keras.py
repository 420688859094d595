"""Import TensorFlow/Keras lazily and quietly.

TensorFlow's C++ runtime writes start-up chatter (oneDNN, CUDA stub, cpu_feature_guard) straight
to file descriptor 2, before any Python logging is set up, and environment variables no longer
silence all of it. Importing it with fd 2 pointed at /dev/null is the only reliable way to keep a
normal run quiet; ``set_verbose(True)`` (the CLI's ``--verbose``) lets it through.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Let TensorFlow's start-up messages through (True) or hide them (False, the default)."""
    global _verbose
    _verbose = verbose


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def keras() -> ModuleType:
    """Return the ``keras`` module, importing TensorFlow first without its start-up noise."""
    if "keras" in sys.modules and "tensorflow" in sys.modules:
        return sys.modules["keras"]
    if _verbose:
        import keras as keras_module
        import tensorflow as tf
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with _stderr_to_devnull():
            import keras as keras_module
            import tensorflow as tf

            # Device discovery logs its own CUDA complaints: get it over with while muted.
            tf.config.list_physical_devices()
        tf.get_logger().setLevel("ERROR")
    return keras_module


def tensorflow() -> ModuleType:
    """Return the ``tensorflow`` module, imported as quietly as :func:`keras`."""
    keras()
    return sys.modules["tensorflow"]
