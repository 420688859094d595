"""Writing to a bundle: the writer lock, new files, the atomic commit, and cleaning up after.

One writer at a time holds ``.lock`` (``flock``, so a killed writer's lock is released by the
kernel). A writer names every file it creates after the version it is about to commit
(``segments/s00000008-1a2b3c``); a version becomes current only when ``manifest.json`` is replaced
by the new one, and so the files of a writer that died before that are exactly those named after
versions above the current one. The next writer removes them before it writes anything.

Files that a commit stops using stay for :data:`GRACE_SECONDS` after it, so that a reader that
has just read the previous manifest can still open them; readers that take longer simply read the
manifest again (``snapshot.open_snapshot``). Readers never take the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from .bundle import (
    DELETIONS_DIR,
    ENCODER_FILE,
    ENCODERS_DIR,
    FORMAT_1_FILES,
    IDS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    KEPT_FILES,
    LABELS_FILE,
    LITERT_FILE,
    LOCK_FILE,
    MANIFEST,
    SCRATCH_DIR,
    SEGMENTS_DIR,
    SOURCES_FILE,
    STAGED_PREFIX,
    VECTORS_FILE,
    VERSIONS_DIR,
    FileEntry,
    Manifest,
    Segment,
    contents,
    malformed,
    manifest_json,
    read_manifest,
    remember_manifest,
    remember_records,
    row_dtype,
)
from .data import read_rows
from .errors import LenetEmbedError
from .snapshot import check_version, forget_version

# How long the files of a superseded version are kept for readers that are opening them.
GRACE_SECONDS = 3.0
DEFAULT_LOCK_TIMEOUT = 30.0
# Superseded versions are looked for every this many commits (and at every build and compact).
_SWEEP_EVERY = 16
# Files and folders a commit of adds or removals removes at most of what a sweep found unused,
# the rest going at the next commits: a stream of adds leaves about two files a commit, and
# removing the ~1,200 that piled up within the grace period at once held the writer lock for
# 150-370 ms (the disk here takes ~0.2 ms an unlink). Builds, compactions and explicit sweeps
# remove everything at once.
SWEEP_LIMIT = 8
# What a sweep found unused and its commits have not removed yet, per bundle folder, in order:
# paths, and for version records (whose names a rebuild reuses) the inode found.
_UNUSED: dict[str, list[tuple[Path, int | None]]] = {}
_UNUSED_LOCK = threading.Lock()
_SERIAL_FSYNCS = 3  # files flushed one after another, not from threads (see _fsync_all)
_NAMES: dict[tuple[str, int, int, int], list[str] | None] = {}  # see _named_files
_NAMES_LOCK = threading.Lock()
_NAMES_KEPT = 20_000
_VERSIONED = re.compile(r"[sed](\d{8})-[0-9a-f]+(\.npy)?")
# Bytes of an array saved at a time: the images of a million digits may be memory-mapped from the
# data set's file, and are then read (and hashed, and written) 64 MB at a time, never copied whole.
_SAVE_CHUNK_BYTES = 64 << 20


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_all(fds: list[int]) -> None:
    """``fsync`` every descriptor. Many (a build's, a compaction's files) go all at once from
    threads of their own, so the disk writes them together. An add's three (its segment, the
    segments folder, the staged manifest) go one after the other: measured as fast (0.9 against
    1.2 ms), and without starting threads and waking their caller at every add, wake-ups that
    preempted readers on the other core (bench_updates figure 3)."""
    if len(fds) <= _SERIAL_FSYNCS:
        for fd in fds:
            os.fsync(fd)
        return
    errors: list[OSError] = []

    def flush(fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=flush, args=(fd,)) for fd in fds[1:]]
    for thread in threads:
        thread.start()
    if fds:
        flush(fds[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class _HashingFile:
    """A write-only file object that hashes what passes through it (so nothing is read back)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self.fh.write(view)


