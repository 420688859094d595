"""Writing to a bundle: new files, the atomic commit, and cleaning up after.

One writer at a time holds the bundle's lock (:mod:`lenet_embed.lock`). Before it creates a file
or folder, a writer appends its name to the intent journal kept in the lock file; a version
becomes current only when ``manifest.json`` is replaced by the new one, and so what a writer that
died before that left is exactly the names it journaled that the current version does not use.
The next writer removes them before it writes anything (:mod:`lenet_embed.garbage`).

Files that a commit stops using stay for :data:`GRACE_SECONDS` after it, so that a reader that
has just read the previous manifest can still open them; readers that take longer simply read the
manifest again (``snapshot.open_snapshot``). Readers never take the lock.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import durable, garbage
from .bundle import (
    FileEntry,
    Manifest,
    Segment,
    checked,
    manifest_json,
    read_manifest,
    remember_manifest,
    row_dtype,
)
from .errors import LenetEmbedError
from .layout import (
    CALIBRATION_DIR,
    DELETIONS_DIR,
    ENCODER_FILE,
    ENCODERS_DIR,
    IDS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    KEPT_FILES,
    LABELS_FILE,
    LAYOUT,
    LITERT_FILE,
    MANIFEST,
    SCRATCH_DIR,
    SEGMENTS_DIR,
    SOURCES_FILE,
    STAGED_PREFIX,
    VECTORS_FILE,
    VERSIONS_DIR,
)
from .lock import DEFAULT_LOCK_TIMEOUT, WriterLock, check_writable
from .lock import WriterBusy as WriterBusy
from .snapshot import are_nondigits, check_version, forget_version
from .written import remember_records

# How long the files of a superseded version are kept for readers that are opening them.
GRACE_SECONDS = 3.0
# Superseded versions are looked for every this many commits (and at every build and compact).
_SWEEP_EVERY = 16
# Files and folders a commit of adds or removals removes at most of what a sweep found unused,
# the rest going at the next commits: a stream of adds leaves about two files a commit, and
# removing the ~1,200 that piled up within the grace period at once held the writer lock for
# 150-370 ms (the disk here takes ~0.2 ms an unlink). Builds, compactions and explicit sweeps
# remove everything at once.
SWEEP_LIMIT = 8
def now_iso() -> str:
    """The current UTC time, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _disk_error(exc: BaseException) -> OSError | None:
    """The OSError that a library's own exception stands for, when it reports a full disk."""
    if isinstance(exc, OSError):
        return None
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in str(exc):
            return OSError(code, os.strerror(code))
    return None


