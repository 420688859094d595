"""The seal of a bundle: the sha256 of its manifest's body and of every file the manifest names.

A manifest carries the sha256 of its own canonical JSON (``manifest_sha256``), so a torn or
edited manifest is refused; it lists every file it names with its size and sha256, computed once,
as the file is written. A load checks sizes only (:func:`check_size`: a stat a file, whatever its
size); ``lenet-embed info --verify`` and every writer, before it commits on top of a version,
compare the bytes too (:func:`verify_files`, :func:`verify_files_once`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import LenetEmbedError
from .files import open_regular
from .layout import MANIFEST, REBUILD

# The key under which a manifest stores the sha256 of the rest of it.
SEAL = "manifest_sha256"


class Entry(Protocol):
    """What a manifest says of one file (:class:`lenet_embed.bundle.FileEntry`)."""

    @property
    def bytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...


# ------------------------------------------------------------------------------ the manifest's

def canonical(body: Any) -> str:
    """A manifest body's canonical JSON (sorted keys, no spaces, ASCII): what its seal hashes,
    so that the layout of the text does not matter but every value does."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(canonical_text: str) -> str:
    return hashlib.sha256(canonical_text.encode("ascii")).hexdigest()


def sealed(canonical_text: str) -> str:
    """The text written to disk for a body's canonical JSON: that text with its seal appended,
    so a commit serialises its manifest once."""
    return f'{canonical_text[:-1]},"{SEAL}":"{_digest(canonical_text)}"}}\n'


def sealed_json(body: dict[str, Any]) -> str:
    """A manifest's body as the JSON text written to disk, with its ``manifest_sha256``."""
    return sealed(canonical(body))


def check_seal(data: dict[str, Any], where: str, text: str | None = None) -> None:
    """Refuse a manifest whose body does not match its ``manifest_sha256`` (a manifest written
    before lenet-embed sealed them has none, and is taken as it is).

    A text as :func:`sealed_json` writes it is checked as it is: serialising the parsed body
    again (the calibration's numbers above all) cost a reader a millisecond per new version."""
    if SEAL not in data:
        return
    if text is not None and isinstance(data[SEAL], str):
        tail = f',"{SEAL}":"{data[SEAL]}"}}\n'
        if text.endswith(tail) and _digest(text[:-len(tail)] + "}") == data[SEAL]:
            return
    body = {key: value for key, value in data.items() if key != SEAL}
    if data[SEAL] != _digest(canonical(body)):
        raise LenetEmbedError(f"{where}: does not match its own checksum ({SEAL}): the manifest "
                              f"was edited or damaged; {REBUILD}")


# ------------------------------------------------------------------------------ the files'

def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open_regular(path, "the bundle's own file") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_size(directory: Path, name: str, entry: Entry) -> None:
    """Check that a file a manifest names is there with its size: what every load checks (a
    stat, whatever the file's size)."""
    path = directory / name
    try:
        found = path.stat()
    except FileNotFoundError:
        raise LenetEmbedError(f"{path}: missing from the bundle; {REBUILD}") from None
    if not stat.S_ISREG(found.st_mode):  # a FIFO or device would block the read that follows
        raise LenetEmbedError(f"{path}: not a regular file; the bundle is damaged, {REBUILD}")
    size = found.st_size
    if size != entry.bytes:
        raise LenetEmbedError(
            f"{path}: does not match {MANIFEST} (size: {size} bytes, not {entry.bytes}); the "
            f"bundle is damaged, {REBUILD}"
        )


def verify_file(directory: Path, name: str, entry: Entry) -> None:
    """Check one file a manifest names against its size and sha256 (reads all of it)."""
    check_size(directory, name, entry)
    if sha256_file(directory / name) != entry.sha256:
        raise damaged([name], directory)


# Files whose bytes this process hashed, by identity (path, inode, size, mtime), and the sha256
# found: files never change once written, so a writer checking the version it commits on top of
# hashes each file once, not at every commit (a rewrite in place changes the mtime).
_HASHED: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
_HASHED_KEPT = 20_000
_HASHED_LOCK = threading.Lock()  # the service verifies from several threads


def _hash_once(path: str, directory: Path, name: str, entry: Entry) -> str:
    """The sha256 of the file at ``path``, from memory when this process hashed the same file
    (same identity) before."""
    found = os.stat(path)
    if found.st_size != entry.bytes:
        check_size(directory, name, entry)  # says how it differs
    with _HASHED_LOCK:
        digest = _HASHED.get((path, found.st_ino, found.st_size, found.st_mtime_ns))
    if digest is not None:
        return digest
    with open_regular(path, "the bundle's own file") as fh:
        found = os.fstat(fh.fileno())  # the identity of the bytes hashed
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if found.st_size != entry.bytes:
        check_size(directory, name, entry)
    with _HASHED_LOCK:
        _HASHED[(path, found.st_ino, found.st_size, found.st_mtime_ns)] = digest
        while len(_HASHED) > _HASHED_KEPT:
            _HASHED.popitem(last=False)
    return digest


def verify_files_once(directory: Path, files: Mapping[str, Entry]) -> None:
    """:func:`verify_file` of every file of ``files``, each hashed once per process as long as
    its identity (path, inode, size, mtime) stays the same; one error naming the files that
    differ, one line for a file missing or of the wrong size."""
    bad = []
    base = str(directory)
    for name, entry in files.items():
        path = os.path.join(base, name)  # strings, not Paths: this runs at every commit
        try:
            digest = _hash_once(path, directory, name, entry)
        except FileNotFoundError:
            raise LenetEmbedError(f"{path}: missing from the bundle; {REBUILD}") from None
        except OSError as exc:
            raise LenetEmbedError(f"{path}: unreadable ({exc.strerror or exc}); {REBUILD}"
                                  ) from None
        if digest != entry.sha256:
            bad.append(name)
    if bad:
        raise damaged(bad, directory)


def verify_files(directory: Path, files: Mapping[str, Entry]) -> None:
    """Compare every file of ``files`` with its size and sha256 (reads them all) and raise one
    error naming those that differ. All are opened before any is read, so that however long the
    reading takes, a sweep of their version cannot make one vanish; FileNotFoundError when one is
    already gone."""
    with contextlib.ExitStack() as stack:
        handles = {name: stack.enter_context(open_regular(directory / name, "the bundle's own "
                                                          "file")) for name in files}
        bad = [name for name, fh in handles.items()
               if os.fstat(fh.fileno()).st_size != files[name].bytes
               or hashlib.file_digest(fh, "sha256").hexdigest() != files[name].sha256]
    if bad:
        raise damaged(bad, directory)


def damaged(names: list[str], directory: Path) -> LenetEmbedError:
    """The one-line error for files whose bytes do not match their checksums."""
    others = f"; neither do {some(names[1:])}" if len(names) > 1 else ""
    return LenetEmbedError(
        f"{directory / names[0]}: does not match {MANIFEST} (checksum){others}; the bundle is "
        f"damaged, {REBUILD}"
    )


def some(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
