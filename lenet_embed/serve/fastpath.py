"""The service's hot path: ``POST /v1/search`` with a small body, answered without FastAPI's
routing.

A search is what the service does most, and per request FastAPI's routing, dependency solving,
``Request`` and Starlette's form parser (which spools every uploaded file to a temporary file)
cost more CPU than decoding, embedding and searching the digit itself. :class:`SearchFastPath`
sits under :class:`~.middleware.RequestGuard` (so the body limits, security headers, allowed
hosts and access log apply unchanged) and answers the common case itself: a body of at most
:data:`~.pools.SURELY_HEAVY_BODY` bytes, a multipart upload with one ``file`` or a JSON body, and
no query string but ``k=N``. Everything else goes to the FastAPI route, which stays the
reference (and the OpenAPI schema): a request it cannot parse plainly is handed over with its
body replayed, so both paths give the same answers and the same errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.responses import JSONResponse

from ..errors import LenetEmbedError
from ..search import Query, QueryResult
from .decode import image_query, json_query
from .errors import CLIENT_GONE, ApiError, refusal
from .pools import SURELY_HEAVY_BODY

Search = Callable[[Query, int], Awaitable[QueryResult]]


class SearchFastPath:
    """ASGI middleware answering plain ``POST /v1/search`` requests with ``search(query, k)``;
    any other request goes to ``app``. ``max_k`` and ``default_k`` are the route's bounds on
    ``k`` (a ``k`` outside them goes to the route, which words the error)."""

    def __init__(self, app: Any, search: Search, body_model: Any, max_k: int,
                 default_k: int) -> None:
        self.app = app
        self.search = search
        self.body_model = body_model
        self.max_k = max_k
        self.default_k = default_k

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == "/v1/search"):
            await self.app(scope, receive, send)
            return
        k = self._k(scope.get("query_string", b""))
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        media_type, options = parse_options_header(headers.get(b"content-type", b""))
        plain = (k is not None and length.isdigit() and 0 < int(length) <= SURELY_HEAVY_BODY
                 and (media_type == b"application/json" or media_type == b"multipart/form-data"))
        if not plain:
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
            query = _parse(body, media_type, options.get(b"boundary"), self.body_model)
            if query is None:  # not plain after all: the route parses it (and words any error)
                await self.app(scope, _replay(body, receive), send)
                return
            result = await self.search(query, k)
            response = JSONResponse(result.to_dict())
        except (ApiError, LenetEmbedError) as exc:
            response = refusal(exc)
        await response(scope, receive, send)

    def _k(self, query_string: bytes) -> int | None:
        """``k`` from a query string that is empty or exactly ``k=N`` with N in bounds; None for
        anything else."""
        if not query_string:
            return self.default_k
        name, _, value = query_string.partition(b"=")
        if name != b"k" or not value.isdigit() or len(value) > 4:
            return None
        k = int(value)
        return k if 1 <= k <= self.max_k else None


async def _read_body(receive: Any) -> bytes:
    """The whole body (small: the caller checked its declared length)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise ApiError(400, CLIENT_GONE)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` again, then whatever ``receive`` gives."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _parse(body: bytes, media_type: bytes, boundary: bytes | None, body_model: Any
           ) -> Query | None:
    """The query of a plain body, or None when it is not plain."""
    if media_type == b"application/json":
        return json_query(body, body_model)
    if not boundary:
        return None
    upload = _only_file(body, boundary)
    return None if upload is None else image_query(*upload)


def _only_file(body: bytes, boundary: bytes) -> tuple[str, bytes] | None:
    """The file name and bytes of a multipart body that is exactly one part, a file in the field
    ``file`` (RFC 7578: the delimiter, the part's headers, its bytes, the close delimiter), or
    None for any other body, which the route's full parser then reads."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    head_end = body.find(b"\r\n\r\n", len(delimiter) + 2)
    if head_end < 0:
        return None
    data_start = head_end + 4
    data_end = body.find(b"\r\n" + delimiter, data_start)
    if data_end < 0 or body[data_end + 2 + len(delimiter):] not in (b"--", b"--\r\n"):
        return None  # more parts, or no close delimiter
    disposition = None
    for line in body[len(delimiter) + 2:head_end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        if name.strip().lower() == b"content-disposition":
            disposition = value.strip()
    if disposition is None:
        return None
    kind, options = parse_options_header(disposition)
    if kind != b"form-data" or options.get(b"name") != b"file" or b"filename" not in options:
        return None
    name = options[b"filename"].decode("utf-8", "replace") or "file"
    return name, body[data_start:data_end]
