"""Opening the files a user names: regular files only, so that a read never hangs.

Opening a FIFO for reading blocks until some process opens it for writing, and reading a
character device (``/dev/zero``, a terminal) may never end. Every path that reads a file a user
named (images, IDX and ``.npz`` data, token files) opens it through :func:`open_regular`, which
promises: the file it returns is a regular file, and nothing that is not one is ever opened in a
way that can block.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat

from .errors import LenetEmbedError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(LenetEmbedError):
    """A path that names a FIFO, a device, a socket or a folder where a file was expected."""


def _kind(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), "not a plain file")


def _refuse(name: str, mode: int, what: str) -> NotRegularFile:
    return NotRegularFile(f"{name}: not a regular file ({_kind(mode)}); give {what}")


def open_regular(path: str | os.PathLike[str], what: str = "a regular file",
                 name: str | None = None) -> io.FileIO:
    """Open ``path`` for reading (unbuffered, binary), refusing anything but a regular file.

    The path is checked with ``os.stat`` before it is opened, and opened with ``O_NONBLOCK`` and
    checked again on the descriptor (``fstat``), so a file swapped for a FIFO in between is
    still refused without blocking. Symbolic links are followed (to a regular file they are
    fine). Raises :class:`NotRegularFile`, one line naming the file (``name``, default: the
    path), its kind and ``what`` to give instead (e.g. "an image file"). Other ``OSError``\\ s
    (no such file, permission) pass through for the caller to word.
    """
    name = os.fspath(path) if name is None else name
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(name, mode, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(name, mode, what)
        # Regular files ignore O_NONBLOCK; cleared anyway so the descriptor reads as open() would.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], what: str = "a regular file") -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`'s rules)."""
    with open_regular(path, what) as fh:
        return fh.read()


def check_regular(path: str | os.PathLike[str], what: str = "a regular file") -> None:
    """Refuse ``path`` unless it is a regular file (or does not exist: the opener says so), for
    files a library opens by name itself (Keras's ``.keras`` files).

    Unlike :func:`open_regular` this cannot catch a file swapped for a FIFO after the check;
    it stops the operator's mistake, not an attacker racing the command.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise _refuse(os.fspath(path), mode, what)
