"""The search service: a FastAPI app over one loaded :class:`SearchIndex`, and its web page.

``lenet-embed serve`` loads the bundle (LiteRT encoder, never TensorFlow), follows its new versions,
and answers:

- ``GET /healthz``: liveness, the number of indexed items and the version served;
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
images are decoded in bounded pools, costly ones in worker processes within a time budget, so they
never hold up other searches; each process keeps a bounded number of connections and cuts off
slow or oversized request headers. Each request is logged as one INFO line (method, path, status,
milliseconds) on the ``lenet_embed.serve`` logger, its control characters escaped; overload as at
most one WARNING per kind every 10 seconds. Answers name no folder of the server's disk (sources
relative to the images folder the bundle was built from, unless ``serve --show-sources``); a
request repeating ``Host`` (or another header the service reads once) is refused with 400.

The modules, one concern each:

- :mod:`.wire`: pydantic models of the request and response bodies, validation errors as one line;
- :mod:`.decode`: a request body (multipart, base64, pixels, vector) into one query;
- :mod:`.pools`: image files decoded in bounded pools (threads, worker processes) before a search;
- :mod:`.middleware`: the body limits (size, time), the access log, security headers, allowed
  hosts, and a JSON 500 for the service's own faults;
- :mod:`.fastpath`: plain searches answered in front of FastAPI's routing;
- :mod:`.batcher`: the searches of concurrent requests answered in batches;
- :mod:`.reload`: following commits by other processes (polling, SIGHUP);
- :mod:`.auth`: the write token, and whether the bundle can be written to;
- :mod:`.exposure`: log lines escaped, server paths kept out of answers;
- :mod:`.errors`: :class:`ApiError` and the handlers that turn every error into JSON;
- :mod:`.overload`: 503 with ``Retry-After``, and overload logged once per interval;
- :mod:`.connections`: uvicorn's protocol with a connection cap and header limits;
- :mod:`.accept`: worker processes sharing new connections fairly (``--workers N``);
- :mod:`.app`: :func:`create_app` and its routes;
- :mod:`.process`: :class:`ServiceConfig`, logging, the worker factory and :func:`serve`.

FastAPI and uvicorn come with the ``serve`` extra; the CLI imports this package only for ``serve``.
"""

from __future__ import annotations

from ..errors import LenetEmbedError

try:
    import fastapi  # noqa: F401
    import pydantic  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise LenetEmbedError(
        f"the service needs FastAPI and uvicorn ({exc}); install them with "
        "pip install 'lenet-embed[serve]'"
    ) from None

from .app import DEFAULT_K, MAX_K, create_app
from .errors import ApiError
from .middleware import MAX_BODY_BYTES
from .process import CONFIG_ENV, ServiceConfig, app_from_env, serve

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
