"""The service's metrics, in the Prometheus text format (``GET /metrics``), by
`prometheus-client <https://prometheus.github.io/client_python/>`_:

- ``lenet_embed_http_requests_total{route, method, status}``: requests answered, by route template
  (``/v1/items/{item_id}``, never the raw path; ``unmatched`` for a path no route has);
- ``lenet_embed_http_request_duration_seconds{route, method, status}``: their latency, a histogram;
- ``lenet_embed_refusals_total{kind}``: refused requests by kind (``too_large``, ``overload``,
  ``decode_timeout``, ``bad_image``, ``invalid``, ``auth``, ``host``, ``body_timeout``, ...);
- ``lenet_embed_index_version`` and ``lenet_embed_index_items``: the version served and its live
  items.

With ``serve --workers N`` the workers count in prometheus-client's multiprocess mode (each writes
its figures to files in ``$PROMETHEUS_MULTIPROC_DIR``, which ``serve`` makes, and whichever worker
answers ``/metrics`` adds them all up), so one scrape covers every worker.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus-client's own variable: set, every process writes its figures to files there.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A service's searches take milliseconds; decodes and writes up to seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A refusal's kind when the code refusing named none: after its status.
KIND_BY_STATUS = {400: "bad_request", 403: "auth", 404: "not_found", 405: "bad_request",
                  408: "body_timeout", 413: "too_large", 415: "media_type", 422: "invalid",
                  429: "overload", 431: "headers_too_large", 500: "error", 503: "overload"}
UNMATCHED = "unmatched"

# The refusal kind of the request being answered: set by whichever layer refuses it.
_refusal: ContextVar[dict[str, str] | None] = ContextVar("lenet_embed_refusal", default=None)


def note_refusal(kind: str | None) -> None:
    """Name the kind of the refusal being answered (None: after its status)."""
    holder = _refusal.get()
    if holder is not None and kind is not None:
        holder.setdefault("kind", kind)


def begin_request() -> dict[str, str]:
    """A new request is being answered: the holder its refusal kind will be noted in."""
    holder: dict[str, str] = {}
    _refusal.set(holder)
    return holder


class ServiceMetrics:
    """The metrics of one app; ``index`` is the :class:`SearchIndex` it serves."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        # Per app in one process (tests make many apps); in multiprocess mode the figures live in
        # files and a fresh registry collects them at each scrape.
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        labels = ["route", "method", "status"]
        self.requests = Counter("lenet_embed_http_requests", "HTTP requests answered.", labels,
                                registry=registry)
        self.latency = Histogram("lenet_embed_http_request_duration_seconds",
                                 "Time from a request's start to its answer.", labels,
                                 buckets=BUCKETS, registry=registry)
        self.refusals = Counter("lenet_embed_refusals", "Requests refused, by kind.", ["kind"],
                                registry=registry)
        self.version = Gauge("lenet_embed_index_version", "The bundle version served.",
                             registry=registry, multiprocess_mode="livemostrecent")
        self.items = Gauge("lenet_embed_index_items", "Live items in the version served.",
                           registry=registry, multiprocess_mode="livemostrecent")

    def observe(self, scope: dict[str, Any], status: int, seconds: float,
                refusal: dict[str, str]) -> None:
        """Count one answered request (``scope`` as the app left it, with its route)."""
        labels = (route_template(scope), scope["method"], str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)
        if status >= 400:
            self.refusals.labels(refusal.get("kind") or KIND_BY_STATUS.get(status, str(status))
                                 ).inc()

    def render(self) -> tuple[bytes, str]:
        """The metrics as Prometheus text, and its content type."""
        snapshot = self.index.snapshot
        self.version.set(snapshot.manifest.version)
        self.items.set(len(snapshot))
        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def route_template(scope: dict[str, Any]) -> str:
    """The template of the route that answered (``/v1/items/{item_id}/image.png``), the mount's
    path for a static file, or :data:`UNMATCHED`: never the raw path, which would give every
    client-chosen path its own series."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    root = scope.get("root_path")  # a Mount (static files) sets it to its own path
    return root if isinstance(root, str) and root else UNMATCHED
