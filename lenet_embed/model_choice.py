"""Which model a build embeds with: ``--model``, else ``models/lenet.keras``, else the default
model that ships with the package.

Two kinds of model are accepted. A Keras classifier or encoder file (``.keras``, what ``train``
writes) needs TensorFlow to load, and its encoder is embedded with Keras. A **model folder** holds
what a bundle needs from a model, ready made, and is read without TensorFlow:

    encoder.keras   the headless encoder (image -> 84-d fc2), copied into bundles as it is
    encoder.tflite  the same encoder exported to LiteRT, which embeds where ai-edge-litert is
    head.json       the classifier's 84->10 ``prediction`` layer, {"weights": 84x10, "bias": 10},
                    that calibration scores with
    card.json       how it was made and measured, and the sha256 and size of each file above

The shipped default (``lenet_embed/default_model``, rebuilt by ``scripts/build_default_model.py``)
is such a folder, so a base install builds, calibrates and evaluates bundles without TensorFlow.
A folder's files are checked against its card before use: a damaged or edited file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LenetEmbedError
from .files import read_regular
from .model import EMBEDDING_DIM, NUM_CLASSES
from .recipes import DEFAULT_MODEL_PATH

SHIPPED_DIR = Path(__file__).resolve().parent / "default_model"
KERAS_FILE = "encoder.keras"
LITERT_FILE = "encoder.tflite"
HEAD_FILE = "head.json"
CARD_FILE = "card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
# The files a card lists with their sha256 and size.
MODEL_FILES = (KERAS_FILE, LITERT_FILE, HEAD_FILE)
# Larger files are not a model folder's (the shipped files take about 0.6 MB together).
MAX_FILE_BYTES = 64 << 20
REBUILD = "scripts/build_default_model.py"


def sha256_of(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read(path: Path, what: str) -> bytes:
    """The bytes of a model folder's file, or one line saying why not."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise LenetEmbedError(f"{path}: too large for {what}")
        return read_regular(path, what)
    except OSError as exc:
        raise LenetEmbedError(f"{path}: cannot read {what} ({exc.strerror or exc}); reinstall "
                              f"lenet-embed, or rebuild the folder with {REBUILD}") from None


@dataclass(frozen=True)
class ModelFolder:
    """A model folder (see the module's docstring), its files checked against its card."""

    path: Path
    card: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelFolder:
        """Read ``path``'s card and check every file it lists (regular, size, sha256)."""
        folder = Path(path)
        card_path = folder / CARD_FILE
        try:
            card = json.loads(_read(card_path, "a model folder's card"))
            listed = {name: (int(card["files"][name]["bytes"]), str(card["files"][name]["sha256"]))
                      for name in MODEL_FILES}
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise LenetEmbedError(f"{card_path}: not a model card ({exc.__class__.__name__}); "
                                  f"rebuild the folder with {REBUILD}") from None
        for name, (size, digest) in listed.items():
            file = folder / name
            content = _read(file, f"a model folder's {name}")
            if len(content) != size or hashlib.sha256(content).hexdigest() != digest:
                raise LenetEmbedError(
                    f"{file}: does not match {card_path} (damaged or edited); reinstall "
                    f"lenet-embed, or rebuild the folder with {REBUILD}")
        return cls(folder, card)

    @property
    def keras_path(self) -> Path:
        """The Keras encoder."""
        return self.path / KERAS_FILE

    @property
    def litert_path(self) -> Path:
        """The LiteRT encoder."""
        return self.path / LITERT_FILE

    @property
    def encoder_sha256(self) -> str:
        """The sha256 of the Keras encoder: a bundle built with this folder has the same."""
        return str(self.card["files"][KERAS_FILE]["sha256"])

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier head as float64 (weights (84, 10), bias (10,)), as calibration wants."""
        path = self.path / HEAD_FILE
        try:
            parsed = json.loads(_read(path, "a classifier head"))
            weights = np.asarray(parsed["weights"], dtype=np.float64)
            bias = np.asarray(parsed["bias"], dtype=np.float64)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise LenetEmbedError(f"{path}: not a classifier head ({exc.__class__.__name__})"
                                  ) from None
        if (weights.shape != (EMBEDDING_DIM, NUM_CLASSES) or bias.shape != (NUM_CLASSES,)
                or not (np.isfinite(weights).all() and np.isfinite(bias).all())):
            raise LenetEmbedError(f"{path}: a head needs finite {EMBEDDING_DIM}x{NUM_CLASSES} "
                                  f"weights and {NUM_CLASSES} biases")
        return weights, bias


def write_head(path: Path, weights: np.ndarray, bias: np.ndarray) -> None:
    """Write a classifier head as :meth:`ModelFolder.head` reads it (float32 values, exactly)."""
    text = json.dumps({"weights": np.asarray(weights, dtype=np.float32).tolist(),
                       "bias": np.asarray(bias, dtype=np.float32).tolist()})
    path.write_text(text + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ModelChoice:
    """The model a build uses and why: ``folder`` for a model folder, else a ``.keras`` file."""

    path: Path
    reason: str
    folder: ModelFolder | None

    def describe(self) -> str:
        """One line for the output: which model, and why this one."""
        return f"{self.path} ({self.reason})"


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is the shipped default model's folder."""
    return path.resolve() == SHIPPED_DIR


