"""ASGI middleware in front of the app: the request-body limit and the one-line access log."""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import ApiError, error_response

log = logging.getLogger(__package__)

MAX_BODY_BYTES = 5 * 1024 * 1024


class RequestGuard:
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
                await error_response(code, problem)(scope, receive, status_send)
                return
            await self.app(scope, counting_receive, status_send)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            path = scope["path"] + (f"?{query}" if query else "")
            elapsed = (time.perf_counter() - started) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], path, status, elapsed)
