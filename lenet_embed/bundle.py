"""The on-disk index bundle: the one place its format is defined (documented in index/README.md).

A bundle is a folder that changes only by **commits**. Every commit (a build, an add, a remove, a
compaction) writes new files under names never used before, then makes a new ``manifest.json``
current with one ``os.replace``; files are never modified after they are written. A reader reads
``manifest.json`` once and opens only what that version names, so it sees one version from start
to end. Layout::

    manifest.json                    the current version (the commit point)
    versions/00000007.json           the manifests of recent versions (kept while readers may
                                     still be opening their files)
    segments/<segment>/vectors.npy   a sealed segment: float32 (n, dim), as indexed
                       ids.npy       int64 (n,), strictly increasing, never reused
                       labels.npy    int64 (n,), -1 = no label, else a digit or a class code
                       images.npy    uint8 (n, 28, 28), the digits as the encoder saw them
                       sources.json  optional: the source path of each row (or null)
                       index.faiss   the FAISS index of the rows
    segments/<segment>.npy           an unsealed segment (from add): the same, one record a row
    encoders/<fingerprint>/encoder.keras, encoder.tflite
    deletions/<name>.npy             int64, sorted: ids removed since the last compaction
    .lock                            the writer lock (``flock``)
    .tmp/                            writers' scratch space, emptied by the next writer

Everything a manifest names is listed in its ``files`` with size and sha256; the names must stay
inside the bundle and cover exactly the files the manifest's structure needs. The manifest carries
the sha256 of its own body (``manifest_sha256``), so a torn or edited manifest is refused.

Loading costs O(files), not O(data): a load checks the manifest's own checksum and each file's
size, and memory-maps the data; the sha256 of every file is computed once, when it is written,
and compared by ``lenet-embed info --verify`` (:func:`verify_file`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import json
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LenetEmbedError
from .factory import AUTO, check_search_params, parse_factory
from .files import open_regular, read_regular

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# The key under which a manifest stores the sha256 of the rest of it.
SEAL = "manifest_sha256"
VERSIONS_DIR = "versions"
SEGMENTS_DIR = "segments"
ENCODERS_DIR = "encoders"
DELETIONS_DIR = "deletions"
LOCK_FILE = ".lock"
# A commit's manifest is written under this name in the bundle, then renamed to manifest.json.
STAGED_PREFIX = ".manifest.json.new-"
SCRATCH_DIR = ".tmp"
# Files of one segment.
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
IMAGES_FILE = "images.npy"
SOURCES_FILE = "sources.json"
INDEX_FILE = "index.faiss"
SEGMENT_FILES = (VECTORS_FILE, IDS_FILE, LABELS_FILE, IMAGES_FILE)
# Files of the encoder.
ENCODER_FILE = "encoder.keras"
LITERT_FILE = "encoder.tflite"
DEFAULT_INDEX_DIR = Path("index")
# Everything a bundle folder may hold besides the user's own files.
LAYOUT = frozenset({MANIFEST, VERSIONS_DIR, SEGMENTS_DIR, ENCODERS_DIR, DELETIONS_DIR, LOCK_FILE,
                    SCRATCH_DIR})
# Files of the first bundle format (one flat folder), removed when a build replaces such a bundle.
FORMAT_1_FILES = frozenset({"index.faiss", "labels.npy", "ids.npy", "images.npy", "sources.json",
                            "encoder.keras", "encoder.tflite"})
# Files that may sit in a folder that is not yet a bundle and stay there (the repository's
# index/README.md documents the format).
KEPT_FILES = frozenset({"README.md", ".gitignore", ".gitkeep"})
REBUILD = "rebuild it with `lenet-embed build-index`"
# A name a manifest may use: a file in a segment or encoder folder, or a deletions file.
_NAME = re.compile(
    rf"({SEGMENTS_DIR}|{ENCODERS_DIR})/[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"
    rf"|({SEGMENTS_DIR}|{DELETIONS_DIR})/[A-Za-z0-9][A-Za-z0-9_.-]*\.npy"
)
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Every whole number a manifest holds (versions, counts, ids, sizes) is stored in int64 arrays or
# handed to FAISS and numpy as one: larger ones overflowed deep inside (OverflowError).
INT64_MAX = (1 << 63) - 1
# The dimensions a bundle's vectors may have, and the neighbours a calibration may look at.
MAX_DIM = 4096
MAX_CALIBRATION_K = 1024
# The features a calibration model may use: what calibration.features computes, from the
# neighbours alone (PLAIN) or also from the classifier head's logits (HEAD, only with a head).
PLAIN_FEATURES = ("log_d1", "log_dk", "agree")
HEAD_FEATURES = ("energy", "msp", "log_1_minus_msp", "head_agrees")
# Manifests recently parsed or committed, by their text: a writer that commits many times in a
# row reads back what it wrote, and a reader refreshing reads the same text again and again.
_PARSED: OrderedDict[str, Manifest] = OrderedDict()
_PARSED_KEPT = 8
_PARSED_LOCK = threading.Lock()  # for both caches: the service refreshes from several threads
# Unsealed segments this process wrote lately, by path, with the identity of the file written
# (inode, size, mtime): reading one back (to merge it, to refresh after its commit) takes the
# records from memory, exactly the bytes hashed as they were written, unless the file was since
# replaced or rewritten. Kept up to this many bytes of records.
_WRITTEN: OrderedDict[str, tuple[tuple[int, int, int], np.ndarray]] = OrderedDict()
_WRITTEN_BYTES = 8 << 20
_written_total = 0


@functools.cache
def package_version() -> str:
    """The installed lenet-embed version."""
    try:
        return version("lenet-embed")
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open_regular(path, "the bundle's own file") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """A file a manifest names: its size and sha256."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class Segment:
    """An immutable set of rows: their vectors, ids, labels, images (and sources). A sealed
    segment (from a build or a compaction) is a folder of arrays and its FAISS index; an unsealed
    one (from ``add``) is a single ``.npy`` file of :func:`row_dtype` records, searched exactly."""

    name: str
    rows: int
    sealed: bool
    has_sources: bool = False

    @property
    def entry(self) -> str:
        """What the segment is under ``segments/``: a folder (sealed) or one ``.npy`` file."""
        return f"{SEGMENTS_DIR}/{self.name}" + ("" if self.sealed else ".npy")

    def file(self, name: str) -> str:
        """A file of this sealed segment, relative to the bundle."""
        return f"{self.entry}/{name}"

    def files(self) -> list[str]:
        """Every file this segment consists of."""
        if not self.sealed:
            return [self.entry]
        names = [*SEGMENT_FILES, INDEX_FILE]
        if self.has_sources:
            names.append(SOURCES_FILE)
        return [self.file(name) for name in names]


