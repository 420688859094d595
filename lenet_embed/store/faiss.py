"""One version of a bundle, loaded and searchable: :class:`Snapshot`.

A snapshot holds everything one manifest names (segments, removed ids, the encoder), checked
against it, and never changes; a newer version is a new snapshot that shares the unchanged
segments with the old one. Opening one costs O(files), not O(rows): the segments' files are
checked for their sizes and memory-mapped, not read (:func:`inspect_bundle` with ``verify``
compares every checksum); only the small files read whole (encoder, removed ids) are hashed.
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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import garbage
from .ann import SEARCH_PARAMETERS, apply_search_params, faiss_metric, to_distances
from .bundle import (
    IDS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    LABELS_FILE,
    REBUILD,
    SOURCES_FILE,
    VECTORS_FILE,
    Manifest,
    Segment,
    check_size,
    read_manifest,
    row_dtype,
    verify_file,
    verify_files,
    verify_files_once,
    written_records,
)
from .errors import LenetEmbedError
from .files import read_regular

EncoderLoader = Callable[[Path, Path], Any]
_READ_WHOLE_BYTES = 1 << 20  # unsealed segments up to this size are read, not mapped
_ATTEMPTS = 8
# A filtered search is replaced by exact search over the live rows once it would compare this
# many times as many rows as there are live ones: the exact index holds a copy of the live
# vectors, worth it only when it is much faster.
_EXACT_SPEEDUP = 2
# One unit of HNSW's efSearch expands a node: distances to its level-0 neighbours (2M), read at
# random, each about 3 times a row of an exact scan (measured on the team's two-core machine,
# 300 queries of 84-d unit vectors at a time: efSearch 64 on HNSW32 over 60,000 rows took 0.41 ms a
# query, exact search over 10,000 rows 0.21 ms and over 30,000 1.0 ms; 64 x 64 x 3 = 12,288).
_HNSW_ROWS_PER_NEIGHBOUR = 3
# What numpy raises for a ``.npy`` file it cannot parse: its header is a Python literal, so a
# damaged one fails in the tokenizer or the parser, not only with a ValueError.
_UNREADABLE = (OSError, ValueError, SyntaxError, tokenize.TokenError, EOFError, MemoryError)


class _Vanished(Exception):
    """A file of the version being opened disappeared (a newer version replaced it)."""


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
        raise _Vanished from None
    except _UNREADABLE as exc:
        raise LenetEmbedError(f"{where}: unreadable segment ({_first_line(exc)}); the bundle is "
                              f"damaged, {REBUILD} or restore it") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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


class Snapshot:
    """One loaded version of a bundle; read-only, so threads may share it."""

    def __init__(self, directory: Path, manifest: Manifest, segments: list[LoadedSegment],
                 deleted_ids: np.ndarray, encoder: Any,
                 search_params: dict[str, int] | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.segments = segments
        self.encoder = encoder
        self.metric = manifest.metric
        self.dim = manifest.dim
        self.search_params = dict(search_params or {})
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

    def __len__(self) -> int:
        """The number of live items."""
        return self.manifest.count

    @property
    def identity(self) -> tuple[int, str]:
        """What tells two versions apart, even across a rebuild that restarts numbering."""
        return self.manifest.version, self.manifest.committed_at

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

    def label_of(self, item_id: int) -> int | str | None:
        """The label of a live item as the user knows it (None also when there is no item)."""
        row = self.row_of(item_id)
        return None if row is None else self.label_name(int(self.labels[row]))

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

    def label_name(self, code: int) -> int | str | None:
        """A stored label code as the user knows it: the digit, the folder name, or None."""
        classes = self.manifest.classes
        # A load does not read every label: say so when one is wrong.
        if classes and code >= len(classes):
            raise LenetEmbedError(f"{self.directory}: label {code} names a class the manifest "
                                  "does not list; the bundle is damaged, check it with "
                                  "`lenet-embed info --verify`")
        return self.manifest.label_name(code)

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

    def hits(self, vectors: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str | None]] | None]:
        """:meth:`search` as what the rows hold: distances, ids and label codes (n, k; -1 ids
        and labels pad) and, when the bundle records any, the rows' sources."""
        distances, rows = self.search(vectors, k)
        missing = rows < 0
        safe = np.where(missing, 0, rows)
        ids = np.where(missing, -1, self.ids[safe]) if len(self.ids) else rows
        labels = np.where(missing, -1, self.labels[safe]) if len(self.ids) else rows
        sources = ([[self.source(row) for row in found if row >= 0] for found in rows.tolist()]
                   if self.has_sources else None)
        return distances, ids, labels, sources

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


# --------------------------------------------------------------------------- opening

