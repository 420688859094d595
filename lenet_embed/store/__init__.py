"""Where a bundle's items live: one interface, two backends.

A bundle always holds its manifest and its encoder. Its items (id, vector, label, image, source)
live either in the bundle's own segments, searched with FAISS (:mod:`.faiss`, the default), or in
a collection of an external vector database that the manifest's ``store`` names
(:mod:`.milvus`). Everything outside this package talks to the interface stated here:

- reading, :class:`Snapshot`: one loaded version (its manifest, encoder and items): search
  (:meth:`Snapshot.hits`), an item's image and label, the labelled items and their images (what
  calibration samples), the counts and the contents checked (``info`` and ``info --verify``);
- writing, :class:`Backend`: add, remove and compact inside the bundle's writer session (the
  caller holds the lock and commits the manifest changes a method returns); create the items of
  a build (:class:`Build`); load a version for the writer's check before a commit.

The backend is chosen here and nowhere else: by the manifest (:func:`backend_of`) for a bundle
that exists, by the build's target (:func:`build_target`) for a new one. No caller asks which
one it has.
"""

from __future__ import annotations

import os
import tokenize
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import LenetEmbedError
from ..layout import REBUILD
from ..seal import verify_file

if TYPE_CHECKING:
    from ..bundle import Manifest, Store
    from ..writer import BundleWriter

# The external vector databases a manifest's ``store`` may name (its ``kind``).
EXTERNAL_KINDS = ("milvus",)
EncoderLoader = Callable[[Path, Path], Any]
Progress = Callable[[int, int], None]
# Manifest fields a write changes (count, segments, files, ...), as keywords of Manifest.next.
Changes = dict[str, Any]


class Vanished(Exception):
    """A file of the version being opened disappeared (a newer version replaced it): the reader
    reads the manifest again."""


# What numpy raises for a ``.npy`` file it cannot parse: its header is a Python literal, so a
# damaged one fails in the tokenizer or the parser, not only with a ValueError.
UNREADABLE = (OSError, ValueError, SyntaxError, tokenize.TokenError, EOFError, MemoryError)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_whole_array(directory: Path, name: str, manifest: Manifest) -> np.ndarray:
    """The ``.npy`` file ``name`` of ``manifest``, read whole after its checksum is checked
    (reading it costs as much); :class:`Vanished` when a newer version removed it, one line
    when it is damaged."""
    verify_file(directory, name, manifest.files[name])
    path = directory / name
    try:
        return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise Vanished from None
    except UNREADABLE as exc:
        raise LenetEmbedError(f"{path}: unreadable ({first_line(exc)}); the bundle is damaged, "
                              f"{REBUILD} or restore it") from None


class Found(NamedTuple):
    """The ``k`` nearest items of ``n`` queries, nearest first: distances (float32, smaller is
    nearer), ids and label codes (int64), all (n, k), padded with +inf, -1 and -1 when fewer
    items are live; and each query's sources (None when the bundle records none)."""

    distances: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    sources: list[list[str | None]] | None


