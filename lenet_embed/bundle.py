"""The on-disk index bundle: the one place its format is defined (documented in index/README.md).

A bundle is a directory holding everything a search needs:

- ``manifest.json``: format version, lenet-embed version, creation time, dim, metric, FAISS factory
  string, count, a description of the data set, the encoder's sha256 fingerprint, the sha256 of
  every other file, class names for folder labels, and search parameters;
- ``index.faiss``: the FAISS index (row i holds the vector of item i);
- ``labels.npy`` (int64, -1 = no label) and ``ids.npy`` (int64), one entry per row;
- ``images.npy``: the indexed digits as the encoder saw them, uint8 (N, 28, 28), for pictures;
- ``sources.json``: the source path of every row, for bundles built from image files;
- ``encoder.keras``: the encoder that made the vectors, and ``encoder.tflite``, the same encoder
  exported to LiteRT for queries that never load TensorFlow.

A bundle is written into a temporary sibling directory and renamed into place, so a failed or
interrupted build never leaves half a bundle and never damages the one already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .embed import export_litert
from .errors import LenetEmbedError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.npy"
IMAGES_FILE = "images.npy"
SOURCES_FILE = "sources.json"
ENCODER_FILE = "encoder.keras"
LITERT_FILE = "encoder.tflite"
DEFAULT_INDEX_DIR = Path("index")
# Files that may sit in a folder that is not yet a bundle and be carried over into it (the
# repository's index/README.md documents the format there).
KEPT_FILES = frozenset({"README.md", ".gitignore", ".gitkeep"})
_REBUILD = "rebuild it with `lenet-embed build-index`"
# Fields every reader relies on, and their JSON types.
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "dim": int,
    "metric": str,
    "count": int,
    "files": dict,
    "encoder_sha256": str,
    "search_params": dict,
    "classes": list,
}


def package_version() -> str:
    """The installed lenet-embed version."""
    try:
        return version("lenet-embed")
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A bundle read back from disk, checked against its manifest."""

    path: Path
    manifest: dict[str, Any]
    index: Any
    labels: np.ndarray
    ids: np.ndarray
    images: np.ndarray
    sources: list[str] | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def encoder_path(self) -> Path:
        """The Keras encoder file inside the bundle."""
        return self.path / ENCODER_FILE

    @property
    def litert_path(self) -> Path:
        """The LiteRT encoder file inside the bundle."""
        return self.path / LITERT_FILE


