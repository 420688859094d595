"""The bundle's own segments, searched with FAISS: the default store (:class:`FaissSnapshot`
reads, :data:`FAISS` writes, :class:`FaissBuild` builds).

A snapshot holds everything one manifest names (segments, removed ids), checked against it, and
never changes; a newer version is a new snapshot that shares the unchanged
segments with the old one. Opening one costs O(files), not O(rows): the segments' files are
checked for their sizes and memory-mapped, not read (``info --verify`` compares every
checksum); only the small files read whole (encoder, removed ids) are hashed.
Searching combines the segments:

- a sealed segment is searched with its own FAISS index. Removed rows are masked with an
  ``IDSelectorBitmap`` where the index takes one (Flat, IVF, HNSW), else over-fetched and dropped.
  With a share of its rows removed, the search effort is scaled by 1 / (live share), so that the
  search meets as many live candidates as the tuned one did with nothing removed and its recall
  holds (:func:`_filtered_search`); once that effort would cost more than twice an exact search
  over the segment's live rows, they are searched exactly instead. A query that still gets fewer
  than ``k`` live rows (a filtered graph search can run dry) is answered by exact search over the
  live rows too, so ``k`` live results always come back when the bundle has ``k`` live items;
- unsealed segments (written by ``add``) are searched exactly, all together in one flat index of
  their live rows, as Milvus searches its growing segments.

Rows are numbered across segments in manifest order; ids are strictly increasing in that order.

Writes (inside the writer's session): an add writes a new unsealed segment, merged with the
newest ones as in a size-tiered LSM tree (see :func:`_merged_with`): for any sequence of add
sizes, the ``n`` rows in unsealed segments are in at most ``3 * (floor(log4(n)) + 1)`` of them,
and each row is rewritten at most ``floor(log4(n))`` times. A removal writes the removed ids;
``compact`` rebuilds everything live into one sealed segment with the bundle's FAISS factory and
forgets removed rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ..ann import (
    SEARCH_PARAMETERS,
    apply_search_params,
    build_tuned_index,
    faiss_metric,
    make_index,
    needs_training,
    to_distances,
)
from ..bundle import (
    IDS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    LABELS_FILE,
    REBUILD,
    SOURCES_FILE,
    VECTORS_FILE,
    FileEntry,
    Manifest,
    Segment,
    check_size,
    row_dtype,
    verify_file,
    written_records,
)
from ..errors import LenetEmbedError
from ..files import read_regular
from . import (
    UNREADABLE,
    Backend,
    Build,
    Changes,
    Found,
    Progress,
    Snapshot,
    Vanished,
    first_line,
    read_whole_array,
)

if TYPE_CHECKING:
    from ..ann import TunedIndex
    from ..writer import BundleWriter

_READ_WHOLE_BYTES = 1 << 20  # unsealed segments up to this size are read, not mapped
# Unsealed segments are merged MERGE_FACTOR at a time, once that many of a size class pile up
# (and a size class spans a factor of MERGE_FACTOR in rows: see _tier).
MERGE_FACTOR = 4
# A filtered search is replaced by exact search over the live rows once it would compare this
# many times as many rows as there are live ones: the exact index holds a copy of the live
# vectors, worth it only when it is much faster.
_EXACT_SPEEDUP = 2
# One unit of HNSW's efSearch expands a node: distances to its level-0 neighbours (2M), read at
# random, each about 3 times a row of an exact scan (measured on the team's two-core machine,
# 300 queries of 84-d unit vectors at a time: efSearch 64 on HNSW32 over 60,000 rows took 0.41 ms a
# query, exact search over 10,000 rows 0.21 ms and over 30,000 1.0 ms; 64 x 64 x 3 = 12,288).
_HNSW_ROWS_PER_NEIGHBOUR = 3


@dataclass
class LoadedSegment:
    """A segment's arrays (memory-mapped; copied only for an unsealed segment's ids and labels)
    and, when sealed, its index."""

    info: Segment
    vectors: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    sources: list[str | None] | None
    index: Any | None
    # (live rows as a bitmap, a flat index of their vectors, their rows): the exact index of the
    # latest set of removed rows, kept across the snapshots that share this segment (a stream of
    # adds after a remove would otherwise copy the live vectors again at every commit).
    live_index: tuple[bytes, Any, np.ndarray] | None = field(default=None, compare=False,
                                                             repr=False)


def _read_index(path: Path) -> Any:
    """Read a FAISS index memory-mapped where its type allows (large indexes load at once)."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