def open_snapshot(directory: str | os.PathLike[str], load_encoder: EncoderLoader,
                  previous: Snapshot | None = None,
                  search_params: dict[str, int] | None = None,
                  committed: Manifest | None = None) -> Snapshot:
    """Load the current version of the bundle in ``directory`` (or ``committed``, a version
    this process has just committed, without reading the manifest again).

    Segments and the encoder that ``previous`` already holds are reused, not read again. When a
    commit by another process removes a file while it is being opened, the manifest is read again:
    readers never wait for writers and never see a mix of two versions.
    """
    directory = Path(directory)
    for _ in range(_ATTEMPTS):
        manifest, committed = committed or read_manifest(directory), None
        if previous is not None and previous.identity == (manifest.version,
                                                          manifest.committed_at):
            return previous
        try:
            return _load(directory, manifest, load_encoder, previous, search_params)
        except _Vanished:
            continue
        except LenetEmbedError:
            if _current_identity(directory) != (manifest.version, manifest.committed_at):
                continue  # a newer version replaced what we were checking
            raise
    raise _changed(directory)


def _changed(directory: Path) -> LenetEmbedError:
    return LenetEmbedError(f"{directory}: the bundle changed {_ATTEMPTS} times while it was being "
                           "opened; try again")


# The version each bundle was last checked at by check_version in this process: the next check
# loads only what changed since, as a reader refreshing does.
_CHECKED: dict[str, Snapshot] = {}
_CHECKED_LOCK = threading.Lock()
_CHECKED_KEPT = 4


