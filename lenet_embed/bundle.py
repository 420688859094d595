"""What a bundle's manifest holds, defined once: typed models with every invariant readers rely
on, parsed by msgspec (the layout on disk is :mod:`.layout`, the checksums :mod:`.seal`).

Everything a manifest names is listed in its ``files`` with size and sha256; the names must stay
inside the bundle and cover exactly the files the manifest's structure needs. Every whole number
is an int64 (versions, counts, ids and sizes end up in int64 arrays or in FAISS), every real
number finite, the calibration's features a closed set and its head a matrix that reads the
bundle's embeddings, the FAISS factory one of the grammar of :mod:`.factory`. A manifest that
breaks any of this is not read from disk, and none is committed: :func:`from_dict` checks every
field's type and constraint as it converts; a model made in memory (``msgspec.structs.replace``
too, and so :meth:`Manifest.next`) checks its invariants (``__post_init__``) when made, and the
writer checks the types of what it commits with :func:`checked`, so a reader is handed nothing
it needs to check again.

Why msgspec: the CLI imports this module at every start, and msgspec imports in milliseconds,
where importing pydantic and building its validators took a tenth of a second, a fifth of a cold
``lenet-embed query``. Its strict conversion runs in compiled code, converts nothing into another
type (a "3" is no number, a true no 1), and says at which path the first error is, which
:func:`malformed` turns into one line. The service keeps pydantic for its request bodies
(FastAPI's models).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
import threading
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
import numpy as np
from msgspec import Meta
from msgspec.structs import replace

from . import layout
from .errors import LenetEmbedError
from .factory import AUTO, check_search_params, parse_factory
from .files import read_regular
from .layout import (
    CALIBRATION_DIR,
    DATA_NAME,
    DEFAULT_INDEX_DIR,
    ENCODER_FILE,
    ENCODERS_DIR,
    INDEX_FILE,
    LITERT_FILE,
    MANIFEST,
    PART,
    REBUILD,
    SEGMENT_FILES,
    SEGMENTS_DIR,
    SOURCES_FILE,
)
from .seal import SEAL, canonical, check_seal, sealed, sealed_json, some
from .seal import check_size as check_size
from .seal import damaged as damaged
from .seal import sha256_file as sha256_file
from .seal import verify_file as verify_file
from .seal import verify_files as verify_files
from .seal import verify_files_once as verify_files_once
from .store import EXTERNAL_KINDS
from .written import remember_records as remember_records
from .written import written_records as written_records


def __getattr__(name: str) -> Any:
    """The names of the layout (:mod:`.layout`), importable from here as before."""
    if name.isupper() and hasattr(layout, name):
        return getattr(layout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FORMAT_VERSION = 2
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
# ... and from the distances to the calibration's known non-digits (only with those).
NONDIGIT_FEATURES = ("log_n1", "log_nk")

# The types of a manifest's values. JSON gives ints, floats, strings, bools, lists and objects:
# msgspec's strict conversion turns none into another (a "3" is no number, a true no 1), but a
# whole number where a real one is wanted is that real number. msgspec has no "finite" constraint:
# the bounds of a float refuse infinities and (being no number, NaN is within no bounds) NaN.
Whole = Annotated[int, Meta(ge=0, le=INT64_MAX)]
_LARGEST = sys.float_info.max
Real = Annotated[float, Meta(ge=-_LARGEST, le=_LARGEST)]
Positive = Annotated[float, Meta(gt=0, le=_LARGEST)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
# What msgspec says of those bounds, and what a person reading the error wants to hear.
_SAID_OF_BOUNDS = {f"`float` >= {-_LARGEST!r}": "a finite `float`",
                   f"`float` <= {_LARGEST!r}": "a finite `float`"}

# Names a manifest holds, each all of its pattern (checked by the models' ``__post_init__``, which
# says what the name is not; a ``Meta(pattern=...)`` would quote the regex to the user).
_NAME = re.compile(PART)
_FILE_NAME = re.compile(DATA_NAME)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENCODER_FOLDER = re.compile(rf"{ENCODERS_DIR}/{PART}")
_NONDIGITS_FILE = re.compile(rf"{CALIBRATION_DIR}/{PART}\.npy")


def _check_name(pattern: re.Pattern[str], value: str, what: str, field: str = "") -> None:
    """Refuse ``value`` unless it is all of ``pattern``, saying that it is not ``what``
    (``field``, the name of a manifest's own field, goes first: a field of a nested model is
    named by where the model is)."""
    if pattern.fullmatch(value) is None:
        raise ValueError(f"{field}{': ' if field else ''}{value[:60]!r} is not {what}")


def _lines_of(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """Lines each all of ``pattern`` (which matches no newline)."""
    return re.compile(rf"(?:{pattern.pattern})(?:\n(?:{pattern.pattern}))*")


def _all_match(lines: re.Pattern[str], values: list[str]) -> bool:
    """Whether every one of ``values`` is a line of ``lines`` (:func:`_lines_of`): one regex over
    them all, joined (a manifest names every file, and is made again at every commit)."""
    joined = "\n".join(values)
    return joined.count("\n") == len(values) - 1 and lines.fullmatch(joined) is not None


_FILE_NAMES, _SHA256S = _lines_of(_FILE_NAME), _lines_of(_SHA256)


class _Model(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A part of a manifest: immutable, with no field beyond those declared."""


