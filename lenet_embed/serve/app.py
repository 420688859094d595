"""The FastAPI app over one loaded :class:`SearchIndex`: its routes and their OpenAPI schema."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp

from ..embed import LiteRTEncoder
from ..errors import LenetEmbedError
from ..search import Query as SearchQuery
from ..search import QueryResult, SearchIndex
from ..writer import WriterBusy
from .auth import require_writer, write_problem
from .batcher import SearchBatcher
from .decode import read_item, read_query
from .errors import ApiError, install_error_handlers
from .exposure import escape_log_lines, shown_source, without_paths
from .metrics import ServiceMetrics
from .middleware import MAX_BODY_BYTES, RequestGuard
from .pools import DECODE_TIMEOUT, DecodePools
from .reload import RELOAD_INTERVAL, Reloader
from .wire import (
    MAX_K,
    ErrorBody,
    Health,
    Info,
    ItemBody,
    ItemCreated,
    SearchParams,
    SearchResult,
    query_parameters,
    search_body_model,
    search_params,
)

log = logging.getLogger(__package__)

WRITE_WAIT_SECONDS = 5.0


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of a route's refusals."""
    meanings = {
        400: "Malformed request (empty or undecodable body).",
        403: "Writes are disabled, or the request lacks the write token.",
        404: "No such item.",
        408: "The body did not arrive within 30 s.",
        413: "Body over 5 MB, image over 16.8 megapixels (4096x4096), or an image whose "
             "decoding uses half the decode budget in CPU time.",
        415: "Body is neither multipart/form-data nor JSON.",
        422: "Invalid parameter, body, or image (e.g. blank or not an image).",
        503: "Busy: the decode pools are full or slow, or (writes) another process is writing "
             "to the bundle; retry after Retry-After seconds.",
    }
    return {status: {"model": ErrorBody, "description": meanings[status]} for status in statuses}


