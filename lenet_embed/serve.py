"""The search service: a FastAPI app over one loaded :class:`SearchIndex`, and its web page.

``lenet-embed serve`` loads the bundle once (LiteRT encoder, never TensorFlow) and answers:

- ``GET /healthz``: liveness and the number of indexed items;
- ``GET /v1/info``: a summary of the bundle's manifest;
- ``POST /v1/search?k=5``: nearest neighbours of a multipart upload (field ``file``) or of a JSON
  body holding one of ``image_base64``, ``pixels`` or ``vector``; the answer is one line of
  ``query --json``;
- ``GET /v1/items/{id}/image.png``: an indexed digit as a PNG;
- ``GET /``: a page to draw a digit and see its neighbours (``static/``, no CDN).

Every error is JSON ``{"error": "<one line>"}`` with a 4xx status; bodies over 5 MB get 413 before
they are read. Each request is logged as one INFO line (method, path, status, milliseconds).

FastAPI and uvicorn come with the ``serve`` extra; the CLI imports this module only for ``serve``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image

from .ann import set_threads
from .embed import LiteRTEncoder
from .errors import LenetEmbedError
from .preprocess import SIDE, ImageTooLarge, open_image, to_mnist
from .search import Neighbor, SearchIndex, query_result

try:
    from fastapi import FastAPI, Query, Request
    from fastapi import Path as PathParam
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise LenetEmbedError(
        f"the service needs FastAPI and uvicorn ({exc}); install them with "
        "pip install 'lenet-embed[serve]'"
    ) from None

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
MAX_K = 100
DEFAULT_K = 5
# Worker processes (``--workers N``) rebuild the app from this variable: a JSON ServiceConfig.
CONFIG_ENV = "LENET_EMBED_SERVE_CONFIG"
_BODY_HELP = (
    "send an image as multipart field 'file', or a JSON object with one of "
    "image_base64, pixels, vector"
)


class ApiError(Exception):
    """A request the service refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------- wire formats

class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="What was wrong with the request, in one line.")


class Health(BaseModel):
    """``GET /healthz``."""

    status: str = Field(examples=["ok"])
    count: int = Field(description="Number of indexed items.")


class Info(BaseModel):
    """``GET /v1/info``: what the loaded bundle holds and how it is searched."""

    count: int
    dim: int
    metric: str
    factory: str | None
    search_params: dict[str, int]
    dataset: dict[str, Any] | None
    classes: list[str]
    created_at: str | None
    lenet_embed_version: str | None
    encoder: str = Field(description="Encoder runner in use: litert or keras.")
    max_k: int = Field(description="Largest k a search accepts.")


class NeighborOut(BaseModel):
    """One search result, as in ``query --json``."""

    rank: int
    id: int
    label: int | str | None
    distance: float = Field(description="Smaller is nearer: 1 - cos (cosine) or Euclidean (l2).")
    source: str | None


class SearchResult(BaseModel):
    """``POST /v1/search``: the same object as one line of ``query --json``."""

    query: str = Field(description="The upload's file name, or image_base64, pixels or vector.")
    predicted_label: int | str | None = Field(description="Majority label of the neighbours.")
    neighbors: list[NeighborOut]


Pixel = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]
PixelRow = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]


def _search_body_model(dim: int) -> type[BaseModel]:
    """The JSON request body of ``POST /v1/search`` for an index of ``dim``-d vectors."""

    class SearchBody(BaseModel):
        """Exactly one of the three fields."""

        model_config = ConfigDict(extra="forbid")

        image_base64: str | None = Field(
            None, description="An image file (PNG, JPEG, ...) in base64; a data: URL works too."
        )
        pixels: (
            Annotated[list[Pixel], Field(min_length=SIDE * SIDE, max_length=SIDE * SIDE)]
            | Annotated[list[PixelRow], Field(min_length=SIDE, max_length=SIDE)]
            | None
        ) = Field(None, description="28x28 grayscale, nested or 784 flat; 0-255, or 0-1 floats.")
        vector: (
            Annotated[list[Annotated[float, Field(allow_inf_nan=False)]],
                      Field(min_length=dim, max_length=dim)]
            | None
        ) = Field(None, description=f"An embedding to search by: {dim} floats.")

        @model_validator(mode="after")
        def _exactly_one(self) -> SearchBody:
            given = [name for name in ("image_base64", "pixels", "vector")
                     if getattr(self, name) is not None]
            if len(given) != 1:
                raise ValueError("give exactly one of image_base64, pixels, vector")
            return self

    return SearchBody


