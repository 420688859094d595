"""The HTTP service: every endpoint and every refusal through FastAPI's TestClient over the session
bundle (2,000 real MNIST digits), answers checked against in-process searches and `query --json`,
concurrent searches, the TensorFlow-free process, `serve --workers 2` as a real subprocess, and
schemathesis fuzzing of the OpenAPI schema.

Writes (POST/DELETE /v1/items behind the write token) and following commits made elsewhere
(polling, SIGHUP, two workers) run on private copies of the session bundle (`bundle_copy`)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode

from lenet_embed.cli import main
from lenet_embed.errors import LenetEmbedError
from lenet_embed.search import SearchIndex
from lenet_embed.serve import (
    CONFIG_ENV,
    MAX_BODY_BYTES,
    ServiceConfig,
    app_from_env,
    create_app,
)
from lenet_embed.serve.app import WRITE_WAIT_SECONDS
from scripts.harness.running import free_port, running_service

K = 5
TOKEN = "test-token-0123456789abcdef"  # over the 16-character minimum
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def app(search_index):
    return create_app(search_index)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def digits(bundle_data):
    """Real MNIST test digits (not in the bundle) and their labels."""
    return bundle_data.test.images[:20], bundle_data.test.labels[:20].tolist()


def upload(client, data: bytes, name: str = "digit.png", k: int | str = K):
    return client.post(f"/v1/search?k={k}", files={"file": (name, data, "image/png")})


def assert_error(response, status: int, *fragments: str) -> str:
    """A refusal: the expected status, JSON {"error": one line}, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    message = body["error"]
    assert message and "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# ----------------------------------------------------------------------------------- endpoints

def test_healthz(client, bundle_data, search_index):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "count": len(bundle_data.train),
                               "version": search_index.version}
    assert search_index.version >= 1


def test_info_summarises_the_manifest(client, search_index):
    info = client.get("/v1/info").json()
    manifest = search_index.manifest
    assert info["count"] == manifest.count == 2000
    assert (info["deleted"], info["version"]) == (0, manifest.version)
    assert info["committed_at"] == manifest.committed_at
    assert info["writes"] is False  # no write token given to create_app
    assert (info["dim"], info["metric"], info["factory"]) == (84, "cosine", "Flat")
    # The data set as in the manifest, less the folders of absolute paths (no server layout
    # reaches clients): {"source": "IDX files in /x/y/mnist (subset)"} -> ".../mnist (subset)".
    assert info["dataset"]["kind"] == manifest.dataset["kind"]
    assert "/" not in json.dumps(info["dataset"], ensure_ascii=False).replace("…/", "")
    assert info["dataset"]["source"].endswith(manifest.dataset["source"].rsplit("/", 1)[-1])
    assert info["created_at"] == manifest.created_at
    assert info["classes"] == []  # MNIST digits are their own labels
    assert info["encoder"] == "litert"
    assert info["max_k"] == 100
    assert "files" not in info and "segments" not in info  # a summary, not the checksums


def test_upload_finds_the_same_neighbours_as_searching_in_process(client, search_index, digits):
    images, labels = digits
    right = 0
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        response = upload(client, png(image), name=f"test-{number}.png")
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = search_index.search(image, k=K)[0]
        assert answer["query"] == f"test-{number}.png"
        assert [n["id"] for n in answer["neighbors"]] == [n.id for n in expected]
        assert [n["rank"] for n in answer["neighbors"]] == list(range(1, K + 1))
        distances = [n["distance"] for n in answer["neighbors"]]
        assert distances == sorted(distances)
        assert np.allclose(distances, [n.distance for n in expected], atol=1e-6)
        right += answer["predicted_label"] == label
    # The session model is one epoch on 5,000 digits; its 5-NN vote is right ~95 % of the time.
    assert right >= 17


def test_a_real_seven_is_predicted_seven(client, digits):
    images, labels = digits
    assert labels[0] == 7  # MNIST test digit 0
    answer = upload(client, png(images[0])).json()
    assert answer["predicted_label"] == 7 and answer["match"] is True
    assert 0.5 <= answer["confidence"] <= 1 and answer["reason"] is None


def test_min_confidence_overrides_the_threshold(client, digits):
    data = png(digits[0][0])
    answer = client.post("/v1/search?min_confidence=1", files={"file": ("a.png", data)}).json()
    assert answer["match"] is False and answer["predicted_label"] is None
    assert answer["reason"] == "unsure" and len(answer["neighbors"]) == K
    lenient = client.post("/v1/search?min_confidence=0", files={"file": ("a.png", data)})
    assert lenient.json()["predicted_label"] == 7
    refused = client.post("/v1/search?min_confidence=2", files={"file": ("a.png", data)})
    assert refused.status_code == 422 and "min_confidence" in refused.json()["error"]


