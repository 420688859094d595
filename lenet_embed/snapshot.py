"""Opening one version of a bundle: :func:`open_snapshot`, the writers' :func:`check_version`,
and what ``info`` reports (:func:`inspect_bundle`).

A :class:`~.store.Snapshot` holds everything one manifest names (its items, the encoder),
checked against it, and never changes; a newer version is a new snapshot that shares what did
not change with the old one. Where the items live is the store's business (:mod:`.store`):
this module reads the manifest, loads the encoder and has the store load the items, retrying
when a commit by another process replaces the version being opened.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import garbage
from .ann import SEARCH_PARAMETERS
from .bundle import (
    REBUILD,
    Manifest,
    read_manifest,
    verify_file,
    verify_files,
    verify_files_once,
)
from .errors import LenetEmbedError
from .store import EncoderLoader, Snapshot, Vanished, backend_of, read_whole_array

__all__ = ["BundleReport", "Snapshot", "check_version", "forget_version", "inspect_bundle",
           "open_snapshot"]

_ATTEMPTS = 8

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
        except Vanished:
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
    if not backend_of(manifest).checked_by_loading:
        return
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


def bundle_encoder(directory: Path, manifest: Manifest, load_encoder: EncoderLoader) -> Any:
    """Check the two encoder files of ``manifest`` (their checksums: the loaders read them whole,
    and their size does not grow with the data) and load the encoder with ``load_encoder``."""
    for name in (manifest.encoder_path, manifest.litert_path):
        verify_file(directory, name, manifest.files[name])
    try:
        return load_encoder(directory / manifest.encoder_path, directory / manifest.litert_path)
    except FileNotFoundError:
        raise Vanished from None


def _current_identity(directory: Path) -> tuple[int, str] | None:
    try:
        manifest = read_manifest(directory)
    except LenetEmbedError:
        return None
    return manifest.version, manifest.committed_at


def _load(directory: Path, manifest: Manifest, load_encoder: EncoderLoader,
          previous: Snapshot | None, search_params: dict[str, int] | None) -> Snapshot:
    if previous is not None and previous.manifest.encoder_sha256 == manifest.encoder_sha256:
        encoder = previous.encoder
    else:
        encoder = bundle_encoder(directory, manifest, load_encoder)
    params = {**{k: int(v) for k, v in manifest.search_params.items()
                 if k in SEARCH_PARAMETERS}, **(search_params or {})}
    snapshot = backend_of(manifest).open(directory, manifest, encoder, params, previous)
    snapshot.nondigits = read_nondigits(directory, manifest, previous)
    return snapshot


def are_nondigits(vectors: np.ndarray, dim: int) -> bool:
    """Whether ``vectors`` are what a calibration's known non-digits must be, for the writer
    that writes them and every reader that loads them: at least two float32 unit rows of
    ``dim`` finite values."""
    return bool(vectors.dtype == np.float32 and vectors.ndim == 2 and len(vectors) >= 2
                and vectors.shape[1] == dim and np.isfinite(vectors).all()
                and np.allclose(np.einsum("ij,ij->i", vectors, vectors), 1.0, atol=1e-4))


def read_nondigits(directory: Path, manifest: Manifest, previous: Snapshot | None = None
                   ) -> np.ndarray | None:
    """The known non-digits of the version's calibration (read-only float32 unit rows of the
    bundle's dimension), checked against the manifest, or None when it has none; those of
    ``previous`` when it holds the same file."""
    name = manifest.calibration.nondigits if manifest.calibration is not None else None
    if name is None:
        return None
    if (previous is not None and previous.nondigits is not None and previous.manifest.calibration
            is not None and previous.manifest.calibration.nondigits == name):
        return previous.nondigits
    vectors = read_whole_array(directory, name, manifest)
    path = directory / name
    if not are_nondigits(vectors, manifest.dim):
        raise LenetEmbedError(f"{path}: not the unit rows of {manifest.dim} float32 values a "
                              f"calibration's non-digits are; {REBUILD} or run "
                              "`lenet-embed calibrate`")
    vectors.setflags(write=False)
    return vectors


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
        snapshot.check_count()
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