def _check_target(directory: Path) -> list[Path]:
    """Refuse to replace a folder that is not a bundle; return the files to carry over.

    In a bundle, every file that is not part of the bundle (a README, the user's notes) is carried
    over; a folder that is not a bundle may hold only ``KEPT_FILES``. Nothing is silently lost.
    """
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise LenetEmbedError(
            f"{directory}: exists and is not a folder; choose another --index-dir"
        )
    entries = list(directory.iterdir())
    is_bundle = (directory / MANIFEST).is_file()
    ours = {MANIFEST, INDEX_FILE, LABELS_FILE, IDS_FILE, IMAGES_FILE, SOURCES_FILE, ENCODER_FILE,
            LITERT_FILE}
    foreign = [e for e in entries if e.name not in ours]
    kept = [e for e in foreign if e.is_file() and (is_bundle or e.name in KEPT_FILES)]
    if len(kept) != len(foreign):
        raise LenetEmbedError(
            f"{directory}: exists and is not an index bundle; choose another --index-dir "
            "or empty that folder"
        )
    return kept


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes private folders; a bundle gets the permissions a plain mkdir would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(
    directory: str | os.PathLike[str],
    *,
    index: Any,
    labels: np.ndarray,
    ids: np.ndarray,
    images: np.ndarray,
    encoder: Any,
    metric: str,
    factory: str,
    dataset: dict[str, Any],
    classes: list[str] | None = None,
    sources: list[str] | None = None,
    search_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a complete bundle to ``directory`` atomically and return its manifest.

    ``images`` are the indexed digits as uint8 (N, 28, 28); ``encoder`` is the Keras encoder model
    that produced the vectors. Both are saved into the bundle.
    """
    directory = Path(directory)
    kept = _check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        _chmod_like_mkdir(tmp)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / LABELS_FILE, np.asarray(labels, dtype=np.int64), allow_pickle=False)
        np.save(tmp / IDS_FILE, np.asarray(ids, dtype=np.int64), allow_pickle=False)
        np.save(tmp / IMAGES_FILE, np.asarray(images, dtype=np.uint8), allow_pickle=False)
        if sources is not None:
            _write_json(tmp / SOURCES_FILE, list(sources))
        encoder.save(tmp / ENCODER_FILE)
        export_litert(encoder, tmp / LITERT_FILE)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "lenet_embed_version": package_version(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dim": int(index.d),
            "metric": metric,
            "factory": factory,
            "count": int(index.ntotal),
            "dataset": dataset,
            "classes": list(classes or []),
            "search_params": dict(search_params or {}),
            "encoder_sha256": files[ENCODER_FILE],
            "encoder_litert_sha256": files[LITERT_FILE],
            "files": files,
        }
        _write_json(tmp / MANIFEST, manifest)
        for path in kept:
            shutil.copy2(path, tmp / path.name)
        _fsync_tree(tmp)
        _swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(new: Path, directory: Path) -> None:
    """Rename ``new`` to ``directory``; an existing bundle is moved aside first, then removed."""
    if not directory.exists():
        os.rename(new, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check a bundle's manifest without loading the rest."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        if not directory.exists():
            raise LenetEmbedError(
                f"{directory}: no index bundle there; build one with `lenet-embed build-index`"
            )
        raise LenetEmbedError(f"{directory}: no {MANIFEST}, so not an index bundle; {_REBUILD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LenetEmbedError(f"{path}: unreadable manifest ({exc}); {_REBUILD}") from None
    if not isinstance(manifest, dict) or any(
        not isinstance(manifest.get(key), kind) for key, kind in _MANIFEST_TYPES.items()
    ):
        raise LenetEmbedError(f"{path}: manifest lacks required fields; {_REBUILD}")
    if manifest["metric"] not in ("cosine", "l2"):
        raise LenetEmbedError(f"{path}: unknown metric {manifest['metric']!r}; {_REBUILD}")
    if not all(isinstance(v, str) for v in manifest["files"].values()):
        raise LenetEmbedError(f"{path}: manifest lists malformed checksums; {_REBUILD}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise LenetEmbedError(
            f"{path}: bundle format {manifest['format_version']} is not supported by this "
            f"lenet-embed (format {FORMAT_VERSION}); {_REBUILD}"
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Check the encoders' fingerprints, then every file against its sha256 in the manifest."""
    fingerprints = {ENCODER_FILE: "encoder_sha256", LITERT_FILE: "encoder_litert_sha256"}
    for name, key in fingerprints.items():
        encoder = directory / name
        if key not in manifest:
            continue
        if not encoder.is_file():
            raise LenetEmbedError(f"{encoder}: missing from the bundle; {_REBUILD}")
        if sha256_file(encoder) != manifest[key]:
            raise LenetEmbedError(
                f"{encoder}: fingerprint differs from the encoder the index was built with; "
                f"the vectors would not match, {_REBUILD}"
            )
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise LenetEmbedError(f"{path}: missing from the bundle; {_REBUILD}")
        if name not in fingerprints and sha256_file(path) != expected:
            raise LenetEmbedError(
                f"{path}: checksum does not match {MANIFEST}; the bundle is damaged, {_REBUILD}"
            )


def _read_index(path: Path) -> Any:
    """Read a FAISS index memory-mapped where its type allows (large indexes load at once)."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


def read_bundle(directory: str | os.PathLike[str] = DEFAULT_INDEX_DIR) -> Bundle:
    """Read a bundle, verifying checksums, the encoder fingerprint and the counts."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    try:
        index = _read_index(directory / INDEX_FILE)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise LenetEmbedError(
            f"{directory / INDEX_FILE}: unreadable ({first}); {_REBUILD}"
        ) from None
    try:
        labels = np.load(directory / LABELS_FILE, allow_pickle=False)
        ids = np.load(directory / IDS_FILE, allow_pickle=False)
        images = np.load(directory / IMAGES_FILE, allow_pickle=False, mmap_mode="r")
        sources_path = directory / SOURCES_FILE
        sources = json.loads(sources_path.read_text("utf-8")) if sources_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise LenetEmbedError(f"{directory}: unreadable bundle data ({exc}); {_REBUILD}") from None
    count = manifest["count"]
    lengths = {index.ntotal, len(labels), len(ids), len(images)}
    lengths |= {len(sources)} if sources else set()
    if lengths != {count} or index.d != manifest["dim"]:
        raise LenetEmbedError(
            f"{directory}: index, labels and ids disagree with the manifest's count; {_REBUILD}"
        )
    return Bundle(
        directory, manifest, index, labels, ids, images, sources, manifest.get("classes", [])
    )