def test_answer_is_one_line_of_query_json(client, digits, bundle_dir, tmp_path):
    images, _ = digits
    path = tmp_path / "digit.png"
    path.write_bytes(png(images[3]))
    result = CliRunner().invoke(main, ["query", str(path), "-k", "7", "--json",
                                       "--index-dir", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.splitlines()[0])
    answer = upload(client, path.read_bytes(), name=str(path), k=7).json()
    assert answer.keys() == line.keys()
    assert answer["query"] == line["query"] == str(path)
    assert answer["predicted_label"] == line["predicted_label"]
    assert (answer["match"], answer["confidence"], answer["reason"]) == (
        line["match"], line["confidence"], line["reason"])
    for got, want in zip(answer["neighbors"], line["neighbors"], strict=True):
        assert got.keys() == want.keys() == {"rank", "id", "label", "distance", "source"}
        assert (got["rank"], got["id"], got["label"], got["source"]) == (
            want["rank"], want["id"], want["label"], want["source"])
        assert got["distance"] == pytest.approx(want["distance"], abs=1e-6)


def test_every_json_query_form_agrees_with_the_upload(client, search_index, digits):
    image = digits[0][5]
    data = png(image)
    want = [n["id"] for n in upload(client, data).json()["neighbors"]]
    encoded = base64.b64encode(data).decode()
    bodies = {
        "image_base64": {"image_base64": encoded},
        "data URL": {"image_base64": f"data:image/png;base64,{encoded}"},
        "pixels 28x28 0-255": {"pixels": image.tolist()},
        "pixels 784 0-1": {"pixels": (image.reshape(-1) / 255.0).tolist()},
        "vector": {"vector": search_index.embed(image)[0].tolist()},
    }
    for form, body in bodies.items():
        response = client.post(f"/v1/search?k={K}", json=body)
        assert response.status_code == 200, (form, response.text)
        answer = response.json()
        assert [n["id"] for n in answer["neighbors"]] == want, form
        assert answer["query"] == next(iter(body))


def test_k_bounds_are_inclusive(client, digits):
    data = png(digits[0][1])
    assert len(upload(client, data, k=1).json()["neighbors"]) == 1
    assert len(upload(client, data, k=100).json()["neighbors"]) == 100


def test_item_image_is_the_indexed_digit(client, search_index, bundle_data):
    for item_id in (0, 1234, 1999):
        response = client.get(f"/v1/items/{item_id}/image.png")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        assert (picture.size, picture.mode) == ((28, 28), "L")
        assert np.array_equal(np.asarray(picture), search_index.item_image(item_id))
        assert np.array_equal(np.asarray(picture), bundle_data.train.images[item_id])


def test_unknown_item_is_a_json_404(client):
    assert_error(client.get("/v1/items/2000/image.png"), 404, "no item with id 2000")
    assert_error(client.get("/v1/items/-1/image.png"), 422, "item_id")
    assert_error(client.get("/v1/items/seven/image.png"), 422, "item_id")
    assert_error(client.get(f"/v1/items/{2**70}/image.png"), 422, "item_id")


def test_openapi_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/healthz", "/metrics", "/v1/info", "/v1/search", "/v1/items/{item_id}/image.png",
        "/v1/items", "/v1/items/{item_id}"}
    search = schema["paths"]["/v1/search"]["post"]
    content = search["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["required"] == ["file"]
    assert set(content["application/json"]["schema"]["properties"]) == {
        "image_base64", "pixels", "vector"}
    k = next(p for p in search["parameters"] if p["name"] == "k")
    assert (k["schema"]["minimum"], k["schema"]["maximum"]) == (1, 100)
    assert {"200", "400", "413", "415", "422"} <= set(search["responses"])
    add = schema["paths"]["/v1/items"]["post"]
    content = add["requestBody"]["content"]
    assert set(content["multipart/form-data"]["schema"]["properties"]) == {"file", "label"}
    assert set(content["application/json"]["schema"]["properties"]) == {
        "image_base64", "pixels", "label"}
    assert {"201", "403", "413", "422", "503"} <= set(add["responses"])
    delete = schema["paths"]["/v1/items/{item_id}"]["delete"]
    assert {"204", "403", "404", "503"} <= set(delete["responses"])


def test_page_is_served_by_the_app_and_needs_no_network(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="pad" width="280" height="280"' in page.text
    assert '<form id="add" class="add" hidden' in page.text  # shown only when writes are on
    assert 'type="password" id="token"' in page.text
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = client.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="lenet_embed.serve"):
        client.get("/healthz")
        client.post("/v1/search?k=0", json={})
    lines = [r.getMessage() for r in caplog.records if r.name == "lenet_embed.serve"]
    assert len(lines) == 2
    method, path, status, ms, unit = lines[0].split()
    assert (method, path, status, unit) == ("GET", "/healthz", "200", "ms") and float(ms) >= 0
    assert lines[1].startswith("POST /v1/search?k=0 422 ")


def test_concurrent_searches_get_their_own_answers(app, search_index, digits):
    """Concurrent requests are answered in batches (one encoder call, one FAISS call); each must
    still get exactly its own k neighbours, or its own error."""
    images, _ = digits
    vector = search_index.embed(images[0])[0].tolist()
    requests = [("upload", i, 1 + i % 9) for i in range(len(images))]
    requests += [("vector", 0, 4), ("blank", 0, 3), ("text", 0, 3), ("upload", 7, 2)]

    def send(http, kind, i, k):
        url = f"/v1/search?k={k}"
        if kind == "vector":
            return http.post(url, json={"vector": vector})
        data = {"upload": lambda: png(images[i]), "blank": lambda: png(np.zeros((28, 28))),
                "text": lambda: b"no image here"}[kind]()
        return http.post(url, files={"file": (f"{kind}-{i}.png", data, "image/png")})

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(send(http, *request) for request in requests))

    for (kind, i, k), response in zip(requests, asyncio.run(run()), strict=True):
        if kind == "blank":
            assert_error(response, 422, "blank-0.png: no digit found")
        elif kind == "text":
            assert_error(response, 422, "text-0.png: not a readable image")
        else:
            want = search_index.search(images[i], k=k)[0]
            assert response.status_code == 200, response.text
            assert [n["id"] for n in response.json()["neighbors"]] == [n.id for n in want]


# ------------------------------------------------------------------------------------ refusals

def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_empty_body_is_400(client):
    assert_error(client.post("/v1/search"), 400, "empty request body")
    assert_error(client.post("/v1/search", content=b"",
                             headers={"content-type": "application/json"}), 400)


