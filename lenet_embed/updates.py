"""Changing a bundle in place: add items, remove items, compact. Each call is one commit.

These take vectors that are already embedded; :meth:`lenet_embed.SearchIndex.add` embeds images
with the bundle's own encoder and calls :func:`add_vectors`. Every function holds the bundle's
writer lock for the length of its commit: it checks what it is given, has the bundle's store
(:mod:`.store`) write the items, and commits the manifest the store's changes make. Ids come
from the manifest, so they are never reused.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import garbage
from .ann import prepare_vectors
from .bundle import INT64_MAX, Manifest, read_manifest
from .embed import Encoder
from .errors import LenetEmbedError
from .preprocess import ImageLike, to_batch, to_uint8
from .store import backend_of
from .writer import DEFAULT_LOCK_TIMEOUT, GRACE_SECONDS, BundleWriter

Label = int | str | None


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


@dataclass
class _PendingAdd:
    """One :meth:`GroupCommit.add` call waiting for its commit, and then what came of it."""

    batch: np.ndarray
    labels: list[Label]
    sources: list[str | None] | None
    ids: np.ndarray | None = None
    error: BaseException | None = None


class GroupCommit:
    """Adds of preprocessed batches to the bundle in ``directory`` from many threads, committed
    in groups: calls that arrive while a commit is being made join the next one (one commit, and
    one set of fsyncs, for all of them); each returns once the commit holding it is on disk.

    It holds no reference to its caller (the callbacks come with each call), so that a reader
    owning one is freed, and lets its memory maps go, as soon as it is dropped."""

    def __init__(self, directory: str | os.PathLike[str],
                 timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout
        self._committing = threading.Lock()  # held by the thread committing the waiting adds
        self._waiting_lock = threading.Lock()
        self._waiting: list[_PendingAdd] = []

    def add(self, batch: np.ndarray, labels: list[Label], sources: list[str | None] | None, *,
            encoder: Callable[[Manifest], Encoder], loaded: Callable[[], Manifest],
            committed: Callable[[Manifest], None]) -> np.ndarray:
        """Add ``batch`` ((N, 28, 28) float32) with one label (and source) per image in the next
        commit; return the new ids.

        ``encoder(manifest)`` gives the encoder a manifest names; ``loaded()`` the manifest the
        caller has loaded (a commit on top of another encoder embeds again); ``committed`` is
        told of the version committed (by the thread that commits the group)."""
        pending = _PendingAdd(batch, labels, sources)
        if len(labels) != len(batch) or (sources is not None and len(sources) != len(batch)):
            raise LenetEmbedError("give one label (and source) per image")
        if len(batch) == 0:
            raise LenetEmbedError("nothing to add: give at least one image")
        label_codes(labels, loaded())  # a bad label fails its own call only
        with self._waiting_lock:
            self._waiting.append(pending)
        led = False
        with self._committing:
            if pending.ids is None and pending.error is None:  # no one committed it meanwhile
                with self._waiting_lock:
                    group, self._waiting = self._waiting, []
                self._commit(group, encoder, loaded, committed)
                led = True
        if pending.error is not None:
            if led:
                raise pending.error
            raise copy.copy(pending.error) from None  # an exception of its own to each thread
        assert pending.ids is not None
        return pending.ids

    def _commit(self, group: list[_PendingAdd], encoder: Callable[[Manifest], Encoder],
                loaded: Callable[[], Manifest], committed: Callable[[Manifest], None]) -> None:
        """Commit the adds of ``group`` in one commit."""
        sources = None
        if any(pending.sources is not None for pending in group):
            sources = [source for pending in group
                       for source in (pending.sources or [None] * len(pending.batch))]
        try:
            ids, manifest = add_batch(
                self.directory, np.concatenate([pending.batch for pending in group]),
                [label for pending in group for label in pending.labels], sources,
                encoder=encoder, timeout=self.timeout, manifest=loaded())
        except BaseException as exc:
            for pending in group:
                pending.error = exc
            return
        start = 0
        for pending in group:
            pending.ids, start = ids[start:start + len(pending.batch)], start + len(pending.batch)
        committed(manifest)


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
        changes = backend_of(current).add(writer, current, ids, vectors, codes, images,
                                          sources)
        manifest = current.next("add", **{
            "classes": classes, "count": current.count + count, "rows": current.rows + count,
            "next_id": current.next_id + count, **changes})
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


def remove(directory: str | os.PathLike[str], ids: list[int] | np.ndarray,
               timeout: float = DEFAULT_LOCK_TIMEOUT) -> tuple[Removal, Manifest]:
    """Remove live items by id in one commit (none when no id is live)."""
    wanted = _as_ids(ids)
    with BundleWriter(directory, timeout) as writer:
        current = writer.require_current()
        gone, changes = backend_of(current).remove(writer, current, wanted)
        removal = Removal(len(gone), [int(i) for i in np.setdiff1d(wanted, gone)])
        if changes is None:
            return removal, current
        return removal, writer.commit(current.next("remove", **changes))


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
    """Drop removed items for good (a bundle's own segments: every live item rebuilt into one
    sealed segment with the bundle's FAISS factory); return the manifests before and after. Ids
    stay as they are."""
    with BundleWriter(directory, timeout) as writer:
        current = writer.require_current()
        changes = backend_of(current).compact(writer, current)
        if changes is None:
            return current, current
        return current, writer.commit(current.next("compact", **changes))
