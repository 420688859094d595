"""How the service refuses: :class:`ApiError`, JSON error responses, and the exception handlers
that turn every error into ``{"error": "<one line>"}`` so no traceback reaches a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import LenetEmbedError
from ..preprocess import ImageTooLarge
from .exposure import without_paths
from .metrics import note_refusal
from .wire import validation_message

log = logging.getLogger(__package__)

CLIENT_GONE = "the client closed the connection before sending the whole request"


class ApiError(Exception):
    """A request the service refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, retry_after: int | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        # The refusal's kind in the service's metrics (None: named after the status).
        self.kind = kind


def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """The response for every refusal: ``{"error": message}`` with ``status``, the folders of
    any absolute path cut out of ``message`` (a client learns nothing of the server's disk)."""
    return JSONResponse({"error": without_paths(message)}, status_code=status, headers=headers)


def internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    """The response to a fault of the service's own: the traceback goes to the log, the client
    gets one line."""
    log.error("%s %s failed", method, path, exc_info=exc)
    return error_response(500, "internal server error")


def refusal(exc: ApiError | LenetEmbedError) -> JSONResponse:
    """The response to a refused request: an :class:`ApiError` with its status (and
    ``Retry-After``), or a :class:`LenetEmbedError` about the request's image or values (413 for
    an image over the decode budget, which is refused from its header, else 422)."""
    if isinstance(exc, ApiError):
        note_refusal(exc.kind)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return error_response(exc.status, exc.message, headers)
    too_large = isinstance(exc, ImageTooLarge)
    note_refusal("too_large" if too_large else "bad_image")
    return error_response(413 if too_large else 422, str(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes ``{"error": "<one line>"}``; no traceback ever reaches a client."""

    @app.exception_handler(ApiError)
    @app.exception_handler(LenetEmbedError)
    async def refused(request: Request, exc: ApiError | LenetEmbedError) -> JSONResponse:
        return refusal(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(list(exc.errors())))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; the access log shows the request and its 400.
        return error_response(400, CLIENT_GONE)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.method, request.url.path, exc)