@dataclass(frozen=True)
class Store:
    """Where a bundle's items live when not in its own segments: a Milvus collection
    (:mod:`.milvus`). ``uri`` is a server address or a Milvus Lite file relative to the bundle;
    ``index`` is the Milvus index type."""

    kind: str
    uri: str
    collection: str
    index: str


@dataclass(frozen=True)
class LogisticModel:
    """A logistic model over named features: log-odds = sum(weights * (x - mean) / scale) +
    bias (:mod:`.calibration` defines the features)."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float


@dataclass(frozen=True)
class Calibration:
    """What turns a query's ``k`` nearest neighbours into a confidence and a verdict
    (:mod:`.calibration` fits and applies it; index/README.md documents the fields).

    ``ood`` gives the out-of-distribution score (log-odds of "not like the items"), answered
    when at most ``ood_thresholds[default_keep]``; ``ood_thresholds`` maps each operating point
    (the fraction of held-out items kept, as text: "0.995") to its threshold. ``confidence``
    gives P(predicted label is right) after a sigmoid; answered when at least ``min_confidence``.
    ``head_weights`` (84 x classes) and ``head_bias`` are the classifier head whose logits some
    features use (None when the bundle's model had none). ``fitted_on`` counts what was fitted
    on.
    """

    k: int
    ood: LogisticModel
    confidence: LogisticModel
    ood_thresholds: dict[str, float]
    default_keep: str
    min_confidence: float
    head_weights: list[list[float]] | None
    head_bias: list[float] | None
    fitted_on: dict[str, int]

    @functools.cached_property
    def json_data(self) -> dict[str, Any]:
        """The calibration as JSON-ready data, made once: every commit writes it again, and
        converting the classifier head (840 numbers) took most of a single add's CPU time.
        Shared: read it, never change it."""
        return asdict(self)

    @functools.cached_property
    def canonical_json(self) -> str:
        """:attr:`json_data` as canonical JSON, made once: serialising the head's numbers took
        a fifth of a single add's time, at every commit."""
        return _canonical(self.json_data)

    @functools.cached_property
    def head_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The classifier head as read-only float64 arrays (weights, bias), made once: every
        query batch applies it. None when the calibration keeps no head."""
        if self.head_weights is None or self.head_bias is None:
            return None
        weights = np.array(self.head_weights, dtype=np.float64)
        bias = np.array(self.head_bias, dtype=np.float64)
        weights.setflags(write=False)
        bias.setflags(write=False)
        return weights, bias

    @property
    def ood_threshold(self) -> float:
        """The OOD score threshold in force."""
        return self.ood_thresholds[self.default_keep]

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Parse and check a manifest's ``calibration``; TypeError/ValueError when malformed."""
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise TypeError("malformed calibration")
        values = dict(data)
        values["ood"] = _logistic(data["ood"])
        values["confidence"] = _logistic(data["confidence"])
        calibration = cls(**values)
        if not _whole(calibration.k, 1, MAX_CALIBRATION_K):
            raise ValueError(f"calibration k must be a whole number in 1..{MAX_CALIBRATION_K}")
        thresholds = calibration.ood_thresholds
        if not (isinstance(thresholds, dict) and isinstance(calibration.default_keep, str)
                and calibration.default_keep in thresholds
                and all(_finite(v) for v in thresholds.values())):
            raise ValueError("calibration thresholds must map operating points to numbers, "
                             "the default among them")
        if not (_finite(calibration.min_confidence) and 0 <= calibration.min_confidence <= 1):
            raise ValueError("calibration min_confidence must be between 0 and 1")
        if (calibration.head_weights is None) != (calibration.head_bias is None):
            raise ValueError("calibration head needs both weights and bias")
        if calibration.head_weights is not None:
            _check_head(calibration.head_weights, calibration.head_bias)
        for model in (calibration.ood, calibration.confidence):
            allowed = PLAIN_FEATURES + (HEAD_FEATURES if calibration.head_weights else ())
            unknown = [name for name in model.features if name not in allowed]
            if unknown:
                raise ValueError(f"calibration feature {unknown[0][:40]!r} is not one of "
                                 f"{', '.join(allowed)}")
        if not (isinstance(calibration.fitted_on, dict)
                and all(_whole(v) for v in calibration.fitted_on.values())):
            raise ValueError("calibration fitted_on must map names to whole numbers")
        return calibration

    def check_dim(self, dim: int) -> None:
        """Refuse a classifier head that does not read ``dim``-d embeddings (ValueError)."""
        if self.head_weights is not None and len(self.head_weights) != dim:
            raise ValueError(f"calibration head must have {dim} rows of weights, one per "
                             "embedding dimension")


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and bool(np.isfinite(value)))