def _request_body_schema(body_model: type[BaseModel], label: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of ``POST /v1/search`` or ``/v1/items``: multipart or JSON."""
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                           "description": "An image file (PNG, JPEG, ...)."}}
    if label:
        properties["label"] = {"type": "string", "description": "The item's label."}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": properties}
            },
            "application/json": {"schema": body_model.model_json_schema()},
        },
    }


def create_app(index: SearchIndex, threads: int = 1, write_token: str | None = None,
               reload_interval: float | None = None,
               allowed_hosts: list[str] | None = None,
               decode_timeout: float = DECODE_TIMEOUT, show_sources: bool = False) -> ASGIApp:
    """The service for a loaded index: an ASGI app (FastAPI behind :class:`RequestGuard`).
    ``threads`` caps FAISS's threads in each search; ``GET /metrics`` gives the service's
    figures in the Prometheus text format (see :mod:`.metrics`).

    Requests, not threads, are the service's parallelism: the searches of concurrent requests run
    batched on the event loop (see :mod:`.batcher`); ``serve --workers N`` runs N processes. With a
    ``write_token``, ``POST``/``DELETE /v1/items`` add and remove items. The service follows
    commits made by other processes (see :mod:`.reload`). ``allowed_hosts`` lists the ``Host``
    names it answers for (None: any; ``serve`` chooses them, see :func:`.process.allowed_hosts`).
    Uploaded images are decoded in bounded pools before they are searched, each within
    ``decode_timeout`` seconds (see :mod:`.pools`).

    Answers name no server folder (see :mod:`.exposure`): a result's source is relative to the
    images folder the bundle was built from, or its file name, and ``/v1/info`` cuts the folders
    out of the data set's paths; ``show_sources`` gives both in full. A write token on a bundle
    this process cannot write to leaves writes off, with one warning saying why.
    """
    escape_log_lines()
    problem = write_problem(index.path) if write_token is not None else None
    if problem is not None:
        log.warning("writes disabled although a write token is set: %s", problem)
    dim = index.manifest.dim
    # A request waits this long for another process's commit before it answers 503.
    index.lock_timeout = WRITE_WAIT_SECONDS
    body_model = search_body_model(dim)
    batcher = SearchBatcher(index, threads)
    pools = DecodePools(decode_timeout)
    metrics = ServiceMetrics(index)
    interval = RELOAD_INTERVAL if reload_interval is None else reload_interval

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A reloader per run: its task and wake-up event belong to this run's event loop (an
        # app run again, or twice at once, e.g. by two test clients, must not share them).
        reloader = Reloader(index, interval)
        reloader.start()
        pools.start()
        try:
            yield
        finally:
            await reloader.stop()
            pools.stop()
            batcher.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="lenet-embed",
        version=index.manifest.lenet_embed_version,
        summary="Similarity search for digit images: LeNet-5 embeddings in a FAISS index.",
        description="JSON API of the lenet-embed search service; errors are "
                    '`{"error": "..."}` with a 4xx status.',
        docs_url=None,
        redoc_url=None,
        # GET /metrics is the service's telemetry; FastAPI's own OpenTelemetry hooks, checked on
        # every request, are off.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    async def answer(query: SearchQuery, k: int) -> QueryResult:
        index.check_k(k)
        result = await batcher.search(await pools.prepare(query), k)
        return result if show_sources else _sources_shown(result, index)

    install_error_handlers(app)
    static = files("lenet_embed") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(packages=[("lenet_embed", "static")]), name="static")

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "count": N, "version": V}``."""
        snapshot = index.snapshot
        return {"status": "ok", "count": len(snapshot), "version": snapshot.manifest.version}

    @app.get("/metrics", response_class=Response, tags=["service"],
             responses={200: {"content": {"text/plain": {}},
                              "description": "Prometheus text format."}})
    def prometheus_metrics() -> Response:
        """Requests and latency by route and status, refusals by kind, the index version and its
        live items, in the Prometheus text format."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/info", response_model=Info, tags=["search"])
    def info() -> dict[str, Any]:
        """What the loaded bundle holds: size, metric, FAISS factory, data set, encoder."""
        snapshot = index.snapshot
        manifest = snapshot.manifest
        return {
            "count": manifest.count,
            "deleted": manifest.deleted,
            "version": manifest.version,
            "committed_at": manifest.committed_at,
            "writes": write_token is not None and problem is None,
            "dim": manifest.dim,
            "metric": manifest.metric,
            "factory": manifest.factory,
            "search_params": snapshot.search_params,
            "dataset": manifest.dataset if show_sources else without_paths(manifest.dataset),
            "classes": list(manifest.classes),
            "created_at": manifest.created_at,
            "lenet_embed_version": manifest.lenet_embed_version,
            "encoder": "litert" if isinstance(snapshot.encoder, LiteRTEncoder) else "keras",
            "max_k": MAX_K,
        }

    @app.post(
        "/v1/search",
        response_model=SearchResult,
        tags=["search"],
        responses=_errors(400, 408, 413, 415, 422, 503),
        openapi_extra={"requestBody": _request_body_schema(body_model),
                       "parameters": query_parameters(SearchParams)},
    )
    async def search(request: Request) -> JSONResponse:
        """Nearest neighbours of one image (multipart ``file``) or of a JSON body holding
        ``image_base64``, ``pixels`` (28x28 or 784 values) or ``vector`` (an embedding)."""
        try:
            params = search_params(request.query_params)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        index.check_k(params.k)
        pools.check_room(request.headers.get("content-length"))
        query = await read_query(request, body_model)
        result = (await answer(query, params.k)).judged(params.min_confidence)
        # A ready response skips FastAPI's re-validation; the schema above documents it.
        return JSONResponse(result.to_dict())

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

    @app.post(
        "/v1/items",
        status_code=201,
        response_model=ItemCreated,
        tags=["items"],
        responses=_errors(400, 403, 408, 413, 415, 422, 503),
        openapi_extra={"requestBody": _request_body_schema(ItemBody, label=True)},
    )
    async def add_item(request: Request) -> JSONResponse:
        """Add one image (multipart ``file`` and ``label``, or JSON ``image_base64``/``pixels``
        and ``label``) as a new item, durably; it is searchable when this answers. Needs the
        write token."""
        require_writer(request, write_token, problem)
        pools.check_room(request.headers.get("content-length"))
        query, label = await read_item(request)
        query = await pools.prepare(query)
        new_id = await run_in_threadpool(_add, query, label)
        snapshot = index.snapshot
        # The label as searches report it (JSON "7" is stored as 7).
        label = snapshot.label_of(new_id) if label is not None else None
        body = {"id": new_id, "label": label, "version": snapshot.manifest.version,
                "count": snapshot.manifest.count}
        return JSONResponse(body, status_code=201)

    def _add(query: Any, label: int | str | None) -> int:
        pixels = query.pixels()  # decoded already, or a JSON pixel array
        return int(_writing(lambda: index.add(pixels, labels=[label], sources=None))[0])

    @app.delete(
        "/v1/items/{item_id}",
        status_code=204,
        response_class=Response,
        tags=["items"],
        responses={204: {"description": "Removed."}, **_errors(403, 404, 503)},
    )
    async def remove_item(
        request: Request,
        item_id: Annotated[int, PathParam(ge=0, le=2**63 - 1, description="An item's id.")],
    ) -> Response:
        """Remove an item, durably; it never comes back in results. Needs the write token."""
        require_writer(request, write_token, problem)
        removed = await run_in_threadpool(lambda: _writing(lambda: index.remove([item_id])))
        if not removed:
            raise ApiError(404, f"no item with id {item_id}")
        return Response(status_code=204)

    # In front of FastAPI, not inside it as middleware: every request passes the guard, even
    # one FastAPI's own layers refuse.
    return RequestGuard(app, max_body=MAX_BODY_BYTES, allowed_hosts=allowed_hosts,
                        metrics=metrics)


def _sources_shown(result: QueryResult, index: SearchIndex) -> QueryResult:
    """``result`` with its neighbours' sources as clients may see them (:func:`shown_source`):
    relative to the images folder the bundle was built from, else file names."""
    if not any(neighbor.source for neighbor in result.neighbors):
        return result
    dataset = index.manifest.dataset
    root = dataset.get("root") if isinstance(dataset, dict) else None
    root = root if isinstance(root, str) else None
    return replace(result, neighbors=[replace(n, source=shown_source(n.source, root))
                                      for n in result.neighbors])


def _writing(write: Any) -> Any:
    """Run a write; waiting too long for another writer becomes 503 with Retry-After, and a
    bundle the service cannot write to (its permissions changed, a full or read-only disk) 503
    with the reason in the log: a write never answers 500 for the state of the disk."""
    try:
        return write()
    except WriterBusy as exc:
        raise ApiError(503, str(exc), retry_after=1) from None
    except (OSError, LenetEmbedError) as exc:
        # The writer words an OSError met while writing as a one-line LenetEmbedError about it;
        # any other LenetEmbedError is about the request (its label, say): 422 as usual.
        if not isinstance(exc, OSError) and not isinstance(exc.__context__, OSError):
            raise
        log.warning("a write failed: %s", exc)
        raise ApiError(503, "the service cannot write to its bundle now; its operator can see "
                            "why in the service's log", retry_after=1) from None