def _read_sealed_index(path: Path) -> Any:
    try:
        return _read_index(path)
    except RuntimeError as exc:
        if not path.exists():
            raise FileNotFoundError(path) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise LenetEmbedError(f"{path}: unreadable ({first}); {REBUILD}") from None


def _read_records(path: Path, dim: int, segment: Segment) -> tuple[Any, ...]:
    """The arrays of an unsealed segment: views into its records (those this process wrote
    there, when it did lately), read whole when small, else memory-mapped. A reader catching up
    with a stream of adds opens many small segments: mapping each cost twice as much as
    reading it."""
    records = written_records(path)
    if records is None:
        small = segment.rows * row_dtype(dim).itemsize <= _READ_WHOLE_BYTES
        records = np.load(path, allow_pickle=False, mmap_mode=None if small else "r")
        records.setflags(write=False)  # as a read-only mapping is: snapshots are shared
    expected = row_dtype(dim, records.dtype["source"].itemsize // 4
                         if records.dtype.names and "source" in records.dtype.names else 0)
    if records.dtype != expected or records.ndim != 1 or (
            segment.has_sources != ("source" in (records.dtype.names or ()))):
        raise ValueError("not a segment's records")
    sources = ([s or None for s in records["source"].tolist()] if segment.has_sources
               else None)
    return (records["vector"], np.ascontiguousarray(records["id"]),
            np.ascontiguousarray(records["label"]), records["image"], sources)


def _mapped(path: Path) -> np.ndarray:
    """A ``.npy`` array memory-mapped read-only: nothing is read until it is used, and the mapping
    stays valid when a later commit's sweep unlinks the file (segment files never change)."""
    return np.asarray(np.load(path, allow_pickle=False, mmap_mode="r"))


@contextlib.contextmanager
def _opening(directory: Path, manifest: Manifest, segment: Segment,
             verify: bool = False) -> Iterator[Path]:
    """Check a segment's files against the manifest, then open them in the ``with`` block: one
    that vanished means a newer version replaced this one; one that cannot be read, one line."""
    check = verify_file if verify else check_size
    # A segment whose records this process wrote lately is read from memory: the bytes that were
    # hashed as they were written (a missing file is reported by the check below).
    with contextlib.suppress(FileNotFoundError):
        if verify and not segment.sealed and written_records(directory / segment.entry) is not None:
            check = check_size
    for name in segment.files():
        check(directory, name, manifest.files[name])
    where = directory / segment.entry
    try:
        yield where
    except FileNotFoundError:
        raise Vanished from None
    except UNREADABLE as exc:
        raise LenetEmbedError(f"{where}: unreadable segment ({first_line(exc)}); the bundle is "
                              f"damaged, {REBUILD} or restore it") from None


def _disagrees(where: Path, segment: Segment) -> LenetEmbedError:
    return LenetEmbedError(f"{where}: arrays disagree with {segment.name}'s entry in the "
                           f"manifest; {REBUILD}")


def load_segment(directory: Path, manifest: Manifest, segment: Segment,
                 verify: bool = False) -> LoadedSegment:
    """Open a segment, its arrays memory-mapped, after checking its files' sizes against the
    manifest (``verify``: their checksums too, which reads them whole; for writers that copy rows
    into a new segment, so that damage is never sealed under a fresh checksum)."""
    index = None
    with _opening(directory, manifest, segment, verify) as where:
        if segment.sealed:
            vectors = _mapped(where / VECTORS_FILE)
            ids = _mapped(where / IDS_FILE)
            labels = _mapped(where / LABELS_FILE)
            images = _mapped(where / IMAGES_FILE)
            sources = (json.loads(read_regular(where / SOURCES_FILE).decode("utf-8"))
                       if segment.has_sources else None)
            index = _read_sealed_index(where / INDEX_FILE)
        else:
            vectors, ids, labels, images, sources = _read_records(where, manifest.dim, segment)
    rows = segment.rows
    shapes_ok = (
        vectors.shape == (rows, manifest.dim) and vectors.dtype == np.float32
        and ids.shape == (rows,) and ids.dtype == np.int64
        and labels.shape == (rows,) and labels.dtype == np.int64
        and images.shape == (rows, 28, 28) and images.dtype == np.uint8
        and (sources is None or (isinstance(sources, list) and len(sources) == rows
                                 and all(s is None or isinstance(s, str) for s in sources)))
        and (index is None or (index.ntotal == rows and index.d == manifest.dim))
    )
    if not shapes_ok:
        raise _disagrees(where, segment)
    return LoadedSegment(segment, vectors, ids, labels, images, sources, index)


