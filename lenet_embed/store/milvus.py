"""Items kept in a Milvus collection instead of the bundle's own segments: the second store
(:class:`MilvusSnapshot` reads, :class:`Milvus` writes, :class:`MilvusBuild` builds), over one
connection, :class:`MilvusStore`.

A bundle built with ``--store milvus`` still holds its manifest and its encoder; the manifest's
``store`` names the Milvus deployment and the collection that holds the items (id, vector,
label, image, source). The same ``MilvusClient`` API reaches every deployment:

- a **Milvus Lite** file (``./digits.db``): embedded, opened by one process at a time (Milvus
  Lite locks the file). A relative path is kept relative to the bundle, so the two move together.
- a **Milvus server** (``http://host:19530``, ``python -m milvus_lite server``, or a cluster),
  with a token from ``$LENET_EMBED_MILVUS_TOKEN`` when it needs one.

A bundle may come from anyone, so what its manifest names is not trusted (:func:`allowed_uri`,
checked before every connection): a Milvus server is used only when the operator named it
(``--milvus-uri``, :func:`allow_uri`, ``build_index(store_uri=...)`` or
``$LENET_EMBED_MILVUS_URI``), so the token never goes to a host a bundle chose; a Milvus Lite
file only inside the bundle's folder, or where the operator named it. Reads never create a
Milvus Lite file.

Milvus makes an insert or a delete visible by itself (the collection is created with strong
consistency); the bundle's manifest, committed after it under the writer lock, keeps the count
and the next id, so ids are still never reused. Rows that a killed writer inserted but never
committed (ids at or above the manifest's ``next_id``) are deleted by the next writer.

Each snapshot holds its connection and hands it on to the next version it is refreshed to; each
write connects for the length of its commit (a Milvus Lite file runs once in a process, however
many clients it has).
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from .._quiet import is_verbose
from ..ann import exact_scores
from ..bundle import MANIFEST, REBUILD, Manifest, Store
from ..errors import LenetEmbedError
from ..files import open_regular
from . import Backend, Build, Changes, Found, Progress, Snapshot

if TYPE_CHECKING:
    from ..writer import BundleWriter

log = logging.getLogger(__name__)

EXTRA = 'pip install "lenet-embed[milvus]"'
REBUILD_MILVUS = "rebuild it with `lenet-embed build-index --store milvus`"
TOKEN_ENV = "LENET_EMBED_MILVUS_TOKEN"
URI_ENV = "LENET_EMBED_MILVUS_URI"
INDEX_TYPES = ("AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ")
# Milvus's HNSW searches with ef = k unless told: too few for recall on small k.
MIN_EF = 64
# Anything shaped like a URL is a server address, parsed strictly (server_address); the rest is
# a Milvus Lite path.
_SERVER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEMES = ("http", "https", "tcp")  # what pymilvus connects to (besides unix sockets)
_NETLOC = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DATABASE = re.compile(r"/?|/[A-Za-z_][A-Za-z0-9_]{0,254}/?")  # pymilvus: a path names a database
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SOURCE_CHARS = 4096
# Rows per insert call (Milvus caps one gRPC message at 64 MB; a row is about 1.5 KB).
_BATCH = 5000
_CONNECT_TIMEOUT = 30  # seconds pymilvus waits for a server to answer
_FIELDS = ("id", "label", "source")


def is_server(uri: str) -> bool:
    """True for a server address (anything shaped like a URL), False for a Milvus Lite file."""
    return bool(_SERVER.match(uri))


def server_address(uri: str) -> str:
    """A Milvus server URI parsed strictly, as ``scheme://host:port[/database]`` (lower case, the
    port pymilvus would use when none is given): what two spellings of one server share.

    Raises ValueError saying what is wrong: a scheme other than http, https or tcp; no host;
    credentials, a query or a fragment; whitespace, control or non-ASCII characters."""
    if not re.fullmatch(r"[!-~]+", uri):
        raise ValueError("it holds whitespace, control or non-ASCII characters")
    if "@" in uri:
        raise ValueError(f"credentials do not go in the URI: put the token in ${TOKEN_ENV}")
    if any(c in uri for c in "?#\\"):
        raise ValueError("a server URI has no query, fragment or backslash")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError("the scheme must be http, https or tcp")
    netloc = _NETLOC.fullmatch(parts.netloc)
    if netloc is None:
        raise ValueError("it needs a host, and a port from 1 to 65535 if any")
    host, port = netloc["host"].lower(), netloc["port"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
    elif not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"{host} is not a host name")
    number = int(port) if port else (443 if scheme == "https" else 19530)
    if not 1 <= number <= 65535:
        raise ValueError("the port must be from 1 to 65535")
    if not _DATABASE.fullmatch(parts.path):
        raise ValueError("the only path a server URI takes is a database name")
    return f"{scheme}://{host}:{number}{parts.path.rstrip('/')}"


def lite_path(uri: str, base: Path) -> Path:
    """A Milvus Lite file (``*.db``) as an absolute path, relative ones from ``base``, symlinks
    resolved. Raises ValueError for what is not one."""
    if _CONTROL.search(uri) or not uri.endswith(".db"):
        raise ValueError("a Milvus Lite file is a path ending in .db, without control characters")
    return (base / uri).resolve()


def stored_uri(uri: str, bundle: Path) -> str:
    """The URI as the manifest keeps it: a Milvus Lite file relative to the bundle."""
    if is_server(uri):
        return uri
    return os.path.relpath(Path(uri).resolve(), bundle.resolve())


# The Milvus deployments the operator named in this process (server_address or lite_path forms).
_NAMED: set[str] = set()
_NAMED_LOCK = threading.Lock()


def _named_form(uri: str) -> str:
    return server_address(uri) if is_server(uri) else str(lite_path(uri, Path.cwd()))


def allow_uri(uri: str) -> str:
    """Name a Milvus deployment this process may connect to (and send its token to) when a
    bundle's manifest names it: a server URI, or a Milvus Lite file (relative to the working
    folder). ``--milvus-uri`` and ``build_index(store_uri=...)`` call it. Returns the URI in
    its checked form; a URI that does not parse strictly is a :class:`LenetEmbedError`."""
    try:
        form = _named_form(uri)
    except ValueError as exc:
        raise LenetEmbedError(f"{_shown(uri)} is not a Milvus URI ({exc})") from None
    with _NAMED_LOCK:
        _NAMED.add(form)
    return form


def _named() -> set[str]:
    """What the operator named: in this process, and in ``$LENET_EMBED_MILVUS_URI``
    (comma-separated, read at every check)."""
    named = set()
    for entry in filter(None, (e.strip() for e in os.environ.get(URI_ENV, "").split(","))):
        try:
            named.add(_named_form(entry))
        except ValueError as exc:
            raise LenetEmbedError(f"${URI_ENV}: {_shown(entry)} is not a Milvus URI ({exc}); "
                                  "fix or remove it") from None
    with _NAMED_LOCK:
        return named | _NAMED


def _shown(text: str) -> str:
    """A URI from outside as it can be printed on one line."""
    return repr(text[:200] + ("..." if len(text) > 200 else ""))


def allowed_uri(uri: str, bundle: Path) -> str:
    """What to connect to for a bundle whose manifest names ``uri``, checked before any
    connection. The promise: a server is used only when the operator named it (:func:`allow_uri`,
    ``$LENET_EMBED_MILVUS_URI``), so no token follows a manifest; a Milvus Lite file only inside
    the bundle's folder (after resolving symlinks) or where the operator named it. Anything
    else is a one-line :class:`LenetEmbedError` naming the URI and how to allow it."""
    where = bundle / MANIFEST
    how = f"if you trust it, pass --milvus-uri {{}} or add it to ${URI_ENV}"
    if is_server(uri):
        try:
            form = server_address(uri)
        except ValueError as exc:
            raise LenetEmbedError(f"{where}: store.uri {_shown(uri)} is not a Milvus server URI "
                                  f"({exc}); {REBUILD}") from None
        if form in _named():
            return uri
        raise LenetEmbedError(f"{where}: names the Milvus server {uri}, which you have not "
                              "named (a Milvus token goes only to a server you name); "
                              + how.format(uri))
    try:
        path = lite_path(uri, bundle)
    except ValueError as exc:
        raise LenetEmbedError(f"{where}: store.uri {_shown(uri)} is not a Milvus Lite file "
                              f"({exc}); {REBUILD}") from None
    if path.is_relative_to(bundle.resolve()) or str(path) in _named():
        return str(path)
    raise LenetEmbedError(f"{where}: names the Milvus Lite file {path}, outside the bundle; "
                          + how.format(path))


# A token is one line; more than this of a token file is never read.
_TOKEN_FILE_BYTES = 64 * 1024


def token_from_file(path: str | os.PathLike[str]) -> str:
    """A Milvus token: the first line of ``path``."""
    try:
        with open_regular(path, "a file holding the Milvus token") as fh:  # a FIFO would block
            lines = fh.read(_TOKEN_FILE_BYTES).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LenetEmbedError(f"{path}: cannot read the Milvus token ({exc})") from None
    if not lines or not lines[0].strip():
        raise LenetEmbedError(f"{path}: empty; put the Milvus token on its first line")
    return lines[0].strip()


# pymilvus and Milvus Lite log each failure with a traceback (and gRPC an unimplemented call
# Milvus Lite answers at every connection); the one-line errors here say what matters, and
# --verbose lets the rest through.
_NOISY_LOGGERS = ("pymilvus", "milvus_lite", "grpc._server")


def _client(uri: str, token: str | None, create: bool = False) -> Any:
    """A client of ``uri`` (checked by :func:`allowed_uri` or named by the operator). A Milvus
    Lite file is opened only when it exists, unless ``create``: Milvus Lite would make one."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise LenetEmbedError(f"the Milvus store needs pymilvus and milvus-lite; {EXTRA}"
                              ) from None
    if not is_verbose():
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if is_server(uri):
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    else:
        token = ""  # Milvus Lite runs in this process: it has no use for a token
        if not create and not Path(uri).exists():
            raise LenetEmbedError(f"{uri}: no Milvus Lite file there, and the bundle's items "
                                  f"were in it; {REBUILD_MILVUS}")
    try:
        return MilvusClient(uri=uri, token=token, timeout=_CONNECT_TIMEOUT)
    except Exception as exc:  # pymilvus raises its own types, or gRPC's, or OSError
        raise LenetEmbedError(_connect_error(uri, exc)) from None