@functools.cache
def package_version() -> str:
    """The installed lenet-embed version."""
    try:
        return version("lenet-embed")
    except PackageNotFoundError:
        return "unknown"


class FileEntry(_Model):
    """A file a manifest names: its size and sha256."""

    bytes: Whole
    sha256: str  # in hex: checked by the manifest, which can say of which file


class Segment(_Model):
    """An immutable set of rows: their vectors, ids, labels, images (and sources). A sealed
    segment (from a build or a compaction) is a folder of arrays and its FAISS index; an unsealed
    one (from ``add``) is a single ``.npy`` file of :func:`row_dtype` records, searched exactly."""

    name: str
    rows: Whole
    sealed: bool
    has_sources: bool = False

    def __post_init__(self) -> None:
        _check_name(_NAME, self.name, "a name inside the bundle")

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


class Store(_Model):
    """Where a bundle's items live when not in its own segments: a collection of an external
    vector database of one of :data:`lenet_embed.store.EXTERNAL_KINDS`. ``uri`` is the
    database's address (or a file relative to the bundle, for an embedded one); ``index`` is
    the database's index type."""

    kind: str
    uri: str
    collection: str
    index: str

    def __post_init__(self) -> None:
        if self.kind not in EXTERNAL_KINDS:
            raise ValueError(f"unknown store kind {self.kind[:40]!r}; this version knows "
                             f"{', '.join(EXTERNAL_KINDS)}")
        _check_name(_NAME, self.collection, "a name for a collection")


class LogisticModel(_Model):
    """A logistic model over named features: log-odds = sum(weights * (x - mean) / scale) +
    bias (:mod:`.calibration` defines the features)."""

    features: list[str]
    mean: list[Real]
    scale: list[Positive]
    weights: list[Real]
    bias: Real

    def __post_init__(self) -> None:
        if not len(self.mean) == len(self.scale) == len(self.weights) == len(self.features):
            raise ValueError("a calibration model needs one mean, scale and weight per feature")


