"""Writing to a bundle: the writer lock, new files, the atomic commit, and cleaning up after.

One writer at a time holds ``.lock`` (``flock``, so a killed writer's lock is released by the
kernel). Before it creates a file or folder, a writer appends its name to the intent journal kept
in the lock file after the ``busy <pid>`` line; a version becomes current only when
``manifest.json`` is replaced by the new one, and so what a writer that died before that left is
exactly the names it journaled that the current version does not use. The next writer removes
them before it writes anything (:mod:`lenet_embed.garbage`).

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
import math
import numbers
import os
import secrets
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

from . import garbage
from .bundle import (
    DELETIONS_DIR,
    ENCODER_FILE,
    ENCODERS_DIR,
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
_SERIAL_FSYNCS = 3  # files flushed one after another, not from threads (see _fsync_all)
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


_LOCK_RECORD = garbage.LOCK_RECORD


class WriterBusy(LenetEmbedError):
    """Another process held the writer lock for longer than this writer would wait."""


class WriterLock:
    """The bundle's writer lock: ``flock`` on ``.lock``, waited for up to ``timeout`` seconds.

    The lock file holds, in its first 32 bytes, ``busy <pid>`` (written by the holder as soon as
    it has the lock, and flushed: see :meth:`acquire`) or ``idle <pid>`` (written by a writer
    that left nothing behind), then the holder's intent journal: one name a line, relative to the
    bundle, of every file or folder it is about to create (:meth:`intend`: one ``pwrite``). The
    journal is not flushed: it has to survive the writer's death, not a power failure (after
    which a file it names may stay as an unknown file, never a file removed that should not be).
    A clean release empties it (one ``ftruncate`` a session that journaled anything), so an idle
    lock file is its first line alone.

    ``timeout`` must be a finite number >= 0 (else :class:`LenetEmbedError`): the wait compares
    the clock with a deadline, and a NaN deadline is never reached.
    """

    def __init__(self, directory: Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) \
                or not math.isfinite(timeout) or timeout < 0:
            raise LenetEmbedError(f"{directory}: the time to wait for the writer lock must be a "
                                  f"finite number of seconds >= 0, not {timeout!r}")
        self.path = directory / LOCK_FILE
        self.timeout = timeout
        self.fd: int | None = None
        self.previous = ""
        self.left: list[str] = []  # the journal of a writer that died holding the lock
        self._end = _LOCK_RECORD

    def _open(self, before_creating: Callable[[], None] | None) -> int:
        """The lock file, opened for writing without following a link; a bundle that cannot be
        written (read-only, not ours, a loop of links) is a one-line error."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                return os.open(self.path, flags)
            except (FileNotFoundError, NotADirectoryError):
                if before_creating is not None:
                    before_creating()
                return os.open(self.path, flags | os.O_CREAT, 0o644)
        except OSError as exc:
            raise garbage.disk_error(self.path, exc) from None

    def acquire(self, before_creating: Callable[[], None] | None = None) -> None:
        """Take the lock, or raise a one-line error naming the process that holds it. When there
        is no lock file yet, ``before_creating()`` runs first (it may refuse the folder)."""
        fd = self._open(before_creating)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    os.close(fd)
                    raise WriterBusy(
                        f"{self.path.parent}: another process (pid {holder}) is writing to this "
                        f"bundle; waited {self.timeout:g} s, try again"
                    ) from None
                time.sleep(0.005)
        self.fd = fd
        self.previous = self.state(fd)[0]
        self._end = max(os.fstat(fd).st_size, _LOCK_RECORD)  # this writer's names go after
        if self.previous != "idle":  # its holder died: its journal says what it created
            self.left = self.intents()
        elif self._end > _LOCK_RECORD:
            self.forget()
        self._mark("busy")

    @staticmethod
    def state(fd: int) -> tuple[str, str]:
        """What the lock file says: ``busy`` or ``idle``, and the pid of the last writer."""
        words = os.pread(fd, _LOCK_RECORD, 0).decode("ascii", "replace").split()
        return (words[0], words[1]) if len(words) == 2 else ("", "")

    def intents(self) -> list[str]:
        """The names journaled in the lock file (by this holder, or by one that died)."""
        assert self.fd is not None
        return garbage.parse_journal(os.pread(self.fd, garbage.JOURNAL_MAX, 0))

    def intend(self, names: list[str]) -> None:
        """Journal names (relative to the bundle) about to be created: one ``pwrite``."""
        assert self.fd is not None
        data = "".join(f"{name}\n" for name in names).encode("ascii")
        if self._end + len(data) >= garbage.JOURNAL_MAX:
            raise OSError(errno.EFBIG, "the writer's intent journal is full")
        written = os.pwrite(self.fd, data, self._end)
        if written != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._end += written

    def forget(self) -> None:
        """Empty the journal: what it names is committed or removed."""
        assert self.fd is not None
        os.ftruncate(self.fd, _LOCK_RECORD)
        self._end = _LOCK_RECORD
        self.left = []

    def _mark(self, state: str) -> None:
        # Fixed width, written in place: no truncation, no new file.
        os.pwrite(self.fd, f"{state} {os.getpid()}".ljust(_LOCK_RECORD - 1).encode() + b"\n", 0)

    def release(self, clean: bool = True) -> None:
        """Let the next writer in; ``clean`` says this writer left nothing behind."""
        if self.fd is not None:
            if clean:
                try:
                    if self._end > _LOCK_RECORD:
                        self.forget()
                    self._mark("idle")
                except OSError:
                    pass  # still "busy": the next writer reads the journal and looks again
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _holder(fd: int) -> str:
    """The pid of the process that holds the flock on ``fd``'s file now, from the kernel's table
    of locks (``/proc/locks``): the lock file's ``busy <pid>`` may be a dead writer's, or the
    previous writer's when the holder is not lenet-embed (``flock(1)``) or has not written yet.
    Where there is no such table, the pid the lock file says is busy, else ``?``."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            # "1: FLOCK  ADVISORY  WRITE 1234 00:2b:5678 0 EOF"; waiters have a "->" there
            held = {words[5]: words[4] for words in map(str.split, table)
                    if len(words) >= 6 and words[1] == "FLOCK"}
    except OSError:
        held = {}
    if device in held:
        return held[device]
    # Some file systems (btrfs, overlayfs) show another device number there than fstat does.
    same_inode = [pid for where, pid in held.items() if where.endswith(f":{info.st_ino}")]
    if len(same_inode) == 1:
        return same_inode[0]
    state, pid = WriterLock.state(fd)
    return pid if state == "busy" else "?"


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
            # checked (and refused before anything is created in it, a bundle of format 1 too).
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
        self._intend(folder / ENCODER_FILE, folder / LITERT_FILE)  # written by the libraries
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
        (self.directory / SCRATCH_DIR).mkdir(exist_ok=True)
        if self._scratch is None:
            # A folder of this writer's own (the next one removes it with all that is in it,
            # which it never does to a folder it did not create).
            self._scratch = f"{SCRATCH_DIR}/{self._new_name('w')}"
            self._intend(self.directory / self._scratch)
            (self.directory / self._scratch).mkdir()
        scratch = self.directory / self._scratch
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
        differ from their checksums (a build replaces whatever was there).

        Durable when it returns: the lock file (its intent journal), then the new files and
        folders, their entries, the staged manifest and (for a build that created it) the
        bundle's folder are flushed before the rename, the bundle's folder after it. A power
        failure before that last flush leaves the previous version, one after it the new one
        (``tests/test_power_loss.py``)."""
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
        if self._scratch is not None:
            # Removed before the flushes that make the commit durable: once the lock file's
            # "idle" reaches the disk, no writer would look for it after a power failure.
            garbage.remove_scratch(self.directory, self._scratch)
            self._scratch = None
            if (self.directory / SCRATCH_DIR).is_dir():  # else its entry goes with the last flush
                self._flush_later(self.directory / SCRATCH_DIR)
        for folder in self._created:
            # A new folder's entry is in its parent: unflushed, a power failure could lose the
            # bundle, manifest and all, after the build returned.
            self._flush_later(folder.parent)
        staged = self.directory / f"{STAGED_PREFIX}{secrets.token_hex(4)}"
        self._new_file(staged, lambda fh: fh.write(text.encode()))
        # The lock file first, on its own: its "busy" and the intent journal reach the disk before
        # any file this writer created is flushed, so that after a power failure the next writer
        # finds every one of them that survived and removes it.
        os.fsync(self.lock.fd)
        # Every new file and folder, and the staged manifest, flushed at once before the rename.
        _fsync_all(list(self._unflushed.values()))
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
        format_1 = manifest.operation == "build" and garbage.is_format_1(self.directory)
        os.replace(staged, self.directory / MANIFEST)
        _fsync_dir(self.directory)
        self.current = remember_manifest(text, manifest)
        if format_1:
            garbage.remove_format_1(self.directory)
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
    writer could write to is refused too (:func:`garbage.check_writable`)."""
    garbage.check_writable(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise LenetEmbedError(f"{directory}: exists and is not a folder; choose another "
                              "--index-dir")
    found = contents(directory)
    is_bundle = _holds_a_bundle(directory)
    lite = _lite_folder(directory) if is_bundle else None
    strangers = [p for p in found.foreign
                 if not (p.is_file() and (is_bundle or p.name in KEPT_FILES)) and p.name != lite]
    if not is_bundle:
        # Named like a bundle's files but no bundle's: a build would replace manifest.json and
        # remove what looks like format 1.
        strangers += [p for p in found.ours if p.name == MANIFEST] + found.format_1
    if strangers:
        raise LenetEmbedError(
            f"{directory}: exists and is not an index bundle ({strangers[0].name} is not part "
            "of one); choose another --index-dir or empty that folder"
        )


def _lite_folder(directory: Path) -> str | None:
    """The Milvus Lite file the bundle's current manifest keeps directly in its folder (where
    a bundle's Milvus Lite file needs no naming to be read), if any: the bundle's own."""
    try:
        store = read_manifest(directory).store
    except LenetEmbedError:
        return None
    return store.uri if store is not None and "/" not in store.uri else None


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
