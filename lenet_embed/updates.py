"""Changing a bundle in place: add items, remove items, compact. Each call is one commit.

These take vectors that are already embedded; :meth:`lenet_embed.SearchIndex.add` embeds images
with the bundle's own encoder and calls :func:`add_vectors`. Every function holds the bundle's
writer lock for the length of its commit.

Added items go into a new unsealed segment, searched exactly. So that a stream of small adds does
not pile up segments, unsealed segments are merged as in a size-tiered LSM tree (see
:func:`_merged_with`): for any sequence of add sizes, the ``n`` rows in unsealed segments are in
at most ``3 * (floor(log4(n)) + 1)`` of them, and each row is rewritten at most ``floor(log4(n))``
times. ``compact`` rebuilds everything live into one sealed segment with the
bundle's FAISS factory and forgets removed rows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import garbage, milvus
from .ann import make_index, needs_training, prepare_vectors
from .bundle import (
    INT64_MAX,
    FileEntry,
    Manifest,
    Segment,
    read_manifest,
)
from .embed import Encoder
from .errors import LenetEmbedError
from .preprocess import ImageLike, to_batch, to_uint8
from .snapshot import LoadedSegment, find_sorted, load_segment, read_deletions, segment_ids
from .writer import DEFAULT_LOCK_TIMEOUT, GRACE_SECONDS, BundleWriter

Label = int | str | None
# Unsealed segments are merged MERGE_FACTOR at a time, once that many of a size class pile up
# (and a size class spans a factor of MERGE_FACTOR in rows: see _tier).
MERGE_FACTOR = 4


class EncoderChanged(LenetEmbedError):
    """The bundle was rebuilt with another encoder after the vectors to add were made."""


@dataclass(frozen=True)
class Removal:
    """What a remove did: how many items went, and which of the ids asked for were not live."""

    removed: int
    missing: list[int]


def label_codes(labels: list[Label], manifest: Manifest) -> tuple[np.ndarray, list[str]]:
    """User labels as stored codes: digits as themselves, folder names as positions in
    ``classes`` (new names are appended), None as -1. A number below 0 or beyond int64 is
    refused in one line: codes are stored as int64, and -1 already means "no label"."""
    classes = list(manifest.classes)
    codes = []
    for label in labels:
        if label is None:
            codes.append(-1)
        elif classes:
            name = str(label)
            if name not in classes:
                classes.append(name)
            codes.append(classes.index(name))
        else:
            code = _as_number(label)
            if code is None or not 0 <= code <= INT64_MAX:
                raise LenetEmbedError(
                    f"label {str(label)[:40]!r}: this bundle's labels are whole numbers (like the "
                    f"digits 0-9); give a whole number in 0..{INT64_MAX}"
                )
            codes.append(code)
    return np.asarray(codes, dtype=np.int64), classes


def _as_number(label: Label) -> int | None:
    """A label as a whole number (a string of ASCII digits too, maybe with a minus), else
    None."""
    if isinstance(label, (bool, np.bool_)):
        return None
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, str):
        text = label.strip()
        digits = text.removeprefix("-")
        if digits.isdecimal() and digits.isascii() and len(digits) <= 40:
            return int(text)
    return None


def _as_ids(ids: list[int] | np.ndarray) -> np.ndarray:
    """Item ids as a sorted int64 array without repeats; one line for one that is not a whole
    number within int64 (no id is, so nothing could match it)."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "i":  # within int64 already
        return np.unique(ids.astype(np.int64).ravel())
    values = list(ids)
    for value in values:
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
                and -INT64_MAX - 1 <= value <= INT64_MAX):
            raise LenetEmbedError(f"id {str(value)[:40]!r}: ids are whole numbers in "
                                  f"0..{INT64_MAX}")
    return np.unique(np.asarray(values, dtype=np.int64))


