"""Cleaning up a bundle: what a commit's sweep and the successor of a killed writer remove.

The promise: a cleanup removes a path only when the bundle's own layout gives that name AND the
bundle's own records name it as written by lenet-embed:

- the files of superseded versions: names listed in a record ``versions/N.json`` whose version
  is past its grace period, that neither the current version nor a version still within its grace
  period names; then the folders of those files, with ``rmdir`` (so only when empty), then the
  record itself;
- what a writer killed before its commit left: exactly the names it wrote into its intent journal
  (the lock file, see :mod:`lenet_embed.lock`) before creating them, when the
  current version does not name them; the one folder ever removed with its contents is the
  scratch folder under ``.tmp/`` that such a writer created for the libraries it ran.

Nothing is found by listing a folder and matching a pattern, so a file the user put into the
bundle (``segments/NOTES.txt``) stays, and :func:`refuse_symlinks` refuses a bundle whose parts
are symbolic links before anything is written, so no write or unlink follows a link out of it.
Every removal measures the file (``lstat``) before unlinking it and reports the bytes freed;
:func:`survey` counts, for ``info``, the bytes a cleanup would free and lists the files it never
touches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Manifest
from .errors import LenetEmbedError
from .files import read_regular
from .layout import (
    CALIBRATION_DIR,
    DATA_NAME,
    DELETIONS_DIR,
    ENCODERS_DIR,
    LOCK_FILE,
    MANIFEST,
    PART,
    SCRATCH_DIR,
    SEGMENTS_DIR,
    STAGED_PREFIX,
    VERSIONS_DIR,
)
from .lock import journal_on_disk as journal_on_disk

# Names a version's record may list for removal: the layout's data files (as a manifest may list
# them in its ``files``).
_DATA_NAME = re.compile(DATA_NAME)
# Names a writer may journal before creating them: data files and their folders, a version's
# record, a staged manifest, a scratch folder.
_JOURNAL_NAME = re.compile(
    rf"{_DATA_NAME.pattern}|({SEGMENTS_DIR}|{ENCODERS_DIR})/{PART}|{VERSIONS_DIR}/\d{{8}}\.json"
    rf"|{re.escape(STAGED_PREFIX)}[0-9a-f]+|{re.escape(SCRATCH_DIR)}/{PART}")
_RECORD_NAME = re.compile(r"(\d{8})\.json")
# The parts of a bundle a writer writes into or removes from: none may be a symbolic link.
_PARTS = (SEGMENTS_DIR, ENCODERS_DIR, DELETIONS_DIR, CALIBRATION_DIR, VERSIONS_DIR, SCRATCH_DIR,
          MANIFEST)

# What a sweep found and its commits have not removed yet, per bundle folder, in order (a commit
# of a stream of adds removes a bounded batch): relative names, and for version records (whose
# number a rebuild after damage could reuse) the inode found.
_PENDING: dict[str, list[tuple[str, int | None]]] = {}
_PENDING_LOCK = threading.Lock()
_NAMES: dict[tuple[str, int, int, int], list[str] | None] = {}  # see _named_files
_NAMES_LOCK = threading.Lock()
_NAMES_KEPT = 20_000


def journal_name(name: str) -> bool:
    """Whether ``name`` (relative to the bundle) is one a writer may journal and so remove."""
    return _JOURNAL_NAME.fullmatch(name) is not None


# ------------------------------------------------------------------------------ refusing links

def refuse_symlinks(directory: Path, manifest: Manifest | None) -> None:
    """Raise a one-line error when a part of the bundle a writer writes to or removes from (its
    folders, ``.tmp``, the manifest, the current version's segment and encoder folders and
    files) is a symbolic link: a write or a cleanup would then follow it out of the bundle.
    Costs one ``lstat`` a part (a few dozen for a bundle after many adds)."""
    names: list[str] = list(_PARTS)
    if manifest is not None:
        names += {n.rsplit("/", 1)[0]: None for n in manifest.files if n.count("/") == 2}
        names += manifest.files
    base = os.fspath(directory)  # plain strings: a Path a part cost more than its lstat
    for name in names:
        try:
            mode = os.lstat(f"{base}/{name}").st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LenetEmbedError(f"{directory / name}: cannot be checked ({exc.strerror}); "
                                  "lenet-embed writes only to a bundle it can inspect") from None
        if stat.S_ISLNK(mode):
            raise LenetEmbedError(
                f"{directory / name}: is a symbolic link; lenet-embed writes only to a bundle "
                "whose folders and files are its own (a cleanup could follow the link out of "
                "it): put the real folder or file in its place, or rebuild the bundle")


# ------------------------------------------------------------------------------ removing

def _unlink(path: Path) -> int:
    """Unlink one file (never a folder), measured first; return the bytes this freed: its size,
    unless another name still holds it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if stat.S_ISDIR(info.st_mode):
        return 0  # a folder where the record names a file is not ours to remove
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return info.st_size if info.st_nlink == 1 and stat.S_ISREG(info.st_mode) else 0
    return 0


