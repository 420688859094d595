"""Crash states of a power failure, generated from a recorded run (in the manner of ALICE,
Pillai et al., OSDI 2014), for ``tests/integration/test_power_loss.py``.

A :class:`Recorder` watches a folder (the "world") while a real operation runs in this process:
it wraps ``os.fsync`` and ``os.fdatasync`` and, at every call on something inside the world,
notes what that call made durable. A power failure just after any of those calls may leave only
what was durable by then; :meth:`Recorder.crash_states` gives those trees, and :func:`materialize`
writes one into a folder for the code under test to open.

The persistence model (what the generated states assume of the file system):

- before the operation everything in the world is durable (as after ``sync``);
- a regular file's bytes are durable as they were at its last ``fsync``/``fdatasync``; a file
  never flushed since it was created is empty, as ext4's delayed allocation may leave it
  (variants: all of it written, as ``data=ordered`` writes data before the metadata naming it;
  a random prefix of it, as ``data=writeback`` and other file systems may);
- a directory's entries (name -> file or folder) are durable as they were at its last ``fsync``;
  a folder never flushed since it was created has no entries, and it exists only where its
  parent's durable entries name it. Creating, linking, renaming and removing are atomic: an
  entry is either there or not (so ``rename`` over a file leaves the old file or the new one);
- variant: one directory's entries written back early, as they are at that moment (the kernel
  writes directories back on its own; ext4 commits its journal every few seconds);
- an ``fsync`` that returned is durable, in the order the calls returned.

Not modelled: torn or reordered writes inside a file that was flushed, stale or garbage blocks
in a file that was not, devices whose caches lie about ``fsync``, ``fsync`` errors (the page
cache dropping dirty pages), the early write-back of several directories at once, flushes that
complete in another order than they returned, crashes in the middle of a flush, and anything
done by another process or through another path than ``os.fsync``/``os.fdatasync``.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# name -> (inode, is a folder)
Listing = dict[str, tuple[int, bool]]
# relative path -> the file's bytes, or None for a folder
Tree = dict[str, bytes | None]
DATA_VARIANTS = ("lost", "prefix", "written")


@dataclass(frozen=True)
class Moment:
    """What was durable just after one durability event, and what the folders held then."""

    number: int
    event: str  # "start", "fsync segments/...", "end"
    listings: dict[int, Listing]  # durable entries, by folder inode
    data: dict[int, bytes]  # durable bytes, by file inode
    volatile_listings: dict[int, Listing]  # the entries as the running code saw them
    volatile_data: dict[int, bytes]  # the latest bytes seen of every file
    paths: dict[int, str]  # where each inode was (for messages)


class Recorder:
    """Record durability events under ``world`` while the ``with`` block runs.

    Thread-safe (a commit flushes its files from several threads). Every inode seen is held open
    until :meth:`close`, so that the file system cannot reuse its number for a new file while
    the durable state still refers to the old one."""

    def __init__(self, world: Path) -> None:
        self.world = world
        self.root = os.stat(world).st_ino
        self.moments: list[Moment] = []
        self.ignored = 0  # flushes of files outside the world
        self._lock = threading.Lock()
        self._pins: dict[int, int] = {}
        self._cache: dict[tuple[int, int, int, int], bytes] = {}
        self._seen: dict[int, bytes] = {}
        self._real = (os.fsync, os.fdatasync)
        listings, paths = self._scan()
        self._listings = dict(listings)
        self._data = dict(self._seen)
        self._mark("start", listings, paths)

    # -------------------------------------------------------------------- recording

    def __enter__(self) -> Recorder:
        os.fsync, os.fdatasync = self._fsync, self._fdatasync
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync, os.fdatasync = self._real
        with self._lock:
            listings, paths = self._scan()
            self._mark("end", listings, paths)

    def close(self) -> None:
        """Let go of the inodes held open."""
        for fd in self._pins.values():
            os.close(fd)
        self._pins.clear()

    def _fsync(self, fd: int) -> None:
        self._real[0](fd)
        self._record(fd)

    def _fdatasync(self, fd: int) -> None:
        self._real[1](fd)
        self._record(fd)

    def _record(self, fd: int) -> None:
        info = os.fstat(fd)
        with self._lock:
            listings, paths = self._scan()
            if info.st_ino not in paths:
                self.ignored += 1
                return
            if stat.S_ISDIR(info.st_mode):
                self._listings[info.st_ino] = listings[info.st_ino]
            else:
                self._data[info.st_ino] = self._seen[info.st_ino]
            self._mark(f"fsync {paths[info.st_ino]}", listings, paths)

    def _mark(self, event: str, listings: dict[int, Listing], paths: dict[int, str]) -> None:
        self.moments.append(Moment(len(self.moments), event, dict(self._listings),
                                   dict(self._data), listings, dict(self._seen), paths))

    def _scan(self) -> tuple[dict[int, Listing], dict[int, str]]:
        """Every folder's entries and every file's bytes under the world, as they are now."""
        listings: dict[int, Listing] = {}
        paths = {self.root: "."}
        self._pin(self.root, self.world)
        stack = [(self.world, self.root)]
        while stack:
            folder, inode = stack.pop()
            listing: Listing = {}
            for entry in os.scandir(folder):
                info = entry.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(info.st_mode)
                if not (is_dir or stat.S_ISREG(info.st_mode)):
                    raise AssertionError(f"{entry.path}: neither a file nor a folder")
                listing[entry.name] = (info.st_ino, is_dir)
                paths[info.st_ino] = Path(entry.path).relative_to(self.world).as_posix()
                self._pin(info.st_ino, Path(entry.path))
                if is_dir:
                    stack.append((Path(entry.path), info.st_ino))
                else:
                    self._seen[info.st_ino] = self._read(Path(entry.path), info)
            listings[inode] = listing
        return listings, paths

    def _pin(self, inode: int, path: Path) -> None:
        if inode not in self._pins:
            self._pins[inode] = os.open(path, os.O_PATH | os.O_NOFOLLOW)

    def _read(self, path: Path, info: os.stat_result) -> bytes:
        key = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if key not in self._cache:
            self._cache[key] = path.read_bytes()
        return self._cache[key]

    # -------------------------------------------------------------------- crash states

    def crash_states(self, seed: int = 0) -> Iterator[tuple[Moment, str, Tree]]:
        """The trees a power failure may leave, with the moment each stands for (the last event
        that returned before it) and the variant that made it: at each moment, the bytes not
        flushed lost, cut at random or all written; and, with them lost or written, each folder
        whose entries changed since their last flush written back early. Many are alike (see
        :func:`fingerprint`)."""
        rng = random.Random(seed)
        for moment in self.moments:
            early = [inode for inode, listing in moment.volatile_listings.items()
                     if listing != moment.listings.get(inode, {})]
            variants = [(data, None) for data in DATA_VARIANTS]
            variants += [(data, inode) for inode in early for data in ("lost", "written")]
            for data, inode in variants:
                name = data if inode is None else f"{moment.paths[inode]}/ written back, {data}"
                yield moment, name, crash_tree(moment, self.root, data, inode, rng)


def crash_tree(moment: Moment, root: int, data: str = "lost", early: int | None = None,
               rng: random.Random | None = None) -> Tree:
    """The tree a power failure just after ``moment`` leaves: durable entries (the folder
    ``early``'s as they were at that moment) with durable bytes, and files never flushed
    ``lost`` (empty), cut to a random ``prefix`` or ``written`` in full."""
    rng = rng or random.Random(0)
    tree: Tree = {}

    def content(inode: int) -> bytes:
        if data == "written":
            return moment.volatile_data.get(inode, moment.data.get(inode, b""))
        if inode in moment.data:
            return moment.data[inode]
        if data == "lost":
            return b""
        written = moment.volatile_data.get(inode, b"")
        return written[: rng.randrange(len(written) + 1)]

    def walk(inode: int, prefix: str) -> None:
        listing = (moment.volatile_listings if inode == early else moment.listings).get(inode,
                                                                                       {})
        for name, (child, is_dir) in sorted(listing.items()):
            path = f"{prefix}{name}"
            if is_dir:
                tree[path] = None
                walk(child, f"{path}/")
            else:
                tree[path] = content(child)

    walk(root, "")
    return tree


def fingerprint(tree: Tree) -> str:
    """A digest of a tree's paths and bytes: two crash states alike need one check."""
    digest = hashlib.sha256()
    for path, content in sorted(tree.items()):
        digest.update(path.encode() + b"\0")
        digest.update(b"/" if content is None else hashlib.sha256(content).digest())
    return digest.hexdigest()


def materialize(tree: Tree, dest: Path) -> Path:
    """Write ``tree`` into the new folder ``dest``; return it."""
    dest.mkdir(parents=True)
    for path, content in sorted(tree.items()):
        if content is None:
            (dest / path).mkdir()
        else:
            (dest / path).write_bytes(content)
    return dest