class BundleWriter:
    """One writer's session on a bundle: ``with BundleWriter(path) as writer: ...``.

    On entering it takes the lock, removes what killed writers left, and reads the current
    manifest (``writer.current``; None when the folder holds no bundle yet). ``new_*`` methods
    write files for the next version; :meth:`commit` flushes them all at once and makes a
    manifest naming them current.
    """

    def __init__(self, directory: str | os.PathLike[str], timeout: float = DEFAULT_LOCK_TIMEOUT,
                 replacing: bool = False) -> None:
        self.directory = Path(directory)
        self.replacing = replacing
        self.lock = WriterLock(self.directory, timeout)
        self.current: Manifest | None = None
        # Files and folders written for the next version, open until the commit flushes them.
        self._unflushed: dict[Path, int] = {}
        self._created: list[Path] = []  # the bundle's folder and parents, when a build made them
        # Bytes this session's cleaning up unlinked (what a killed writer left, old versions).
        self.freed_bytes = 0
        self._scratch: str | None = None  # this writer's own folder under .tmp/
        self._first: int | None = None  # the version a first commit carries

    # ------------------------------------------------------------------------ session

    def __enter__(self) -> BundleWriter:
        if self.replacing:
            self._prepare_folder()
            self.lock.acquire()
        else:
            # A bundle has its lock file from its first build on: only a folder without one is
            # checked (and refused before anything is created in it, a bundle of format 1 too:
            # only a build replaces one).
            self.lock.acquire(before_creating=self._prepare_folder)
        try:
            self.current = self._read_current()
            garbage.refuse_symlinks(self.directory, self.current)
            self._entered_at = self.current.version if self.current else 0
            # Each writer marks the lock file busy and idle again when it is done: finding it
            # busy means the previous writer died, and only then is the bundle searched for what
            # it left.
            if self.lock.left:
                self.remove_leftovers(self.lock.left)
                self.lock.forget()
        except BaseException:
            self.lock.release(clean=not self.lock.left)  # keep a dead writer's journal
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> None:
        clean = True
        self._close_unflushed()
        try:
            if exc is not None and self.lock.fd is not None:
                # What this failed writer wrote for its next version.
                self.remove_leftovers(self.lock.intents())
            elif self._scratch is not None:
                garbage.remove_scratch(self.directory, self._scratch)
        except OSError:
            clean = False  # the next writer will look again
        self.lock.release(clean)
        if isinstance(exc, OSError):
            committed = (self.current.version if self.current else 0) != self._entered_at
            state = ("the new version was committed" if committed
                     else "the bundle is unchanged")
            raise LenetEmbedError(
                f"{self.directory}: cannot write ({exc.strerror or exc}); {state}"
            ) from None

    def _prepare_folder(self) -> None:
        """Make sure the folder exists and may become a bundle; refuse to touch anyone's files."""
        check_folder(self.directory)
        if not self.replacing:
            read_manifest(self.directory)  # "no index bundle there", "format 1 ...", and so on
        elif not self.directory.exists():
            folder = self.directory
            while not folder.exists():
                self._created.append(folder)
                folder = folder.parent
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LenetEmbedError(f"{self.directory}: cannot create the folder ({exc})"
                                      ) from None

    def _read_current(self) -> Manifest | None:
        path = self.directory / MANIFEST
        if not path.is_file():
            return None
        try:
            return read_manifest(self.directory)
        except LenetEmbedError:
            if self.replacing:  # a build replaces a damaged or older bundle
                return None
            raise

    def require_current(self) -> Manifest:
        """The current manifest, for operations that change an existing bundle."""
        if self.current is None:
            read_manifest(self.directory)  # raises the precise error
            raise LenetEmbedError(f"{self.directory}: no index bundle there")
        return self.current

    # ------------------------------------------------------------------------ new files

    def _intend(self, *paths: Path) -> None:
        """Journal files and folders before creating them, so that the next writer removes them
        if this one dies before its commit (and nothing else)."""
        self.lock.intend([path.relative_to(self.directory).as_posix() for path in paths])

    def _new_file(self, path: Path, write: Any) -> FileEntry:
        """Write a file of the next version; the commit flushes it."""
        self._intend(path)
        entry, fd = durable.write_new(path, write)
        self._unflushed[path] = fd
        return entry

    def _written(self, path: Path) -> FileEntry:
        """The entry of a file of the next version that a library wrote; the commit flushes it."""
        fd = os.open(path, os.O_RDONLY)
        self._unflushed[path] = fd
        return durable.entry_of(fd)

    def _flush_later(self, folder: Path) -> None:
        """Have the commit flush ``folder``, where this writer created files or folders."""
        if folder not in self._unflushed:
            self._unflushed[folder] = os.open(folder, os.O_RDONLY)

    def _close_unflushed(self) -> None:
        for fd in self._unflushed.values():
            os.close(fd)
        self._unflushed.clear()

    @property
    def next_version(self) -> int:
        """The number the next commit will carry: one above the current version's, or, with no
        version that loads (a build replacing a damaged bundle), one above every version's
        record, so that no record (what the sweep reads to find old files) is overwritten."""
        if self.current is not None:
            return self.current.version + 1
        if self._first is None:
            self._first = garbage.highest_record(self.directory) + 1
        return self._first

    def _new_name(self, prefix: str) -> str:
        return f"{prefix}{self.next_version:08d}-{secrets.token_hex(4)}"

    def _new_folder(self, parent: str, prefix: str) -> Path:
        base = self.directory / parent
        base.mkdir(exist_ok=True)
        folder = base / self._new_name(prefix)
        self._intend(folder)
        folder.mkdir()
        return folder

    def new_segment(self, *, vectors: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                    images: np.ndarray, sources: list[str | None] | None = None,
                    index: Any = None, on_progress: Callable[[int, int], None] | None = None
                    ) -> tuple[Segment, dict[str, FileEntry]]:
        """Write a segment and return its entry: sealed (a folder of arrays and ``index``) when
        an index is given, else unsealed (one file of records: one write, one fsync).

        A sealed segment's arrays are written a chunk at a time (``images`` may be memory-mapped
        and larger than memory would like); ``on_progress(done, rows)`` follows the images."""
        rows = len(ids)
        if not (len(vectors) == len(labels) == len(images) == rows) or (
                sources is not None and len(sources) != rows):
            raise ValueError("a segment's arrays must have one row per item")
        has_sources = sources is not None and any(s is not None for s in sources)
        if index is None:
            return self._unsealed_segment(vectors, ids, labels, images,
                                          sources if has_sources else None)
        folder = self._new_folder(SEGMENTS_DIR, "s")
        segment = Segment(name=folder.name, rows=rows, sealed=True, has_sources=has_sources)
        arrays = {
            VECTORS_FILE: (vectors, np.dtype(np.float32)),
            IDS_FILE: (ids, np.dtype(np.int64)),
            LABELS_FILE: (labels, np.dtype(np.int64)),
            IMAGES_FILE: (images, np.dtype(np.uint8)),
        }
        on_rows = None if on_progress is None else (lambda done: on_progress(done, rows))
        files: dict[str, FileEntry] = {}
        for name, (array, dtype) in arrays.items():
            track = on_rows if name == IMAGES_FILE else None
            files[segment.file(name)] = self._new_file(
                folder / name, lambda fh, a=array, d=dtype, t=track: durable.save_npy(fh, a, d, t))
        if has_sources:
            text = _json_bytes(list(sources or []))
            files[segment.file(SOURCES_FILE)] = self._new_file(
                folder / SOURCES_FILE, lambda fh: fh.write(text))
        # Written by Python, a megabyte at a time through FAISS's callback writer: a full disk is
        # an OSError like every other write's (faiss.write_index to a path raises a RuntimeError,
        # or misses a failed final flush), and no serialised copy of the index (600 MB for a
        # million vectors in HNSW32) is held in memory beside it.
        files[segment.file(INDEX_FILE)] = self._new_file(
            folder / INDEX_FILE,
            lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))
        self._flush_later(folder)
        self._flush_later(folder.parent)
        return segment, files

    def _unsealed_segment(self, vectors: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                          images: np.ndarray, sources: list[str | None] | None
                          ) -> tuple[Segment, dict[str, FileEntry]]:
        chars = max((len(s) for s in sources if s), default=1) if sources is not None else 0
        records = np.zeros(len(ids), dtype=row_dtype(vectors.shape[1], chars))
        records["id"], records["label"] = ids, labels
        records["vector"], records["image"] = vectors, images
        if sources is not None:
            records["source"] = [s or "" for s in sources]
        base = self.directory / SEGMENTS_DIR
        segment = Segment(name=self._new_name("s"), rows=len(ids), sealed=False,
                          has_sources=sources is not None)
        if not base.is_dir():
            base.mkdir()
        path = self.directory / segment.entry
        entry = self._new_file(path, lambda fh: np.save(fh, records, allow_pickle=False))
        remember_records(path, records)
        self._flush_later(base)
        return segment, {segment.entry: entry}

    def export_encoder(self, model: Any) -> bytes:
        """A Keras encoder's LiteRT export (the bytes of an ``encoder.tflite``), its SavedModel
        staged in this writer's :meth:`scratch` folder. Keras's own save makes an empty folder
        in the system's temp folder and removes it before it returns: no public Keras API
        places it elsewhere."""
        from .embed import litert_flatbuffer

        try:
            return litert_flatbuffer(model, self.scratch() / f"litert-{secrets.token_hex(4)}")
        except Exception as exc:
            # TensorFlow reports a full disk as its own error (ResourceExhaustedError): make it
            # the OSError that the writer turns into one line.
            disk_full = _disk_error(exc)
            if disk_full is None:
                raise
            raise disk_full from exc

    def new_encoder(self, model: Any, litert: bytes | None = None
                    ) -> tuple[str, dict[str, FileEntry]]:
        """Save a Keras encoder and its LiteRT export (``litert``: the bytes of one made
        already, else made here by :meth:`export_encoder`); return the folder and its
        entries."""
        folder = self._new_folder(ENCODERS_DIR, "e")
        relative = f"{ENCODERS_DIR}/{folder.name}"
        self._intend(folder / ENCODER_FILE)  # written by Keras
        model.save(folder / ENCODER_FILE)
        flatbuffer = litert if litert is not None else self.export_encoder(model)
        files = {f"{relative}/{ENCODER_FILE}": self._written(folder / ENCODER_FILE),
                 f"{relative}/{LITERT_FILE}": self._new_file(folder / LITERT_FILE,
                                                             lambda fh: fh.write(flatbuffer))}
        self._flush_later(folder)
        self._flush_later(folder.parent)
        return relative, files

    def copy_encoder(self, keras_file: Path, litert_file: Path
                     ) -> tuple[str, dict[str, FileEntry]]:
        """Copy an encoder's two files as they are (a model folder's, such as the shipped
        default's; no TensorFlow needed); return the folder and its entries."""
        folder = self._new_folder(ENCODERS_DIR, "e")
        relative = f"{ENCODERS_DIR}/{folder.name}"
        files = {}
        for name, source in ((ENCODER_FILE, keras_file), (LITERT_FILE, litert_file)):
            content = source.read_bytes()
            files[f"{relative}/{name}"] = self._new_file(folder / name,
                                                         lambda fh, c=content: fh.write(c))
        self._flush_later(folder)
        self._flush_later(folder.parent)
        return relative, files

    def new_deletions(self, ids: np.ndarray) -> tuple[str, dict[str, FileEntry]]:
        """Write the sorted list of removed ids; return its name and entry."""
        return self._new_array(DELETIONS_DIR, "d", np.unique(np.asarray(ids, dtype=np.int64)))

    def new_nondigits(self, vectors: np.ndarray) -> tuple[str, dict[str, FileEntry]]:
        """Write a calibration's known non-digits (float32 unit rows); return name and entry.
        Rows that no reader would load (:func:`lenet_embed.snapshot.are_nondigits`) are refused
        before anything is written."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or not are_nondigits(vectors, vectors.shape[1]):
            raise LenetEmbedError(f"{self.directory}: a calibration's known non-digits must be "
                                  "at least two unit rows of finite values; not written")
        return self._new_array(CALIBRATION_DIR, "n", vectors)

    def _new_array(self, parent: str, prefix: str, array: np.ndarray
                   ) -> tuple[str, dict[str, FileEntry]]:
        """Write ``array`` as a new ``.npy`` file in the bundle's folder ``parent``."""
        folder = self.directory / parent
        folder.mkdir(exist_ok=True)
        name = f"{parent}/{self._new_name(prefix)}.npy"
        entry = self._new_file(self.directory / name,
                               lambda fh: np.save(fh, array, allow_pickle=False))
        self._flush_later(folder)
        return name, {name: entry}

    def scratch(self) -> Path:
        """This writer's own folder under ``.tmp/``, for what the libraries it runs stage on
        disk (the LiteRT exporter's SavedModel): the commit removes it with all that is in it,
        and so does the next writer when this one is killed (it never removes a folder that it
        did not find journaled)."""
        if self._scratch is None:
            (self.directory / SCRATCH_DIR).mkdir(exist_ok=True)
            self._scratch = f"{SCRATCH_DIR}/{self._new_name('w')}"
            self._intend(self.directory / self._scratch)
            (self.directory / self._scratch).mkdir()
        return self.directory / self._scratch

    # ------------------------------------------------------------------------ commit

    def commit(self, manifest: Manifest) -> Manifest:
        """Make ``manifest`` the current version: one ``os.replace`` of ``manifest.json``.

        The manifest's invariants were checked when it was made; its fields' types are checked
        here as readers check them (:func:`lenet_embed.bundle.checked`), and it is serialised once;
        its text goes to disk once (``versions/N.json`` is a second name for the same file). The
        version it replaces is checked first (:func:`lenet_embed.snapshot.check_version`):
        nothing is committed, or acknowledged, on top of a version that readers cannot load or
        whose files differ from their checksums (a build replaces whatever was there).

        Durable when it returns: the lock file (its intent journal), then the new files and
        folders, their entries, the staged manifest and (for a build that created it) the
        bundle's folder are flushed before the rename, the bundle's folder after it. A power
        failure before that last flush leaves the previous version, one after it the new one
        (``tests/integration/test_power_loss.py``)."""
        if manifest.version != self.next_version:
            raise ValueError("a commit must carry the next version number")
        if self.current is not None and not self.replacing:
            check_version(self.directory, self.current)
        manifest = _with_commit_time(manifest)
        text = manifest_json(manifest)
        if self._scratch is not None:
            # Removed before the flushes that make the commit durable: once the lock file's
            # "idle" reaches the disk, no writer would look for it after a power failure.
            garbage.remove_scratch(self.directory, self._scratch)
            self._scratch = None
            if (self.directory / SCRATCH_DIR).is_dir():  # else its entry goes with the last flush
                self._flush_later(self.directory / SCRATCH_DIR)
        # A new folder's entry is in its parent: unflushed, a power failure could lose the
        # bundle, manifest and all, after the build returned. A build flushes its folder's
        # entry whoever made the folder (an earlier session that committed nothing, such as a
        # build's LiteRT export or a killed build, may have).
        for folder in self._created:
            self._flush_later(folder.parent)
        if self.replacing:
            self._flush_later(self.directory.parent)  # once: _flush_later keeps each folder once
        staged = self.directory / f"{STAGED_PREFIX}{secrets.token_hex(4)}"
        self._new_file(staged, lambda fh: fh.write(text.encode()))
        # The lock file first, on its own: its "busy" and the intent journal reach the disk before
        # any file this writer created is flushed, so that after a power failure the next writer
        # finds every one of them that survived and removes it.
        os.fsync(self.lock.fd)
        # Every new file and folder, and the staged manifest, flushed at once before the rename.
        durable.fsync_all(list(self._unflushed.values()))
        self._close_unflushed()
        # The version's record serves cleaning up only, so its name is not flushed: lost in a
        # power failure, the sweep treats that version's files as unused, which they are by then.
        record = self.directory / VERSIONS_DIR / f"{manifest.version:08d}.json"
        self._intend(record)
        try:
            os.link(staged, record)
        except (FileNotFoundError, FileExistsError):
            record.parent.mkdir(exist_ok=True)
            record.unlink(missing_ok=True)
            os.link(staged, record)
        os.replace(staged, self.directory / MANIFEST)
        durable.fsync_dir(self.directory)
        self.current = remember_manifest(text, manifest)
        if manifest.operation in ("build", "compact"):
            forget_version(self.directory)  # its segments are gone: let their mappings go
            self.collect_garbage()
        else:
            self.collect_garbage(limit=SWEEP_LIMIT, look=manifest.version % _SWEEP_EVERY == 0)
        return manifest

    # ------------------------------------------------------------------------ cleaning up

    def remove_leftovers(self, journal: list[str]) -> None:
        """Remove what a writer that did not commit created: the names of its intent journal
        that the current version does not use (:func:`garbage.remove_leftovers`)."""
        self.freed_bytes += garbage.remove_leftovers(self.directory, self.current, journal)

    def collect_garbage(self, grace: float = GRACE_SECONDS, force: bool = False,
                        limit: int | None = None, look: bool = True) -> int:
        """Remove the files of superseded versions no reader may still be opening (only names
        their records list, see :func:`garbage.collect`); return the bytes this freed."""
        if self.current is None:
            return 0
        freed = garbage.collect(self.directory, self.current, grace, force, limit, look)
        self.freed_bytes += freed
        return freed