def segment_ids(directory: Path, manifest: Manifest, segment: Segment) -> np.ndarray:
    """Only the ids of a segment (memory-mapped when sealed), after checking its files' sizes."""
    with _opening(directory, manifest, segment) as where:
        ids = (_mapped(where / IDS_FILE) if segment.sealed
               else _read_records(where, manifest.dim, segment)[1])
    if ids.shape != (segment.rows,) or ids.dtype != np.int64:
        raise _disagrees(where, segment)
    return ids


class FaissSnapshot(Snapshot):
    """One loaded version of a bundle that keeps its items in its own segments."""

    def __init__(self, directory: Path, manifest: Manifest, segments: list[LoadedSegment],
                 deleted_ids: np.ndarray, encoder: Any,
                 search_params: dict[str, int] | None = None) -> None:
        super().__init__(directory, manifest, encoder, search_params)
        self.segments = segments
        sizes = [s.info.rows for s in segments]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # One segment (a fresh build, a compaction) is used as it is mapped: nothing is read.
        self.ids = _joined([s.ids for s in segments])
        self.labels = _joined([s.labels for s in segments])
        self.live = np.ones(len(self.ids), dtype=bool)
        # Ids are strictly increasing, so the first and the last bound them all: an id at or
        # above next_id would be handed out again by the next add.
        if len(self.ids) and (self.ids[0] < 0 or self.ids[-1] >= manifest.next_id):
            raise LenetEmbedError(
                f"{directory}: item ids run from {self.ids[0]} to {self.ids[-1]}, outside "
                f"0..{manifest.next_id - 1} (the manifest's next_id); {REBUILD}")
        rows, found = find_sorted(self.ids, deleted_ids)
        self.live[rows[found]] = False
        # What costs a pass over every row (ids in order, labels among the classes) is checked by
        # check_contents, on `info --verify`; the writers guarantee it and checksums guard it.
        if int(self.live.sum()) != manifest.count:
            raise LenetEmbedError(f"{directory}: removed ids disagree with the manifest's count; "
                                  f"{REBUILD}")
        self.has_sources = any(s.sources is not None for s in segments)
        self._parts = [self._sealed_part(i) for i, s in enumerate(segments) if s.info.sealed]
        self._growing = self._growing_part()

    # ----------------------------------------------------------------------- lookups

    def row_of(self, item_id: int) -> int | None:
        """The row of a live item, or None: a binary search of the ids, which are strictly
        increasing (log2(n) probes, 24 at ten million; no table to build at load)."""
        row = int(np.searchsorted(self.ids, item_id))
        if row < len(self.ids) and self.ids[row] == item_id and self.live[row]:
            return row
        return None

    def image_of(self, item_id: int) -> np.ndarray | None:
        """The stored digit of a live item (uint8 28x28), or None."""
        row = self.row_of(item_id)
        return None if row is None else self.image(row)

    def label_code_of(self, item_id: int) -> int | None:
        """The stored label code of a live item, or None."""
        row = self.row_of(item_id)
        return None if row is None else int(self.labels[row])

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and label codes of every live item, in id order."""
        live = self.live_rows()
        return self.ids[live], self.labels[live]

    def images_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored digits of live items: uint8 (len(ids), 28, 28)."""
        rows, found = find_sorted(self.ids, np.asarray(ids, dtype=np.int64))
        if not (found.all() and self.live[rows].all()):
            raise LenetEmbedError(f"{self.directory}: no live item with some of these ids")
        return self.images(rows)

    def check_contents(self) -> None:
        """The checks that read every row: ids strictly increasing, labels among the classes."""
        if len(self.ids) > 1 and not (np.diff(self.ids) > 0).all():
            raise LenetEmbedError(f"{self.directory}: item ids are not in increasing order; "
                                  f"{REBUILD}")
        classes = self.manifest.classes
        if classes and len(self.labels) and int(self.labels.max()) >= len(classes):
            raise LenetEmbedError(f"{self.directory}: labels name classes the manifest does not "
                                  f"list; {REBUILD}")

    def _locate(self, row: int) -> tuple[LoadedSegment, int]:
        position = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.segments[position], row - int(self.offsets[position])

    def image(self, row: int) -> np.ndarray:
        """The stored digit of a row: uint8 (28, 28)."""
        segment, local = self._locate(row)
        return np.asarray(segment.images[local])

    def source(self, row: int) -> str | None:
        """The source path of a row, if it was recorded."""
        segment, local = self._locate(row)
        return segment.sources[local] if segment.sources is not None else None

    def live_rows(self) -> np.ndarray:
        """The rows of live items, in id order."""
        return np.flatnonzero(self.live)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored (indexed) vectors of ``rows``: float32 (len(rows), dim)."""
        return self._gather("vectors", rows, (self.dim,), np.float32)

    def images(self, rows: np.ndarray) -> np.ndarray:
        """The stored digits of ``rows``: uint8 (len(rows), 28, 28)."""
        return self._gather("images", rows, (28, 28), np.uint8)

    def _gather(self, field: str, rows: np.ndarray, shape: tuple[int, ...],
                dtype: type) -> np.ndarray:
        """Rows of one per-segment array, picked across the segments they live in."""
        out = np.empty((len(rows), *shape), dtype=dtype)
        for position, segment in enumerate(self.segments):
            start, stop = self.offsets[position], self.offsets[position + 1]
            inside = (rows >= start) & (rows < stop)
            if inside.any():
                out[inside] = getattr(segment, field)[rows[inside] - start]
        return out

    def sources(self, rows: np.ndarray) -> list[str | None] | None:
        """The source paths of ``rows`` (None when no segment recorded any)."""
        if not self.has_sources:
            return None
        return [self.source(int(row)) for row in rows]

    # ----------------------------------------------------------------------- search

    def _sealed_part(self, position: int) -> dict[str, Any]:
        segment = self.segments[position]
        start, stop = int(self.offsets[position]), int(self.offsets[position + 1])
        live = self.live[start:stop]
        apply_search_params(segment.index, self.search_params)
        # Counted once here: summing the live mask on every search would cost a single query more
        # than the graph search itself.
        live_count = int(live.sum())
        part: dict[str, Any] = {"segment": segment, "start": start, "live": live,
                                "live_count": live_count, "removed": len(live) - live_count,
                                "exact": None, "lock": threading.Lock()}
        if part["removed"]:
            part["bitmap"] = np.packbits(live, bitorder="little")
            part["selector"] = faiss.IDSelectorBitmap(len(live), faiss.swig_ptr(part["bitmap"]))
        return part

    def _growing_part(self) -> dict[str, Any] | None:
        # Made at every commit, so straight from the unsealed segments' arrays: picking their
        # rows through `vectors` cost a pass over every row per segment.
        unsealed = [i for i, s in enumerate(self.segments) if not s.info.sealed]
        if not unsealed:
            return None
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in unsealed])
        vectors = _joined([self.segments[i].vectors for i in unsealed])
        live = self.live[rows]
        if not live.all():
            rows, vectors = rows[live], vectors[live]
        if len(rows) == 0:
            return None
        flat = faiss.IndexFlat(self.dim, faiss_metric(self.metric))
        flat.add(np.ascontiguousarray(vectors))
        return {"index": flat, "rows": rows}

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest live rows of each (prepared) vector: distances (smaller is nearer)
        and rows, both (n, k); -1 rows and infinite distances pad when fewer items are live."""
        found: list[tuple[np.ndarray, np.ndarray]] = []
        for part in self._parts:
            if part["live_count"]:
                found.append(self._search_sealed(part, vectors, k))
        if self._growing is not None:
            flat, rows = self._growing["index"], self._growing["rows"]
            scores, local = flat.search(vectors, min(k, flat.ntotal))
            found.append(self._as_rows(scores, local, rows))
        if not found:
            empty = np.full((len(vectors), k), -1, dtype=np.int64)
            return np.full((len(vectors), k), np.inf, dtype=np.float32), empty
        if len(found) == 1:
            distances, rows = found[0]
        else:
            distances = np.hstack([d for d, _ in found])
            rows = np.hstack([r for _, r in found])
            order = np.argsort(distances, axis=1, kind="stable")
            distances = np.take_along_axis(distances, order, axis=1)
            rows = np.take_along_axis(rows, order, axis=1)
        return _pad(distances, rows, k)

    def hits(self, vectors: np.ndarray, k: int) -> Found:
        """:meth:`search` as what the rows hold: distances, ids and label codes (n, k; -1 ids
        and labels pad) and, when the bundle records any, the rows' sources."""
        distances, rows = self.search(vectors, k)
        missing = rows < 0
        safe = np.where(missing, 0, rows)
        ids = np.where(missing, -1, self.ids[safe]) if len(self.ids) else rows
        labels = np.where(missing, -1, self.labels[safe]) if len(self.ids) else rows
        sources = ([[self.source(row) for row in found if row >= 0] for found in rows.tolist()]
                   if self.has_sources else None)
        return Found(distances, ids, labels, sources)

    def _as_rows(self, scores: np.ndarray, local: np.ndarray, rows: np.ndarray | int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS results of one part as distances and global rows (-1 kept, at +inf)."""
        distances = to_distances(scores, self.metric).astype(np.float32, copy=False)
        missing = local < 0
        if not missing.any():  # the usual case, kept to two array operations
            return distances, (rows[local] if isinstance(rows, np.ndarray) else local + rows)
        if isinstance(rows, np.ndarray):
            global_rows = rows[np.where(missing, 0, local)]
        else:
            global_rows = local + rows
        global_rows = np.where(missing, -1, global_rows)
        distances = np.where(missing, np.inf, distances)
        return distances, global_rows

    def _search_sealed(self, part: dict[str, Any], vectors: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        index, start, live = part["segment"].index, part["start"], part["live"]
        wanted = min(k, part["live_count"])
        if not part["removed"]:
            scores, local = index.search(vectors, wanted)
            return self._as_rows(scores, local, start)
        params, effort = _filtered_search(index, part["selector"],
                                          part["live_count"] / len(live), wanted)
        if effort >= _EXACT_SPEEDUP * part["live_count"]:
            return self._as_rows(*self._search_live(part, vectors, wanted), start)
        if params is not None:
            scores, local = index.search(vectors, wanted, params=params)
        else:  # masking by over-fetching: ask for as many more as were removed
            deep = min(index.ntotal, wanted + part["removed"])
            scores, local = index.search(vectors, deep)
            dead = (local >= 0) & ~live[np.maximum(local, 0)]
            local = np.where(dead, -1, local)
            order = np.argsort(local < 0, axis=1, kind="stable")[:, :wanted]
            local = np.take_along_axis(local, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
        short = (local[:, :wanted] < 0).any(axis=1)
        if short.any():
            scores[short], local[short] = self._search_live(part, vectors[short], wanted)
        return self._as_rows(scores, local, start)

    def _search_live(self, part: dict[str, Any], vectors: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over a sealed segment's live rows: FAISS scores and rows of the segment
        (-1 past its live rows)."""
        flat, live_local = self._exact(part)
        scores, found = flat.search(vectors, k)
        return scores, np.where(found < 0, -1, live_local[np.maximum(found, 0)])

    def _exact(self, part: dict[str, Any]) -> tuple[Any, np.ndarray]:
        """A flat index over a sealed segment's live vectors and their rows in the segment, made
        the first time it is needed (or taken from the segment, when it was made for the same
        removed rows by another snapshot)."""
        with part["lock"]:
            if part["exact"] is None:
                segment, key = part["segment"], part["bitmap"].tobytes()
                cached = segment.live_index
                if cached is None or cached[0] != key:
                    live_local = np.flatnonzero(part["live"])
                    flat = faiss.IndexFlat(self.dim, faiss_metric(self.metric))
                    flat.add(np.ascontiguousarray(segment.vectors[live_local]))
                    cached = segment.live_index = (key, flat, live_local)
                part["exact"] = cached[1:]
            return part["exact"]


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """One array of the segments' arrays, copied only when there are several."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def find_sorted(haystack: np.ndarray, needles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``needles`` sits in the strictly increasing ``haystack``, and whether it is
    there at all (rows of absent needles are 0)."""
    rows = np.searchsorted(haystack, needles)
    found = rows < len(haystack)
    found[found] = haystack[rows[found]] == needles[found]
    return np.where(found, rows, 0), found


def _pad(distances: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    have = rows.shape[1]
    if have >= k:
        return distances[:, :k], rows[:, :k]
    pad = k - have
    return (np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf),
            np.pad(rows, ((0, 0), (0, pad)), constant_values=-1))


def _filtered_search(index: Any, selector: Any, live_fraction: float, k: int
                     ) -> tuple[Any | None, float]:
    """Search parameters that carry ``selector`` for the index types that honour one (None for
    the others), and what such a search of ``k`` costs, in rows of an exact scan.

    The promise: the search meets as many live candidates as the tuned one did with nothing
    removed, so its recall of the live items holds whatever the share removed. A filtered search
    visiting ``nprobe`` IVF lists, or keeping ``efSearch`` HNSW nodes in its beam, meets live rows
    at ``live_fraction`` of the rate it was tuned with, so it visits that many times more lists
    (all of them, at worst) or keeps that many times more nodes; with most rows removed the tuned
    values would otherwise return k live rows far from the nearest ones (HNSW at 95 % removed:
    recall@10 0.68 instead of 0.99)."""
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        # FAISS keeps at least k nodes in the beam whatever efSearch says.
        params.efSearch = math.ceil(max(index.hnsw.efSearch, k) / live_fraction)
        effort = (params.efSearch * index.hnsw.nb_neighbors(0)
                  * _HNSW_ROWS_PER_NEIGHBOUR)
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(index.nlist, math.ceil(index.nprobe / live_fraction))
        effort = index.ntotal * params.nprobe / index.nlist
    elif isinstance(index, faiss.IndexFlatCodes):
        params = faiss.SearchParameters()
        effort = index.ntotal
    else:
        return None, index.ntotal
    params.sel = selector
    return params, effort


def read_deletions(directory: Path, manifest: Manifest) -> np.ndarray:
    """The ids removed in this version (sorted), checked against the manifest. The file is read
    whole, so its checksum is checked too: it costs as much as the reading."""
    if manifest.deletions is None:
        return np.zeros(0, dtype=np.int64)
    deleted = read_whole_array(directory, manifest.deletions, manifest)
    if deleted.dtype != np.int64 or deleted.ndim != 1:
        raise LenetEmbedError(f"{directory / manifest.deletions}: not a list of ids; {REBUILD}")
    return deleted




# --------------------------------------------------------------------------- the backend

class _Faiss(Backend):
    """The writes of a bundle that keeps its items in its own segments."""

    def open(self, directory: Path, manifest: Manifest, encoder: Any,
             search_params: dict[str, int], previous: Snapshot | None) -> FaissSnapshot:
        """Load the segments of ``manifest``, reusing those ``previous`` holds unchanged."""
        reusable: dict[str, LoadedSegment] = {}
        if isinstance(previous, FaissSnapshot):
            old_files = previous.manifest.files
            for segment in previous.segments:
                if all(old_files.get(f) == manifest.files.get(f) for f in segment.info.files()):
                    reusable[segment.info.name] = segment
        segments = [
            reusable.get(segment.name) or load_segment(directory, manifest, segment)
            for segment in manifest.segments
        ]
        deleted = read_deletions(directory, manifest)
        return FaissSnapshot(directory, manifest, segments, deleted, encoder, search_params)

    def add(self, writer: BundleWriter, current: Manifest, ids: np.ndarray, vectors: np.ndarray,
            labels: np.ndarray, images: np.ndarray, sources: list[str | None] | None) -> Changes:
        """Write the new rows as one unsealed segment, together with the newest segments they
        are merged with (so that a merge writes, and flushes, one file instead of two)."""
        merged = _merged_with(current.segments, len(ids))
        split = len(current.segments) - merged
        kept, old = current.segments[:split], current.segments[split:]
        files = dict(current.files)
        if old:
            loaded = [load_segment(writer.directory, current, s, verify=True) for s in old]
            if sources is not None or any(s.sources is not None for s in loaded):
                sources = [source for s in loaded
                           for source in (s.sources or [None] * s.info.rows)] + (
                    sources or [None] * len(ids))
            vectors = np.concatenate([*(s.vectors for s in loaded), vectors])
            ids = np.concatenate([*(s.ids for s in loaded), ids])
            labels = np.concatenate([*(s.labels for s in loaded), labels])
            images = np.concatenate([*(s.images for s in loaded), images])
            for segment in old:
                for name in segment.files():
                    del files[name]
        segment, written = writer.new_segment(vectors=vectors, ids=ids, labels=labels,
                                              images=images, sources=sources)
        return {"segments": [*kept, segment], "files": {**files, **written}}

    def remove(self, writer: BundleWriter, current: Manifest, ids: np.ndarray
               ) -> tuple[np.ndarray, Changes | None]:
        """Record the live ones among ``ids`` as removed (a new list of removed ids)."""
        stored = np.zeros(len(ids), dtype=bool)
        for segment in current.segments:
            stored |= find_sorted(segment_ids(writer.directory, current, segment), ids)[1]
        deleted = read_deletions(writer.directory, current)
        gone = ids[stored & ~np.isin(ids, deleted)]
        if len(gone) == 0:
            return gone, None
        name, files = writer.new_deletions(np.concatenate([deleted, gone]))
        kept = {k: v for k, v in current.files.items() if k != current.deletions}
        return gone, {"deletions": name, "files": {**kept, **files},
                      "count": current.count - len(gone)}

    def compact(self, writer: BundleWriter, current: Manifest) -> Changes | None:
        """Rebuild every live item into one sealed segment with the bundle's FAISS factory."""
        unsealed = sum(not s.sealed for s in current.segments)
        if current.deleted == 0 and unsealed == 0 and len(current.segments) <= 1:
            return None
        loaded = [load_segment(writer.directory, current, s, verify=True)
                  for s in current.segments]
        deleted = read_deletions(writer.directory, current)
        rows = [np.flatnonzero(~np.isin(s.ids, deleted)) for s in loaded]
        vectors = (np.concatenate([np.asarray(s.vectors)[r] for s, r in zip(loaded, rows,
                                                                            strict=True)])
                   if loaded else np.zeros((0, current.dim), np.float32))
        segments: list[Segment] = []
        files = {k: v for k, v in current.files.items()
                 if k in (current.encoder_path, current.litert_path)
                 or k == (current.calibration and current.calibration.nondigits)}
        changes: Changes = {}
        if len(vectors):
            index, changes = _sealed_index(vectors, current)
            segment, segment_files = _write_rows(writer, loaded, rows, index=index,
                                                 vectors=vectors)
            segments, files = [segment], {**files, **segment_files}
        return {"segments": segments, "files": files, "deletions": None, "rows": current.count,
                **changes}


FAISS = _Faiss()


class FaissBuild(Build):
    """A build into the bundle's own segments: one sealed segment with a tuned FAISS index."""

    def index(self, vectors: np.ndarray, metric: str, factory: str, target_recall: float,
              budget: int, held_out: Callable[[], np.ndarray], on_progress: Progress
              ) -> TunedIndex:
        """The tuned index (:func:`~..ann.build_tuned_index`), its search parameters applied."""
        built = build_tuned_index(vectors, metric, factory, target_recall, budget, held_out,
                                  on_progress=on_progress)
        apply_search_params(built.index, {name: int(value) for name, value
                                          in built.search_params.items()
                                          if name in SEARCH_PARAMETERS})
        return built

    def scores(self, built: TunedIndex, vectors: np.ndarray, metric: str
               ) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
        """The tuned index's own search: the calibration sees what queries will."""
        return built.index.search  # type: ignore[no-any-return]

    def fields(self, built: TunedIndex, factory: str) -> Changes:
        """The factory chosen, its tuned parameters and why."""
        return {"factory": built.factory, "search_params": built.search_params,
                "target_recall": built.target_recall, "factory_reason": built.reason}

    def write(self, writer: BundleWriter, built: TunedIndex, ids: np.ndarray,
              vectors: np.ndarray, labels: np.ndarray, images: np.ndarray,
              sources: list[str] | None, factory: str, metric: str,
              on_progress: Progress) -> Changes:
        """One sealed segment holding every item and the index."""
        segment, files = writer.new_segment(vectors=vectors, ids=ids, labels=labels,
                                            images=images, sources=sources, index=built.index,
                                            on_progress=on_progress)
        return {"segments": [segment], "files": files, "store": None}


# --------------------------------------------------------------------------- writes' helpers

def _tier(rows: int) -> int:
    """A segment's size class: rows in [1, 4) are tier 0, [4, 16) tier 1, and so on."""
    return (max(rows, 1).bit_length() - 1) // 2


def _merged_with(segments: list[Segment], rows: int) -> int:
    """How many of the newest ``segments`` a new unsealed segment of ``rows`` rows is merged
    with at once (the newest first: the merged segment takes their place).

    The promise: the unsealed segments after the last sealed one, oldest first, never rise in
    tier (:func:`_tier`) and hold fewer than MERGE_FACTOR of any tier. With tiers 0 to
    floor(log4(n)) for ``n`` unsealed rows, that is at most ``3 * (floor(log4(n)) + 1)``
    segments, whatever the sizes of the adds were (1,000 alternating adds of 4 and 1 images
    leave 9, where merging only four of a tier left 1,000). Each add restores it by merging the
    new segment, always the newest, with

    - its predecessor while that one is of a lower tier (a large add pulls in the small
      segments before it, so no small segment is left stranded behind a larger one), then
    - the MERGE_FACTOR - 1 before it when none of them is of a higher tier (a tier collision:
      four of tier t make one of tier t + 1, the carry of a base-4 counter),

    until neither applies. A row that is rewritten always lands in a segment of a higher tier
    than the one it left, so it is rewritten at most floor(log4(n)) times. (Segments left by an
    older, unbounded policy are merged in as they are met; ``compact`` clears them at once.)
    """
    older: list[int] = []
    for segment in reversed(segments):
        if segment.sealed:
            break
        older.append(segment.rows)
    older.reverse()
    size, merged = rows, 0
    while merged < len(older):
        rest = older[:len(older) - merged]
        if _tier(rest[-1]) < _tier(size):
            take = 1
        elif (len(rest) >= MERGE_FACTOR - 1
              and all(_tier(r) <= _tier(size) for r in rest[1 - MERGE_FACTOR:])):
            take = MERGE_FACTOR - 1
        else:
            break
        size += sum(rest[-take:])
        merged += take
    return merged


def _write_rows(writer: BundleWriter, loaded: list[LoadedSegment], rows: list[np.ndarray],
                index: Any = None, vectors: np.ndarray | None = None
                ) -> tuple[Segment, dict[str, FileEntry]]:
    """One new segment holding the given rows of ``loaded`` segments, in order."""
    def gather(field: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(s, field))[r] for s, r in zip(loaded, rows,
                                                                            strict=True)])
    sources: list[str | None] | None = None
    if any(s.sources is not None for s in loaded):
        sources = []
        for segment, chosen in zip(loaded, rows, strict=True):
            sources.extend(segment.sources[i] if segment.sources else None for i in chosen)
    return writer.new_segment(
        vectors=gather("vectors") if vectors is None else vectors,
        ids=gather("ids"), labels=gather("labels"), images=gather("images"),
        sources=sources, index=index,
    )


def _sealed_index(vectors: np.ndarray, manifest: Manifest) -> tuple[Any, dict[str, Any]]:
    """The FAISS index ``compact`` seals the live rows in, with the bundle's factory; and the
    manifest's new search fields when there are too few rows left to train it (an IVF bundle
    with fewer live items than lists): then an exact Flat index, and the reason says why."""
    try:
        return make_index(vectors, manifest.metric, manifest.factory), {}
    except LenetEmbedError:
        if not needs_training(manifest.factory, manifest.metric, manifest.dim):
            raise
    reason = (f"compact: {len(vectors)} live items are too few to train {manifest.factory}; "
              "Flat (exact search) instead")
    return make_index(vectors, manifest.metric, "Flat"), {
        "factory": "Flat", "search_params": {}, "target_recall": None, "factory_reason": reason}
