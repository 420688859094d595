"""The search service: a FastAPI app over one loaded :class:`SearchIndex`, and its web page.

``lenet-embed serve`` loads the bundle (LiteRT encoder, never TensorFlow), follows its new versions,
and answers:

- ``GET /healthz``: liveness, the number of indexed items and the version served;
- ``GET /metrics``: requests and latency by route and status, refusals by kind, the index version
  and live items, in the Prometheus text format;
- ``GET /v1/info``: a summary of the bundle's manifest;
- ``POST /v1/search?k=5``: nearest neighbours of a multipart upload (field ``file``) or of a JSON
  body holding one of ``image_base64``, ``pixels`` or ``vector``; the answer is one line of
  ``query --json``;
- ``GET /v1/items/{id}/image.png``: an indexed digit as a PNG;
- ``POST /v1/items`` (an image and a label) and ``DELETE /v1/items/{id}``: writes, enabled by a
  write token and authorised by ``Authorization: Bearer <token>``;
- ``GET /``: a page to draw a digit and see its neighbours (``static/``, no CDN).

Every error is JSON ``{"error": "<one line>"}`` with a 4xx status, or 503 with ``Retry-After`` when
the service has no room for a request; bodies over 5 MB get 413 before they are read. Uploaded
images that are costly to decode are decoded in a bounded pool of worker processes within a time
and memory budget, so they never hold up other searches. The service is HTTP on proven parts:
uvicorn with its public settings (a cap on concurrent connections, a keep-alive timeout, its own
worker processes), and, wherever others can reach it, nginx in front with the shipped
``deploy/nginx.conf``, which cuts off idle and slow connections, oversized headers and connection
floods. Each request is logged as one INFO line (method, path, status, milliseconds) on the
``lenet_embed.serve`` logger, its control characters escaped; overload as at most one WARNING per
kind every 10 seconds. Answers name no folder of the server's disk (sources
relative to the images folder the bundle was built from, unless ``serve --show-sources``); a
request repeating ``Host`` (or another header the service reads once) is refused with 400.

The modules, one concern each:

- :mod:`.wire`: pydantic models of the request and response bodies, validation errors as one line;
- :mod:`.decode`: a request body (multipart, base64, pixels, vector) into one query;
- :mod:`.pools`: costly image files decoded in a bounded pool of worker processes (pebble);
- :mod:`.middleware`: the body limits (size, time), the access log, security headers, allowed
  hosts, and a JSON 500 for the service's own faults;
- :mod:`.metrics`: the Prometheus metrics (prometheus-client);
- :mod:`.batcher`: the searches of concurrent requests answered in batches;
- :mod:`.reload`: following commits by other processes (polling, SIGHUP);
- :mod:`.auth`: the write token, and whether the bundle can be written to;
- :mod:`.exposure`: log lines escaped, server paths kept out of answers;
- :mod:`.errors`: :class:`ApiError` and the handlers that turn every error into JSON;
- :mod:`.overload`: 503 with ``Retry-After``, and overload logged once per interval;
- :mod:`.app`: :func:`create_app` and its routes;
- :mod:`.process`: :class:`ServiceConfig`, logging, the worker factory and :func:`serve`.

FastAPI, uvicorn, pebble and prometheus-client come with the ``serve`` extra; the CLI imports this
package only for ``serve``.
"""

from __future__ import annotations

from ..errors import LenetEmbedError

try:
    import fastapi  # noqa: F401
    import pebble  # noqa: F401
    import prometheus_client  # noqa: F401
    import pydantic  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise LenetEmbedError(
        f"the service needs FastAPI, uvicorn, pebble and prometheus-client ({exc}); install "
        "them with pip install 'lenet-embed[serve]'"
    ) from None

from .app import create_app
from .errors import ApiError
from .middleware import MAX_BODY_BYTES
from .process import CONFIG_ENV, ServiceConfig, app_from_env, serve
from .wire import DEFAULT_K, MAX_K

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_K",
    "MAX_BODY_BYTES",
    "MAX_K",
    "ApiError",
    "ServiceConfig",
    "app_from_env",
    "create_app",
    "serve",
]