def test_body_over_5_mb_is_413_before_it_is_read(client):
    big = os.urandom(6 * 1024 * 1024)
    assert_error(upload(client, big, name="big.png"), 413, "over 5 MB")
    # Without Content-Length (chunked), the count of received bytes trips the same limit.
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    assert_error(client.post("/v1/search", content=chunks,
                             headers={"content-type": "application/json"}), 413, "over 5 MB")
    assert len(big) > MAX_BODY_BYTES


def test_text_file_is_422_with_the_preprocessing_message(client, tmp_path):
    assert_error(upload(client, b"just some text\n", name="notes.txt"), 422,
                 "notes.txt: not a readable image")


def test_image_modes_preprocessing_cannot_convert_are_converted_first(client, digits):
    """A LAB TIFF: Pillow converts LAB to neither L nor RGB, which preprocessing needs."""
    digit = Image.fromarray(digits[0][0])
    neutral = Image.new("L", digit.size, 128)
    buffer = io.BytesIO()
    Image.merge("LAB", (digit, neutral, neutral)).save(buffer, format="TIFF")
    answer = upload(client, buffer.getvalue(), name="lab.tif").json()
    assert answer["predicted_label"] == upload(client, png(digits[0][0])).json()["predicted_label"]


def test_blank_image_is_422_with_the_preprocessing_message(client):
    assert_error(upload(client, png(np.zeros((28, 28))), name="blank.png"), 422,
                 "blank.png: no digit found")
    white = base64.b64encode(png(np.full((64, 64), 255))).decode()
    assert_error(client.post("/v1/search", json={"image_base64": white}), 422, "no digit found")


def test_image_over_the_pixel_budget_is_413(client):
    # 4097 x 4097 is one row and one column over 4096 x 4096 = 16.8 megapixels.
    big = png(np.zeros((4097, 4097)))
    assert_error(upload(client, big, name="big.png"), 413, "4097x4097 px", "16.8 megapixels")
    # Pillow's decompression-bomb guard stops a 30,000 x 30,000 header before any decoding.
    assert_error(upload(client, bomb_png(30000, 30000), name="bomb.png"), 413, "bomb.png")
    assert_error(upload(client, bomb_png(5000, 5000), name="big.png"), 413, "5000x5000")


@pytest.mark.parametrize("k", ["0", "1000", "-3", "2.5", "seven"])
def test_k_out_of_range_is_422(client, digits, k):
    assert_error(upload(client, png(digits[0][0]), k=k), 422, "k: ")


def test_k_above_the_index_size_is_422(trained, bundle_data, tmp_path):
    from lenet_embed import SearchIndex, build_index

    small = build_index(data=bundle_data.head(30, 10), model=trained.model,
                        index_dir=tmp_path / "index")
    with TestClient(create_app(SearchIndex.load(small.path))) as small_client:
        data = png(bundle_data.test.images[0])
        assert upload(small_client, data, k=30).status_code == 200
        assert_error(upload(small_client, data, k=31), 422,
                     "k must be between 1 and 30 (the number of items in …/index), got 31")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"vector": [0.1] * 83}, "vector: List should have at least 84 items"),
        ({"vector": [0.1] * 85}, "vector: List should have at most 84 items"),
        ({"vector": ["x"] * 84}, "vector.0"),
        ({"pixels": [1, 2, 3]}, "pixels: give 28 rows of 28 numbers or 784 numbers"),
        ({"pixels": [[0] * 28] * 27}, "pixels: give 28 rows"),
        ({"pixels": [300] * 784}, "pixels: give"),
        ({"pixels": [-1] * 784}, "pixels: give"),
        ({}, "give exactly one of image_base64, pixels, vector"),
        ({"vector": [0.0] * 84, "pixels": [0] * 784}, "give exactly one"),
        ({"image": "abc"}, "image: Extra inputs are not permitted"),
        ({"image_base64": "***not base64***"}, "image_base64 is not valid base64"),
        ({"image_base64": base64.b64encode(b"GIF89a broken").decode()}, "not a readable image"),
        ([1, 2, 3], "Input should be an object"),
    ],
)
def test_bad_json_bodies_are_422(client, body, fragment):
    assert_error(client.post("/v1/search", json=body), 422, fragment)


def test_non_finite_vector_is_refused(client):
    body = '{"vector": [NaN' + ", 0.5" * 83 + "]}"
    response = client.post("/v1/search", content=body,
                           headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)


def test_malformed_requests_are_4xx(client):
    assert_error(client.post("/v1/search", content=b"{not json",
                             headers={"content-type": "application/json"}), 400, "Invalid JSON")
    assert_error(client.post("/v1/search", content=b"hello",
                             headers={"content-type": "text/plain"}), 415, "text/plain")
    assert_error(client.post("/v1/search", files={"other": ("a.png", b"x", "image/png")}), 422,
                 "field 'file'")
    assert_error(client.post("/v1/search", data={"file": "not a file"},
                             files={"other": ("a.png", b"x", "image/png")}), 422, "field 'file'")
    assert_error(client.post("/v1/search", data={"file": "a form"}), 415, "x-www-form-urlencoded")
    assert_error(client.post("/v1/search", content=b"--x\r\n",
                             headers={"content-type": "multipart/form-data"}), 400)
    assert_error(client.delete("/v1/search"), 405)
    assert_error(client.get("/v2/nothing"), 404)


# -------------------------------------------------------------------------------------- writes

@pytest.fixture
def writable(bundle_copy):
    """The service with writes enabled over a private copy of the session bundle, its lifespan
    (so its reloader) running; yields (client, the index it serves)."""
    index = SearchIndex.load(bundle_copy)
    with TestClient(create_app(index, write_token=TOKEN)) as test_client:
        yield test_client, index