def add_vectors(
    directory: str | os.PathLike[str],
    vectors: np.ndarray,
    images: np.ndarray,
    labels: list[Label] | None = None,
    sources: list[str | None] | None = None,
    encoder_sha256: str | None = None,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    metric: str | None = None,
) -> tuple[np.ndarray, Manifest]:
    """Add items (prepared vectors, uint8 28x28 images) in one commit; return their new ids and
    the manifest committed. ``encoder_sha256`` and ``metric`` say what the vectors were made
    with: if the bundle's encoder or metric is another one by now, :class:`EncoderChanged` is
    raised and nothing is written."""
    count = len(vectors)
    labels = list(labels) if labels is not None else [None] * count
    if len(labels) != count or len(images) != count or (sources is not None
                                                          and len(sources) != count):
        raise LenetEmbedError("give one label (and source) per image")
    if count == 0:
        raise LenetEmbedError("nothing to add: give at least one image")
    with BundleWriter(directory, timeout) as writer:
        current = writer.require_current()
        if (encoder_sha256 is not None and encoder_sha256 != current.encoder_sha256) or (
                metric is not None and metric != current.metric):
            raise EncoderChanged(f"{directory}: the bundle was rebuilt with another encoder "
                                 "while adding; refresh and add again")
        if vectors.shape[1:] != (current.dim,):
            raise LenetEmbedError(f"vectors must have shape (N, {current.dim})")
        codes, classes = label_codes(labels, current)
        if current.next_id > INT64_MAX + 1 - count:
            raise LenetEmbedError(f"{directory}: no ids left to give {count} new items "
                                  f"(next_id {current.next_id}); rebuild the bundle")
        ids = np.arange(current.next_id, current.next_id + count, dtype=np.int64)
        segments, new_files = current.segments, current.files
        live = current.count + count
        if current.store is not None:
            live = milvus.add_rows(writer.directory, current, ids, vectors, codes, images,
                                   sources)
        else:
            segments, new_files = _append_segment(writer, current, vectors, ids, codes, images,
                                                  sources)
        manifest = current.next(
            "add", classes=classes, segments=segments, files=new_files,
            count=live, rows=current.rows + count, next_id=current.next_id + count,
        )
        return ids, writer.commit(manifest)


