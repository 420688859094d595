"""lenet-embed: similarity search for digit images with LeNet-5 embeddings and FAISS.

>>> from lenet_embed import SearchIndex
>>> index = SearchIndex.load("index")
>>> index.search("digit.png", k=5)[0][0].label

Names are imported on first use, so ``import lenet_embed`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchIndex": "search",
    "Neighbor": "search",
    "Results": "search",
    "Hits": "search",
    "majority_label": "search",
    "Query": "search",
    "QueryResult": "search",
    "calibrate": "calibration",
    "load_head": "calibration",
    "build_lenet": "model",
    "encoder_of": "model",
    "train": "training",
    "Recipe": "recipes",
    "RECIPES": "recipes",
    "build_index": "build",
    "load_mnist": "data",
    "load_image_folder": "data",
    "write_samples": "data",
    "to_mnist": "preprocess",
    "read_manifest": "bundle",
    "inspect_bundle": "snapshot",
    "LenetEmbedError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lenet_embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
