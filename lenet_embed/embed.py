"""Turn preprocessed 28x28 images into 84-d embeddings with a saved encoder.

Two runners share one interface (``dim``, ``embed``): :class:`LiteRTEncoder` runs the bundle's
``encoder.tflite`` with ``ai-edge-litert`` and never imports TensorFlow, which makes queries start
in a fraction of a second; :class:`KerasEncoder` runs ``encoder.keras`` and is the fallback where
LiteRT has no wheel. :func:`load_encoder` picks one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ._quiet import native_stderr_silenced
from .errors import LenetEmbedError

log = logging.getLogger(__name__)

BATCH_SIZE = 1024
BACKENDS = ("auto", "litert", "keras")
ProgressCallback = Callable[[int, int], None]


class Encoder(Protocol):
    """What every encoder runner offers."""

    @property
    def dim(self) -> int:
        """Length of the embedding vectors."""
        ...

    def embed(self, pixels: np.ndarray, batch_size: int = BATCH_SIZE,
              on_progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed an (N, 28, 28) float32 batch in [0, 1]; returns (N, dim) float32."""
        ...


def featureless(vectors: np.ndarray) -> np.ndarray:
    """Which rows of (n, dim) embeddings have no feature at all (every value 0: no ReLU of the
    84 fired). The model sees nothing of a digit in such an image, and its neighbours would all
    be equally far, so a query is answered "not a digit" without a search. No MNIST digit,
    training or test, embeds to zeros."""
    return ~np.asarray(vectors).any(axis=1)


def _batches(pixels: np.ndarray, batch_size: int, run: Callable[[np.ndarray], np.ndarray],
             dim: int, on_progress: ProgressCallback | None) -> np.ndarray:
    """Run ``run`` over (N, 28, 28, 1) chunks of ``pixels`` and stack the results."""
    if len(pixels) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    pixels = np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 28, 28, 1)
    chunks = []
    for start in range(0, len(pixels), batch_size):
        chunks.append(run(pixels[start : start + batch_size]))
        if on_progress is not None:
            on_progress(start + len(chunks[-1]), len(pixels))
    return np.concatenate(chunks)


class KerasEncoder:
    """A headless LeNet-5 encoder (image -> 84-d ``fc2`` features) run by Keras."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             needed_for: str = "the Keras encoder") -> KerasEncoder:
        """Load an encoder written by ``train`` or ``build-index`` (``*.keras``).

        ``needed_for`` names this use in the error raised where TensorFlow is not installed.
        """
        from ._keras import keras

        keras_module = keras(needed_for)
        try:
            model = keras_module.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad file
            raise LenetEmbedError(
                f"{path}: cannot load the encoder ({exc.__class__.__name__}); "
                "rebuild the index with `lenet-embed build-index`"
            ) from None
        return cls(model)

    @property
    def dim(self) -> int:
        """Length of the embedding vectors."""
        return int(self.model.output_shape[-1])

    def embed(self, pixels: np.ndarray, batch_size: int = BATCH_SIZE,
              on_progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed an (N, 28, 28) float32 batch in [0, 1]; returns (N, dim) float32.

        ``on_progress(done, total)`` is called after each batch (for progress bars).
        """

        def run(chunk: np.ndarray) -> np.ndarray:
            return np.asarray(self.model(chunk, training=False), dtype=np.float32)

        return _batches(pixels, batch_size, run, self.dim, on_progress)


