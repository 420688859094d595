"""New files of a bundle: created once under a new name, hashed as they are written, flushed
together.

A writer never rewrites a file: :func:`write_new` creates it (``O_EXCL``) and computes its size
and sha256 from the bytes passing through (nothing is read back), and leaves it open for the
commit, which flushes every new file and folder at once (:func:`fsync_all`) before the rename
that makes them current.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .bundle import FileEntry
from .data import read_rows

_SERIAL_FSYNCS = 3  # files flushed one after another, not from threads (see fsync_all)
# Bytes of an array saved at a time: the images of a million digits may be memory-mapped from the
# data set's file, and are then read (and hashed, and written) 64 MB at a time, never copied whole.
_SAVE_CHUNK_BYTES = 64 << 20


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


def write_new(path: Path, write: Callable[[Any], Any]) -> tuple[FileEntry, int]:
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


def entry_of(fd: int) -> FileEntry:
    """The entry of a file a library wrote, read through the descriptor ``fd``."""
    with open(fd, "rb", closefd=False) as fh:
        return FileEntry(bytes=os.fstat(fd).st_size,
                         sha256=hashlib.file_digest(fh, "sha256").hexdigest())


def save_npy(fh: Any, array: np.ndarray, dtype: np.dtype,
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


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(fds: list[int]) -> None:
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
