"""FAISS indexes: building them from vectors, and tuning approximate ones instead of guessing.

The ``faiss.index_factory`` strings of :func:`lenet_embed.factory.parse_factory`'s grammar work
(``Flat``, ``HNSW32``, ``IVF256,Flat``, ``OPQ12,IVF256,PQ12``, ...), checked before FAISS sees
them. Rows of the index are the bundle's rows; ``ids.npy`` maps them to
stable ids, so no ``IndexIDMap`` is needed for ids to survive. For an approximate index the search
parameter (``efSearch`` for HNSW, ``nprobe`` for IVF) is tuned on held-out queries against exact
search, and the smallest value that reaches the target recall@10 is stored in the manifest.

``auto`` (the default of ``build-index``) chooses the factory from the number of vectors, their
dimension and a memory budget, as autofaiss does: exact ``Flat`` while a single query over all of
them is fast anyway, an HNSW graph beyond, inverted lists with fewer bytes per vector when the
graph would not fit the budget (``IVF,Flat``, then ``IVF,SQ8``, then product quantisation).
:func:`build_tuned_index` builds the choice, tunes it and says why in one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .errors import LenetEmbedError
from .factory import AUTO, parse_factory
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
DEFAULT_TARGET_RECALL = 0.995
DEFAULT_MEMORY_BUDGET = "2GB"
# One query scans every vector of a Flat index: over 10,000 x 84 floats that takes 0.1-0.2 ms of
# FAISS time on the team's two-core machine, over 60,000 1-2.4 ms (scripts/bench_speed.py prints
# both), while decoding, preprocessing and embedding one image take about 0.3 ms. Up to here a
# whole `search(one.png)` stays near the 0.5 ms goal exactly; beyond, only a graph meets it.
FLAT_MAX_COUNT = 10_000
HNSW_M = 32
# FAISS's k-means wants at least 39 training vectors per centroid; fewer only warns, but the
# lists then come out uneven.
_POINTS_PER_LIST = 39
# Product quantisation: sub-vectors per code (each m must divide the dimension), most accurate
# first; 8-bit codes, so m bytes per vector. Below 4 bytes a code says too little to rank by.
_PQ_BYTES = (42, 28, 21, 14, 12, 7, 6, 4)
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
# More threads than this only crash OpenMP or LiteRT (50,000 did), they never help.
MAX_THREADS = 256


def set_threads(threads: int) -> None:
    """Cap the OpenMP threads FAISS uses (``--threads``)."""
    if not 1 <= threads <= MAX_THREADS:
        raise LenetEmbedError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    faiss.omp_set_num_threads(threads)


# Rows added to an index at a time by make_index (its progress steps).
ADD_ROWS = 65_536
# Rows normalised at a time by prepare_vectors (5.5 MB of float64 temporaries).
PREPARE_ROWS = 8192


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as FAISS wants them: contiguous float32, L2-normalised for ``cosine``.

    Vectors that already are (a bundle's stored vectors, a build's once normalised) come back
    as they are, not copied; others are normalised :data:`PREPARE_ROWS` rows at a time, so the
    only new memory is the result (a million vectors: 336 MB, not three times that in float64).
    """
    vectors = np.asarray(vectors)
    if vectors.dtype == np.float32 and vectors.flags.c_contiguous and (
            metric != "cosine" or _unit_rows(vectors)):
        return vectors
    prepared = np.empty(vectors.shape, dtype=np.float32)
    for start in range(0, len(vectors), PREPARE_ROWS):
        # In float64, so that values near float32's limit (1e38) do not overflow the norm.
        rows = vectors[start : start + PREPARE_ROWS].astype(np.float64)
        if metric == "cosine":
            rows /= np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
        prepared[start : start + PREPARE_ROWS] = rows
    return prepared


def _unit_rows(vectors: np.ndarray) -> bool:
    """Whether every row of a float32 matrix has norm 1 (to float32 rounding)."""
    for start in range(0, len(vectors), PREPARE_ROWS):
        rows = vectors[start : start + PREPARE_ROWS].astype(np.float64)
        if not np.all(np.abs(np.einsum("...i,...i->...", rows, rows) - 1.0) < 1e-5):
            return False
    return True


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
    """Fail early, before any embedding, on a factory string outside :func:`parse_factory`'s
    grammar or that FAISS cannot build for ``dim``."""
    parse_factory(factory, dim)
    try:
        faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as exc:
        raise _factory_error(factory, dim, _reason(exc)) from None


