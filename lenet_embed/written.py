"""Unsealed segments this process wrote lately, kept in memory.

Reading one back (to merge it, to refresh after its commit) takes the records from memory,
exactly the bytes hashed as they were written, unless the file was since replaced or rewritten
(its identity: inode, size, mtime). Kept up to :data:`KEPT_BYTES` bytes of records.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

KEPT_BYTES = 8 << 20
_WRITTEN: OrderedDict[str, tuple[tuple[int, int, int], np.ndarray]] = OrderedDict()
_LOCK = threading.Lock()  # the service's writers and readers run in several threads
_total = 0


def _identity(path: str) -> tuple[int, int, int]:
    found = os.stat(path)
    return found.st_ino, found.st_size, found.st_mtime_ns


def remember_records(path: Path, records: np.ndarray) -> None:
    """Note that the unsealed segment file ``path``, just written and flushed, holds
    ``records`` (made read-only)."""
    if records.nbytes > KEPT_BYTES:
        return
    global _total
    records.setflags(write=False)
    with _LOCK:
        replaced = _WRITTEN.pop(str(path), None)
        _total -= 0 if replaced is None else replaced[1].nbytes
        _WRITTEN[str(path)] = (_identity(str(path)), records)
        _total += records.nbytes
        while _total > KEPT_BYTES:
            _total -= _WRITTEN.popitem(last=False)[1][1].nbytes


def written_records(path: Path) -> np.ndarray | None:
    """The records of an unsealed segment file this process wrote lately and that is unchanged
    since, else None (FileNotFoundError when the file is gone)."""
    with _LOCK:
        kept = _WRITTEN.get(str(path))
    if kept is None or _identity(str(path)) != kept[0]:
        return None
    return kept[1]