def check_version(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Refuse (one line naming the file) a version that a reader could not load, or whose files
    differ from their checksums: what a writer checks before it commits on top of ``manifest``.

    Every file is compared with its size and sha256, each hashed once per process as long as
    it is unchanged (:func:`lenet_embed.bundle.verify_files_once`); then the version is loaded
    by the reader's own load (:func:`open_snapshot`, the encoder's files checked but not
    loaded): ``.npy`` headers parse, FAISS indexes read, removed ids agree with the count, ids
    stay below ``next_id``. The last version checked is kept, so the next check loads only the
    segments that are new (:func:`forget_version` lets its files go)."""
    directory = Path(directory)
    verify_files_once(directory, manifest.files)
    if manifest.store is not None:
        return  # the items are in Milvus: loading would connect to it
    key = str(directory.resolve())
    with _CHECKED_LOCK:
        previous = _CHECKED.pop(key, None)
    snapshot = open_snapshot(directory, _no_encoder, previous=previous, committed=manifest)
    with _CHECKED_LOCK:
        _CHECKED[key] = snapshot
        while len(_CHECKED) > _CHECKED_KEPT:
            del _CHECKED[next(iter(_CHECKED))]


def forget_version(directory: str | os.PathLike[str]) -> None:
    """Drop what :func:`check_version` keeps of a bundle (its memory maps of segments that a
    compaction or a build has just replaced)."""
    with _CHECKED_LOCK:
        _CHECKED.pop(str(Path(directory).resolve()), None)


def _no_encoder(keras_path: Path, litert_path: Path) -> None:
    """An encoder loader for checks: the files are checked, the model is not needed."""
    return None


def read_deletions(directory: Path, manifest: Manifest) -> np.ndarray:
    """The ids removed in this version (sorted), checked against the manifest. The file is read
    whole, so its checksum is checked too: it costs as much as the reading."""
    if manifest.deletions is None:
        return np.zeros(0, dtype=np.int64)
    path = directory / manifest.deletions
    verify_file(directory, manifest.deletions, manifest.files[manifest.deletions])
    try:
        deleted = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise _Vanished from None
    except _UNREADABLE as exc:
        raise LenetEmbedError(f"{path}: unreadable ({_first_line(exc)}); the bundle is damaged, "
                              f"{REBUILD} or restore it") from None
    if deleted.dtype != np.int64 or deleted.ndim != 1:
        raise LenetEmbedError(f"{path}: not a list of ids; {REBUILD}")
    return deleted


def bundle_encoder(directory: Path, manifest: Manifest, load_encoder: EncoderLoader) -> Any:
    """Check the two encoder files of ``manifest`` (their checksums: the loaders read them whole,
    and their size does not grow with the data) and load the encoder with ``load_encoder``."""
    for name in (manifest.encoder_path, manifest.litert_path):
        verify_file(directory, name, manifest.files[name])
    try:
        return load_encoder(directory / manifest.encoder_path, directory / manifest.litert_path)
    except FileNotFoundError:
        raise _Vanished from None


def _current_identity(directory: Path) -> tuple[int, str] | None:
    try:
        manifest = read_manifest(directory)
    except LenetEmbedError:
        return None
    return manifest.version, manifest.committed_at


def _load(directory: Path, manifest: Manifest, load_encoder: EncoderLoader,
          previous: Snapshot | None, search_params: dict[str, int] | None) -> Snapshot:
    reusable: dict[str, LoadedSegment] = {}
    if previous is not None:
        old_files = previous.manifest.files
        for segment in previous.segments:
            if all(old_files.get(f) == manifest.files.get(f) for f in segment.info.files()):
                reusable[segment.info.name] = segment
    segments = [
        reusable.get(segment.name) or load_segment(directory, manifest, segment)
        for segment in manifest.segments
    ]
    deleted = read_deletions(directory, manifest)
    if previous is not None and previous.manifest.encoder_sha256 == manifest.encoder_sha256:
        encoder = previous.encoder
    else:
        encoder = bundle_encoder(directory, manifest, load_encoder)
    params = {**{k: int(v) for k, v in manifest.search_params.items()
                 if k in SEARCH_PARAMETERS}, **(search_params or {})}
    if manifest.store is not None:
        from .milvus import MilvusSnapshot  # pymilvus only for bundles that use it

        return MilvusSnapshot(directory, manifest, encoder, params)  # type: ignore[return-value]
    return Snapshot(directory, manifest, segments, deleted, encoder, params)


# `info` suggests `compact` from this share of removed rows on: a search of a segment with a share
# d removed does 1 / (1 - d) times the work (its effort is scaled to keep its recall), 1.5x at a
# third; scripts/bench_removed.py measured HNSW at 50 % removed 1.5-2x slower than compacted.
COMPACT_HINT_SHARE = 1 / 3


@dataclass(frozen=True)
class BundleReport:
    """What ``lenet-embed info`` shows: the manifest of a bundle that loaded, and its sizes."""

    manifest: Manifest
    bytes: int
    # What ``compact`` frees: the removed rows' share of the segments plus ``old_files_bytes``.
    reclaimable_bytes: int
    verified: bool
    # Files on disk the current version does not use: those a cleanup removes (superseded
    # versions', a killed writer's), and those it never touches (the user's), by name.
    old_files_bytes: int = 0
    unknown_files: tuple[str, ...] = ()

    @property
    def sealed(self) -> int:
        """Segments with a FAISS index of their own."""
        return sum(segment.sealed for segment in self.manifest.segments)

    @property
    def compaction_hint(self) -> str | None:
        """"N % of rows removed: `lenet-embed compact` restores search speed" once at least
        :data:`COMPACT_HINT_SHARE` of the stored rows are removed ones, else None."""
        share = self.manifest.deleted / max(self.manifest.rows, 1)
        if self.manifest.deleted == 0 or share < COMPACT_HINT_SHARE:
            return None
        return (f"{round(share * 100)} % of rows removed: `lenet-embed compact` restores search "
                "speed")

    def to_dict(self) -> dict[str, Any]:
        """The manifest, plus the figures ``info`` prints."""
        return {**self.manifest.to_dict(), "deleted": self.manifest.deleted, "bytes": self.bytes,
                "reclaimable_bytes": self.reclaimable_bytes,
                "old_files_bytes": self.old_files_bytes, "unknown_files": list(self.unknown_files),
                "checks": "ok", "verified": self.verified, "compaction_hint": self.compaction_hint}


def inspect_bundle(directory: str | os.PathLike[str], verify: bool = False) -> BundleReport:
    """Load the current version as a search would (sizes checked, the LiteRT encoder opened where
    ai-edge-litert is installed) and report on it. ``verify`` also compares every file with its
    sha256 and checks every row (ids in order, labels among the classes): it reads the whole
    bundle, and names the files that are damaged."""
    from .embed import LiteRTEncoder, litert_available

    def check_encoder(keras_path: Path, litert_path: Path) -> None:
        if litert_available():
            LiteRTEncoder(litert_path, threads=1)

    directory = Path(directory)
    for _ in range(_ATTEMPTS):
        snapshot = open_snapshot(directory, check_encoder)
        manifest = snapshot.manifest
        if manifest.store is not None:
            snapshot.check_count()  # type: ignore[attr-defined]
        if verify:
            try:
                verify_files(directory, manifest.files)
            except FileNotFoundError as exc:
                if _current_identity(directory) != snapshot.identity:
                    continue  # a newer version was committed and this one's files swept
                raise LenetEmbedError(f"{exc.filename}: missing from the bundle; {REBUILD}"
                                      ) from None
            snapshot.check_contents()
        total = sum(entry.bytes for entry in manifest.files.values())
        per_row = sum(entry.bytes for name, entry in manifest.files.items()
                      if name.startswith("segments/")) / max(manifest.rows, 1)
        found = garbage.survey(directory, manifest, garbage.journal_on_disk(directory))
        return BundleReport(manifest, total,
                            int(per_row * manifest.deleted) + found.reclaimable_bytes, verify,
                            found.reclaimable_bytes, tuple(found.unknown))
    raise _changed(directory)
