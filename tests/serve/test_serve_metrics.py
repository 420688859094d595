"""``GET /metrics``: Prometheus text with requests and latency by route template and status,
refusals by kind, the index version and its live items (through FastAPI's TestClient; the
multi-worker sums are checked on ``serve --workers 2`` in test_serve.py)."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_serve import png

from lenet_embed.serve import create_app

REQUESTS = "lenet_embed_http_requests_total"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_by_route_template_and_refusals_by_kind(search_index,
                                                                       bundle_data):
    digit = png(bundle_data.test.images[0])
    blank = png(np.zeros((28, 28), np.uint8))
    with TestClient(create_app(search_index)) as client:
        for _ in range(2):
            assert client.post("/v1/search?k=3", files={"file": ("d.png", digit)}
                               ).status_code == 200
        for item in (987654321, 123456789):
            assert client.get(f"/v1/items/{item}/image.png").status_code == 404
        assert client.get("/no/such/987654321").status_code == 404
        assert client.post("/v1/search", content=b"x",
                           headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/v1/search", files={"file": ("blank.png", blank)}).status_code == 422
        assert client.post("/v1/items", files={"file": ("d.png", digit)}).status_code == 403
        assert client.post("/v1/search", content=b"x" * (5 * 2**20 + 1),
                           headers={"content-type": "application/json"}).status_code == 413
        health = client.get("/healthz").json()
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    found = samples(response.text)
    assert value(found, REQUESTS, route="/v1/search", method="POST", status="200") == 2
    assert value(found, REQUESTS, route="/v1/items/{item_id}/image.png", method="GET",
                 status="404") == 2
    assert value(found, REQUESTS, route="unmatched", method="GET", status="404") == 1
    assert value(found, "lenet_embed_http_request_duration_seconds_count", route="/v1/search",
                 method="POST", status="200") == 2
    # Never the raw path: a client cannot make a series per path it sends.
    assert "987654321" not in response.text and "123456789" not in response.text
    kinds = {dict(labels)["kind"]: count for (name, labels), count in found.items()
             if name == "lenet_embed_refusals_total"}
    assert kinds["not_found"] == 3 and kinds["media_type"] == 1 and kinds["auth"] == 1
    assert kinds["bad_image"] == 1 and kinds["too_large"] == 1
    assert value(found, "lenet_embed_index_version") == health["version"]
    assert value(found, "lenet_embed_index_items") == health["count"] == len(search_index)
