"""Where training and indexing data come from: MNIST-style IDX files, a Keras ``mnist.npz``, or a
folder of the user's own pictures.

Resolution order for MNIST: an explicit path, else the ``LENET_EMBED_MNIST`` environment variable,
else Keras's own ``keras.datasets.mnist.load_data()`` (which downloads and caches where there is
internet). Every file is validated: magic number, dimensions, counts and label range, and a bad file
raises :class:`LenetEmbedError` naming it.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import mmap
import os
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from .errors import LenetEmbedError
from .files import NotRegularFile, open_regular
from .labels import MAX_LABEL

log = logging.getLogger(__name__)

ENV_VAR = "LENET_EMBED_MNIST"
IMAGE_SIDE = 28
NUM_CLASSES = 10

# IDX type codes (third byte of the magic number) and the numpy dtype each stands for.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Magic number and 255 dimensions: no IDX header is longer.
_LONGEST_HEADER = 4 + 4 * 255
# The four standard file stems; the original distribution also used a dot before "idx".
_STEMS = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass(frozen=True)
class LabeledImages:
    """A set of 28x28 uint8 images (white ink on black) with integer labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> LabeledImages:
        """The first ``n`` items: a cheap slice for quick experiments and tests."""
        return LabeledImages(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    """Train and test splits of an MNIST-style data set, and where they came from."""

    train: LabeledImages
    test: LabeledImages
    source: str

    def head(self, n_train: int, n_test: int) -> Dataset:
        """A smaller data set made of the first items of each split."""
        return Dataset(self.train.head(n_train), self.test.head(n_test), f"{self.source} (subset)")


@dataclass(frozen=True)
class ImageFolder:
    """The user's own pictures, preprocessed to the MNIST convention.

    ``labels`` holds an index into ``classes`` for files in a subfolder and -1 for files directly
    in the root; ``sources`` holds each file's path; ``skipped`` the files that could not be read.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    sources: list[str]
    skipped: list[str] = field(default_factory=list)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, validating its header against its size.

    A gzip-compressed file is decompressed into memory; a raw one is memory-mapped (read-only),
    so that a million digits (784 MB) are read from disk as they are used instead of all at once.
    """
    try:
        # The file opened once, as a regular file, and mapped from that descriptor: a FIFO or a
        # device never reaches a read (see .files).
        with open_regular(path, "an IDX file (or its .gz)") as fh:
            head = fh.read(_LONGEST_HEADER)
            if head[:2] == b"\x1f\x8b":
                fh.seek(0)
                raw = gzip.decompress(fh.readall())
                dtype, shape, header = _idx_layout(path, raw[:_LONGEST_HEADER], len(raw))
                return np.frombuffer(raw, dtype, offset=header).reshape(shape)
            size = os.fstat(fh.fileno()).st_size
            dtype, shape, header = _idx_layout(path, head, size)
            if size == header:  # nothing to map: mmap refuses an empty range
                return np.zeros(shape, dtype)
            return np.memmap(fh, dtype, mode="r", offset=header, shape=shape)
    except (OSError, EOFError, zlib.error) as exc:
        raise LenetEmbedError(f"{path}: cannot read ({exc}); replace the file") from None


def read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``array`` copied into memory. For a memory-mapped IDX file the pages
    just read are dropped from this process's mapping again: mapped pages count as the process's
    resident memory until unmapped (784 MB for a million digits read once), while the kernel's
    page cache keeps them, so reading them again costs no disk access."""
    rows = np.array(array[start:stop])
    mapping = getattr(array, "_mmap", None)  # np.memmap's mapping; numpy has no public name
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
    return rows


def _idx_layout(path: Path, head: bytes, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and header length an IDX file's first bytes declare, checked against the
    file's ``size`` in bytes."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise LenetEmbedError(f"{path}: not an IDX file (bad magic number); replace the file")
    dtype = _IDX_DTYPES[head[2]]
    ndim = head[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(head) < header:
        raise LenetEmbedError(f"{path}: truncated IDX header; replace the file")
    shape = tuple(int(d) for d in np.frombuffer(head, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if size - header != expected:
        raise LenetEmbedError(
            f"{path}: header says {shape} ({expected} bytes of data) but the file holds "
            f"{size - header}; the file is truncated or corrupt, replace it"
        )
    return dtype, shape, header


def _find_idx(folder: Path, split: str, kind: str) -> Path:
    for stem in _STEMS[(split, kind)]:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.exists():  # read_idx refuses it if it is not a regular file
                return candidate
    wanted = _STEMS[(split, kind)][0]
    raise LenetEmbedError(
        f"{folder}: missing {wanted}[.gz]; a data folder needs the four standard IDX files"
    )


def _validate(images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str) -> None:
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise LenetEmbedError(
            f"{images_name}: images must be N x {IMAGE_SIDE} x {IMAGE_SIDE}, found {images.shape}"
        )
    if images.dtype != np.uint8:
        raise LenetEmbedError(f"{images_name}: images must be unsigned bytes, found {images.dtype}")
    if labels.ndim != 1:
        raise LenetEmbedError(
            f"{labels_name}: labels must be one-dimensional, found {labels.shape}"
        )
    if len(labels) != len(images):
        raise LenetEmbedError(
            f"{labels_name}: {len(labels)} labels for {len(images)} images in {images_name}; "
            "the files do not belong together"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise LenetEmbedError(
            f"{labels_name}: labels must lie in 0..{NUM_CLASSES - 1}, "
            f"found {int(labels.min())}..{int(labels.max())}"
        )


def _load_idx_folder(folder: Path) -> Dataset:
    splits = {}
    for split in ("train", "test"):
        images_path = _find_idx(folder, split, "images")
        labels_path = _find_idx(folder, split, "labels")
        images, labels = read_idx(images_path), read_idx(labels_path)
        _validate(images, labels, str(images_path), str(labels_path))
        splits[split] = LabeledImages(images, labels.astype(np.int64))
    return Dataset(splits["train"], splits["test"], f"IDX files in {folder}")


def _load_npz(path: Path) -> Dataset:
    what = "a Keras-style mnist.npz or a folder of IDX files"
    try:
        fh = open_regular(path, what)
    except OSError as exc:
        raise LenetEmbedError(f"{path}: cannot read ({exc})") from None
    with fh:
        if not zipfile.is_zipfile(fh):
            raise LenetEmbedError(f"{path}: not an .npz archive; give {what}")
        fh.seek(0)
        return _npz_dataset(path, fh)


def _npz_dataset(path: Path, fh: IO[bytes]) -> Dataset:
    try:
        with np.load(fh, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as exc:
        raise LenetEmbedError(
            f"{path}: missing array {exc}; expected a Keras-style mnist.npz"
        ) from None
    except (OSError, ValueError) as exc:
        raise LenetEmbedError(f"{path}: not a readable .npz file ({exc})") from None
    for split in ("train", "test"):
        _validate(arrays[f"x_{split}"], arrays[f"y_{split}"], str(path), str(path))
    return Dataset(
        LabeledImages(arrays["x_train"], arrays["y_train"].astype(np.int64)),
        LabeledImages(arrays["x_test"], arrays["y_test"].astype(np.int64)),
        f"Keras-style {path}",
    )


def resolve_data_path(path: str | os.PathLike[str] | None) -> Path | None:
    """The data location to use: ``path``, else ``$LENET_EMBED_MNIST``, else None (Keras)."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


def load_mnist(path: str | os.PathLike[str] | Dataset | None = None) -> Dataset:
    """Load MNIST (or any data set in the same layout) as uint8 images and int64 labels.

    ``path`` may be a folder holding the four standard IDX files (raw or ``.gz``), a Keras-style
    ``.npz`` file, an already loaded :class:`Dataset` (returned as is), or None to use
    ``$LENET_EMBED_MNIST`` and then Keras's downloader.
    """
    if isinstance(path, Dataset):
        return path
    resolved = resolve_data_path(path)
    if resolved is None:
        return _load_from_keras()
    if resolved.is_dir():
        return _load_idx_folder(resolved)
    if resolved.exists():  # _load_npz refuses it if it is not a regular file
        return _load_npz(resolved)
    origin = f" (from ${ENV_VAR})" if path is None else ""
    raise LenetEmbedError(
        f"{resolved}{origin}: no such file or folder; point --data or ${ENV_VAR} at a folder "
        "of MNIST IDX files or an mnist.npz"
    )


def _load_from_keras() -> Dataset:
    from ._keras import keras

    keras_module = keras(f"downloading MNIST (no --data and no ${ENV_VAR})")
    log.info("no --data and no $%s: using keras.datasets.mnist", ENV_VAR)
    try:
        # Keras prints its download notice on stdout, which belongs to results (--json).
        with contextlib.redirect_stdout(sys.stderr):
            (x_train, y_train), (x_test, y_test) = keras_module.datasets.mnist.load_data()
    except Exception as exc:  # network errors come in many types
        raise LenetEmbedError(
            f"could not download MNIST through Keras ({exc}); pass --data PATH or set ${ENV_VAR}"
        ) from None
    return Dataset(
        LabeledImages(x_train, y_train.astype(np.int64)),
        LabeledImages(x_test, y_test.astype(np.int64)),
        "keras.datasets.mnist",
    )


IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)