def _rmdir(path: Path) -> None:
    """Remove a folder only if it is empty (a user's file in it keeps it)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
        os.rmdir(path)


def _remove_tree(path: Path) -> int:
    """Remove a scratch folder a writer created for the libraries it ran, with what they put in
    it, counting the bytes; never through a link."""
    freed = 0
    if path.is_symlink() or not path.is_dir():
        return _unlink(path) if path.is_symlink() else 0
    for root, folders, files in os.walk(path, topdown=False):
        for name in files + [f for f in folders if os.path.islink(os.path.join(root, f))]:
            freed += _unlink(Path(root, name))
        for name in folders:
            _rmdir(Path(root, name))
    _rmdir(path)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)  # what a library made unreadable to os.walk
    return freed


def remove_leftovers(directory: Path, current: Manifest | None, journal: Iterable[str]) -> int:
    """Remove what a writer created before it was killed or failed: the names it journaled that
    the current version does not use, newest first (a folder's files before it). Return the
    bytes freed. Names outside what a writer journals are ignored (the journal is a file)."""
    names = [name for name in journal if journal_name(name)]
    version = current.version if current is not None else 0
    used = set(current.files) if current is not None else set()
    if names:
        # Also what a version kept for readers names: after a power failure the journal may be
        # an older session's (its emptying was never flushed), whose files a later commit
        # superseded; they are the sweep's to remove, after their grace period.
        for number, path in _records(directory):
            if number <= version:
                used.update(_named_files(path) or ())
    used |= {name.rsplit("/", 1)[0] for name in used}
    freed = 0
    for name in reversed(names):
        path = directory / name
        if name in used:
            continue
        if name.startswith(f"{VERSIONS_DIR}/"):
            if int(name[len(VERSIONS_DIR) + 1:][:8]) > version:  # a record never made current
                freed += _unlink(path)
        elif name.startswith(f"{SCRATCH_DIR}/"):
            freed += _remove_tree(path)
            _rmdir(directory / SCRATCH_DIR)
        elif path.is_dir() and not path.is_symlink():
            _rmdir(path)
        else:
            freed += _unlink(path)
    return freed


def remove_scratch(directory: Path, name: str) -> None:
    """Remove this writer's own scratch folder (``.tmp/<name>``), and ``.tmp`` if then empty."""
    _remove_tree(directory / name)
    _rmdir(directory / SCRATCH_DIR)


# ------------------------------------------------------------------------------ the sweep

def collect(directory: Path, current: Manifest, grace: float, force: bool = False,
            limit: int | None = None, look: bool = True) -> int:
    """Remove the files of superseded versions past their grace period (see the module's
    promise); return the bytes freed.

    A superseded version is kept for ``grace`` seconds after its successor was committed. The
    sweep looks for unused files once the oldest kept version is twice that old (``force``: at
    once), so a stream of small commits pays for it now and then instead of every time. With a
    ``limit``, it removes at most that many files and folders and leaves the rest of what it
    found to the next calls (this process remembers them; ``look=False`` only goes on with
    those)."""
    key = str(directory.resolve())
    with _PENDING_LOCK:
        pending = _PENDING.pop(key, [])
    if limit is None or (not pending and look):
        pending = find_unused(directory, current, grace, force)
    freed = 0
    for name, inode in pending[:limit]:
        path = directory / name
        if inode is not None:  # a version's record: the one found, not one written since
            if _inode(path) == inode:
                freed += _unlink(path)
        elif name.count("/") == 1 and name.startswith((f"{SEGMENTS_DIR}/", f"{ENCODERS_DIR}/")
                                                       ) and not name.endswith(".npy"):
            _rmdir(path)
        else:
            freed += _unlink(path)
    if limit is not None and pending[limit:]:
        with _PENDING_LOCK:
            _PENDING[key] = pending[limit:]
    return freed


def _records(directory: Path) -> list[tuple[int, Path]]:
    versions = directory / VERSIONS_DIR
    if not versions.is_dir() or versions.is_symlink():
        return []
    return sorted((int(match.group(1)), versions / entry.name) for entry in os.scandir(versions)
                  if (match := _RECORD_NAME.fullmatch(entry.name)) and entry.is_file(
                      follow_symlinks=False))


def find_unused(directory: Path, current: Manifest, grace: float, force: bool = True
                ) -> list[tuple[str, int | None]]:
    """What :func:`collect` removes, in order: the files only expired versions name, their
    folders, then the records of those versions (with their inodes), last, so that a sweep
    killed half-way leaves nothing that no record names."""
    numbered = [(n, p) for n, p in _records(directory) if n != current.version]
    if not numbered:
        return []
    own = directory / VERSIONS_DIR / f"{current.version:08d}.json"
    # A version's successor is the next record by number; the newest superseded version's (and
    # that of a record above the current one, left by a bundle rebuilt after damage) is the
    # current one's.
    successors = [p for _, p in numbered[1:]] + [own]
    successors = [own if n > current.version else s for (n, _), s in zip(numbered, successors,
                                                                       strict=True)]
    if not force and _age(successors[0]) < 2 * grace:
        return []  # not even the oldest version is well past its grace period: look later
    referenced = set(current.files)
    expired: list[tuple[Path, list[str]]] = []
    for (_, path), successor in zip(numbered, successors, strict=True):
        names = _named_files(path)
        if names is None:
            continue  # unreadable: what it names is unknown, so it and they are left alone
        if _age(successor) >= grace:
            expired.append((path, names))
        else:
            referenced.update(names)
    files = dict.fromkeys(n for _, names in expired for n in names
                          if n not in referenced and _DATA_NAME.fullmatch(n))
    kept_folders = {n.rsplit("/", 1)[0] for n in referenced if n.count("/") == 2}
    folders = dict.fromkeys(n.rsplit("/", 1)[0] for n in files if n.count("/") == 2)
    linked = {f for f in folders if os.path.islink(directory / f)}
    unused: list[tuple[str, int | None]] = [
        (n, None) for n in files if n.count("/") < 2 or n.rsplit("/", 1)[0] not in linked]
    unused += [(f, None) for f in folders if f not in kept_folders and f not in linked]
    unused += [(f"{VERSIONS_DIR}/{path.name}", inode) for path, _ in expired
               if (inode := _inode(path)) is not None]
    return unused


def highest_record(directory: Path) -> int:
    """The highest version number among the records in ``versions/`` (0 when none)."""
    return max((n for n, _ in _records(directory)), default=0)


def grace_left(directory: Path, current: Manifest, grace: float) -> float | None:
    """Seconds until every superseded version is past its grace period (0 when they are), or
    None when there is no superseded version's record to sweep."""
    if not [n for n, _ in _records(directory) if n != current.version]:
        return None
    own = directory / VERSIONS_DIR / f"{current.version:08d}.json"
    return max(0.0, grace - _age(own)) if own.exists() else 0.0


def _named_files(path: Path) -> list[str] | None:
    """The files a version's record names (None when it cannot be read): only its names matter
    to the sweep, so the record is not checked further.

    Records never change once written, so what one names is remembered (by the file's identity):
    a stream of adds keeps hundreds of versions within the grace period, and parsing all of them
    at every sweep held the lock for a tenth of a second."""
    try:
        info = path.stat()
        identity = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
        with _NAMES_LOCK:
            if identity in _NAMES:
                return _NAMES[identity]
        files = json.loads(read_regular(path)).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    names = ([name for name in files if isinstance(name, str)] if isinstance(files, dict)
             else None)
    with _NAMES_LOCK:
        _NAMES[identity] = names
        while len(_NAMES) > _NAMES_KEPT:
            del _NAMES[next(iter(_NAMES))]
    return names


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


# ------------------------------------------------------------------------------ info's figures

@dataclass(frozen=True)
class Survey:
    """Every file on disk under a bundle that the current version does not use.

    ``reclaimable_bytes``: files a cleanup will remove (named by superseded versions, their
    records, a killed writer's journaled leftovers); ``unknown``: files it never touches (the
    user's, or a link), by name relative to the bundle."""

    reclaimable_bytes: int = 0
    reclaimable: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def survey(directory: Path, current: Manifest, journal: Iterable[str]) -> Survey:
    """Walk the bundle (never through a link) and sort every file the current version does not
    use into reclaimable and unknown; hard links are counted once."""
    live = {*current.files, MANIFEST, LOCK_FILE, f"{VERSIONS_DIR}/{current.version:08d}.json"}
    ours: set[str] = set()
    for number, path in _records(directory):
        if number != current.version and (names := _named_files(path)) is not None:
            ours.add(f"{VERSIONS_DIR}/{path.name}")
            ours.update(n for n in names if _DATA_NAME.fullmatch(n))
    left = [name for name in journal if journal_name(name)]
    ours.update(left)
    scratch = tuple(f"{name}/" for name in left if name.startswith(f"{SCRATCH_DIR}/"))
    seen: set[tuple[int, int]] = set()
    reclaimable: list[str] = []
    unknown: list[str] = []
    for root, folders, files in os.walk(directory):
        base = Path(root).relative_to(directory).as_posix()
        for name in sorted(files + [f for f in folders if os.path.islink(os.path.join(root, f))]):
            relative = name if base == "." else f"{base}/{name}"
            if relative in live:
                continue
            try:
                info = os.lstat(Path(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and (relative in ours or relative.startswith(scratch)):
                reclaimable.append(relative)
                seen.add((info.st_dev, info.st_ino, info.st_size))
            else:
                unknown.append(relative)
    return Survey(sum(size for _, _, size in seen), sorted(reclaimable), sorted(unknown))