def add_images(
    directory: str | os.PathLike[str],
    images: ImageLike | list[ImageLike],
    labels: Label | Sequence[Label] = None,
    sources: Sequence[str | None] | None = None,
    *,
    encoder: Callable[[Manifest], Encoder],
    timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> tuple[np.ndarray, Manifest]:
    """Preprocess ``images``, embed them with the bundle's encoder (``encoder(manifest)`` gives
    it) and add them in one commit; return the new ids and the manifest committed.

    ``labels`` is one label for every image or one per image.
    """
    batch = to_batch(images)
    return add_batch(directory, batch, per_image(labels, len(batch)),
                     list(sources) if sources is not None else None,
                     encoder=encoder, timeout=timeout)


def per_image(labels: Label | Sequence[Label], count: int) -> list[Label]:
    """One label for every image, or one per image, as a list of one per image."""
    if labels is None or isinstance(labels, (str, int, np.integer)):
        return [labels] * count
    return list(labels)


def add_batch(
    directory: str | os.PathLike[str],
    batch: np.ndarray,
    labels: list[Label],
    sources: list[str | None] | None,
    *,
    encoder: Callable[[Manifest], Encoder],
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    manifest: Manifest | None = None,
) -> tuple[np.ndarray, Manifest]:
    """:func:`add_images` of a batch already preprocessed ((N, 28, 28) float32).

    ``manifest`` is the version the caller has loaded (else the current one is read): if a
    rebuild has changed the encoder by the time of the commit, the images are embedded again
    with the current one.
    """
    pixels = to_uint8(batch)
    for attempt in range(3):
        if manifest is None:
            manifest = read_manifest(directory)
        vectors = prepare_vectors(encoder(manifest).embed(batch), manifest.metric)
        try:
            return add_vectors(directory, vectors, pixels, labels, sources,
                               manifest.encoder_sha256, timeout, manifest.metric)
        except EncoderChanged:
            if attempt == 2:
                raise
            manifest = None
    raise AssertionError("unreachable")


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


def _append_segment(writer: BundleWriter, current: Manifest, vectors: np.ndarray,
                    ids: np.ndarray, labels: np.ndarray, images: np.ndarray,
                    sources: list[str | None] | None
                    ) -> tuple[list[Segment], dict[str, FileEntry]]:
    """Write the new rows as one unsealed segment, together with the newest segments they are
    merged with (so that a merge writes, and flushes, one file instead of two); return the new
    segment list and file list."""
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
    return [*kept, segment], {**files, **written}


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


def remove(directory: str | os.PathLike[str], ids: list[int] | np.ndarray,
               timeout: float = DEFAULT_LOCK_TIMEOUT) -> tuple[Removal, Manifest]:
    """Remove live items by id in one commit (none when no id is live)."""
    wanted = _as_ids(ids)
    with BundleWriter(directory, timeout) as writer:
        current = writer.require_current()
        if current.store is not None:
            gone, live = milvus.remove_rows(writer.directory, current, wanted)
            missing = [int(i) for i in np.setdiff1d(wanted, gone)]
            if len(gone) == 0 and live == current.count:
                return Removal(0, missing), current
            manifest = current.next("remove", count=live,
                                    rows=current.rows - (current.count - live))
            return Removal(len(gone), missing), writer.commit(manifest)
        stored = np.zeros(len(wanted), dtype=bool)
        for segment in current.segments:
            stored |= find_sorted(segment_ids(writer.directory, current, segment), wanted)[1]
        deleted = read_deletions(writer.directory, current)
        present = stored & ~np.isin(wanted, deleted)
        missing = [int(i) for i in wanted[~present]]
        hits = wanted[present]
        if len(hits) == 0:
            return Removal(0, missing), current
        name, files = writer.new_deletions(np.concatenate([deleted, hits]))
        new_files = {k: v for k, v in current.files.items() if k != current.deletions}
        manifest = current.next("remove", deletions=name, files={**new_files, **files},
                                count=current.count - len(hits))
        return Removal(len(hits), missing), writer.commit(manifest)


def reclaim(directory: str | os.PathLike[str], timeout: float = DEFAULT_LOCK_TIMEOUT) -> int:
    """Remove every file of superseded versions and what killed writers left, waiting first
    until readers can no longer be opening the former (until the grace period after the last
    commit is over: a few seconds at most, none when there is no old version); return the bytes
    of the files unlinked (each measured just before). ``compact`` is followed by this."""
    directory = Path(directory)
    wait = garbage.grace_left(directory, read_manifest(directory), GRACE_SECONDS)
    time.sleep(wait or 0.0)
    with BundleWriter(directory, timeout) as writer:
        writer.require_current()
        writer.collect_garbage(force=True)
        return writer.freed_bytes


def compact(directory: str | os.PathLike[str], timeout: float = DEFAULT_LOCK_TIMEOUT
            ) -> tuple[Manifest, Manifest]:
    """Rebuild every live item into one sealed segment with the bundle's FAISS factory, dropping
    removed rows; return the manifests before and after. Ids stay as they are."""
    with BundleWriter(directory, timeout) as writer:
        current = writer.require_current()
        if current.store is not None:
            milvus.compact(writer.directory, current)
            return current, current
        unsealed = sum(not s.sealed for s in current.segments)
        if current.deleted == 0 and unsealed == 0 and len(current.segments) <= 1:
            return current, current
        loaded = [load_segment(writer.directory, current, s, verify=True)
                  for s in current.segments]
        deleted = read_deletions(writer.directory, current)
        rows = [np.flatnonzero(~np.isin(s.ids, deleted)) for s in loaded]
        vectors = (np.concatenate([np.asarray(s.vectors)[r] for s, r in zip(loaded, rows,
                                                                            strict=True)])
                   if loaded else np.zeros((0, current.dim), np.float32))
        segments: list[Segment] = []
        files = {k: v for k, v in current.files.items()
                 if k in (current.encoder_path, current.litert_path)}
        changes: dict[str, Any] = {}
        if len(vectors):
            index, changes = _sealed_index(vectors, current)
            segment, segment_files = _write_rows(writer, loaded, rows, index=index,
                                                 vectors=vectors)
            segments, files = [segment], {**files, **segment_files}
        manifest = current.next("compact", segments=segments, files=files, deletions=None,
                                rows=current.count, **changes)
        return current, writer.commit(manifest)


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