def make_index(vectors: np.ndarray, metric: str, factory: str = "Flat",
               on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Build a FAISS index from ``vectors`` with ``faiss.index_factory(dim, factory, metric)``,
    adding :data:`ADD_ROWS` at a time and calling ``on_progress(done, total)`` after each (a
    million vectors take minutes to add to a graph)."""
    kind = faiss_metric(metric)
    vectors = prepare_vectors(vectors, metric)
    parse_factory(factory, vectors.shape[1])  # no string reaches FAISS unchecked
    try:
        index = faiss.index_factory(vectors.shape[1], factory, kind)
        if not index.is_trained:
            index.train(vectors)
    except RuntimeError as exc:
        raise _factory_error(factory, vectors.shape[1], _reason(exc), len(vectors)) from None
    for start in range(0, len(vectors), ADD_ROWS):
        index.add(vectors[start : start + ADD_ROWS])
        if on_progress is not None:
            on_progress(min(start + ADD_ROWS, len(vectors)), len(vectors))
    return index


def needs_training(factory: str, metric: str, dim: int) -> bool:
    """Whether ``factory`` learns from the vectors before it takes them (IVF's lists, PQ's
    codebooks), and so needs enough of them."""
    parse_factory(factory, dim)
    return not faiss.index_factory(dim, factory, faiss_metric(metric)).is_trained


def parse_size(text: str | int) -> int:
    """Bytes from a size such as ``2GB``, ``500MB``, ``1.5GiB`` or a plain number of bytes.

    KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None:
            raise LenetEmbedError(f"--memory-budget must be a size such as 2GB or 500MB, "
                                  f"got {text!r}")
        number, prefix, binary = match.groups()
        power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
        value = int(float(number) * (1024 if binary else 1000) ** power)
    if value <= 0:
        raise LenetEmbedError(f"--memory-budget must be more than 0 bytes, got {text!r}")
    return value


def format_size(count: int) -> str:
    """A byte count for people: ``36.5 MB``, ``2 GB`` (powers of 1000, as ``parse_size``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


def check_target_recall(target_recall: float) -> None:
    """Refuse a recall target outside (0, 1]."""
    if not 0.0 < target_recall <= 1.0:
        raise LenetEmbedError(f"--target-recall must be in (0, 1], got {target_recall}")


@dataclass(frozen=True)
class IndexChoice:
    """What ``auto`` picked for a set of vectors: a factory string, its estimated size in memory,
    and why, in words."""

    factory: str
    bytes: int
    why: str


def _ivf_lists(count: int) -> int:
    """Inverted lists for ``count`` vectors: a power of two near 4 sqrt(count) (autofaiss's rule
    of thumb), with enough vectors per list to train the coarse quantiser."""
    lists = 1 << max(0, round(np.log2(max(4 * np.sqrt(count), 1))))
    while lists > 1 and lists * _POINTS_PER_LIST > count:
        lists //= 2
    return lists


def _candidates(count: int, dim: int) -> list[tuple[str, int]]:
    """Approximate factories and their estimated bytes in memory, fastest first."""
    # HNSW: the vector, 2M neighbour links on level 0 (upper levels add about one more), a level
    # and two offsets: 608 bytes per 84-d vector, as FAISS writes it.
    found = [(f"HNSW{HNSW_M}", count * (4 * dim + 4 * (2 * HNSW_M + 1) + 12))]
    lists = _ivf_lists(count)
    centroids = lists * dim * 4
    found.append((f"IVF{lists},Flat", count * (4 * dim + 8) + centroids))
    found.append((f"IVF{lists},SQ8", count * (dim + 8) + centroids + 8 * dim))
    # Each PQ sub-quantiser is a k-means of 256 centroids, trained on the vectors themselves.
    trainable = count >= 256 * _POINTS_PER_LIST
    for m in (m for m in _PQ_BYTES if dim % m == 0 and trainable):
        found.append((f"IVF{lists},PQ{m}", count * (m + 8) + centroids + 256 * dim * 4))
    return found


def choose_index(count: int, dim: int, memory_budget: int,
                 flat_max_count: int = FLAT_MAX_COUNT) -> IndexChoice:
    """The factory ``auto`` builds for ``count`` vectors of ``dim`` within ``memory_budget`` bytes.

    Exact Flat up to ``flat_max_count`` vectors, then the fastest of HNSW, IVF-Flat, IVF-SQ8 and
    IVF-PQ (largest codes first) whose estimated size fits the budget.
    """
    budget = format_size(memory_budget)
    flat_bytes = count * dim * 4
    if count <= flat_max_count and flat_bytes <= memory_budget:
        return IndexChoice("Flat", flat_bytes,
                           f"exact search is fast up to {flat_max_count} vectors; "
                           f"{format_size(flat_bytes)} within the {budget} budget")
    if count <= flat_max_count:
        over = f"Flat ({format_size(flat_bytes)}) is over the {budget} budget"
    else:
        over = f"exact search is slow beyond {flat_max_count} vectors"
    for factory, size in _candidates(count, dim):
        if size <= memory_budget:
            return IndexChoice(factory, size,
                               f"{over}; {format_size(size)} within the {budget} budget")
        over = f"{factory} ({format_size(size)}) is over the {budget} budget"
    raise LenetEmbedError(
        f"--memory-budget {budget} is too small for {count} vectors of dim {dim}: the smallest "
        f"index, {factory}, needs about {format_size(size)}; raise the budget"
    )


@dataclass(frozen=True)
class TunedIndex:
    """A built FAISS index, the factory it was built with, its tuned search parameters (as stored
    in the manifest), the recall target they were tuned for (None when nothing was tuned), and
    the one-line reason recorded in the manifest."""

    index: Any
    factory: str
    search_params: dict[str, float]
    target_recall: float | None
    reason: str


def build_tuned_index(vectors: np.ndarray, metric: str, factory: str, target_recall: float,
                      memory_budget: int, queries: Callable[[], np.ndarray],
                      flat_max_count: int = FLAT_MAX_COUNT,
                      on_progress: Callable[[int, int], None] | None = None) -> TunedIndex:
    """Build ``factory`` (``auto``: :func:`choose_index`) over ``vectors`` and tune its search
    parameter to ``target_recall`` on ``queries()``, held-out query vectors (only asked for when
    the index has something to tune). ``on_progress`` as for :func:`make_index`."""
    count, dim = vectors.shape
    chosen = factory == AUTO
    if chosen:
        choice = choose_index(count, dim, memory_budget, flat_max_count)
        factory, why = choice.factory, f"{count} vectors x {dim} d: {choice.factory} ({choice.why})"
    else:
        why = f"{factory} as asked (--factory)"
    index = make_index(vectors, metric, factory, on_progress)
    params: dict[str, float] = {}
    if search_parameter(index) is not None:
        params = tune(index, vectors, queries(), metric, target_recall)
    if not params:
        return TunedIndex(index, factory, params, None, why)
    (name, value), reached = next(iter(params.items())), params["tuned_recall_at_10"]
    why += f", {name} {value} for recall@{TUNING_K} {reached:.4f}"
    if reached < target_recall:
        # Lossy codes (SQ, PQ) cap the recall whatever the search depth.
        lossy = chosen and ("SQ" in factory or "PQ" in factory)
        why += f", short of the {target_recall} target" + (
            ": the memory budget forces lossy codes; raise --memory-budget" if lossy else "")
    return TunedIndex(index, factory, params, target_recall, why)


def exact_scores(vectors: np.ndarray, queries: np.ndarray, metric: str, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's (scores, rows) of the exact ``k`` nearest of ``vectors`` to each query, both
    already prepared (:func:`prepare_vectors`): brute force, no index holding a copy."""
    return faiss.knn(queries, vectors, k, metric=faiss_metric(metric))


def exact_search(vectors: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Row numbers of the exact ``k`` nearest ``vectors`` to each query (brute force, on the
    vectors as they are: no index holding a copy of them)."""
    _, rows = exact_scores(prepare_vectors(vectors, metric), prepare_vectors(queries, metric),
                           metric, k)
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


def _candidate_values(index: Any, name: str) -> list[int]:
    """The values of ``name`` worth trying on ``index``: for IVF, none past visiting every list
    (the recall cannot grow beyond it, and lossy codes may keep it below the target)."""
    if name != "nprobe":
        return _CANDIDATES[name]
    lists = faiss.extract_index_ivf(index).nlist
    return [value for value in _CANDIDATES[name] if value < lists] + [lists]


def tune(index: Any, vectors: np.ndarray, queries: np.ndarray, metric: str,
         target_recall: float) -> dict[str, Any]:
    """Pick the smallest search parameter whose recall@10 on ``queries`` reaches the target.

    ``vectors`` are the indexed vectors (for exact search); ``queries`` should be held out from
    them. Returns the search parameters to store, e.g. ``{"efSearch": 48}``, with the recall
    reached under ``"tuned_recall_at_10"``; ``{}`` for an exact index.
    """
    check_target_recall(target_recall)
    name = search_parameter(index)
    if name is None:
        return {}
    exact = exact_search(vectors, queries, metric, TUNING_K)
    prepared = prepare_vectors(queries, metric)
    reached = 0.0
    for value in _candidate_values(index, name):
        apply_search_params(index, {name: value})
        _, rows = index.search(prepared, TUNING_K)
        reached = recall_at_k(rows, exact, TUNING_K)
        if reached >= target_recall:
            break
    return {name: value, "tuned_recall_at_10": round(reached, 4)}