class Snapshot(ABC):
    """One loaded version of a bundle: its manifest, its encoder and its items; read-only, so
    threads may share it."""

    has_sources: bool = False
    # The calibration's known non-digits (unit rows), set once the version is loaded
    # (:func:`lenet_embed.snapshot.read_nondigits`); None when the calibration has none.
    nondigits: np.ndarray | None = None

    def __init__(self, directory: Path, manifest: Manifest, encoder: Any,
                 search_params: dict[str, int] | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.encoder = encoder
        self.metric = manifest.metric
        self.dim = manifest.dim
        self.search_params = dict(search_params or {})

    def __len__(self) -> int:
        """The number of live items."""
        return self.manifest.count

    @property
    def identity(self) -> tuple[int, str]:
        """What tells two versions apart, even across a rebuild that restarts numbering."""
        return self.manifest.version, self.manifest.committed_at

    def label_name(self, code: int) -> int | str | None:
        """A stored label code as the user knows it: the digit, the folder name, or None."""
        classes = self.manifest.classes
        # A load does not read every label: say so when one is wrong.
        if classes and code >= len(classes):
            raise LenetEmbedError(f"{self.directory}: label {code} names a class the manifest "
                                  "does not list; the bundle is damaged, check it with "
                                  "`lenet-embed info --verify`")
        return self.manifest.label_name(code)

    def label_of(self, item_id: int) -> int | str | None:
        """The label of a live item as the user knows it (None also when there is no item)."""
        code = self.label_code_of(item_id)
        return None if code is None else self.label_name(code)

    @abstractmethod
    def hits(self, vectors: np.ndarray, k: int) -> Found:
        """The ``k`` nearest live items of each prepared vector (:func:`~..ann.prepare_vectors`),
        ``k`` of them whenever ``k`` items are live."""

    @abstractmethod
    def image_of(self, item_id: int) -> np.ndarray | None:
        """The stored digit of a live item (uint8 28x28), or None."""

    @abstractmethod
    def label_code_of(self, item_id: int) -> int | None:
        """The stored label code of a live item, or None when there is no such item."""

    @abstractmethod
    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and label codes of every live item, in id order."""

    @abstractmethod
    def images_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored digits of live items: uint8 (len(ids), 28, 28)."""

    def check_count(self) -> None:  # noqa: B027 - most stores check their count as they load
        """What every ``info`` checks beyond the load: that the items the manifest counts are
        there (a bundle's own segments are checked as they load)."""

    @abstractmethod
    def check_contents(self) -> None:
        """What ``info --verify`` checks beyond the files' checksums, reading every item: ids
        in order and in range, labels among the manifest's classes, images 28x28 digits."""


class Build(ABC):
    """Where a build puts its items: the index it builds (or not), and how it writes them."""

    @abstractmethod
    def index(self, vectors: np.ndarray, metric: str, factory: str, target_recall: float,
              budget: int, held_out: Callable[[], np.ndarray], on_progress: Progress) -> Any:
        """The search index of the build's (prepared) vectors, tuned as ``build-index`` says
        (:class:`~..ann.TunedIndex`), or None where the store indexes them itself."""

    @abstractmethod
    def scores(self, built: Any, vectors: np.ndarray, metric: str
               ) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
        """``search(prepared queries, k) -> (FAISS scores, rows)`` over every item, for the
        calibration fitted before the items are written."""

    @abstractmethod
    def fields(self, built: Any, factory: str) -> Changes:
        """The manifest's search fields: factory, search_params, target_recall, factory_reason."""

    @abstractmethod
    def write(self, writer: BundleWriter, built: Any, ids: np.ndarray, vectors: np.ndarray,
              labels: np.ndarray, images: np.ndarray, sources: list[str] | None,
              factory: str, metric: str, on_progress: Progress) -> Changes:
        """Write the items inside the build's writer session; the manifest fields that say where
        they are (segments, files, store)."""


class Backend(ABC):
    """The writes of a bundle's items, each inside the bundle's writer session (``writer`` holds
    the lock; ``current`` is the version the write starts from), returning the manifest fields it
    changes for the caller to commit; and the load of a version."""

    @abstractmethod
    def open(self, directory: Path, manifest: Manifest, encoder: Any,
             search_params: dict[str, int], previous: Snapshot | None) -> Snapshot:
        """Load the items of ``manifest`` (reusing what ``previous`` holds of them)."""

    @abstractmethod
    def add(self, writer: BundleWriter, current: Manifest, ids: np.ndarray, vectors: np.ndarray,
            labels: np.ndarray, images: np.ndarray, sources: list[str | None] | None) -> Changes:
        """Store new items (prepared vectors, label codes, uint8 images; new ids)."""

    @abstractmethod
    def remove(self, writer: BundleWriter, current: Manifest, ids: np.ndarray
               ) -> tuple[np.ndarray, Changes | None]:
        """Remove those of ``ids`` (sorted, unique) that are live: the ids removed, and the
        changes to commit (None: nothing to commit)."""

    @abstractmethod
    def compact(self, writer: BundleWriter, current: Manifest) -> Changes | None:
        """Drop removed items for good; the changes to commit (None: nothing to commit)."""

    def replaced(  # noqa: B027 - most stores keep nothing outside the bundle
            self, directory: Path, old: Manifest, new: Manifest) -> None:
        """After a build replaced ``old`` (a version of this store) with ``new``: let go of what
        ``old`` kept outside the bundle."""

    def kept_in_folder(self, manifest: Manifest) -> set[str]:
        """Names directly in the bundle's folder that the store keeps there besides the
        bundle's own files (none, but for an external store's local file)."""
        return set()

    # Whether a writer loads the version it commits on top of, as its check that a reader can
    # (beyond every file's checksum): not when loading it would connect to a database.
    checked_by_loading = True


def _milvus_backend() -> Any:
    from . import milvus  # pymilvus only for the bundles that use it

    return milvus


def backend_of(manifest: Manifest) -> Backend:
    """The backend holding the items of ``manifest``: the one place the choice is made."""
    return _backend(manifest.store)


def _backend(store: Store | None) -> Backend:
    if store is None:
        from .faiss import FAISS

        return FAISS
    assert store.kind in EXTERNAL_KINDS  # the manifest (bundle.Store) allows no other
    return _milvus_backend().Milvus()


def kept_in_folder(manifest: Manifest) -> set[str]:
    """Names directly in the bundle's folder that its store keeps there (a build into the folder
    must not refuse them as the user's files)."""
    return backend_of(manifest).kept_in_folder(manifest)


def replaced(directory: Path, old: Manifest | None, new: Manifest) -> None:
    """After a build's commit: have the store of the version it replaced (if any) let go of what
    that version kept outside the bundle."""
    if old is not None:
        backend_of(old).replaced(directory, old, new)


def build_target(directory: str | os.PathLike[str], uri: str | None = None,
                 token: str | None = None) -> Build:
    """Where a build of ``directory`` puts its items: the bundle's own segments, or (``uri``)
    the external store at that address; ``token`` authenticates to it."""
    if uri is None:
        from .faiss import FaissBuild

        return FaissBuild()
    return _milvus_backend().MilvusBuild(Path(directory), uri, token)


def allow_uri(uri: str) -> str:
    """Name an external store this process may connect to when a bundle's manifest names it
    (see :func:`.milvus.allow_uri`)."""
    return str(_milvus_backend().allow_uri(uri))
