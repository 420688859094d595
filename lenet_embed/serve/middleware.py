"""ASGI middleware in front of the app: the request-body limits (size and time), the one-line
access log and the request metrics, security headers on every response, and the allowed ``Host``
names."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .errors import ApiError, error_response, internal_error, refusal
from .metrics import ServiceMetrics, begin_request, note_refusal

log = logging.getLogger(__package__)

MAX_BODY_BYTES = 5 * 1024 * 1024
# A body must have arrived this long after its request started (a client trickling one byte at
# a time would otherwise hold its connection for ever).
BODY_TIMEOUT = 30.0
# Headers the service reads as one value: a request that repeats one is refused (RFC 9112 3.2
# for Host), since layers that picked different copies would disagree about the request.
SINGLE_HEADERS = (b"host", b"content-length", b"content-type", b"authorization")
# On every response (OWASP secure headers): the page may load only its own script, style and
# images, nothing may frame it, and browsers must not guess content types.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]


class RequestGuard:
    """ASGI middleware: refuses a request that repeats one of :data:`SINGLE_HEADERS` (400) or
    whose ``Host`` is not in ``allowed_hosts`` (400; None allows any),
    refuses bodies over the limit (413) or still incomplete ``body_timeout`` seconds after the
    request started (408), adds :data:`SECURITY_HEADERS` to every response, logs one line
    per request and counts it in ``metrics`` (see :mod:`.metrics`)."""

    def __init__(self, app: Any, max_body: int = MAX_BODY_BYTES,
                 allowed_hosts: list[str] | None = None,
                 body_timeout: float = BODY_TIMEOUT,
                 metrics: ServiceMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        refused = begin_request()
        too_large = f"request body over {self.max_body // (1024 * 1024)} MB"

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, f"request body not received within {self.body_timeout:g} s"
                               ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise ApiError(413, too_large)
                body_done = not message.get("more_body", False)
            return message

        async def status_send(message: dict[str, Any]) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        received = 0
        body_done = responded = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        try:
            headers = dict(scope["headers"])
            repeated = _repeated(scope["headers"], headers)
            if repeated is not None:
                await error_response(400, f"the request has more than one {repeated} header; "
                                          "send it once")(scope, receive, status_send)
                return
            if self.allowed_hosts is not None and not self._host_allowed(headers.get(b"host")):
                note_refusal("host")
                await error_response(400, "this service does not answer for that Host name; "
                                          "its operator can allow it with --allowed-host"
                                     )(scope, receive, status_send)
                return
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                problem = too_large if declared.isdigit() else "malformed Content-Length header"
                code = 413 if declared.isdigit() else 400
                await error_response(code, problem)(scope, receive, status_send)
                return
            await self.app(scope, counting_receive, status_send)
        except ApiError as exc:  # a refusal no layer inside answered (the body limits)
            if not responded:
                await refusal(exc)(scope, receive, status_send)
                return
            raise
        except Exception as exc:
            # A fault of the service's own (routes answer theirs inside FastAPI): the client
            # gets the same one-line 500 as from a route, when nothing was sent yet.
            if not responded:
                await internal_error(scope["method"], scope["path"], exc)(scope, receive,
                                                                           status_send)
                return
            raise
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            path = scope["path"] + (f"?{query}" if query else "")
            elapsed = time.perf_counter() - started
            log.info("%s %s %d %.1f ms", scope["method"], path, status, elapsed * 1000)
            if self.metrics is not None:
                self.metrics.observe(scope, status, elapsed, refused)

    def _host_allowed(self, host: bytes | None) -> bool:
        if host is None:
            return False
        name = host.decode("latin-1").strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        return name in self.allowed_hosts or "*" in self.allowed_hosts


def _repeated(raw: list[tuple[bytes, bytes]], headers: dict[bytes, bytes]) -> str | None:
    """The name of a header of :data:`SINGLE_HEADERS` that ``raw`` (ASGI's lower-case header
    list, ``headers`` its dict) holds more than once, or None."""
    if len(raw) == len(headers):  # no name repeated at all: the common case, checked at once
        return None
    for name in SINGLE_HEADERS:
        if name in headers and sum(1 for key, _ in raw if key == name) > 1:
            return name.decode().title()
    return None