def _write_file(path: Path, write: Any) -> tuple[FileEntry, int]:
    """Create ``path`` (it must not exist) and fill it with ``write(file)``; return its entry and
    a descriptor of it, open for the commit to flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(fd, "wb", closefd=False) as fh:
            hashing = _HashingFile(fh)
            write(hashing)
    except BaseException:
        os.close(fd)
        raise
    return FileEntry(bytes=hashing.size, sha256=hashing.digest.hexdigest()), fd


def _save_npy(fh: Any, array: np.ndarray, dtype: np.dtype,
              on_rows: Callable[[int], None] | None = None) -> None:
    """Write ``array`` as ``dtype`` in ``.npy`` format, the same bytes as ``np.save``, a chunk of
    rows at a time; ``on_rows(done)`` after each chunk."""
    np.lib.format.write_array_header_1_0(fh, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": array.shape,
    })
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _SAVE_CHUNK_BYTES // row_bytes)
    for start in range(0, len(array), step):
        fh.write(np.ascontiguousarray(read_rows(array, start, start + step), dtype=dtype))
        if on_rows is not None:
            on_rows(min(start + step, len(array)))



def _disk_error(exc: BaseException) -> OSError | None:
    """The OSError that a library's own exception stands for, when it reports a full disk."""
    if isinstance(exc, OSError):
        return None
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in str(exc):
            return OSError(code, os.strerror(code))
    return None


_LOCK_RECORD = 32


class WriterBusy(LenetEmbedError):
    """Another process held the writer lock for longer than this writer would wait."""