# dict: room for the cached properties below; omit_defaults: a calibration without non-digits is
# written as before they were added.
class Calibration(_Model, dict=True, omit_defaults=True):
    """What turns a query's ``k`` nearest neighbours into a confidence and a verdict
    (:mod:`.calibration` fits and applies it; index/README.md documents the fields).

    ``ood`` gives the out-of-distribution score (log-odds of "not like the items"), answered
    when at most ``ood_thresholds[default_keep]``; ``ood_thresholds`` maps each operating point
    (the fraction of held-out items kept, as text: "0.995") to its threshold. ``confidence``
    gives P(predicted label is right) after a sigmoid; answered when at least ``min_confidence``.
    ``head_weights`` (84 x classes) and ``head_bias`` are the classifier head whose logits some
    features use (None when the bundle's model had none). ``nondigits`` names the file of the
    known non-digits' embeddings (``calibration/<name>.npy``, float32 unit rows) whose distances
    some features use (None in a calibration without them). ``fitted_on`` counts what was fitted
    on.
    """

    k: Annotated[int, Meta(ge=1, le=MAX_CALIBRATION_K)]
    ood: LogisticModel
    confidence: LogisticModel
    ood_thresholds: dict[str, Real]
    default_keep: str
    min_confidence: Fraction
    head_weights: Annotated[list[list[Real]], Meta(min_length=1)] | None
    head_bias: Annotated[list[Real], Meta(min_length=1)] | None
    fitted_on: dict[str, Whole]
    nondigits: str | None = None

    def __post_init__(self) -> None:
        if self.nondigits is not None:
            _check_name(_NONDIGITS_FILE, self.nondigits,
                        f"a file in {CALIBRATION_DIR}/ of the bundle", "calibration.nondigits")
        if self.default_keep not in self.ood_thresholds:
            raise ValueError("calibration default_keep must be one of its ood_thresholds")
        if (self.head_weights is None) != (self.head_bias is None):
            raise ValueError("calibration head needs both weights and bias")
        if self.head_weights is not None and any(
                len(row) != len(self.head_bias or ()) for row in self.head_weights):
            raise ValueError("calibration head must be a matrix with one column per bias")
        allowed = (PLAIN_FEATURES + (HEAD_FEATURES if self.head_weights else ())
                   + (NONDIGIT_FEATURES if self.nondigits else ()))
        for model in (self.ood, self.confidence):
            unknown = [name for name in model.features if name not in allowed]
            if unknown:
                raise ValueError(f"calibration feature {unknown[0][:40]!r} is not one of "
                                 f"{', '.join(allowed)}")

    @functools.cached_property
    def json_data(self) -> dict[str, Any]:
        """The calibration as JSON-ready data, made once: every commit writes it again.
        Shared: read it, never change it."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @functools.cached_property
    def canonical_json(self) -> str:
        """:attr:`json_data` as canonical JSON, made once: serialising the head's numbers took
        a fifth of a single add's time, at every commit."""
        return canonical(self.json_data)

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


def row_dtype(dim: int, source_chars: int = 0) -> np.dtype:
    """The record of one row in an unsealed segment's single ``.npy`` file (``source_chars`` > 0
    adds the source path, "" for none)."""
    fields = [("id", "<i8"), ("label", "<i8"), ("vector", "<f4", (dim,)),
              ("image", "u1", (28, 28))]
    if source_chars:
        fields.append(("source", f"<U{source_chars}"))
    return np.dtype(fields)