def add_upload(client, data: bytes, label: str | None = "7", name: str = "new.png",
               headers: dict[str, str] = AUTH):
    """``POST /v1/items`` as multipart: the image in ``file``, the label in ``label``."""
    return client.post("/v1/items", headers=headers, files={"file": (name, data, "image/png")},
                       data={} if label is None else {"label": label})


def nearest(client, data: bytes, k: int = K) -> list[dict]:
    """The neighbours the service finds for an uploaded image."""
    response = upload(client, data, k=k)
    assert response.status_code == 200, response.text
    return response.json()["neighbors"]


def wait_for(check, seconds: float = 1.0, what: str = "the change") -> float:
    """Poll ``check()`` until it is true; the seconds it took. Fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"{what} not seen within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_writes_are_off_without_a_token(client, digits, search_index):
    image = digits[0][0]
    before = client.get("/healthz").json()
    for headers in ({}, AUTH):  # even a well-formed token header is refused
        assert_error(add_upload(client, png(image), headers=headers), 403,
                     "writes are disabled", "--write-token-file")
        assert_error(client.post("/v1/items", headers=headers,
                                 json={"pixels": image.tolist(), "label": 7}), 403,
                     "writes are disabled")
        assert_error(client.delete("/v1/items/3", headers=headers), 403, "writes are disabled")
    # Nothing changed, and the read API answers as before.
    assert client.get("/healthz").json() == before
    assert search_index.version == before["version"]
    assert client.get("/v1/info").json()["writes"] is False
    assert client.get("/v1/items/3/image.png").status_code == 200
    assert [n["id"] for n in nearest(client, png(image))] == [
        n.id for n in search_index.search(image, k=K)[0]]


def test_writes_need_the_token(writable, digits):
    client, index = writable
    assert client.get("/v1/info").json()["writes"] is True
    version = index.version
    refused = [{}, {"Authorization": "Bearer wrong-token-0123456789"},
               {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Bearer {TOKEN}x"},
               {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}]
    for headers in refused:
        assert_error(add_upload(client, png(digits[0][0]), headers=headers), 403,
                     "write token", "Authorization: Bearer")
        assert_error(client.delete("/v1/items/3", headers=headers), 403, "write token")
    assert index.version == version
    assert client.get("/healthz").json()["count"] == 2000
    assert client.get("/v1/items/3/image.png").status_code == 200


def test_an_added_item_is_its_own_nearest_neighbour(writable, digits):
    client, index = writable
    images, labels = digits
    data = png(images[4])
    before = client.get("/healthz").json()
    new_id = index.manifest.next_id
    response = add_upload(client, data, label=f" {labels[4]} ")
    assert response.status_code == 201, response.text
    assert response.json() == {"id": new_id, "label": labels[4],
                               "version": before["version"] + 1, "count": 2001}
    # Searchable as soon as the answer came back, under the label given.
    assert client.get("/healthz").json() == {"status": "ok", "count": 2001,
                                             "version": before["version"] + 1}
    first = nearest(client, data)[0]
    assert (first["rank"], first["id"], first["label"]) == (1, new_id, labels[4])
    assert first["distance"] == pytest.approx(0, abs=1e-5)
    picture = client.get(f"/v1/items/{new_id}/image.png")
    assert picture.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(picture.content))),
                          index.item_image(new_id))
    # Durable: a fresh load of the bundle has it. Unlabelled uploads are welcome too.
    assert SearchIndex.load(index.path).search(images[4], k=1)[0][0].id == new_id
    unlabelled = add_upload(client, png(images[5]), label=None).json()
    assert (unlabelled["id"], unlabelled["label"]) == (new_id + 1, None)
    assert nearest(client, png(images[5]))[0]["label"] is None


def test_json_bodies_add_items(writable, digits):
    client, index = writable
    images, labels = digits

    def encoded(i: int) -> str:
        return base64.b64encode(png(images[i])).decode()

    bodies = [  # (digit, body, label reported by the answer and by searches)
        (6, {"image_base64": encoded(6), "label": labels[6]}, labels[6]),
        (7, {"image_base64": f"data:image/png;base64,{encoded(7)}", "label": str(labels[7])},
         labels[7]),  # "4" on a digit bundle is the digit 4
        (8, {"pixels": images[8].tolist(), "label": labels[8]}, labels[8]),
        (9, {"pixels": (images[9].reshape(-1) / 255.0).tolist()}, None),
        (10, {"pixels": images[10].tolist(), "label": None}, None),
    ]
    for i, body, label in bodies:
        new_id = index.manifest.next_id
        response = client.post("/v1/items", headers=AUTH, json=body)
        assert response.status_code == 201, (i, response.text)
        created = response.json()
        assert (created["id"], created["label"], created["count"]) == (new_id, label,
                                                                       index.manifest.count)
        first = nearest(client, png(images[i]))[0]
        assert (first["id"], first["label"]) == (new_id, label), i
    assert client.get("/healthz").json()["count"] == 2000 + len(bodies)


def test_a_removed_item_never_comes_back(writable, digits, bundle_data):
    client, index = writable
    data = png(digits[0][11])
    new_id = add_upload(client, data, label="5").json()["id"]
    assert nearest(client, data)[0]["id"] == new_id
    response = client.delete(f"/v1/items/{new_id}", headers=AUTH)
    assert response.status_code == 204 and response.content == b""
    assert_error(client.delete(f"/v1/items/{new_id}", headers=AUTH), 404,
                 f"no item with id {new_id}")
    assert_error(client.get(f"/v1/items/{new_id}/image.png"), 404)
    assert new_id not in [n["id"] for n in nearest(client, data, k=100)]
    # An indexed training digit is its own nearest neighbour, until it is removed.
    original = png(bundle_data.train.images[0])
    assert nearest(client, original)[0]["id"] == 0
    assert client.delete("/v1/items/0", headers=AUTH).status_code == 204
    assert 0 not in [n["id"] for n in nearest(client, original, k=100)]
    info = client.get("/v1/info").json()
    assert (info["count"], info["deleted"]) == (1999, 2)
    assert_error(client.delete("/v1/items/123456", headers=AUTH), 404, "no item with id 123456")
    assert_error(client.delete("/v1/items/-1", headers=AUTH), 422, "item_id")
    # Ids are never reused, not even the last one's.
    assert add_upload(client, data, label="5").json()["id"] == new_id + 1
    assert SearchIndex.load(index.path).search(digits[0][11], k=100)[0][0].id == new_id + 1


def test_bad_item_requests_are_one_line_4xx(writable, digits):
    client, index = writable
    image = digits[0][0]
    data = png(image)
    version = index.version

    def multipart(label: str | None = "3", payload: bytes = data, field: str = "file"):
        return client.post("/v1/items", headers=AUTH, data={} if label is None else
                           {"label": label}, files={field: ("digit.png", payload, "image/png")})

    def json_body(body):
        return client.post("/v1/items", headers=AUTH, json=body)

    def raw(content: bytes, media_type: str):
        return client.post("/v1/items", content=content,
                           headers={**AUTH, "content-type": media_type})

    refusals = [
        (multipart("seven"), 422, "label 'seven'", "whole number"),
        (json_body({"pixels": image.tolist(), "label": "seven"}), 422, "label 'seven'"),
        (json_body({"pixels": image.tolist(), "label": -1}), 422, "label: give a whole number"),
        (json_body({"pixels": image.tolist(), "label": True}), 422, "label: give"),
        (json_body({"pixels": image.tolist(), "label": 7.5}), 422, "label: give"),
        (json_body({"pixels": image.tolist(), "label": ""}), 422, "label: give"),
        (multipart("x" * 201), 422, "label: at most 200 characters"),
        (multipart(payload=png(np.zeros((28, 28)))), 422, "digit.png: no digit found"),
        (multipart(payload=b"not an image"), 422, "digit.png: not a readable image"),
        (multipart(payload=png(np.zeros((4097, 4097)))), 413, "4097x4097 px"),
        (multipart(field="other"), 422, "field 'file'"),
        (client.post("/v1/items", headers=AUTH), 400, "empty request body"),
        (client.post("/v1/items", headers=AUTH, data={"label": "3"}), 415,
         "x-www-form-urlencoded"),
        (raw(b"hello", "text/plain"), 415, "text/plain", "field 'label'"),
        (raw(b"{not json", "application/json"), 400, "Invalid JSON"),
        (json_body({}), 422, "give exactly one of image_base64, pixels"),
        (json_body({"label": 3}), 422, "give exactly one"),
        (json_body({"pixels": image.tolist(), "image_base64": "AAAA"}), 422, "give exactly one"),
        (json_body({"vector": [0.0] * 84, "label": 3}), 422, "vector: Extra inputs"),
        (json_body({"pixels": [1, 2, 3], "label": 3}), 422, "pixels: give 28 rows"),
        (json_body({"image_base64": "***", "label": 3}), 422, "not valid base64"),
        (json_body([1, 2, 3]), 422, "Input should be an object"),
    ]
    for response, status, *fragments in refusals:
        assert_error(response, status, *fragments)
    assert index.version == version  # nothing was committed
    assert client.get("/healthz").json()["count"] == 2000


LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_write_kept_waiting_by_another_writer_is_503(writable, digits):
    client, index = writable
    assert index.lock_timeout == WRITE_WAIT_SECONDS == 5  # what the service waits for the lock
    index.lock_timeout = 0.3  # keep the test quick
    data = png(digits[0][12])
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(index.path / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        for response in (add_upload(client, data), client.delete("/v1/items/1", headers=AUTH)):
            assert_error(response, 503, "another process", "try again")
            assert response.headers["retry-after"] == "1"
        assert nearest(client, data)  # readers never wait for writers
    finally:
        locker.stdin.close()
        locker.wait(timeout=10)
    assert add_upload(client, data).status_code == 201
    assert client.delete("/v1/items/1", headers=AUTH).status_code == 204


def test_commits_by_another_writer_are_served_within_a_second(writable, digits):
    """The running app follows commits it did not make: its reloader polls the manifest."""
    client, index = writable
    other = SearchIndex(index.path)  # a second writer, like another process
    image, label = digits[0][13], digits[1][13]
    data = png(image)
    new_id = int(other.add([image], labels=[label])[0])
    wait_for(lambda: client.get("/healthz").json() == {
        "status": "ok", "count": 2001, "version": other.version}, what="the add")
    first = nearest(client, data)[0]
    assert (first["id"], first["label"]) == (new_id, label)
    other.remove([new_id])
    wait_for(lambda: new_id not in [n["id"] for n in nearest(client, data, k=100)],
             what="the removal")
    other.compact()
    wait_for(lambda: client.get("/v1/info").json()["version"] == other.version,
             what="the compaction")
    info = client.get("/v1/info").json()
    assert (info["count"], info["deleted"]) == (2000, 0)
    assert index.version == other.version  # the app's own index was refreshed in place


WRITER = """
import sys, time
import numpy as np
from lenet_embed.search import SearchIndex
index = SearchIndex(sys.argv[1])
images = np.load(sys.argv[2])
stop = time.monotonic() + float(sys.argv[3])
step = 0
while time.monotonic() < stop:
    ids = index.add([images[step % len(images)], images[(step + 1) % len(images)]], labels=[1, 2])
    if step % 2:
        index.remove(ids[:1].tolist())
    if step % 5 == 4:
        index.compact()
    step += 1