class WriterLock:
    """The bundle's writer lock: ``flock`` on ``.lock``, waited for up to ``timeout`` seconds."""

    def __init__(self, directory: Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = directory / LOCK_FILE
        self.timeout = timeout
        self.fd: int | None = None

    def acquire(self, before_creating: Callable[[], None] | None = None) -> None:
        """Take the lock, or raise a one-line error naming the process that holds it. When there
        is no lock file yet, ``before_creating()`` runs first (it may refuse the folder)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except (FileNotFoundError, NotADirectoryError):
            if before_creating is not None:
                before_creating()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.state(fd)[1] or "?"
                    os.close(fd)
                    raise WriterBusy(
                        f"{self.path.parent}: another process (pid {holder}) is writing to this "
                        f"bundle; waited {self.timeout:g} s, try again"
                    ) from None
                time.sleep(0.005)
        self.fd = fd
        self.previous = self.state(fd)[0]
        self._mark("busy")

    @staticmethod
    def state(fd: int) -> tuple[str, str]:
        """What the lock file says: ``busy`` or ``idle``, and the pid of the last writer."""
        words = os.pread(fd, _LOCK_RECORD, 0).decode("ascii", "replace").split()
        return (words[0], words[1]) if len(words) == 2 else ("", "")

    def _mark(self, state: str) -> None:
        # Fixed width, written in place: no truncation, no new file.
        os.pwrite(self.fd, f"{state} {os.getpid()}".ljust(_LOCK_RECORD - 1).encode() + b"\n", 0)

    def release(self, clean: bool = True) -> None:
        """Let the next writer in; ``clean`` says this writer left nothing behind."""
        if self.fd is not None:
            if clean:
                self._mark("idle")
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


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

    # ------------------------------------------------------------------------ session

    def __enter__(self) -> BundleWriter:
        self._scratch_used = False
        if self.replacing:
            self._prepare_folder()
            self.lock.acquire()
        else:
            # A bundle has its lock file from its first build on: only a folder without one is
            # checked (and refused before anything is created in it, a bundle of format 1 too).
            self.lock.acquire(before_creating=self._prepare_folder)
        try:
            self.current = self._read_current()
            self._entered_at = self.current.version if self.current else 0
            # Each writer marks the lock file busy and idle again when it is done: finding it
            # busy means the previous writer died, and only then is the bundle searched for what
            # it left.
            if self.current is None or self.lock.previous != "idle":
                self.remove_leftovers()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> None:
        clean = True
        self._close_unflushed()
        try:
            if exc is not None:
                self.remove_leftovers()  # what this failed writer wrote for its next version
            elif self._scratch_used:
                shutil.rmtree(self.directory / SCRATCH_DIR, ignore_errors=True)
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

    def _new_file(self, path: Path, write: Any) -> FileEntry:
        """Write a file of the next version; the commit flushes it."""
        entry, fd = _write_file(path, write)
        self._unflushed[path] = fd
        return entry

    def _written(self, path: Path) -> FileEntry:
        """The entry of a file of the next version that a library wrote; the commit flushes it."""
        fd = os.open(path, os.O_RDONLY)
        self._unflushed[path] = fd
        with open(fd, "rb", closefd=False) as fh:
            return FileEntry(bytes=os.fstat(fd).st_size,
                             sha256=hashlib.file_digest(fh, "sha256").hexdigest())

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
        """The number the next commit will carry."""
        return (self.current.version if self.current else 0) + 1

    def _new_name(self, prefix: str) -> str:
        return f"{prefix}{self.next_version:08d}-{secrets.token_hex(4)}"

    def _new_folder(self, parent: str, prefix: str) -> Path:
        base = self.directory / parent
        base.mkdir(exist_ok=True)
        folder = base / self._new_name(prefix)
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
                folder / name, lambda fh, a=array, d=dtype, t=track: _save_npy(fh, a, d, t))
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

    def new_encoder(self, model: Any) -> tuple[str, dict[str, FileEntry]]:
        """Save a Keras encoder and its LiteRT export; return the folder and its entries."""
        from .embed import export_litert

        folder = self._new_folder(ENCODERS_DIR, "e")
        with self.scratch_tempdir():  # Keras's save stages assets in a temporary folder too
            model.save(folder / ENCODER_FILE)
            try:
                export_litert(model, folder / LITERT_FILE)
            except Exception as exc:
                # TensorFlow reports a full disk as its own error (ResourceExhaustedError): make
                # it the OSError that the writer turns into one line.
                disk_full = _disk_error(exc)
                if disk_full is None:
                    raise
                raise disk_full from exc
        relative = f"{ENCODERS_DIR}/{folder.name}"
        files = {f"{relative}/{name}": self._written(folder / name)
                 for name in (ENCODER_FILE, LITERT_FILE)}
        self._flush_later(folder)
        self._flush_later(folder.parent)
        return relative, files

    def new_deletions(self, ids: np.ndarray) -> tuple[str, dict[str, FileEntry]]:
        """Write the sorted list of removed ids; return its name and entry."""
        folder = self.directory / DELETIONS_DIR
        folder.mkdir(exist_ok=True)
        name = f"{self._new_name('d')}.npy"
        array = np.unique(np.asarray(ids, dtype=np.int64))
        entry = self._new_file(folder / name, lambda fh: np.save(fh, array, allow_pickle=False))
        self._flush_later(folder)
        return f"{DELETIONS_DIR}/{name}", {f"{DELETIONS_DIR}/{name}": entry}

    @contextlib.contextmanager
    def scratch_tempdir(self) -> Iterator[Path]:
        """Point Python's temporary files into the bundle's scratch folder for a while, so that
        what a killed writer leaves there (the assets folder of Keras's save, the LiteRT
        exporter's SavedModel) is removed by the next writer instead of piling up in the
        system's temp folder."""
        scratch = self.directory / SCRATCH_DIR
        scratch.mkdir(exist_ok=True)
        self._scratch_used = True
        saved = tempfile.tempdir
        tempfile.tempdir = str(scratch)
        try:
            yield scratch
        finally:
            tempfile.tempdir = saved

    # ------------------------------------------------------------------------ commit

    def commit(self, manifest: Manifest) -> Manifest:
        """Make ``manifest`` the current version: one ``os.replace`` of ``manifest.json``.

        The manifest is checked as readers would check it and serialised once; its text goes to
        disk once (``versions/N.json`` is a second name for the same file). The version it
        replaces is checked first (:func:`lenet_embed.snapshot.check_version`): nothing is
        committed, or acknowledged, on top of a version that readers cannot load or whose files
        differ from their checksums (a build replaces whatever was there)."""
        if manifest.version != self.next_version:
            raise ValueError("a commit must carry the next version number")
        if self.current is not None and not self.replacing:
            check_version(self.directory, self.current)
        manifest = _with_commit_time(manifest)
        try:
            manifest.check()  # never commit what readers would refuse
        except (TypeError, ValueError) as exc:
            raise malformed("the new manifest", exc) from None
        text = manifest_json(manifest)
        staged = self.directory / f"{STAGED_PREFIX}{secrets.token_hex(4)}"
        self._new_file(staged, lambda fh: fh.write(text.encode()))
        # Every new file and folder, and the staged manifest, flushed at once before the rename.
        _fsync_all(list(self._unflushed.values()))
        self._close_unflushed()
        # The version's record serves cleaning up only, so its name is not flushed: lost in a
        # power failure, the sweep treats that version's files as unused, which they are by then.
        record = self.directory / VERSIONS_DIR / f"{manifest.version:08d}.json"
        try:
            os.link(staged, record)
        except (FileNotFoundError, FileExistsError):
            record.parent.mkdir(exist_ok=True)
            record.unlink(missing_ok=True)
            os.link(staged, record)
        os.replace(staged, self.directory / MANIFEST)
        _fsync_dir(self.directory)
        self.current = remember_manifest(text, manifest)
        if manifest.operation in ("build", "compact"):
            forget_version(self.directory)  # its segments are gone: let their mappings go
            self.collect_garbage()
        else:
            self.collect_garbage(limit=SWEEP_LIMIT, look=manifest.version % _SWEEP_EVERY == 0)
        return manifest

    # ------------------------------------------------------------------------ cleaning up

    def remove_leftovers(self) -> None:
        """Remove what writers that died before committing left: scratch files, and files named
        after versions above the current one (or, with no bundle yet, all of the layout)."""
        shutil.rmtree(self.directory / SCRATCH_DIR, ignore_errors=True)
        for staged in self.directory.glob(f"{STAGED_PREFIX}*"):
            _remove(staged)
        current = self.current.version if self.current else 0
        for parent in (SEGMENTS_DIR, ENCODERS_DIR, DELETIONS_DIR):
            folder = self.directory / parent
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _VERSIONED.fullmatch(entry.name)
                if match is None or int(match.group(1)) > current:
                    _remove(entry)
        versions = self.directory / VERSIONS_DIR
        if versions.is_dir():
            for entry in versions.iterdir():
                number = _version_number(entry)
                if number is None or number > current:
                    _remove(entry)

    def collect_garbage(self, grace: float = GRACE_SECONDS, force: bool = False,
                        limit: int | None = None, look: bool = True) -> None:
        """Remove files no version a reader may still be opening names, and files of the first
        bundle format once a version of this format is current.

        A superseded version is kept for ``grace`` seconds after its successor was committed. The
        sweep looks for unused files once the oldest kept version is twice that old, so a stream
        of small commits pays for it now and then instead of every time. With a ``limit``, it
        removes at most that many files and folders and leaves the rest of what it found to the
        next calls (this process remembers them; ``look=False`` only goes on with those).
        """
        current = self.current
        if current is None:
            return
        key = str(self.directory.resolve())
        with _UNUSED_LOCK:
            unused = _UNUSED.pop(key, [])
        if limit is None or (not unused and look):
            for name in FORMAT_1_FILES:
                _remove(self.directory / name)
            unused = self._find_unused(current, grace, force)
        for path, inode in unused[:limit]:
            if inode is None or _inode(path) == inode:  # a record a rebuild wrote is not ours
                _remove(path)
        if limit is not None and unused[limit:]:
            with _UNUSED_LOCK:
                _UNUSED[key] = unused[limit:]

    def _find_unused(self, current: Manifest, grace: float, force: bool
                     ) -> list[tuple[Path, int | None]]:
        """What :meth:`collect_garbage` removes: unused files and folders, then the records of
        expired versions (with their inodes)."""
        versions = self.directory / VERSIONS_DIR
        numbered = sorted((n, p) for p in versions.iterdir()
                          if (n := _version_number(p)) is not None and n <= current.version)
        if not force and len(numbered) > 1 and _age(numbered[1][1]) < 2 * grace:
            return []
        referenced = set(current.files)
        expired: list[Path] = []
        for (number, path), (_, successor) in zip(numbered, numbered[1:], strict=False):
            if number == current.version:
                continue
            if _age(successor) >= grace:
                expired.append(path)
                continue
            names = _named_files(path)
            if names is None:
                expired.append(path)
            else:
                referenced.update(names)
        # What sits directly in segments/ or encoders/: a folder, or an unsealed segment's file.
        entries = {"/".join(name.split("/")[:2]) for name in referenced}
        unused: list[tuple[Path, int | None]] = [
            (entry, None) for parent in (SEGMENTS_DIR, ENCODERS_DIR)
            if (self.directory / parent).is_dir()
            for entry in (self.directory / parent).iterdir()
            if f"{parent}/{entry.name}" not in entries]
        if (self.directory / DELETIONS_DIR).is_dir():
            unused += [(entry, None) for entry in (self.directory / DELETIONS_DIR).iterdir()
                       if f"{DELETIONS_DIR}/{entry.name}" not in referenced]
        # The manifests go last: a writer killed during the sweep leaves no file that no kept
        # manifest names (such files would wait for the next sweep, maybe 20 s away). Other
        # names are new at every version (a random part), so what is unused stays unused.
        return unused + [(path, inode) for path in expired if (inode := _inode(path)) is not None]


def check_folder(directory: Path) -> None:
    """Refuse a target that is not a folder, or a folder holding files that are not a bundle's
    (beyond a README and the like): nothing of the user's is ever overwritten."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise LenetEmbedError(f"{directory}: exists and is not a folder; choose another "
                              "--index-dir")
    found = contents(directory)
    is_bundle = _holds_a_bundle(directory)
    strangers = [p for p in found.foreign
                 if not (p.is_file() and (is_bundle or p.name in KEPT_FILES))]
    if not is_bundle:
        # Named like a bundle's files but no bundle's: a build would replace manifest.json and
        # remove what looks like format 1.
        strangers += [p for p in found.ours if p.name == MANIFEST] + found.format_1
    if strangers:
        raise LenetEmbedError(
            f"{directory}: exists and is not an index bundle ({strangers[0].name} is not part "
            "of one); choose another --index-dir or empty that folder"
        )


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
    return replace(manifest, committed_at=now_iso())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode("utf-8")


def _named_files(path: Path) -> list[str] | None:
    """The files a kept version's record names (None when it cannot be read): only its names
    matter to the sweep, which they keep from removal, so the record is not checked further.

    Records never change once written, so what one names is remembered (by the file's identity,
    as a rebuild numbers its versions from 1 again): a stream of adds keeps hundreds of versions
    within the grace period, and parsing all of them at every sweep held the lock for a tenth of
    a second."""
    try:
        stat = path.stat()
        identity = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with _NAMES_LOCK:
            if identity in _NAMES:
                return _NAMES[identity]
        files = json.loads(path.read_bytes()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    names = ([name for name in files if isinstance(name, str)] if isinstance(files, dict)
             else None)
    with _NAMES_LOCK:
        _NAMES[identity] = names
        while len(_NAMES) > _NAMES_KEPT:
            del _NAMES[next(iter(_NAMES))]
    return names


def _version_number(path: Path) -> int | None:
    stem, dot, suffix = path.name.partition(".")
    if suffix != "json" or len(stem) != 8 or not stem.isdigit():
        return None
    return int(stem)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