class Manifest(_Model):
    """One version of a bundle: what it holds, how it is searched, and every file it consists of.

    ``count`` is the number of live items, ``rows`` the number stored (live + removed, until a
    compaction drops the removed ones). ``next_id`` is the id the next added item gets: ids are
    never reused, and every stored one is below it (the load checks the stored ids against it).
    """

    version: Whole
    operation: str
    created_at: str
    committed_at: str
    lenet_embed_version: str
    dim: Annotated[int, Meta(ge=1, le=MAX_DIM)]
    metric: Literal["cosine", "l2"]
    factory: str
    search_params: dict[str, Any]  # checked against the factory: factory.py
    dataset: dict[str, Any]
    classes: list[str]
    encoder: str
    segments: list[Segment]
    deletions: str | None
    count: Whole
    rows: Whole
    next_id: Whole
    files: dict[str, FileEntry]
    format_version: Whole = FORMAT_VERSION
    target_recall: Annotated[float, Meta(gt=0, le=1)] | None = None
    store: Store | None = None
    factory_reason: str | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        _check_name(_ENCODER_FOLDER, self.encoder, "a folder under encoders/", "encoder")
        names, sums = list(self.files), [entry.sha256 for entry in self.files.values()]
        if not (_all_match(_FILE_NAMES, names) and _all_match(_SHA256S, sums)):
            for name, entry in self.files.items():  # which one, and what it is not
                _check_name(_FILE_NAME, name, "a name inside the bundle", "files")
                _check_name(_SHA256, entry.sha256, "a sha256 in hex", f"files.{name}.sha256")
        self._searchable()
        self._counted()
        self._listed()

    def _searchable(self) -> None:
        # The factory is parsed before FAISS ever sees it (a compaction builds it again); a
        # bundle whose items are in an external store may name none ("auto").
        if not (self.store is not None and self.factory == AUTO):
            check_search_params(self.search_params, parse_factory(self.factory, self.dim))
        elif self.search_params:
            raise ValueError("search_params need a factory")
        if self.calibration is not None and self.calibration.head_weights is not None \
                and len(self.calibration.head_weights) != self.dim:
            raise ValueError(f"calibration head must have {self.dim} rows of weights, one per "
                             "embedding dimension")

    def _counted(self) -> None:
        if self.store is not None:
            if self.segments or self.deletions is not None or self.rows != self.count:
                raise ValueError("a bundle whose items are in an external store has no segments")
        elif self.rows != sum(s.rows for s in self.segments) or self.count > self.rows:
            raise ValueError("count and rows disagree with the segments")
        if (self.deletions is None) != (self.count == self.rows):
            raise ValueError("removed rows need a deletions file, and only they")
        if self.rows > self.next_id:
            raise ValueError("next_id must be above every id, so at least rows")

    def _listed(self) -> None:
        if len({s.name for s in self.segments}) != len(self.segments):
            raise ValueError("two segments share a name")
        needed = self.required_files()
        if set(self.files) != needed:
            extra = sorted(set(self.files) - needed)
            lacking = sorted(needed - set(self.files))
            raise ValueError(
                "its file list does not match its contents"
                + (f"; unlisted: {some(lacking)}" if lacking else "")
                + (f"; not needed: {some(extra)}" if extra else "")
            )

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
        if self.calibration is not None and self.calibration.nondigits is not None:
            needed.add(self.calibration.nondigits)
        return needed

    def next(self, operation: str, **changes: Any) -> Manifest:
        """The manifest of the version after this one, with ``changes`` applied; its invariants
        are checked as it is made (a ``ValueError`` when it breaks one), its fields' types when
        it is committed (:func:`checked`)."""
        return replace(self, version=self.version + 1, operation=operation,
                       lenet_embed_version=package_version(), **changes)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (new containers), except the calibration's, which is
        shared (:attr:`Calibration.json_data`)."""
        fields = msgspec.structs.asdict(self)
        calibration = fields.pop("calibration")
        data: dict[str, Any] = msgspec.to_builtins(fields)
        data["calibration"] = None if calibration is None else calibration.json_data
        return data


def checked(manifest: Manifest, **changes: Any) -> Manifest:
    """``manifest`` (with ``changes``, JSON-ready values) as a reader would read it back: every
    field's type and constraint checked as :func:`from_dict` checks them (a
    ``msgspec.ValidationError`` naming the first one broken), and made what its type says (an
    int where a real is wanted is that real).

    msgspec checks types when it converts, not when a model is made in memory (only
    ``__post_init__`` runs then): the writer checks each manifest it commits with this. The
    calibration, the same from commit to commit, is checked but kept, with what it cached."""
    data = {**manifest.to_dict(), **changes}
    if manifest.calibration is not None:
        msgspec.convert(data["calibration"], Calibration, strict=True)
    data["calibration"] = manifest.calibration  # a model already: taken as it is
    return msgspec.convert(data, Manifest, strict=True)


def from_dict(data: Any, where: str, text: str | None = None) -> Manifest:
    """Check and parse a manifest's JSON data; ``where`` names it in errors; ``text``, the JSON
    it was parsed from, if known (its seal is then checked on it as it is)."""
    if not isinstance(data, dict):
        raise LenetEmbedError(f"{where}: not a manifest; {REBUILD}")
    found = data.get("format_version")
    if found != FORMAT_VERSION:
        raise LenetEmbedError(
            f"{where}: bundle format {str(found)[:20]} is not supported by this lenet-embed "
            f"(format {FORMAT_VERSION}); {REBUILD}"
        )
    check_seal(data, where, text)
    try:
        return msgspec.convert({k: v for k, v in data.items() if k != SEAL}, Manifest,
                               strict=True)
    except msgspec.ValidationError as exc:
        raise malformed(where, exc) from None


# How msgspec says where an error is: "- at `$.segments[0].rows`", or "- at `key` in `$.files`".
_AT = re.compile(r"(?P<message>.*?)(?: - at `(?:key` in `)?\$(?P<path>[^`]*)`)?", re.DOTALL)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_ENUM = re.compile(r"Invalid enum value (?P<value>.*)", re.DOTALL)


def malformed(where: str, problem: Exception) -> LenetEmbedError:
    """The one-line error for a manifest that is not what readers accept: for a msgspec
    ``ValidationError``, where its error is and what it says."""
    found = _AT.fullmatch(str(problem)) if isinstance(problem, msgspec.ValidationError) else None
    if found is None:
        return LenetEmbedError(f"{where}: malformed manifest ({problem}); {REBUILD}")
    message, path = found["message"], found["path"] or ""
    missing = _MISSING.fullmatch(message)
    if missing and not path:
        return LenetEmbedError(f"{where}: manifest lacks {missing['field']}; {REBUILD}")
    for said, meant in _SAID_OF_BOUNDS.items():
        message = message.replace(said, meant)
    enum = _ENUM.fullmatch(message)
    if enum and re.fullmatch(r"\.\w+", path):  # a field of the manifest itself: say its choices
        choices = get_args(next(f.type for f in msgspec.structs.fields(Manifest)
                                if f.name == path[1:]))
        message = f"{enum['value']} is not one of {', '.join(map(str, choices))}"
    # "$.segments[0].rows" as "segments.0.rows"; a value of an object ("[...]") stays so.
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]|(\[\.\.\.\])", path)
    place = ".".join((name or index or value)[:40] for name, index, value in parts)
    place = place.replace(".[...]", "[...]")
    message = message[:1].lower() + message[1:]
    message = f"{place}: {message}" if place else message
    return LenetEmbedError(f"{where}: malformed manifest ({message[:300]}); {REBUILD}")


# Manifests recently parsed or committed, by their text: a writer that commits many times in a
# row reads back what it wrote, and a reader refreshing reads the same text again and again.
_PARSED: OrderedDict[str, Manifest] = OrderedDict()
_PARSED_KEPT = 8
_PARSED_LOCK = threading.Lock()  # the service refreshes from several threads


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
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LenetEmbedError(f"{where}: unreadable manifest ({exc}); {REBUILD}") from None
    return remember_manifest(text, from_dict(data, where, text))


def remember_manifest(text: str, manifest: Manifest) -> Manifest:
    """Note that ``text`` is the JSON of ``manifest`` (checked), so reading it costs no parse."""
    with _PARSED_LOCK:
        _PARSED[text] = manifest
        _PARSED.move_to_end(text)
        while len(_PARSED) > _PARSED_KEPT:
            _PARSED.popitem(last=False)
    return manifest


_SLOT = "\0calibration\0"  # stands in for the calibration's text while a manifest is serialised


def manifest_json(manifest: Manifest) -> str:
    """A manifest as the JSON text written to disk (sealed with its checksum). The calibration,
    the same from commit to commit, goes in as the canonical text it keeps."""
    body = manifest.to_dict()
    if manifest.calibration is None:
        return sealed_json(body)
    body["calibration"] = _SLOT
    # The slot is the first occurrence: "calibration" sorts first, and no name holds a NUL.
    text = canonical(body).replace(canonical(_SLOT), manifest.calibration.canonical_json, 1)
    return sealed(text)
