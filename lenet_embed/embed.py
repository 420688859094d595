"""Turn preprocessed 28x28 images into 84-d embeddings with a saved encoder."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import LenetEmbedError

BATCH_SIZE = 1024


class KerasEncoder:
    """A headless LeNet-5 encoder (image -> 84-d ``fc2`` features) run by Keras."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KerasEncoder:
        """Load an encoder written by ``train`` or ``build-index`` (``*.keras``)."""
        from ._keras import keras

        try:
            model = keras().models.load_model(path, compile=False)
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

    def embed(
        self,
        pixels: np.ndarray,
        batch_size: int = BATCH_SIZE,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Embed an (N, 28, 28) float32 batch in [0, 1]; returns (N, dim) float32.

        ``on_progress(done, total)`` is called after each batch (for progress bars).
        """
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 28, 28, 1)
        chunks = []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size]
            chunks.append(np.asarray(self.model(chunk, training=False), dtype=np.float32))
            if on_progress is not None:
                on_progress(start + len(chunk), len(pixels))
        return np.concatenate(chunks)
