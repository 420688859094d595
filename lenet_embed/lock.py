"""The writer lock of a bundle and its intent journal: one writer at a time, and what a killed one
was creating.

One writer at a time holds ``.lock`` with ``flock`` (:class:`WriterLock`), so a killed writer's
lock is released by the kernel. The lock file holds, in its first :data:`LOCK_RECORD` bytes,
``busy <pid>`` or ``idle <pid>``, then the holder's intent journal: the name of every file or
folder it is about to create, one a line. Finding the lock file ``busy`` means its last writer
died; its journal is then exactly what that writer may have left (:mod:`lenet_embed.garbage`
removes it). When another process holds the lock, the error names it, from the kernel's table of
locks (``/proc/locks``).

``flock``, ``pread`` and ``pwrite`` on a descriptor are POSIX (so is ``files.py``'s
``O_NONBLOCK``): lenet-embed runs on Linux and macOS, not on Windows. portalocker and filelock
lock as well, but neither says which process holds a lock, and both keep their own lock file,
where the journal would need a second file and a second flush at every commit.
"""

from __future__ import annotations

import errno
import fcntl
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path

from .errors import LenetEmbedError
from .layout import LOCK_FILE

DEFAULT_LOCK_TIMEOUT = 30.0
# The lock file's first line (``busy <pid>`` or ``idle <pid>``), then the intent journal, of at
# most JOURNAL_MAX bytes in all (a build journals about 15 names).
LOCK_RECORD = 32
JOURNAL_MAX = 1 << 20


class WriterBusy(LenetEmbedError):
    """Another process held the writer lock for longer than this writer would wait."""


def journal_on_disk(directory: Path) -> list[str]:
    """The intent journal as a reader sees it, without the lock: what a writer at work is
    creating, or what a killed one left (the lock file then still says ``busy``)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        data = os.read(fd, JOURNAL_MAX)
    finally:
        os.close(fd)
    return parse_journal(data) if data.startswith(b"busy ") else []


def parse_journal(data: bytes) -> list[str]:
    """The names of the journal in the lock file's bytes ``data``."""
    text = data[LOCK_RECORD:].decode("ascii", "replace")
    return [line for line in text.split("\n") if line]


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
        self._end = LOCK_RECORD

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
            raise disk_error(self.path, exc) from None

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
        self._end = max(os.fstat(fd).st_size, LOCK_RECORD)  # this writer's names go after
        if self.previous != "idle":  # its holder died: its journal says what it created
            self.left = self.intents()
        elif self._end > LOCK_RECORD:
            self.forget()
        self._mark("busy")

    @staticmethod
    def state(fd: int) -> tuple[str, str]:
        """What the lock file says: ``busy`` or ``idle``, and the pid of the last writer."""
        words = os.pread(fd, LOCK_RECORD, 0).decode("ascii", "replace").split()
        return (words[0], words[1]) if len(words) == 2 else ("", "")

    def intents(self) -> list[str]:
        """The names journaled in the lock file (by this holder, or by one that died)."""
        assert self.fd is not None
        return parse_journal(os.pread(self.fd, JOURNAL_MAX, 0))

    def intend(self, names: list[str]) -> None:
        """Journal names (relative to the bundle) about to be created: one ``pwrite``."""
        assert self.fd is not None
        data = "".join(f"{name}\n" for name in names).encode("ascii")
        if self._end + len(data) >= JOURNAL_MAX:
            raise OSError(errno.EFBIG, "the writer's intent journal is full")
        written = os.pwrite(self.fd, data, self._end)
        if written != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._end += written

    def forget(self) -> None:
        """Empty the journal: what it names is committed or removed."""
        assert self.fd is not None
        os.ftruncate(self.fd, LOCK_RECORD)
        self._end = LOCK_RECORD
        self.left = []

    def _mark(self, state: str) -> None:
        # Fixed width, written in place: no truncation, no new file.
        os.pwrite(self.fd, f"{state} {os.getpid()}".ljust(LOCK_RECORD - 1).encode() + b"\n", 0)

    def release(self, clean: bool = True) -> None:
        """Let the next writer in; ``clean`` says this writer left nothing behind."""
        if self.fd is not None:
            if clean:
                try:
                    if self._end > LOCK_RECORD:
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


def check_writable(directory: Path) -> None:
    """Refuse, in one line, a bundle folder a writer could not write to (a read-only file
    system, no permission, a loop of links) before any work is done for the write. A folder
    that does not exist yet passes (a build creates it)."""
    try:
        os.stat(directory)
    except FileNotFoundError:
        if os.path.islink(directory):
            raise LenetEmbedError(f"{directory}: is a symbolic link to nothing; give a real "
                                  "folder as --index-dir") from None
        return
    except OSError as exc:
        raise disk_error(directory / LOCK_FILE, exc) from None
    if os.path.isdir(directory) and not os.access(directory, os.W_OK):
        code = errno.EROFS if os.statvfs(directory).f_flag & os.ST_RDONLY else errno.EACCES
        raise disk_error(directory / LOCK_FILE, OSError(code, os.strerror(code)))


def disk_error(path: Path, exc: OSError) -> LenetEmbedError:
    """The one-line error for a bundle a writer cannot open for writing."""
    directory = path.parent
    if exc.errno == errno.EROFS:
        return LenetEmbedError(f"{directory}: is on a read-only file system, so lenet-embed "
                               "cannot write to this bundle (searching it works); copy it to a "
                               "writable folder or mount it read-write")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return LenetEmbedError(f"{directory}: no permission to write to this bundle ({path.name}"
                               "); run as its owner or make the folder writable")
    if exc.errno == errno.ELOOP:
        if os.path.islink(path):
            return LenetEmbedError(f"{path}: is a symbolic link; lenet-embed writes only to a "
                                   "bundle whose files are its own: remove the link")
        return LenetEmbedError(f"{directory}: a loop of symbolic links; give a real folder as "
                               "--index-dir")
    return LenetEmbedError(f"{directory}: cannot open the bundle for writing ({exc.strerror or exc}"
                           "); give a folder you can write to as --index-dir")