# ---------------------------------------------------------------------------- decoding queries

def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode an uploaded image file, refusing anything over 4096x4096 px before decoding it.

    Raises :class:`ApiError` (413) for a too-large image and :class:`LenetEmbedError` for bytes
    that are not an image.
    """
    if not data:
        raise LenetEmbedError(f"{name}: the file is empty; {_BODY_HELP}")
    try:
        return open_image(data, name, max_side=MAX_IMAGE_SIDE)
    except ImageTooLarge as exc:
        raise ApiError(413, str(exc)) from None


def _from_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image_base64 is not valid base64") from None


@dataclass(frozen=True)
class _Query:
    """One query as read from the request: its name in the answer, and image file bytes, a
    pixel array or an embedding."""

    name: str
    data: bytes | None = None
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None

    def preprocessed(self) -> np.ndarray:
        """The query image in the MNIST convention, (28, 28) float32 (not for vector queries)."""
        image = self.pixels if self.data is None else decode_image(self.data, self.name)
        return to_mnist(image, name=self.name)


# The pixels field is a union (nested or flat), whose raw errors read badly: one rule instead.
_PIXELS_RULE = "pixels: give 28 rows of 28 numbers or 784 numbers, each 0-255 (or 0-1 floats)"


def _validation_message(errors: list[Any]) -> str:
    """Pydantic/FastAPI validation errors as one line: ``where: what; where: what``."""
    parts: list[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if loc and loc[0] == "pixels":
            part = _PIXELS_RULE
        else:
            part = f"{'.'.join(loc)}: {message}" if loc else message
        if part not in parts:
            parts.append(part)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


# ------------------------------------------------------------------------------------ the app

@dataclass(frozen=True)
class ServiceConfig:
    """What a worker process needs to load the same index: JSON in ``$LENET_EMBED_SERVE_CONFIG``."""

    index_dir: str
    backend: str = "auto"
    threads: int = 1
    search_params: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        """This configuration as a JSON string."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServiceConfig:
        """Read a configuration written by :meth:`to_json`."""
        return cls(**json.loads(text))

    def load(self) -> SearchIndex:
        """Load and verify the bundle."""
        return SearchIndex.load(self.index_dir, backend=self.backend, threads=self.threads,
                                search_params=self.search_params)


class _RequestGuard:
    """ASGI middleware: refuses bodies over the limit (413) and logs one line per request."""

    def __init__(self, app: Any, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        too_large = f"request body over {self.max_body // (1024 * 1024)} MB"

        async def counting_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                nonlocal received
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise ApiError(413, too_large)
            return message

        async def status_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0
        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                problem = too_large if declared.isdigit() else "malformed Content-Length header"
                code = 413 if declared.isdigit() else 400
                await _error_response(code, problem)(scope, receive, status_send)
                return
            await self.app(scope, counting_receive, status_send)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            path = scope["path"] + (f"?{query}" if query else "")
            elapsed = (time.perf_counter() - started) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], path, status, elapsed)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None
                    ) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meanings = {
        400: "Malformed request (empty or undecodable body).",
        404: "No such item.",
        413: "Body over 5 MB, or image over 4096x4096 px.",
        415: "Body is neither multipart/form-data nor JSON.",
        422: "Invalid parameter, body, or image (e.g. blank or not an image).",
    }
    return {status: {"model": ErrorBody, "description": meanings[status]} for status in statuses}


def _request_body_schema(body_model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary",
                                            "description": "An image file (PNG, JPEG, ...)."}},
                }
            },
            "application/json": {"schema": body_model.model_json_schema()},
        },
    }