def check_folder(directory: Path) -> None:
    """Refuse a target that is not a folder, or a folder holding files that are not a bundle's
    (beyond a README and the like): nothing of the user's is ever overwritten. A folder no
    writer could write to is refused too (:func:`lenet_embed.lock.check_writable`)."""
    check_writable(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise LenetEmbedError(f"{directory}: exists and is not a folder; choose another "
                              "--index-dir")
    found = contents(directory)
    is_bundle = _holds_a_bundle(directory)
    kept = _kept_by_store(directory) if is_bundle else set()
    strangers = [p for p in found.foreign
                 if not (p.is_file() and (is_bundle or p.name in KEPT_FILES))
                 and p.name not in kept]
    if not is_bundle:
        # Named like a bundle's but no bundle's: a build would replace manifest.json.
        strangers += [p for p in found.ours if p.name == MANIFEST]
    if strangers:
        raise LenetEmbedError(
            f"{directory}: exists and is not an index bundle ({strangers[0].name} is not part "
            "of one); choose another --index-dir or empty that folder"
        )


@dataclass
class Contents:
    """What a bundle folder holds, sorted: our layout and the user's own."""

    ours: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)


def contents(directory: Path) -> Contents:
    """Sort the entries of a bundle folder (or of a folder about to become one)."""
    found = Contents()
    for entry in sorted(directory.iterdir()):
        ours = entry.name in LAYOUT or entry.name.startswith(STAGED_PREFIX)
        (found.ours if ours else found.foreign).append(entry)
    return found


def _kept_by_store(directory: Path) -> set[str]:
    """The names the current manifest's store keeps directly in the bundle's folder (an
    external store's local file), which are the bundle's own, not the user's."""
    from . import store

    try:
        return store.kept_in_folder(read_manifest(directory))
    except LenetEmbedError:
        return set()


def _holds_a_bundle(directory: Path) -> bool:
    """Whether ``manifest.json`` is a bundle's (of any format, maybe damaged): it names a
    ``format_version``, or the folder holds the layout of format 2 beside it."""
    path = directory / MANIFEST
    if not path.is_file():
        return False
    if any((directory / name).is_dir() for name in (VERSIONS_DIR, SEGMENTS_DIR, ENCODERS_DIR)):
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data


def _with_commit_time(manifest: Manifest) -> Manifest:
    """``manifest`` stamped with the time of its commit, checked as a reader will check it."""
    return checked(manifest, committed_at=now_iso())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode("utf-8")