class LiteRTEncoder:
    """The same encoder exported to LiteRT (``encoder.tflite``), run without TensorFlow.

    One interpreter is kept per batch size in use (1 for single queries, run on one thread, the
    chunk size for batches), so alternating single and batch queries costs no re-allocation.
    Other batches are padded to the next power of two: the service's batches of 2 to 30 queries
    then use a handful of interpreters instead of making a new one (about 1 ms) for each size.
    Calls are serialised with a lock: a LiteRT interpreter must not be invoked from two threads
    at once.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 content: bytes | None = None) -> None:
        """The encoder in the LiteRT file ``path``, or in ``content`` (its bytes, ``path`` then
        only naming it in errors); ``threads`` for batches (default: every core)."""
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise LenetEmbedError(f"ai-edge-litert is not installed ({exc})") from None
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        self._model = self.path.read_bytes() if content is None else content
        self._interpreter_class = Interpreter
        self._interpreters: dict[int, tuple[Any, int, int]] = {}
        self._lock = threading.Lock()
        self.dim = int(self._interpreter(1)[0].get_output_details()[0]["shape"][-1])

    def _interpreter(self, batch: int) -> tuple[Any, int, int]:
        cached = self._interpreters.get(batch)
        if cached is not None:
            return cached
        try:
            with native_stderr_silenced():
                # One image is ~0.4 million multiply-adds: handing parts of it to other threads
                # costs more in wake-ups than it saves, and on a busy machine the query then
                # waits until they are scheduled.
                interpreter = self._interpreter_class(
                    model_content=self._model, num_threads=1 if batch == 1 else self.threads
                )
                input_index = interpreter.get_input_details()[0]["index"]
                if batch != 1:
                    interpreter.resize_tensor_input(input_index, [batch, 28, 28, 1])
                interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise LenetEmbedError(
                f"{self.path}: cannot load the LiteRT encoder ({exc}); rebuild the index"
            ) from None
        output_index = interpreter.get_output_details()[0]["index"]
        if len(self._interpreters) >= _INTERPRETERS:
            self._interpreters.pop(next(k for k in self._interpreters if k != 1))
        self._interpreters[batch] = (interpreter, input_index, output_index)
        return self._interpreters[batch]

    def embed(self, pixels: np.ndarray, batch_size: int = BATCH_SIZE,
              on_progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed an (N, 28, 28) float32 batch in [0, 1]; returns (N, dim) float32."""

        def run(chunk: np.ndarray) -> np.ndarray:
            count = len(chunk)
            size = _padded_batch(count, batch_size)
            if size > count:
                chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]),
                                                        dtype=chunk.dtype)])
            interpreter, input_index, output_index = self._interpreter(size)
            interpreter.set_tensor(input_index, chunk)
            interpreter.invoke()
            return interpreter.get_tensor(output_index)[:count].copy()

        with self._lock:
            return _batches(pixels, batch_size, run, self.dim, on_progress)


# Interpreters kept per encoder: 1, 2, 4, ..., 64, and the chunk size of big batches.
_INTERPRETERS = 9


def _padded_batch(count: int, limit: int) -> int:
    """The batch size ``count`` images run at: the next power of two, at most ``limit``."""
    return min(1 << (count - 1).bit_length(), max(limit, count))


def litert_available() -> bool:
    """Whether ``ai-edge-litert`` can be imported here."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def load_encoder(keras_path: Path, litert_path: Path, backend: str = "auto",
                 threads: int | None = None) -> Encoder:
    """Load a bundle's encoder: LiteRT when ``backend`` is ``auto`` or ``litert``, else Keras.

    With ``auto``, a missing ``encoder.tflite`` or a missing ``ai-edge-litert`` falls back to Keras
    with a one-line notice (or, where TensorFlow is not installed either, one error saying so).
    """
    if backend not in BACKENDS:
        raise LenetEmbedError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "keras":
        problem = (
            "ai-edge-litert is not installed" if not litert_available()
            else None if litert_path.is_file() else f"{litert_path} is missing"
        )
        if problem is None:
            return LiteRTEncoder(litert_path, threads)
        if backend == "litert":
            raise LenetEmbedError(f"cannot use LiteRT: {problem}")
        encoder = KerasEncoder.load(keras_path, f"the Keras encoder, used because {problem},")
        log.warning("%s; using the slower Keras encoder", problem)
        return encoder
    return KerasEncoder.load(keras_path)


def litert_flatbuffer(model: Any, workdir: Path) -> bytes:
    """A Keras encoder exported to LiteRT (the bytes of an ``encoder.tflite``), its SavedModel
    staged in the folder ``workdir`` (which must not exist yet).

    This is the path ``model.export(format="litert")`` takes (a Keras ``ExportArchive``, then
    TensorFlow's ``TFLiteConverter.from_saved_model``), through their public APIs, so that the
    SavedModel goes where the caller says instead of the system's temp folder."""
    import functools

    import keras
    import tensorflow as tf

    with contextlib.redirect_stdout(sys.stderr), native_stderr_silenced():
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serve", functools.partial(model.__call__, training=False),
            input_signature=[tf.TensorSpec(model.input.shape, model.input.dtype,
                                           name=model.input.name)])
        archive.write_out(str(workdir), verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(workdir))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
        converter.experimental_enable_resource_variables = True
        return converter.convert()