def create_app(index: SearchIndex, threads: int = 1) -> FastAPI:
    """The service for a loaded index. ``threads`` caps FAISS's threads in each search.

    Requests, not threads, are the service's parallelism: with one FAISS thread, the searches of
    concurrent requests run batched on one core while the other core parses HTTP.
    """
    dim = int(index.bundle.index.d)
    body_model = _search_body_model(dim)
    batcher = _SearchBatcher(index, threads)
    app = FastAPI(
        title="lenet-embed",
        version=str(index.manifest.get("lenet_embed_version") or "unknown"),
        summary="Similarity search for digit images: LeNet-5 embeddings in a FAISS index.",
        description="JSON API of the lenet-embed search service; errors are "
                    '`{"error": "..."}` with a 4xx status.',
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(_RequestGuard, max_body=MAX_BODY_BYTES)
    _install_error_handlers(app)
    static = files("lenet_embed") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(packages=[("lenet_embed", "static")]), name="static")

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "count": N}``."""
        return {"status": "ok", "count": len(index)}

    @app.get("/v1/info", response_model=Info, tags=["search"])
    def info() -> dict[str, Any]:
        """What the loaded bundle holds: size, metric, FAISS factory, data set, encoder."""
        manifest = index.manifest
        return {
            "count": len(index),
            "dim": dim,
            "metric": index.metric,
            "factory": manifest.get("factory"),
            "search_params": index.search_params,
            "dataset": manifest.get("dataset"),
            "classes": [str(name) for name in manifest.get("classes", [])],
            "created_at": manifest.get("created_at"),
            "lenet_embed_version": manifest.get("lenet_embed_version"),
            "encoder": "litert" if isinstance(index.encoder, LiteRTEncoder) else "keras",
            "max_k": MAX_K,
        }

    @app.post(
        "/v1/search",
        response_model=SearchResult,
        tags=["search"],
        responses=_errors(400, 413, 415, 422),
        openapi_extra={"requestBody": _request_body_schema(body_model)},
    )
    async def search(
        request: Request,
        k: Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours to return.")] = DEFAULT_K,
    ) -> JSONResponse:
        """Nearest neighbours of one image (multipart ``file``) or of a JSON body holding
        ``image_base64``, ``pixels`` (28x28 or 784 values) or ``vector`` (an embedding)."""
        if k > len(index):
            raise LenetEmbedError(f"k must be at most {len(index)}, the number of indexed items")
        query = await _read_query(request, body_model)
        neighbors = await batcher.search(query, k)
        # A ready response skips FastAPI's re-validation; the schema above documents it.
        return JSONResponse(query_result(query.name, neighbors))

    @app.get(
        "/v1/items/{item_id}/image.png",
        tags=["search"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "A 28x28 PNG."},
                   **_errors(404)},
    )
    def item_image(
        item_id: Annotated[int, PathParam(ge=0, le=2**63 - 1, description="An item's id.")],
    ) -> Response:
        """An indexed digit as the encoder saw it: a 28x28 grayscale PNG."""
        try:
            pixels = index.item_image(item_id)
        except LenetEmbedError:
            raise ApiError(404, f"no item with id {item_id}") from None
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png",
                        headers={"Cache-Control": "public, max-age=3600"})

    return app


async def _read_query(request: Request, body_model: type[BaseModel]) -> _Query:
    """Decode the request body into one query, or raise :class:`ApiError`."""
    body = await request.body()
    if not body:
        raise ApiError(400, f"empty request body; {_BODY_HELP}")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "multipart upload needs an image file in the field 'file'")
        return _Query(upload.filename or "file", data=await upload.read())
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            payload = body_model.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors()
            status = 400 if any(error["type"] == "json_invalid" for error in errors) else 422
            raise ApiError(status, _validation_message(errors)) from None
        if payload.image_base64 is not None:
            return _Query("image_base64", data=_from_base64(payload.image_base64))
        if payload.pixels is not None:
            pixels = np.asarray(payload.pixels, dtype=np.float64).reshape(SIDE, SIDE)
            return _Query("pixels", pixels=pixels)
        with np.errstate(over="ignore"):
            vector = np.asarray(payload.vector, dtype=np.float32)
        if not np.isfinite(vector).all():
            raise ApiError(422, "vector: values must be finite 32-bit floats")
        return _Query("vector", vector=vector)
    raise ApiError(415, f"unsupported content type {media_type or '(none)'!r}; {_BODY_HELP}")


class _SearchBatcher:
    """Answers the queries of concurrent requests together: one encoder call, one FAISS call.

    An exact scan of 60,000 vectors costs several times less per query for a batch than for one
    query at a time, and one worker-thread hop per batch replaces two per request. Queries that
    arrive while a batch runs wait for it and form the next batch. There is no timer: a lone
    request is answered at once.
    """

    def __init__(self, index: SearchIndex, threads: int) -> None:
        self.index = index
        self.threads = threads
        self._waiting: list[tuple[_Query, int, asyncio.Future[list[Neighbor]]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def search(self, query: _Query, k: int) -> list[Neighbor]:
        """The ``k`` nearest neighbours of one query; its own errors are raised here."""
        future: asyncio.Future[list[Neighbor]] = asyncio.get_running_loop().create_future()
        self._waiting.append((query, k, future))
        if self._drainer is None:
            # A task of its own, so a client that hangs up cancels only its own wait.
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    outcomes = await run_in_threadpool(
                        self._answer, [(query, k) for query, k, _ in batch])
                except Exception as exc:  # not any one query's fault: every request gets it
                    outcomes = [exc] * len(batch)
                for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._drainer = None

    def _answer(self, batch: list[tuple[_Query, int]]) -> list[list[Neighbor] | Exception]:
        """Runs in a worker thread: decode and preprocess each query, embed the images in one
        call, search every embedding in one call."""
        # FAISS's thread cap is per calling thread, so it is set in the thread that searches.
        set_threads(self.threads)
        outcomes: list[Any] = [None] * len(batch)  # each becomes neighbours or an exception
        vectors = np.zeros((len(batch), self.index.bundle.index.d), dtype=np.float32)
        images, image_rows = [], []
        for row, (query, _) in enumerate(batch):
            try:
                if query.vector is not None:
                    vectors[row] = query.vector
                else:
                    images.append(query.preprocessed())
                    image_rows.append(row)
            except (LenetEmbedError, ApiError) as exc:
                outcomes[row] = exc
        if images:
            vectors[image_rows] = self.index.encoder.embed(np.stack(images))
        rows = [row for row, outcome in enumerate(outcomes) if outcome is None]
        if rows:
            found = self.index.search_vectors(vectors[rows], max(batch[row][1] for row in rows))
            for row, neighbors in zip(rows, found, strict=True):
                outcomes[row] = neighbors[: batch[row][1]]
        return outcomes


def _install_error_handlers(app: FastAPI) -> None:
    """Every error becomes ``{"error": "<one line>"}``; no traceback ever reaches a client."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message)

    @app.exception_handler(LenetEmbedError)
    async def user_error(request: Request, exc: LenetEmbedError) -> JSONResponse:
        return _error_response(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal server error")


# ---------------------------------------------------------------------------------- processes

def _ensure_logging() -> None:
    """Send this package's INFO lines to stderr when nothing else has set logging up (worker
    processes, or ``serve`` called from Python)."""
    logger = logging.getLogger("lenet_embed")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes: the index named in ``$LENET_EMBED_SERVE_CONFIG``
    (see :class:`ServiceConfig`)."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise LenetEmbedError(f"${CONFIG_ENV} is not set; start the service with lenet-embed serve")
    _ensure_logging()
    config = ServiceConfig.from_json(text)
    return create_app(config.load(), threads=config.threads)


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          threads: int = 1) -> None:
    """Serve a loaded index over HTTP until interrupted (``lenet-embed serve``).

    Load the index first (``SearchIndex.load``), so a bad bundle is one error line before any
    socket opens. With ``workers`` > 1, uvicorn starts that many processes, each loading the same
    bundle with the same encoder and search parameters through :func:`app_from_env`.
    ``threads`` caps FAISS's threads per search (see :func:`create_app`).
    """
    import uvicorn

    _ensure_logging()
    options: dict[str, Any] = {"host": host, "port": port, "access_log": False,
                               "log_level": "info", "timeout_graceful_shutdown": 5}
    log.info("serving %s (%d items) on http://%s:%d with %d worker(s)",
             index.bundle.path, len(index), host, port, workers)
    if workers == 1:
        uvicorn.run(create_app(index, threads=threads), **options)
        return
    config = ServiceConfig(
        index_dir=str(Path(index.bundle.path).resolve()),
        backend="litert" if isinstance(index.encoder, LiteRTEncoder) else "keras",
        threads=threads,
        search_params=dict(index.search_params),
    )
    os.environ[CONFIG_ENV] = config.to_json()
    from uvicorn.supervisors import Multiprocess

    # What uvicorn.run does for workers, plus TCP_NODELAY: uvicorn makes this socket without
    # IPPROTO_TCP, so asyncio leaves Nagle's algorithm on for the connections accepted from it
    # (they inherit the option) and each response's body waits ~40 ms for a delayed ACK.
    server_config = uvicorn.Config("lenet_embed.serve:app_from_env", factory=True,
                                   workers=workers, **options)
    sock = server_config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(server_config, sockets=[sock]).run()