def _whole(value: Any, low: int = 0, high: float = INT64_MAX) -> bool:
    """Whether ``value`` is a whole number (not a bool) in ``low..high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_head(weights: Any, bias: Any) -> None:
    """A classifier head: a list of rows of the same length as ``bias``, all finite numbers."""
    if not (isinstance(weights, list) and isinstance(bias, list) and bias and weights
            and all(_finite(b) for b in bias)
            and all(isinstance(row, list) and len(row) == len(bias)
                    and all(_finite(w) for w in row) for row in weights)):
        raise ValueError("calibration head must be a matrix of finite weights with one column "
                         "per bias")


def _logistic(data: Any) -> LogisticModel:
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(LogisticModel)}:
        raise TypeError("malformed calibration model")
    model = LogisticModel(**data)
    lists = (model.mean, model.scale, model.weights)
    if not (isinstance(model.features, list) and all(isinstance(f, str) for f in model.features)
            and all(isinstance(v, list) and len(v) == len(model.features)
                    and all(_finite(x) for x in v) for v in lists)
            and _finite(model.bias) and all(x > 0 for x in model.scale)):
        raise ValueError("a calibration model needs one finite mean, scale (> 0) and weight "
                         "per feature")
    return model


def row_dtype(dim: int, source_chars: int = 0) -> np.dtype:
    """The record of one row in an unsealed segment's single ``.npy`` file (``source_chars`` > 0
    adds the source path, "" for none)."""
    fields = [("id", "<i8"), ("label", "<i8"), ("vector", "<f4", (dim,)),
              ("image", "u1", (28, 28))]
    if source_chars:
        fields.append(("source", f"<U{source_chars}"))
    return np.dtype(fields)


@dataclass(frozen=True)
class Manifest:
    """One version of a bundle: what it holds, how it is searched, and every file it consists of.

    ``count`` is the number of live items, ``rows`` the number stored (live + removed, until a
    compaction drops the removed ones). ``next_id`` is the id the next added item gets: ids are
    never reused.
    """

    version: int
    operation: str
    created_at: str
    committed_at: str
    lenet_embed_version: str
    dim: int
    metric: str
    factory: str
    search_params: dict[str, float]
    dataset: dict[str, Any]
    classes: list[str]
    encoder: str
    segments: list[Segment]
    deletions: str | None
    count: int
    rows: int
    next_id: int
    files: dict[str, FileEntry]
    format_version: int = FORMAT_VERSION
    target_recall: float | None = None
    store: Store | None = None
    factory_reason: str | None = None
    calibration: Calibration | None = None

    @property
    def deleted(self) -> int:
        """Rows removed but still stored (what ``compact`` reclaims)."""
        return self.rows - self.count

    @property
    def encoder_path(self) -> str:
        """The Keras encoder, relative to the bundle."""
        return f"{self.encoder}/{ENCODER_FILE}"

    @property
    def litert_path(self) -> str:
        """The LiteRT encoder, relative to the bundle."""
        return f"{self.encoder}/{LITERT_FILE}"

    @property
    def encoder_sha256(self) -> str:
        """The fingerprint of the encoder that made the vectors."""
        return self.files[self.encoder_path].sha256

    def label_name(self, code: int) -> int | str | None:
        """A stored label code as the user knows it: the digit, the folder name, or None."""
        if code < 0:
            return None
        return self.classes[code] if self.classes else int(code)

    def required_files(self) -> set[str]:
        """The files this manifest's structure needs: exactly the keys of ``files``."""
        needed = {self.encoder_path, self.litert_path}
        for segment in self.segments:
            needed.update(segment.files())
        if self.deletions is not None:
            needed.add(self.deletions)
        return needed

    def next(self, operation: str, **changes: Any) -> Manifest:
        """The manifest of the version after this one, with ``changes`` applied."""
        return replace(self, version=self.version + 1, operation=operation,
                       lenet_embed_version=package_version(), **changes)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (new containers, as ``asdict`` makes, but built
        directly: this runs at every commit), except the calibration's, which is shared
        (:attr:`Calibration.json_data`)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(
            search_params=dict(self.search_params), dataset=copy.deepcopy(self.dataset),
            classes=list(self.classes),
            segments=[{"name": s.name, "rows": s.rows, "sealed": s.sealed,
                       "has_sources": s.has_sources} for s in self.segments],
            files={name: {"bytes": e.bytes, "sha256": e.sha256} for name, e in self.files.items()},
            store=None if self.store is None else asdict(self.store),
            calibration=None if self.calibration is None else self.calibration.json_data,
        )
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str, text: str | None = None) -> Manifest:
        """Parse and check a manifest; ``where`` names it in errors; ``text``, the JSON it was
        parsed from, if known."""
        if not isinstance(data, dict):
            raise LenetEmbedError(f"{where}: not a manifest; {REBUILD}")
        found = data.get("format_version")
        if found != FORMAT_VERSION:
            raise LenetEmbedError(
                f"{where}: bundle format {found} is not supported by this lenet-embed "
                f"(format {FORMAT_VERSION}); {REBUILD}"
            )
        _check_seal(data, where, text)
        names = {f.name for f in fields(cls)}
        optional = {"format_version", "target_recall", "store", "factory_reason", "calibration"}
        missing = sorted(names - optional - set(data))
        if missing:
            raise LenetEmbedError(f"{where}: manifest lacks {', '.join(missing)}; {REBUILD}")
        values = {name: data[name] for name in names if name in data}
        try:
            values["segments"] = [_segment(item) for item in data["segments"]]
            if data.get("store") is not None:
                values["store"] = Store(**_typed(data["store"], {
                    "kind": str, "uri": str, "collection": str, "index": str}))
            if data.get("calibration") is not None:
                values["calibration"] = Calibration.from_dict(data["calibration"])
            values["files"] = {
                name: FileEntry(**_typed(entry, {"bytes": int, "sha256": str}))
                for name, entry in _typed_dict(data["files"]).items()
            }
            manifest = cls(**values)
            manifest.check()
        except (TypeError, ValueError) as exc:
            raise malformed(where, exc) from None
        return manifest

    def check(self) -> None:
        """Types, ranges and the file list, so that no reader needs to check them again; a
        ValueError or TypeError says what is wrong."""
        ints = ("version", "dim", "count", "rows", "next_id", "format_version")
        strs = ("operation", "created_at", "committed_at", "lenet_embed_version", "metric",
                "factory", "encoder")
        for name in ints:
            value = getattr(self, name)
            if not _whole(value, high=float("inf")):
                raise ValueError(f"{name} must be a whole number >= 0")
            if value > INT64_MAX:
                raise ValueError(f"{name} must be at most {INT64_MAX}")
        for name in strs:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if self.metric not in ("cosine", "l2"):
            raise ValueError(f"unknown metric {self.metric!r}")
        if not 1 <= self.dim <= MAX_DIM:
            raise ValueError(f"dim must be in 1..{MAX_DIM}")
        if not isinstance(self.dataset, dict):
            raise ValueError("dataset must be an object")
        # The factory is parsed before FAISS ever sees it (a compaction builds it again); a
        # bundle whose items are in Milvus may name none ("auto").
        if not (self.store is not None and self.factory == AUTO):
            check_search_params(self.search_params, parse_factory(self.factory, self.dim))
        elif self.search_params:
            raise ValueError("search_params need a factory")
        if not isinstance(self.classes, list) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError("classes must be a list of strings")
        if not (isinstance(self.deletions, str) or self.deletions is None):
            raise ValueError("deletions must be a file name or null")
        if self.target_recall is not None and not (_finite(self.target_recall)
                                                   and 0 < self.target_recall <= 1):
            raise ValueError("target_recall must be a number in (0, 1] or null")
        if not (isinstance(self.factory_reason, str) or self.factory_reason is None):
            raise ValueError("factory_reason must be a string or null")
        if self.store is not None:
            if self.store.kind != "milvus" or not _FOLDER_NAME.fullmatch(self.store.collection):
                raise ValueError("store must be a Milvus collection")
            if self.segments or self.deletions is not None or self.rows != self.count:
                raise ValueError("a bundle whose items are in Milvus has no segments")
        elif self.rows != sum(s.rows for s in self.segments) or self.count > self.rows:
            raise ValueError("count and rows disagree with the segments")
        if (self.deletions is None) != (self.count == self.rows):
            raise ValueError("removed rows need a deletions file, and only they")
        # Ids are distinct, >= 0 and below next_id (the load checks the stored ones against it).
        if self.rows > self.next_id:
            raise ValueError("next_id must be above every id, so at least rows")
        if self.calibration is not None:
            self.calibration.check_dim(self.dim)
        if len({s.name for s in self.segments}) != len(self.segments):
            raise ValueError("two segments share a name")
        folder = self.encoder.removeprefix(f"{ENCODERS_DIR}/")
        if folder == self.encoder or not _FOLDER_NAME.fullmatch(folder):
            raise ValueError("the encoder must be a folder under encoders/")
        for segment in self.segments:
            if not _FOLDER_NAME.fullmatch(segment.name):
                raise ValueError(f"segment {segment.name!r} is not a name inside the bundle")
        for name, entry in self.files.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a name inside the bundle")
            if not (_whole(entry.bytes) and _SHA256.fullmatch(entry.sha256)):
                raise ValueError(f"{name!r} needs a size in 0..{INT64_MAX} and a sha256")
        needed = self.required_files()
        if set(self.files) != needed:
            extra = sorted(set(self.files) - needed)
            lacking = sorted(needed - set(self.files))
            raise ValueError(
                "its file list does not match its contents"
                + (f"; unlisted: {_some(lacking)}" if lacking else "")
                + (f"; not needed: {_some(extra)}" if extra else "")
            )