def load_image_folder(root: str | os.PathLike[str],
                      on_progress: Callable[[int, int], None] | None = None) -> ImageFolder:
    """Read every image under ``root`` (recursively), in sorted path order.

    A file's label is the name of its immediate subfolder (the ImageFolder convention); files
    directly in ``root`` get no label. Files that cannot be read as images are skipped with a
    warning naming them, and so are FIFOs, devices and sockets (never opened). Folder names that
    are all integers become those integers as labels.
    ``on_progress(done, total)`` is called before each file and after the last.
    """
    from .preprocess import to_mnist

    root = Path(root)
    if not root.is_dir():
        raise LenetEmbedError(f"{root}: not a folder; --images needs a folder of image files")
    # Every entry but folders: a FIFO, a device or a socket among the pictures is skipped with a
    # warning naming it (open_image refuses it before opening it), not passed over in silence.
    paths = sorted(p for p in root.rglob("*") if not p.is_dir() and not p.name.startswith("."))
    images: list[np.ndarray] = []
    names: list[str | None] = []
    sources: list[str] = []
    skipped: list[str] = []
    report = on_progress or (lambda done, total: None)
    for done, path in enumerate(paths):
        report(done, len(paths))
        try:
            images.append(to_mnist(path))
        except LenetEmbedError as exc:
            if path.suffix.lower() in IMAGE_SUFFIXES or isinstance(exc, NotRegularFile):
                log.warning("skipped %s", exc)
                skipped.append(str(path))
            else:
                log.debug("ignored %s", exc)
            continue
        names.append(path.parent.name if path.parent != root else None)
        sources.append(str(path))
    report(len(paths), len(paths))
    if not images:
        raise LenetEmbedError(f"{root}: no readable image files found")
    classes = sorted({n for n in names if n is not None}, key=_class_sort_key)
    if all(_is_number(n) for n in classes):
        labels = np.array([int(n) if n is not None else -1 for n in names], dtype=np.int64)
        classes = []
    else:
        position = {name: i for i, name in enumerate(classes)}
        labels = np.array([position[n] if n is not None else -1 for n in names], dtype=np.int64)
    return ImageFolder(np.stack(images), labels, classes, sources, skipped)


def _is_number(name: str) -> bool:
    """Whether a folder name is a numeric label; a number too large for one (int64) is a name."""
    return (name.isascii() and name.isdigit()
            and len(name.lstrip("0")) <= len(str(MAX_LABEL)) and int(name) <= MAX_LABEL)


def _class_sort_key(name: str) -> tuple[int, str]:
    return (0, f"{int(name):020d}") if _is_number(name) else (1, name)


def write_samples(
    out_dir: str | os.PathLike[str],
    n: int = 20,
    data: str | os.PathLike[str] | Dataset | None = None,
) -> list[Path]:
    """Write the first ``n`` test digits as ``mnist-test-<index>-label-<label>.png`` files.

    They give a newcomer something to query at once; the label in the name lets anyone check the
    answers.
    """
    from PIL import Image

    if n < 1:
        raise LenetEmbedError(f"-n must be at least 1, got {n}")
    test = load_mnist(data).test
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(n, len(test))):
        path = out / f"mnist-test-{i:05d}-label-{int(test.labels[i])}.png"
        Image.fromarray(test.images[i]).save(path)
        written.append(path)
    return written
