"""FAISS indexes: building them from vectors, and tuning approximate ones instead of guessing.

Any ``faiss.index_factory`` string works (``Flat``, ``HNSW32``, ``IVF256,Flat``,
``OPQ12,IVF256,PQ12``, ...). Rows of the index are the bundle's rows; ``ids.npy`` maps them to
stable ids, so no ``IndexIDMap`` is needed for ids to survive. For an approximate index the search
parameter (``efSearch`` for HNSW, ``nprobe`` for IVF) is tuned on held-out queries against exact
search, and the smallest value that reaches the target recall@10 is stored in the manifest.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from .errors import LenetEmbedError
from .metrics import recall_at_k

METRICS = ("cosine", "l2")
# Candidate values, smallest (fastest) first.
_CANDIDATES = {
    # FAISS searches HNSW at least k deep, so nothing below the tuning k=10 is worth trying.
    "efSearch": [10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
    "nprobe": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024],
}
SEARCH_PARAMETERS = tuple(_CANDIDATES)
_OPTION_NAMES = {"efSearch": "--ef-search", "nprobe": "--nprobe"}
TUNING_K = 10
# More threads than this only crash OpenMP or LiteRT (50,000 did), they never help.
MAX_THREADS = 256


def set_threads(threads: int) -> None:
    """Cap the OpenMP threads FAISS uses (``--threads``)."""
    if not 1 <= threads <= MAX_THREADS:
        raise LenetEmbedError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    faiss.omp_set_num_threads(threads)


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as FAISS wants them: contiguous float32, L2-normalised for ``cosine``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        # In float64, so that values near float32's limit (1e38) do not overflow the norm.
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
        vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return vectors


def faiss_metric(metric: str) -> int:
    """The FAISS metric constant for ``cosine`` (inner product) or ``l2``."""
    if metric not in METRICS:
        raise LenetEmbedError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def _factory_error(factory: str, dim: int, reason: str,
                   count: int | None = None) -> LenetEmbedError:
    vectors = f"{count} vectors of dim {dim}" if count is not None else f"dim {dim}"
    return LenetEmbedError(
        f"FAISS factory {factory!r} failed for {vectors} ({reason}); try 'Flat' or 'HNSW32' "
        f"(PQ needs m dividing {dim}, e.g. PQ12, PQ21, PQ28, or an OPQ projection)"
    )


def _reason(exc: RuntimeError) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else "rejected"


def check_factory(factory: str, metric: str, dim: int) -> None:
    """Fail early, before any embedding, on a factory string FAISS cannot build for ``dim``."""
    try:
        faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as exc:
        raise _factory_error(factory, dim, _reason(exc)) from None


def make_index(vectors: np.ndarray, metric: str, factory: str = "Flat") -> Any:
    """Build a FAISS index from ``vectors`` with ``faiss.index_factory(dim, factory, metric)``."""
    kind = faiss_metric(metric)
    vectors = prepare_vectors(vectors, metric)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, kind)
        if not index.is_trained:
            index.train(vectors)
    except RuntimeError as exc:
        raise _factory_error(factory, vectors.shape[1], _reason(exc), len(vectors)) from None
    index.add(vectors)
    return index


def exact_search(vectors: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Row numbers of the exact ``k`` nearest ``vectors`` to each query (brute force)."""
    exact = faiss.IndexFlat(vectors.shape[1], faiss_metric(metric))
    exact.add(prepare_vectors(vectors, metric))
    _, rows = exact.search(prepare_vectors(queries, metric), k)
    return rows


def to_distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """FAISS scores to smaller-is-nearer distances (1 - cos, or unsquared L2)."""
    if metric == "cosine":
        # Rounding can put an item's distance to itself a hair below zero.
        return np.maximum(1.0 - scores, 0.0)
    return np.sqrt(np.maximum(scores, 0.0))


def search_parameter(index: Any) -> str | None:
    """The name of the speed/recall knob of ``index`` (``efSearch``, ``nprobe``), or None.

    Found by trying to set each candidate, which leaves it at its smallest value.
    """
    space = faiss.ParameterSpace()
    for name, values in _CANDIDATES.items():
        try:
            space.set_index_parameter(index, name, values[0])
        except RuntimeError:
            continue
        return name
    return None


def apply_search_params(index: Any, params: dict[str, int]) -> None:
    """Set search-time parameters such as ``{"efSearch": 64}`` on ``index``."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise LenetEmbedError(
                f"{_OPTION_NAMES.get(name, name)} does not apply to this index "
                f"({type(index).__name__})"
            ) from None


def tune(index: Any, vectors: np.ndarray, queries: np.ndarray, metric: str,
         target_recall: float) -> dict[str, Any]:
    """Pick the smallest search parameter whose recall@10 on ``queries`` reaches the target.

    ``vectors`` are the indexed vectors (for exact search); ``queries`` should be held out from
    them. Returns the search parameters to store, e.g. ``{"efSearch": 48}``, with the recall
    reached under ``"tuned_recall_at_10"``; ``{}`` for an exact index.
    """
    if not 0.0 < target_recall <= 1.0:
        raise LenetEmbedError(f"--target-recall must be in (0, 1], got {target_recall}")
    name = search_parameter(index)
    if name is None:
        return {}
    exact = exact_search(vectors, queries, metric, TUNING_K)
    prepared = prepare_vectors(queries, metric)
    reached = 0.0
    for value in _CANDIDATES[name]:
        apply_search_params(index, {name: value})
        _, rows = index.search(prepared, TUNING_K)
        reached = recall_at_k(rows, exact, TUNING_K)
        if reached >= target_recall:
            break
    return {name: value, "tuned_recall_at_10": round(reached, 4)}