def malformed(where: str, problem: Exception) -> LenetEmbedError:
    """The one-line error for a manifest that is not what readers accept."""
    return LenetEmbedError(f"{where}: malformed manifest ({problem}); {REBUILD}")


_SLOT = "\0calibration\0"  # stands in for the calibration's text while a manifest is serialised


def _canonical(body: Any) -> str:
    """A manifest body's canonical JSON (sorted keys, no spaces, ASCII): what its seal hashes,
    so that the layout of the text does not matter but every value does."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _seal(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_seal(data: dict[str, Any], where: str, text: str | None = None) -> None:
    """Refuse a manifest whose body does not match its ``manifest_sha256`` (a manifest written
    before lenet-embed sealed them has none, and is taken as it is).

    A text as :func:`sealed_json` writes it is checked as it is: serialising the parsed body
    again (the calibration's numbers above all) cost a reader a millisecond per new version."""
    if SEAL not in data:
        return
    if text is not None and isinstance(data[SEAL], str):
        tail = f',"{SEAL}":"{data[SEAL]}"}}\n'
        if text.endswith(tail) and _seal(text[:-len(tail)] + "}") == data[SEAL]:
            return
    body = {key: value for key, value in data.items() if key != SEAL}
    if data[SEAL] != _seal(_canonical(body)):
        raise LenetEmbedError(f"{where}: does not match its own checksum ({SEAL}): the manifest "
                              f"was edited or damaged; {REBUILD}")


def sealed_json(body: dict[str, Any]) -> str:
    """A manifest's body as the JSON text written to disk, with its ``manifest_sha256``: the
    canonical text itself with the seal appended, so a commit serialises its manifest once."""
    return _sealed(_canonical(body))


def _sealed(canonical: str) -> str:
    return f'{canonical[:-1]},"{SEAL}":"{_seal(canonical)}"}}\n'


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _typed_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("files must be an object")
    return value


def _typed(value: Any, kinds: dict[str, type]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(kinds):
        raise TypeError(f"expected an object with {', '.join(kinds)}")
    for key, kind in kinds.items():
        if not isinstance(value[key], kind) or isinstance(value[key], bool):
            raise TypeError(f"{key} must be {kind.__name__}")
    return value


def _segment(value: Any) -> Segment:
    kinds = {"name": str, "rows": int, "sealed": bool, "has_sources": bool}
    if not isinstance(value, dict) or set(value) != set(kinds):
        raise TypeError("malformed segment entry")
    for key, kind in kinds.items():
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise TypeError(f"segment {key} must be {kind.__name__}")
    if not _whole(value["rows"]):
        raise ValueError(f"segment rows must be in 0..{INT64_MAX}")
    return Segment(**value)


def read_manifest(directory: str | os.PathLike[str] = DEFAULT_INDEX_DIR) -> Manifest:
    """Read and check the current manifest of the bundle in ``directory``."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        text = read_regular(path, "the bundle's manifest").decode("utf-8")
    except FileNotFoundError:
        if not directory.exists():
            raise LenetEmbedError(
                f"{directory}: no index bundle there; build one with `lenet-embed build-index`"
            ) from None
        raise LenetEmbedError(f"{directory}: no {MANIFEST}, so not an index bundle; "
                              f"{REBUILD}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LenetEmbedError(f"{directory}: a loop of symbolic links; point --index-dir at "
                                  "the bundle's real folder") from None
        raise LenetEmbedError(f"{path}: unreadable manifest ({exc}); {REBUILD}") from None
    except UnicodeDecodeError as exc:
        raise LenetEmbedError(f"{path}: unreadable manifest ({exc}); {REBUILD}") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> Manifest:
    """A manifest from its JSON text; ``where`` names it in errors. A text parsed or committed
    in this process before is not parsed again (manifests are immutable once written)."""
    with _PARSED_LOCK:
        cached = _PARSED.get(text)
        if cached is not None:
            _PARSED.move_to_end(text)
            return cached
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LenetEmbedError(f"{where}: unreadable manifest ({exc}); {REBUILD}") from None
    return remember_manifest(text, Manifest.from_dict(data, where, text))


def remember_manifest(text: str, manifest: Manifest) -> Manifest:
    """Note that ``text`` is the JSON of ``manifest`` (checked), so reading it costs no parse."""
    with _PARSED_LOCK:
        _PARSED[text] = manifest
        _PARSED.move_to_end(text)
        while len(_PARSED) > _PARSED_KEPT:
            _PARSED.popitem(last=False)
    return manifest


def _identity(path: str) -> tuple[int, int, int]:
    found = os.stat(path)
    return found.st_ino, found.st_size, found.st_mtime_ns


def remember_records(path: Path, records: np.ndarray) -> None:
    """Note that the unsealed segment file ``path``, just written and flushed, holds
    ``records``."""
    if records.nbytes > _WRITTEN_BYTES:
        return
    global _written_total
    records.setflags(write=False)
    with _PARSED_LOCK:
        _WRITTEN[str(path)] = (_identity(str(path)), records)
        _written_total += records.nbytes
        while _written_total > _WRITTEN_BYTES:
            _written_total -= _WRITTEN.popitem(last=False)[1][1].nbytes


def written_records(path: Path) -> np.ndarray | None:
    """The records of an unsealed segment file this process wrote lately and that is unchanged
    since, else None (FileNotFoundError when the file is gone)."""
    with _PARSED_LOCK:
        kept = _WRITTEN.get(str(path))
    if kept is None or _identity(str(path)) != kept[0]:
        return None
    return kept[1]


def manifest_json(manifest: Manifest) -> str:
    """A manifest as the JSON text written to disk (sealed with its checksum). The calibration,
    the same from commit to commit, goes in as the canonical text it keeps."""
    body = manifest.to_dict()
    if manifest.calibration is None:
        return sealed_json(body)
    body["calibration"] = _SLOT
    # The slot is the first occurrence: "calibration" sorts first, and no name holds a NUL.
    canonical = _canonical(body).replace(_canonical(_SLOT), manifest.calibration.canonical_json, 1)
    return _sealed(canonical)


def check_size(directory: Path, name: str, entry: FileEntry) -> None:
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


def verify_file(directory: Path, name: str, entry: FileEntry) -> None:
    """Check one file a manifest names against its size and sha256 (reads all of it)."""
    check_size(directory, name, entry)
    if sha256_file(directory / name) != entry.sha256:
        raise damaged([name], directory)


# Files whose bytes this process hashed, by identity (path, inode, size, mtime), and the sha256
# found: files never change once written, so a writer checking the version it commits on top of
# hashes each file once, not at every commit (a rewrite in place changes the mtime).
_HASHED: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
_HASHED_KEPT = 20_000


def verify_files_once(directory: Path, files: dict[str, FileEntry]) -> None:
    """:func:`verify_file` of every file of ``files``, each hashed once per process as long as
    its identity (path, inode, size, mtime) stays the same; one error naming the files that
    differ, one line for a file missing or of the wrong size."""
    bad = []
    base = str(directory)
    for name, entry in files.items():
        path = os.path.join(base, name)  # strings, not Paths: this runs at every commit
        try:
            found = os.stat(path)
            if found.st_size != entry.bytes:
                check_size(directory, name, entry)  # says how it differs
            with _PARSED_LOCK:
                digest = _HASHED.get((path, found.st_ino, found.st_size, found.st_mtime_ns))
            if digest is None:
                with open_regular(path, "the bundle's own file") as fh:
                    found = os.fstat(fh.fileno())  # the identity of the bytes hashed
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
                if found.st_size != entry.bytes:
                    check_size(directory, name, entry)
                with _PARSED_LOCK:
                    _HASHED[(path, found.st_ino, found.st_size, found.st_mtime_ns)] = digest
                    while len(_HASHED) > _HASHED_KEPT:
                        _HASHED.popitem(last=False)
        except FileNotFoundError:
            raise LenetEmbedError(f"{path}: missing from the bundle; {REBUILD}") from None
        except OSError as exc:
            raise LenetEmbedError(f"{path}: unreadable ({exc.strerror or exc}); {REBUILD}"
                                  ) from None
        if digest != entry.sha256:
            bad.append(name)
    if bad:
        raise damaged(bad, directory)


def verify_files(directory: Path, files: dict[str, FileEntry]) -> None:
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
    others = f"; neither do {_some(names[1:])}" if len(names) > 1 else ""
    return LenetEmbedError(
        f"{directory / names[0]}: does not match {MANIFEST} (checksum){others}; the bundle is "
        f"damaged, {REBUILD}"
    )


@dataclass
class Contents:
    """What a bundle folder holds, sorted: our layout, files of format 1, and the user's own."""

    ours: list[Path] = field(default_factory=list)
    format_1: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)


def contents(directory: Path) -> Contents:
    """Sort the entries of a bundle folder (or of a folder about to become one)."""
    found = Contents()
    for entry in sorted(directory.iterdir()):
        if entry.name in LAYOUT or entry.name.startswith(STAGED_PREFIX):
            found.ours.append(entry)
        elif entry.name in FORMAT_1_FILES:
            found.format_1.append(entry)
        else:
            found.foreign.append(entry)
    return found