def choose_model(model: str | os.PathLike[str] | None = None) -> ModelChoice:
    """``model`` (a ``.keras`` file or a model folder) if given, else ``models/lenet.keras`` if
    it exists, else the shipped default model."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise LenetEmbedError(f"{path}: no such model; train one with "
                                  f"`lenet-embed train --out {path}`, or leave out --model to "
                                  "use the shipped default model")
        reason = "the shipped default model" if is_shipped(path) else "--model"
    elif DEFAULT_MODEL_PATH.exists():
        path, reason = DEFAULT_MODEL_PATH, f"yours: {DEFAULT_MODEL_PATH} exists"
    else:
        path = SHIPPED_DIR
        reason = f"the shipped default model; no --model and no {DEFAULT_MODEL_PATH}"
    return ModelChoice(path, reason, ModelFolder.open(path) if path.is_dir() else None)


def shipped_model() -> ModelFolder:
    """The default model that ships with the package, checked."""
    return ModelFolder.open(SHIPPED_DIR)


def is_shipped_encoder(encoder_sha256: str) -> bool:
    """Whether a bundle's encoder (its sha256) is the shipped default model's, by its card."""
    try:
        card = json.loads((SHIPPED_DIR / CARD_FILE).read_text(encoding="utf-8"))
        return card["files"][KERAS_FILE]["sha256"] == encoder_sha256
    except (OSError, ValueError, KeyError, TypeError):
        return False


def shipped_head_for(encoder_sha256: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The shipped model's head if a bundle's encoder (its sha256) is the shipped encoder."""
    return shipped_model().head() if is_shipped_encoder(encoder_sha256) else None


# Spot figures: what a model folder's card promises on slices of MNIST small enough to check in
# seconds (the card's full figures take minutes): the head's accuracy on the first SPOT_QUERIES
# test digits, and their cosine 1-NN label among the first SPOT_ITEMS training digits.
SPOT_QUERIES = 2000
SPOT_ITEMS = 10_000


def spot_figures(encoder: Any, head: tuple[np.ndarray, np.ndarray], dataset: Any
                 ) -> dict[str, float]:
    """The spot figures of an encoder (any :class:`lenet_embed.embed.Encoder`) and its head on
    ``dataset`` (a :class:`lenet_embed.data.Dataset`), in numpy alone."""
    from .preprocess import scale_pixels

    test = dataset.test.head(SPOT_QUERIES)
    train = dataset.train.head(SPOT_ITEMS)
    queries = encoder.embed(scale_pixels(test.images)).astype(np.float64)
    items = encoder.embed(scale_pixels(train.images)).astype(np.float64)
    weights, bias = head
    accuracy = float(np.mean((queries @ weights + bias).argmax(axis=1) == test.labels))

    def unit(vectors: np.ndarray) -> np.ndarray:
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    nearest = (unit(queries) @ unit(items).T).argmax(axis=1)
    nn1 = float(np.mean(train.labels[nearest] == test.labels))
    return {"head_accuracy": accuracy, "nn1_accuracy": nn1, "queries": len(test),
            "items": len(train)}
