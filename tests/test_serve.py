"""The HTTP service: every endpoint and every refusal through FastAPI's TestClient over the session
bundle (2,000 real MNIST digits), answers checked against in-process searches and `query --json`,
concurrent searches, the TensorFlow-free process, `serve --workers 2` as a real subprocess, and
schemathesis fuzzing of the OpenAPI schema."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

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
from lenet_embed.serve import (
    CONFIG_ENV,
    MAX_BODY_BYTES,
    ServiceConfig,
    app_from_env,
    create_app,
)

K = 5


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

def test_healthz(client, bundle_data):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "count": len(bundle_data.train)}


def test_info_summarises_the_manifest(client, search_index):
    info = client.get("/v1/info").json()
    manifest = search_index.manifest
    assert info["count"] == manifest["count"] == 2000
    assert (info["dim"], info["metric"], info["factory"]) == (84, "cosine", "Flat")
    assert info["dataset"] == manifest["dataset"]
    assert info["created_at"] == manifest["created_at"]
    assert info["encoder"] == "litert"
    assert info["max_k"] == 100
    assert "files" not in info  # a summary, not the checksums


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
    assert upload(client, png(images[0])).json()["predicted_label"] == 7


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
        "/healthz", "/v1/info", "/v1/search", "/v1/items/{item_id}/image.png"}
    search = schema["paths"]["/v1/search"]["post"]
    content = search["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["required"] == ["file"]
    assert set(content["application/json"]["schema"]["properties"]) == {
        "image_base64", "pixels", "vector"}
    k = next(p for p in search["parameters"] if p["name"] == "k")
    assert (k["schema"]["minimum"], k["schema"]["maximum"]) == (1, 100)
    assert {"200", "400", "413", "415", "422"} <= set(search["responses"])


def test_page_is_served_by_the_app_and_needs_no_network(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="pad" width="280" height="280"' in page.text
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


def test_image_over_4096_px_is_413(client):
    wide = png(np.zeros((2, 4097)))
    assert_error(upload(client, wide, name="wide.png"), 413, "4097x2 px", "4096x4096")
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
        assert_error(upload(small_client, data, k=31), 422, "at most 30")


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


def test_worker_factory_reads_its_configuration(monkeypatch, bundle_dir):
    config = ServiceConfig(str(bundle_dir), backend="litert", threads=2, search_params={})
    assert ServiceConfig.from_json(config.to_json()) == config
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(LenetEmbedError, match=CONFIG_ENV):
        app_from_env()
    monkeypatch.setenv(CONFIG_ENV, config.to_json())
    with TestClient(app_from_env()) as factory_client:
        assert factory_client.get("/healthz").json() == {"status": "ok", "count": 2000}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(server: subprocess.Popen, url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "the service exited early"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"no answer from {url}/healthz within {seconds} s")


def test_serve_with_two_workers(lenet_embed_cmd, bundle_dir, digits, tmp_path):
    """The real command with --workers 2: uvicorn's worker processes build the app from the
    environment, answer searches, and each logs one line per request."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir), "--port", str(port),
             "--workers", "2"], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(server, url)
            for i in range(6):
                response = httpx.post(f"{url}/v1/search?k=3", timeout=30,
                                      files={"file": (f"{i}.png", png(digits[0][i]))})
                assert response.status_code == 200
                assert len(response.json()["neighbors"]) == 3
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    log = log_path.read_text()
    assert log.count("POST /v1/search?k=3 200 ") == 6, log
    assert "Traceback" not in log


# ------------------------------------------------------------------------------------ fuzzing

@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(app, mode):
    """Property-based requests generated from /openapi.json, valid ones and invalid ones, for
    every operation: each answer has a documented status, content type and schema, and none is a
    server error. (schemathesis's own pytest loader does not run on pytest 9, so this drives its
    strategies with hypothesis directly.)"""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4
    if mode is GenerationMode.NEGATIVE:  # only operations with inputs have invalid ones
        operations = [op for op in operations if len(op.query) + len(op.path_parameters)]
        assert {op.path for op in operations} == {"/v1/search", "/v1/items/{item_id}/image.png"}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(checks=checks)

        fuzz()