print(index.version)
"""


def test_searches_never_fail_while_another_process_commits(writable, digits, bundle_data,
                                                          tmp_path):
    client, index = writable
    images = digits[0]
    np.save(tmp_path / "more.npy", bundle_data.test.images[50:60])
    start = index.version
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(index.path),
                               str(tmp_path / "more.npy"), "2.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    versions, answered = [], 0
    try:
        while writer.poll() is None:
            response = upload(client, png(images[answered % len(images)]), k=K)
            assert response.status_code == 200, response.text
            neighbors = response.json()["neighbors"]
            assert [n["rank"] for n in neighbors] == list(range(1, K + 1))
            distances = [n["distance"] for n in neighbors]
            assert distances == sorted(distances)
            health = client.get("/healthz")
            assert health.status_code == 200, health.text
            versions.append(health.json()["version"])
            for original in [n["id"] for n in neighbors if n["id"] < 2000][:1]:  # never removed
                assert client.get(f"/v1/items/{original}/image.png").status_code == 200
            answered += 1
    finally:
        if writer.poll() is None:
            writer.kill()
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    final = int(out.split()[-1])
    assert final > start + 5  # the writer did commit, many times
    assert versions == sorted(versions) and len(set(versions)) >= 3, versions
    wait_for(lambda: client.get("/healthz").json()["version"] == final, what="the last commit")
    assert answered > 20


# ------------------------------------------------------------------------- processes and CLI

NO_TENSORFLOW = """
import json, sys
from fastapi.testclient import TestClient
from lenet_embed.cli import main
from lenet_embed.search import SearchIndex
from lenet_embed.serve import create_app
client = TestClient(create_app(SearchIndex.load(sys.argv[1])))
data = open(sys.argv[2], "rb").read()
assert client.post("/v1/search", files={"file": ("d.png", data)}).status_code == 200
assert client.get("/v1/items/0/image.png").status_code == 200
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))))
"""


def test_the_service_never_imports_tensorflow(bundle_dir, digits, tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(png(digits[0][0]))
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(bundle_dir), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_cli_help_does_not_import_fastapi():
    code = ("import sys\nfrom lenet_embed.cli import main\ntry:\n    main(['serve', '--help'])\n"
            "except SystemExit:\n    pass\nprint('fastapi' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--workers" in result.stdout and "--port" in result.stdout
    assert result.stdout.strip().endswith("False")


def test_serve_on_a_missing_bundle_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--index-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "no index bundle there" in result.output


def test_worker_factory_reads_its_configuration(monkeypatch, bundle_dir, tmp_path):
    config = ServiceConfig(str(bundle_dir), backend="litert", threads=2, search_params={})
    assert ServiceConfig.from_json(config.to_json()) == config
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(LenetEmbedError, match=CONFIG_ENV):
        app_from_env()
    monkeypatch.setenv(CONFIG_ENV, config.to_json())
    with TestClient(app_from_env()) as factory_client:
        assert factory_client.get("/healthz").json() == {"status": "ok", "count": 2000,
                                                         "version": 1}
        assert factory_client.get("/v1/info").json()["writes"] is False
    # A worker started with a token file reads the token itself and takes writes.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = ServiceConfig(str(bundle_dir), backend="litert", write_token_file=str(token_file))
    monkeypatch.setenv(CONFIG_ENV, config.to_json())
    with TestClient(app_from_env()) as factory_client:
        assert factory_client.get("/v1/info").json()["writes"] is True
        assert_error(factory_client.delete("/v1/items/0", headers={"Authorization": "Bearer x"}),
                     403, "write token")


def test_serve_with_two_workers(lenet_embed_cmd, bundle_dir, digits, tmp_path):
    """The real command with --workers 2: uvicorn's worker processes build the app from the
    environment, answer searches, each logs one line per request, and ``/metrics`` adds up
    both workers' counts (prometheus-client's multiprocess mode) whichever worker answers it."""
    log_path = tmp_path / "serve.log"
    command = [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir), "--workers", "2"]
    with running_service(lambda port: [*command, "--port", str(port)], log_path) as (url, _):
        deadline = time.monotonic() + 120  # both workers up (each loads the bundle first)
        while (log_path.read_text().count("Application startup complete") < 2
               and time.monotonic() < deadline):
            time.sleep(0.2)
        for i in range(6):
            # A new connection each: both workers get some of them.
            response = httpx.post(f"{url}/v1/search?k=3", timeout=30,
                                  files={"file": (f"{i}.png", png(digits[0][i]))})
            assert response.status_code == 200
            assert len(response.json()["neighbors"]) == 3
        scrapes = [httpx.get(f"{url}/metrics", timeout=30).text for _ in range(6)]
    log = log_path.read_text()
    assert log.count("POST /v1/search?k=3 200 ") == 6, log
    assert "Traceback" not in log
    counted = 'lenet_embed_http_requests_total{method="POST",route="/v1/search",status="200"} 6.0'
    assert all(counted in scrape for scrape in scrapes), scrapes[0]



def version_at(url: str) -> int:
    """The version /healthz reports, on a new connection (so on either worker)."""
    response = httpx.get(f"{url}/healthz", timeout=10)
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def cli_add(lenet_embed_cmd, bundle: Path, image: Path, label: str) -> dict:
    """``lenet-embed add IMAGE --label L --json`` in a process of its own: another writer."""
    result = subprocess.run([*lenet_embed_cmd, "add", str(image), "--label", label,
                             "--index-dir", str(bundle), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_serve_refuses_a_short_write_token(lenet_embed_cmd, bundle_dir, tmp_path, monkeypatch):
    short = tmp_path / "token"
    short.write_text("too-short\n")
    result = subprocess.run([*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir),
                             "--port", str(free_port()), "--write-token-file", str(short)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines
    assert str(short) in lines[0] and "at least 16 characters" in lines[0]
    # The other ways a token can be wrong, in-process; a server that started anyway would fail.
    import uvicorn

    def no_server(*args, **kwargs):
        raise AssertionError("the service started")

    monkeypatch.setattr(uvicorn, "run", no_server)
    empty = tmp_path / "empty"
    empty.write_text("")
    cases = [
        (["--write-token-file", str(empty)], {}, "at least 16 characters"),
        (["--write-token-file", str(tmp_path / "missing")], {}, "cannot read the write token"),
        ([], {"LENET_EMBED_WRITE_TOKEN": "short"}, "$LENET_EMBED_WRITE_TOKEN: the write token"),
    ]
    for options, env, fragment in cases:
        outcome = CliRunner().invoke(main, ["serve", "--index-dir", str(bundle_dir), *options],
                                     env=env)
        assert outcome.exit_code == 1, outcome.output
        assert outcome.output.count("\n") == 1 and fragment in outcome.output, outcome.output


SLOW_POLLING = """
import sys
import uvicorn
from lenet_embed.search import SearchIndex
from lenet_embed.serve import create_app
app = create_app(SearchIndex.load(sys.argv[1]), reload_interval=600)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_sighup_makes_the_service_reload_at_once(bundle_copy, digits, tmp_path):
    """With polling every 10 minutes, only SIGHUP can explain a reload within half a second."""
    command = [sys.executable, "-c", SLOW_POLLING, str(bundle_copy)]
    log_path = tmp_path / "serve.log"
    with running_service(lambda port: [*command, str(port)], log_path) as (url, server):
        before = version_at(url)
        new_id = int(SearchIndex(bundle_copy).add([digits[0][14]], labels=[3])[0])
        time.sleep(0.5)
        assert version_at(url) == before  # not polled yet
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: version_at(url) == before + 1, seconds=1, what="the SIGHUP reload")
        response = httpx.post(f"{url}/v1/search?k=1", timeout=30,
                              files={"file": ("d.png", png(digits[0][14]))})
        assert response.json()["neighbors"][0]["id"] == new_id
        assert server.poll() is None
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_serve_follows_commits_and_survives_sighup(lenet_embed_cmd, bundle_copy, digits,
                                                   tmp_path):
    """The real `lenet-embed serve` with a token: a write over HTTP, a commit by the CLI in another
    process, then SIGHUPs: it keeps answering, at the newest version."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    image = tmp_path / "digit.png"
    image.write_bytes(png(digits[0][15]))
    log_path = tmp_path / "serve.log"
    command = [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_copy),
               "--write-token-file", str(token_file)]
    with running_service(lambda port: [*command, "--port", str(port)], log_path) as (url, server):
        assert httpx.get(f"{url}/v1/info").json()["writes"] is True
        created = httpx.post(f"{url}/v1/items", headers=AUTH, data={"label": "2"}, timeout=30,
                             files={"file": ("two.png", png(digits[0][16]))})
        assert created.status_code == 201, created.text
        assert httpx.delete(f"{url}/v1/items/5", timeout=30).status_code == 403
        added = cli_add(lenet_embed_cmd, bundle_copy, image, "3")
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: version_at(url) == added["version"], seconds=1, what="the CLI's add")
        for _ in range(3):
            server.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        response = httpx.post(f"{url}/v1/search?k=3", timeout=30,
                              files={"file": ("d.png", image.read_bytes())})
        assert response.status_code == 200
        first = response.json()["neighbors"][0]
        assert (first["id"], first["label"]) == (added["ids"][0], 3)
        assert version_at(url) == added["version"] == created.json()["version"] + 1
        assert server.poll() is None  # SIGHUP did not stop it
    log = log_path.read_text()
    assert "writes enabled" in log and "POST /v1/items 201 " in log
    assert f"now serving version {added['version']} (2002 items)" in log
    assert "Traceback" not in log


def test_two_workers_follow_commits(lenet_embed_cmd, bundle_copy, digits, tmp_path):
    """`serve --workers 2`: a commit by `lenet-embed add`, and a write through one worker, reach
    both workers within a second or two; SIGHUP reloads both workers without restarting them."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    image = tmp_path / "digit.png"
    image.write_bytes(png(digits[0][17]))
    log_path = tmp_path / "serve.log"
    command = [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_copy), "--workers", "2",
               "--write-token-file", str(token_file)]

    def log() -> str:
        return log_path.read_text()

    with running_service(lambda port: [*command, "--port", str(port)], log_path) as (url, server):
        wait_for(lambda: log().count("Application startup complete") == 2, seconds=60,
                 what="two workers")
        added = cli_add(lenet_embed_cmd, bundle_copy, image, "9")
        version = added["version"]
        # Each worker follows on its own and says so once; requests land on either one.
        wait_for(lambda: log().count(f"now serving version {version} (") == 2, seconds=2,
                 what="both workers reloading")
        assert all(version_at(url) == version for _ in range(10))
        # A write through one worker reaches the other.
        created = httpx.post(f"{url}/v1/items", headers=AUTH, data={"label": "4"}, timeout=30,
                             files={"file": ("four.png", png(digits[0][18]))}).json()
        assert created["version"] == version + 1
        wait_for(lambda: all(version_at(url) == version + 1 for _ in range(10)), seconds=2,
                 what="the write on both workers")
        for _ in range(6):
            answer = httpx.post(f"{url}/v1/search?k=1", timeout=30,
                                files={"file": ("q.png", png(digits[0][18]))}).json()
            assert answer["neighbors"][0]["id"] == created["id"]
        # SIGHUP: the supervisor passes it on; each worker reloads in place, none restarts.
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: log().count("SIGHUP: reading the bundle's manifest now") == 2,
                 seconds=10, what="the workers' reload")
        assert all(version_at(url) == version + 1 for _ in range(6))
        assert server.poll() is None
        assert log().count("Application startup complete") == 2
    assert "Traceback" not in log()