def _connect_error(uri: str, exc: Exception) -> str:
    if is_server(uri):
        return (f"cannot reach Milvus at {uri} ({_first_line(exc)}); start the server or fix "
                f"--milvus-uri (a token goes in ${TOKEN_ENV})")
    return (f"{uri}: cannot open this Milvus Lite file ({_first_line(exc)}); a Milvus Lite "
            "file is open in one process at a time: stop the other one (a running `serve`?), "
            f"or serve the file with `python -m milvus_lite server --data-dir {uri}` and use "
            "--milvus-uri http://127.0.0.1:19530")


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _milvus_metric(metric: str) -> str:
    return "COSINE" if metric == "cosine" else "L2"


def _encode_image(image: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).decode()


def _decode_image(text: Any) -> np.ndarray | None:
    """A stored digit, or None when the text is not one (a collection changed by hand)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        return None
    return np.frombuffer(data, dtype=np.uint8).reshape(28, 28).copy() if len(data) == 784 else None


class MilvusStore:
    """One collection of a Milvus deployment, holding a bundle's items."""

    def __init__(self, uri: str, collection: str, metric: str, dim: int,
                 token: str | None = None, create: bool = False) -> None:
        self.uri = uri
        self.collection = collection
        self.metric = metric
        self.dim = dim
        self._client = _client(uri, token, create)

    def _call(self, what: str, method: str | Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
        """A client call (a method's name, or a callable from the client) whose failure becomes
        one line naming the collection and the step."""
        call = method if callable(method) else getattr(self._client, method)
        try:
            return call(*args, **kwargs)
        except LenetEmbedError:
            raise
        except Exception as exc:
            raise LenetEmbedError(f"Milvus at {self.uri}, collection {self.collection}: {what} "
                                  f"failed ({_first_line(exc)})") from None

    # ----------------------------------------------------------------------- the collection

    def exists(self) -> bool:
        """Whether the collection exists."""
        return bool(self._call("listing collections", "has_collection", self.collection))

    def create(self, index_type: str) -> None:
        """Create the (empty) collection with its vector index."""
        from pymilvus import DataType

        if index_type not in INDEX_TYPES:
            raise LenetEmbedError(f"Milvus index {index_type!r} is not one of "
                                  f"{', '.join(INDEX_TYPES)}")
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("label", DataType.INT64)
        schema.add_field("image", DataType.VARCHAR, max_length=2 * 28 * 28)
        schema.add_field("source", DataType.VARCHAR, max_length=_SOURCE_CHARS)
        params = self._client.prepare_index_params()
        params.add_index(field_name="vector", index_type=index_type,
                         metric_type=_milvus_metric(self.metric))
        self._call("creating the collection", "create_collection", self.collection,
                   schema=schema, index_params=params, consistency_level="Strong")

    def load(self) -> None:
        """Load the collection for searching (Milvus releases it when its process ends)."""
        if not self.exists():
            raise LenetEmbedError(f"Milvus at {self.uri} has no collection {self.collection}; "
                                  f"the bundle's items are gone from there, {REBUILD_MILVUS}")
        self._call("loading the collection", "load_collection", self.collection)

    def schema_problem(self) -> str | None:
        """What is wrong with the collection's fields (None: what :meth:`create` makes)."""
        described = self._call("describing the collection", "describe_collection",
                               self.collection)
        fields = {field.get("name"): field for field in described.get("fields", [])}
        if set(fields) != {"id", "vector", "label", "image", "source"}:
            return f"its fields are {', '.join(sorted(map(str, fields)))}"
        dim = fields["vector"].get("params", {}).get("dim")
        if dim is None or int(dim) != self.dim:
            return f"its vectors have {dim} dimensions, not {self.dim}"
        return None

    def drop(self) -> None:
        """Drop the collection, if it exists."""
        if self.exists():
            self._call("dropping the collection", "drop_collection", self.collection)

    def close(self) -> None:
        """Close the connection (a Milvus Lite file is unlocked for other processes)."""
        self._client.close()

    # ----------------------------------------------------------------------- writes

    def insert(self, ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray,
               images: np.ndarray, sources: Sequence[str | None] | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> None:
        """Insert rows (vectors as indexed; labels as codes, -1 for none), reporting
        ``on_progress(done, total)`` after each batch."""
        for start in range(0, len(ids), _BATCH):
            stop = start + _BATCH
            rows = [
                {"id": int(item), "vector": vector, "label": int(label),
                 "image": _encode_image(image),
                 "source": (sources[start + i] or "") if sources is not None else ""}
                for i, (item, vector, label, image) in enumerate(zip(
                    ids[start:stop].tolist(), vectors[start:stop], labels[start:stop].tolist(),
                    images[start:stop], strict=True))
            ]
            for row in rows:
                if len(row["source"]) > _SOURCE_CHARS:
                    raise LenetEmbedError(f"{row['source'][:80]}...: source path longer than "
                                          f"{_SOURCE_CHARS} characters")
            self._call("inserting items", "insert", self.collection, rows)
            if on_progress is not None:
                on_progress(min(stop, len(ids)), len(ids))

    def delete(self, ids: np.ndarray) -> np.ndarray:
        """Delete rows by id; return the ids that existed."""
        present = self.present(ids)
        if len(present):
            self._call("removing items", "delete", self.collection, ids=present.tolist())
        return present

    def delete_from(self, first_id: int) -> None:
        """Delete every row whose id is ``first_id`` or above (a killed writer's rows)."""
        self._call("removing uncommitted items", "delete", self.collection,
                   filter=f"id >= {int(first_id)}")

    def compact(self) -> None:
        """Ask Milvus to compact the collection (it drops deleted rows in the background)."""
        self._call("compacting", "compact", self.collection)

    # ----------------------------------------------------------------------- reads

    def count(self, where: str = "") -> int:
        """The number of rows in the collection (that match the filter ``where``)."""
        result = self._call("counting items", "query", self.collection, filter=where,
                            output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def get(self, ids: Sequence[int], fields: Sequence[str]) -> list[dict[str, Any]]:
        """The given fields of the rows with these ids (those that exist)."""
        return list(self._call("reading items", "get", self.collection,
                               ids=[int(i) for i in ids], output_fields=list(fields)))

    def batches(self, where: str, fields: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
        """The given fields of every row matching ``where``, a batch at a time (Milvus's own
        iterator: it caps what one query may return)."""
        rows = self._call("reading items", "query_iterator", self.collection, batch_size=1000,
                          filter=where, output_fields=list(fields))
        try:
            while batch := self._call("reading items", rows.next):
                yield list(batch)
        finally:
            rows.close()

    def present(self, ids: np.ndarray) -> np.ndarray:
        """Those of ``ids`` that are in the collection."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        found: list[int] = []
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start:start + _BATCH].tolist()
            found.extend(int(row["id"]) for row in self.get(chunk, ["id"]))
        return np.array(sorted(found), dtype=np.int64)

    def image(self, item_id: int) -> np.ndarray | None:
        """The stored digit of an item (uint8 28x28), or None when there is no such item."""
        rows = self.get([item_id], ["image"])
        if not rows:
            return None
        image = _decode_image(rows[0]["image"])
        if image is None:
            raise LenetEmbedError(f"Milvus at {self.uri}, collection {self.collection}: item "
                                  f"{item_id}'s image is not a 28x28 digit; {REBUILD_MILVUS}")
        return image

    def search(self, vectors: np.ndarray, k: int, params: dict[str, int] | None = None,
               below: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str | None]]]:
        """The ``k`` nearest rows of each (prepared) vector: distances (1 - cosine, or L2),
        ids, label codes (n, k; padded with +inf, -1, -1) and source paths. ``params`` are the
        index's search parameters (``ef``, ``nprobe``); ``below``: only ids under it (a
        version's committed items, not rows a writer is adding)."""
        answers = self._call("searching", "search", self.collection, data=vectors, limit=k,
                             output_fields=list(_FIELDS[1:]), anns_field="vector",
                             search_params={"params": dict(params or {})},
                             filter="" if below is None else f"id < {int(below)}")
        n = len(vectors)
        distances = np.full((n, k), np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        labels = np.full((n, k), -1, dtype=np.int64)
        sources: list[list[str | None]] = []
        for row, hits in enumerate(answers):
            found: list[str | None] = []
            for rank, hit in enumerate(hits[:k]):
                score = float(hit["distance"])
                distances[row, rank] = (max(1.0 - score, 0.0) if self.metric == "cosine"
                                        else np.sqrt(max(score, 0.0)))
                ids[row, rank] = int(hit["id"])
                labels[row, rank] = int(hit["entity"]["label"])
                found.append(hit["entity"]["source"] or None)
            sources.append(found)
        return distances, ids, labels, sources


def index_type(factory: str) -> str:
    """The Milvus index for a FAISS factory string: the same family (Milvus builds and tunes
    its own), AUTOINDEX for anything else (``auto``)."""
    parts = factory.upper().replace(" ", "").split(",")
    if parts == ["FLAT"]:
        return "FLAT"
    if parts[0].startswith("HNSW"):
        return "HNSW"
    if parts[0].startswith("IVF"):
        tail = ",".join(parts[1:])
        return "IVF_PQ" if tail.startswith("PQ") else "IVF_SQ8" if "SQ8" in tail else "IVF_FLAT"
    return "AUTOINDEX"


def open_store(directory: Path, manifest: Manifest, token: str | None = None) -> MilvusStore:
    """A new connection to the collection a manifest names, once :func:`allowed_uri` allows it,
    loaded for searching."""
    ref = manifest.store
    if ref is None:
        raise LenetEmbedError(f"{directory}: this bundle keeps its items itself, not in Milvus")
    store = MilvusStore(allowed_uri(ref.uri, directory), ref.collection, manifest.metric,
                        manifest.dim, token)
    store.load()
    return store


class MilvusSnapshot(Snapshot):
    """One version of a bundle whose items are in Milvus: its manifest and encoder, and the
    collection. Milvus shows every committed write at once, so searches see only the ids below
    the manifest's ``next_id`` (what this version committed; a writer's newer rows are not)."""

    has_sources = True

    def __init__(self, directory: Path, manifest: Manifest, encoder: Any,
                 search_params: dict[str, int] | None, store: MilvusStore) -> None:
        super().__init__(directory, manifest, encoder, search_params)
        self.store = store

    def hits(self, vectors: np.ndarray, k: int) -> Found:
        """Distances, ids and label codes (n, k) of the nearest items, and their sources."""
        ef = max(MIN_EF, k, int(self.search_params.get("efSearch", 0)))
        return Found(*self.store.search(vectors, k, {"ef": ef, "nprobe": int(
            self.search_params.get("nprobe", 16))}, below=self.manifest.next_id))

    def image_of(self, item_id: int) -> np.ndarray | None:
        """The stored digit of an item, or None."""
        if not 0 <= item_id < self.manifest.next_id:
            return None
        return self.store.image(item_id)

    def label_code_of(self, item_id: int) -> int | None:
        """The stored label code of an item, or None."""
        if not 0 <= item_id < self.manifest.next_id:
            return None
        rows = self.store.get([item_id], ["label"])
        return int(rows[0]["label"]) if rows else None

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and label codes of every committed item, in id order."""
        ids: list[int] = []
        labels: list[int] = []
        for rows in self.store.batches(f"id < {self.manifest.next_id}", ["id", "label"]):
            ids.extend(int(row["id"]) for row in rows)
            labels.extend(int(row["label"]) for row in rows)
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        return (np.asarray(ids, dtype=np.int64)[order],
                np.asarray(labels, dtype=np.int64)[order])

    def images_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored digits of items: uint8 (len(ids), 28, 28)."""
        wanted = np.asarray(ids, dtype=np.int64).tolist()
        found: dict[int, Any] = {}
        for start in range(0, len(wanted), _BATCH):
            chunk = [i for i in wanted[start:start + _BATCH] if 0 <= i < self.manifest.next_id]
            found.update((int(row["id"]), row["image"])
                         for row in self.store.get(chunk, ["id", "image"]))
        out = np.empty((len(wanted), 28, 28), dtype=np.uint8)
        for position, item_id in enumerate(wanted):
            image = _decode_image(found.get(item_id))
            if image is None:
                raise LenetEmbedError(f"{self.directory}: Milvus collection "
                                      f"{self.store.collection} has no digit for item "
                                      f"{item_id}; {REBUILD_MILVUS}")
            out[position] = image
        return out
    def check_count(self) -> None:
        """Check that the collection holds the items the manifest counts. Fewer is what a
        removal killed before its commit leaves (a warning: the next write puts the count
        right); more cannot come from a writer and means the collection was changed by hand."""
        found = self.store.count(f"id < {self.manifest.next_id}")
        if found < self.manifest.count:
            log.warning("%s: Milvus collection %s holds %d items, the manifest counts %d: a "
                        "removal was stopped before its commit; the next add or remove "
                        "corrects the count", self.directory, self.store.collection, found,
                        self.manifest.count)
        elif found > self.manifest.count:
            raise LenetEmbedError(
                f"{self.directory}: Milvus collection {self.store.collection} holds {found} "
                f"items, the manifest {self.manifest.count}; {REBUILD_MILVUS}")

    def check_contents(self) -> None:
        """What ``info --verify`` checks of the collection beyond :meth:`check_count` (which
        every ``info`` runs), as far as Milvus tells without sending every vector: its fields
        and the vectors' dimension, no id below 0, labels among the manifest's classes, and
        every committed item's image a 28x28 digit (read in batches)."""
        store, manifest = self.store, self.manifest
        committed = f"id < {manifest.next_id}"
        problem = store.schema_problem()
        if problem is None and store.count("id < 0"):
            problem = "it holds ids below 0"
        if problem is None and manifest.classes and store.count(
                f"{committed} and label >= {len(manifest.classes)}"):
            problem = "its labels name classes the manifest does not list"
        if problem is None:
            problem = self._bad_image(committed)
        if problem is not None:
            raise LenetEmbedError(f"{self.directory}: Milvus collection {store.collection} does "
                                  f"not hold what the bundle's manifest says ({problem}); "
                                  f"{REBUILD_MILVUS}")

    def _bad_image(self, where: str) -> str | None:
        for rows in self.store.batches(where, ["id", "image"]):
            for row in rows:
                if _decode_image(row["image"]) is None:
                    return f"item {int(row['id'])}'s image is not a 28x28 digit"
        return None


# --------------------------------------------------------------------------- writes
# Each runs inside the bundle's writer session, so ids come from one manifest at a time.

class Milvus(Backend):
    """The writes of a bundle whose items are in a Milvus collection."""

    checked_by_loading = False  # loading a version connects to Milvus

    def open(self, directory: Path, manifest: Manifest, encoder: Any,
             search_params: dict[str, int], previous: Snapshot | None) -> MilvusSnapshot:
        """The version ``manifest``, over the connection of ``previous`` when it has the same
        collection (else a new one)."""
        if (isinstance(previous, MilvusSnapshot) and previous.manifest.store == manifest.store
                and previous.directory == directory):
            store = previous.store
        else:
            store = open_store(directory, manifest)
        return MilvusSnapshot(directory, manifest, encoder, search_params, store)

    def add(self, writer: BundleWriter, current: Manifest, ids: np.ndarray, vectors: np.ndarray,
            labels: np.ndarray, images: np.ndarray, sources: list[str | None] | None) -> Changes:
        """Insert rows with new ids (from ``current.next_id``), counting what the next version
        holds. Rows at or above that id are a writer's that never committed (killed, or its
        commit failed): they go first."""
        with _connected(writer.directory, current) as store:
            store.delete_from(current.next_id)
            store.insert(ids, vectors, labels, images, sources)
            return {"count": store.count(f"id < {int(ids[-1]) + 1}")}

    def remove(self, writer: BundleWriter, current: Manifest, ids: np.ndarray
               ) -> tuple[np.ndarray, Changes | None]:
        """Delete the committed items among ``ids``.

        Milvus and the manifest cannot change in one step: a writer killed between the two
        leaves its removal applied but the manifest's count stale (searches are right; ``info``
        warns). Counting what the collection holds here puts the next commit right."""
        with _connected(writer.directory, current) as store:
            gone = store.delete(ids[ids < current.next_id])
            live = store.count(f"id < {current.next_id}")
        if len(gone) == 0 and live == current.count:
            return gone, None
        return gone, {"count": live, "rows": current.rows - (current.count - live)}

    def compact(self, writer: BundleWriter, current: Manifest) -> Changes | None:
        """Have Milvus drop deleted rows (it compacts in the background): nothing to commit."""
        with _connected(writer.directory, current) as store:
            store.compact()
        return None

    def kept_in_folder(self, manifest: Manifest) -> set[str]:
        """A Milvus Lite file kept directly in the bundle's folder (where it needs no naming to
        be read): the bundle's own."""
        uri = manifest.store.uri if manifest.store is not None else ""
        return {uri} if uri and not is_server(uri) and "/" not in uri else set()

    def replaced(self, directory: Path, old: Manifest, new: Manifest) -> None:
        """Drop the collection the replaced version used (:func:`drop_replaced`)."""
        drop_replaced(directory, old, new)


@contextlib.contextmanager
def _connected(directory: Path, manifest: Manifest) -> Iterator[MilvusStore]:
    """A connection to the collection of ``manifest`` for one write, closed after it."""
    store = open_store(directory, manifest)
    try:
        yield store
    finally:
        store.close()


class MilvusBuild(Build):
    """A build into a new collection of the Milvus at ``uri`` (the operator names it, so the
    bundle's later commands may connect to it)."""

    def __init__(self, directory: Path, uri: str, token: str | None) -> None:
        allow_uri(uri)  # a malformed URI is refused before the embedding, not after
        self.directory, self.uri, self.token = directory, uri, token

    def index(self, vectors: np.ndarray, metric: str, factory: str, target_recall: float,
              budget: int, held_out: Callable[[], np.ndarray], on_progress: Progress) -> None:
        """None: Milvus builds and tunes its own index, of the factory's family."""
        return None

    def scores(self, built: None, vectors: np.ndarray, metric: str
               ) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
        """Exact search of the same vectors (what a tuned Milvus index approximates), with no
        copy of them: the collection is written after the calibration."""
        return lambda queries, k: exact_scores(vectors, queries, metric, k)

    def fields(self, built: None, factory: str) -> Changes:
        """The factory asked for; Milvus keeps its own search parameters."""
        return {"factory": factory, "search_params": {}, "target_recall": None,
                "factory_reason": None}

    def write(self, writer: BundleWriter, built: None, ids: np.ndarray, vectors: np.ndarray,
              labels: np.ndarray, images: np.ndarray, sources: list[str] | None,
              factory: str, metric: str, on_progress: Progress) -> Changes:
        """Insert every item into a new collection (dropped again if the insert fails)."""
        ref, collection = new_collection(writer.directory, self.uri, writer.next_version,
                                         metric, vectors.shape[1], factory, self.token)
        try:
            collection.insert(ids, vectors, labels, images, sources, on_progress=on_progress)
        except BaseException:
            collection.drop()
            raise
        finally:
            collection.close()
        return {"segments": [], "files": {}, "store": ref}


def new_collection(directory: Path, uri: str, version: int, metric: str, dim: int,
                   factory: str, token: str | None = None) -> tuple[Store, MilvusStore]:
    """Create an empty collection for a build of the bundle in ``directory``; its name is new
    (the version and a random part), so a rebuild never touches the collection in use."""
    allow_uri(uri)  # the operator named it to build there; its later commands may use it
    name = f"lenet_embed_v{version}_{secrets.token_hex(4)}"
    ref = Store(kind="milvus", uri=stored_uri(uri, directory), collection=name,
                index=index_type(factory))
    store = MilvusStore(allowed_uri(ref.uri, directory), name, metric, dim, token, create=True)
    store.create(ref.index)
    return ref, store


def drop_replaced(directory: Path, old: Manifest | None, new: Manifest) -> None:
    """After a rebuild, drop the collection the previous version used (when it was in Milvus
    and is not the new one's)."""
    if old is None or old.store is None or old.store == new.store:
        return
    try:
        uri = allowed_uri(old.store.uri, directory)
    except LenetEmbedError as exc:  # the previous manifest's Milvus is not one to connect to
        log.warning("%s; its collection %s is left there", exc, old.store.collection)
        return
    store = MilvusStore(uri, old.store.collection, old.metric, old.dim)
    try:
        store.drop()
    finally:
        store.close()