# ------------------------------------------------------------------------------------ fuzzing

def fuzz(operations, mode, headers: dict[str, str] | None = None) -> None:
    """Property-based requests for each operation, valid ones or invalid ones: each answer has a
    documented status, content type and schema, and none is a server error. (schemathesis's own
    pytest loader does not run on pytest 9, so this drives its strategies with hypothesis.)"""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=checks, headers=headers)

        check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(app, mode):
    """Every operation of the read-only service (writes answer 403)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    if mode is GenerationMode.NEGATIVE:  # only operations with inputs have invalid ones
        operations = [op for op in operations if len(op.query) + len(op.path_parameters)]
        assert {op.path for op in operations} == {"/v1/search", "/v1/items/{item_id}/image.png",
                                                  "/v1/items/{item_id}"}
    fuzz(operations, mode)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_writes_never_get_a_5xx(bundle_copy, mode):
    """POST and DELETE /v1/items with the write token, on a copy of the bundle: random images,
    labels and ids are added, refused or removed, never a server error."""
    index = SearchIndex.load(bundle_copy)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(index, write_token=TOKEN))
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path.startswith("/v1/items") and
                  op.method.upper() in ("POST", "DELETE")]
    assert len(operations) == 2
    start = index.version
    fuzz(operations, mode, headers=AUTH)
    if mode is GenerationMode.POSITIVE:
        assert index.version > start  # some of the generated writes were committed


# ------------------------------------------------------------------------- exposure


def test_every_response_carries_the_security_headers(client):
    for response in (client.get("/"), client.get("/healthz"), client.get("/nowhere"),
                     client.post("/v1/search", content=b"")):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        csp = headers["content-security-policy"]
        # The page's own script, style and images, nothing else; never inside a frame.
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "unsafe" not in csp


def test_foreign_host_names_are_refused(search_index):
    from lenet_embed.serve import create_app

    app = create_app(search_index, allowed_hosts=["localhost", "127.0.0.1"])
    with TestClient(app, base_url="http://localhost:8000") as ok:
        assert ok.get("/healthz").status_code == 200
    with TestClient(app, base_url="http://127.0.0.1:8000") as ok:
        assert ok.get("/healthz").status_code == 200
    with TestClient(app, base_url="http://rebind.example:8000") as foreign:
        response = foreign.get("/healthz")
        assert_error(response, 400, "Host", "--allowed-host")
        assert response.headers["x-content-type-options"] == "nosniff"


def test_allowed_hosts_by_binding():
    import socket

    from lenet_embed.serve.process import allowed_hosts

    # Loopback: loopback names only (a DNS-rebinding page sends its own name and is refused).
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    # Every interface: this machine's names too, and what the operator adds; '*' is any.
    wide = allowed_hosts("0.0.0.0", ["digits.example.org"])
    assert {"localhost", socket.gethostname().lower(), "digits.example.org"} <= set(wide)
    assert "0.0.0.0" not in wide
    assert allowed_hosts("0.0.0.0", ["*"]) is None


def test_wire_values_are_strict_numbers(client):
    """Vector and pixel values must be JSON numbers: strings and booleans are refused, not
    converted, and so are all-zero vectors (no direction to compare by cosine)."""
    good = [0.5] * 84
    for bad in (["0.5"] + good[1:], [True] + good[1:], [0.0] * 84):
        assert_error(client.post("/v1/search", json={"vector": bad}), 422)
    assert client.post("/v1/search", json={"vector": good}).status_code == 200
    assert_error(client.post("/v1/search", json={"pixels": ["0"] * 784}), 422, "pixels")


def test_a_fault_of_the_service_is_a_json_500_with_the_usual_headers(search_index, digits,
                                                                       monkeypatch, caplog):
    """A search that fails for a reason of the service's own (not the request's) answers the
    one-line 500 a route's crash gives, with the security headers, and logs the traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    # Starlette re-raises a route's crash once it has answered, for the server's log.
    with TestClient(create_app(search_index), raise_server_exceptions=False) as test_client:
        monkeypatch.setattr(SearchIndex, "query", broken)
        with caplog.at_level(logging.ERROR, logger="lenet_embed.serve"):
            response = upload(test_client, png(digits[0][0]))
    assert_error(response, 500, "internal server error")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "disk on fire" in caplog.text


def test_the_guard_answers_what_no_inner_layer_answered():
    """In front of everything, the guard turns a refusal that reached it into its JSON answer
    and anything else into the one-line 500, both with the security headers; an error after
    the response started is left to the server."""
    from lenet_embed.serve.errors import ApiError
    from lenet_embed.serve.middleware import RequestGuard

    async def refusing(scope, receive, send):
        raise ApiError(413, "request body over 5 MB")

    async def crashing(scope, receive, send):
        raise KeyError("oops")

    async def crashing_late(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial"})
        raise KeyError("late")

    # (No lifespan: these stand-ins answer HTTP only.)
    response = TestClient(RequestGuard(refusing)).post("/v1/search", content=b"x")
    assert_error(response, 413, "5 MB")
    assert response.headers["x-frame-options"] == "DENY"
    assert_error(TestClient(RequestGuard(crashing)).get("/v1/info"), 500, "internal server error")
    with pytest.raises(KeyError):
        TestClient(RequestGuard(crashing_late)).get("/healthz")
