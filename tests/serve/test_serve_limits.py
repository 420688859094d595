"""The service under abuse: costly images do not hold up other searches, a full decode pool answers
503 with Retry-After, a decode over its budget is stopped, a body that does not arrive in time is
408, and each kind of overload is logged once per interval, not once per request. (Idle, slow
and oversized connections are nginx's to cut off: see test_serve_nginx.py.)

The machine is shared, so latencies are compared as ratios to a quiet baseline measured in the
same test, never as absolute milliseconds; every wait has a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import statistics
import threading
import time
from concurrent.futures import Future

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from test_serve import assert_error, png

from lenet_embed.serve import create_app, pools
from lenet_embed.serve.errors import install_error_handlers
from lenet_embed.serve.middleware import RequestGuard
from lenet_embed.serve.process import raise_open_file_limit
from scripts.harness.running import free_port

SERVE_LOGGER = "lenet_embed.serve"


@pytest.fixture(scope="module")
def digits(bundle_data):
    return bundle_data.test.images[:10]


@pytest.fixture(scope="module")
def costly_image() -> bytes:
    """A 4096x4096 digit as JPEG 2000 with a single resolution level: the costliest kind of file
    the service accepts (142 KB, about 1 s of CPU and 100 MB to decode; the same with RGBA and
    small code-blocks is 4.5 MB and 6 s). Encoding it takes a few seconds."""
    side = 4096
    picture = Image.new("L", (side, side), 255)
    ImageDraw.Draw(picture).line([(side * 0.3, side * 0.2), (side * 0.7, side * 0.2),
                                  (side * 0.45, side * 0.85)], fill=0, width=side // 25)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG2000", num_resolutions=1)
    return buffer.getvalue()


def large_png(digit: np.ndarray, side: int = 1024) -> bytes:
    """A real digit scaled up to ``side`` x ``side``: cheap to decode, but over the light size,
    so it goes to a decode worker process."""
    return png(np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.NEAREST)))


def ppm(digit: np.ndarray) -> bytes:
    """A 28x28 digit as PPM: not a light format, so decoded by a worker process in a blink."""
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PPM")
    return buffer.getvalue()


def search(client, data: bytes, name: str = "digit.png", k: int = 5):
    return client.post(f"/v1/search?k={k}", files={"file": (name, data, "image/png")})


def overload_lines(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == SERVE_LOGGER and fragment in r.getMessage()]


# ------------------------------------------------------------------------------ decode pools

def test_costly_images_do_not_hold_up_light_searches(search_index, digits, costly_image):
    """While three clients send the costliest image in a loop, searches of small PNGs take about
    as long as when the service is quiet: the costly decodes run in worker processes, not in the
    search batches (before the pools, each light search waited behind seconds of decoding)."""
    light = [png(digit) for digit in digits]
    app = create_app(search_index, decode_timeout=5.0)

    def light_round(count: int) -> list[float]:
        latencies = []
        for i in range(count):
            begun = time.perf_counter()
            response = search(client, light[i % len(light)])
            latencies.append(time.perf_counter() - begun)
            assert response.status_code == 200, response.text
        return latencies

    heavy: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stop = threading.Event()

    def send_costly() -> None:
        for _ in range(30):
            if stop.is_set():
                return
            sent = time.monotonic()
            response = search(client, costly_image, name="costly.jp2")
            heavy.append((sent, time.monotonic(), response.status_code))
            assert response.status_code in (200, 413, 503), response.text
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1"

    with TestClient(app) as client:
        light_round(10)  # warm-up
        quiet = light_round(40)
        senders = [threading.Thread(target=send_costly) for _ in range(3)]
        for sender in senders:
            sender.start()
        time.sleep(1.0)  # the costly images are being decoded
        loaded_started = time.monotonic()
        loaded = light_round(40)
        loaded_ended = time.monotonic()
        stop.set()
        for sender in senders:
            sender.join(timeout=120)
    assert not any(sender.is_alive() for sender in senders)
    # The costly images were in flight while the light searches ran.
    assert any(sent < loaded_started and answered > loaded_started for sent, answered, _ in heavy)
    busy = sum(min(answered, loaded_ended) - max(sent, loaded_started)
               for sent, answered, _ in heavy if answered > loaded_started and sent < loaded_ended)
    assert busy >= 0.5 * (loaded_ended - loaded_started)
    ratio = statistics.median(loaded) / statistics.median(quiet)
    assert ratio < 4, (ratio, statistics.median(quiet), statistics.median(loaded))


def test_a_full_decode_pool_is_503_with_retry_after_and_one_log_line(
        search_index, digits, monkeypatch, caplog):
    """One heavy worker and no queue, held busy: further heavy images get 503 with Retry-After
    at once (large bodies before they are read), light ones are still answered, and the log
    says so once. The held image is then answered like the same search made in-process."""
    monkeypatch.setattr(pools, "HEAVY_WORKERS", 1)
    monkeypatch.setattr(pools, "HEAVY_QUEUE", 0)
    monkeypatch.setattr(pools, "HEAVY_NICE", 0)  # see test_a_decode_over_its_budget_is_stopped
    entered, release = threading.Event(), threading.Event()
    schedule = pools.DecodePools._schedule

    def held(self, name, data):
        """The decode is sent to the worker processes once released."""
        entered.set()
        future: Future = Future()

        def send() -> None:
            release.wait(30)
            decoded = schedule(self, name, data)
            decoded.add_done_callback(lambda done: future.set_result(done.result()))

        threading.Thread(target=send, daemon=True).start()
        return future

    monkeypatch.setattr(pools.DecodePools, "_schedule", held)
    big = large_png(digits[0])
    noise = png(np.random.default_rng(0).integers(0, 256, (400, 400)))  # over 128 KB
    assert len(big) <= pools.LIGHT_BYTES < pools.SURELY_HEAVY_BODY < len(noise)
    first: list[httpx.Response] = []
    with TestClient(create_app(search_index, decode_timeout=30)) as client, \
            caplog.at_level(logging.WARNING, logger=SERVE_LOGGER):
        holder = threading.Thread(target=lambda: first.append(search(client, big, "big.png")))
        holder.start()
        assert entered.wait(30)
        refused = [search(client, big, f"more-{i}.png") for i in range(4)]
        refused.append(search(client, noise, "noise.png"))
        light = search(client, png(digits[1]))
        release.set()
        holder.join(timeout=60)
    for response in refused:
        assert_error(response, 503, "busy decoding other images")
        assert response.headers["retry-after"] == "1"
    assert light.status_code == 200, light.text
    assert len(overload_lines(caplog, "decode queue full")) == 1
    assert first and first[0].status_code == 200, first
    want = search_index.search(Image.open(io.BytesIO(big)), k=5)[0]
    assert [n["id"] for n in first[0].json()["neighbors"]] == [n.id for n in want]


def test_a_picture_without_pen_strokes_is_refused_on_both_decode_paths(search_index,
                                                                       monkeypatch):
    """A checkerboard reaches the model and is refused by its calibrated verdict (200, no match,
    its neighbours shown), the same whether it is light and decoded in its search batch or heavy
    and decoded by a worker process."""
    board = ((np.indices((64, 64)) // 8).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = png(board)
    large = png(np.asarray(Image.fromarray(board).resize((1024, 1024), Image.Resampling.NEAREST)))
    assert len(small) <= pools.LIGHT_BYTES and Image.open(io.BytesIO(large)).width > 320
    monkeypatch.setattr(pools, "HEAVY_NICE", 0)  # see test_a_decode_over_its_budget_is_stopped
    with TestClient(create_app(search_index)) as client:
        answers = []
        for data in (small, large):
            response = search(client, data)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    for answer in answers:
        assert answer["match"] is False and answer["predicted_label"] is None
        assert answer["reason"] in ("not a digit", "unsure") and answer["neighbors"]
    assert [a["neighbors"][0]["id"] for a in answers] == [answers[0]["neighbors"][0]["id"]] * 2


def test_a_decode_over_its_budget_is_stopped(search_index, digits, costly_image, caplog,
                                             monkeypatch):
    """With a 0.3 s budget the costly image is refused (413 when its decoder used half the budget
    in CPU, 503 when it waited for a core) and its worker process replaced: the next image for a
    worker is answered; the metrics count those as decode timeouts. (A decode that waited over
    the budget for a worker, as while one is being replaced on a busy machine, is 503 too,
    counted as overload. The workers run at normal priority here: at the lowest, on a machine
    that others keep busy, even a tiny image can wait longer than 0.3 s for a core.)"""
    monkeypatch.setattr(pools, "HEAVY_NICE", 0)
    overran = waited = 0
    with TestClient(create_app(search_index, decode_timeout=0.3)) as client, \
            caplog.at_level(logging.WARNING, logger=SERVE_LOGGER):
        for _ in range(3):
            response = search(client, costly_image, name="costly.jp2")
            assert response.status_code in (413, 503)
            if response.status_code == 413:
                assert_error(response, 413, "costly.jp2: decoding this image takes over 0.3 s")
                overran += 1
                continue
            assert response.headers["retry-after"] == "1"
            if "waited over 0.3 s" in assert_error(response, 503, "over 0.3 s"):
                waited += 1
            else:
                assert_error(response, 503, "took over 0.3 s")
                overran += 1
        answered = search(client, ppm(digits[2]), name="after.ppm")
        metrics = client.get("/metrics").text
    assert answered.status_code == 200, answered.text
    assert overran >= 1
    assert f'lenet_embed_refusals_total{{kind="decode_timeout"}} {overran:.1f}' in metrics
    if waited:
        assert f'lenet_embed_refusals_total{{kind="overload"}} {waited:.1f}' in metrics
    want = search_index.search(digits[2], k=5)[0]
    assert [n["id"] for n in answered.json()["neighbors"]] == [n.id for n in want]
    assert len(overload_lines(caplog, "decode budget overrun")) == 1


def test_a_decode_over_its_memory_budget_is_413(search_index, digits, monkeypatch):
    """A worker may map DECODE_MEMORY more for a decode: a 4096x4096 RGBA PNG needs 64 MB for its
    pixels alone, so with 48 MB it is refused; a small image is still decoded."""
    monkeypatch.setattr(pools, "DECODE_MEMORY", 48 * 1024 * 1024)
    monkeypatch.setattr(pools, "HEAVY_NICE", 0)  # see test_a_decode_over_its_budget_is_stopped
    picture = Image.new("RGBA", (4096, 4096), (255, 255, 255, 255))
    ImageDraw.Draw(picture).line([(1200, 800), (2800, 800), (1800, 3500)], fill=(0, 0, 0, 255),
                                 width=160)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    with TestClient(create_app(search_index, decode_timeout=30)) as client:
        assert_error(search(client, buffer.getvalue(), name="wide.png"), 413,
                     "wide.png: decoding this image needs over 48 MB of memory")
        assert search(client, ppm(digits[3]), name="small.ppm").status_code == 200


# ------------------------------------------------------------------------- the real service

# ------------------------------------------------------- the body timeout, on a small app

def small_app(body_timeout: float = 30.0) -> tuple[FastAPI, threading.Event]:
    """An app that echoes body sizes (``POST /echo``) and holds requests until released
    (``GET /hold``), behind the service's middleware and error handlers."""
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestGuard, body_timeout=body_timeout)
    released = threading.Event()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/hold")
    async def hold() -> dict[str, bool]:
        for _ in range(1500):
            if released.is_set():
                break
            await asyncio.sleep(0.02)
        return {"released": released.is_set()}

    return app, released


@contextlib.contextmanager
def served(app):
    """``app`` served by uvicorn in a thread; yields the port."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def read_response(sock: socket.socket, seconds: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response read from a blocking socket."""
    sock.settimeout(seconds)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def is_closed(sock: socket.socket, seconds: float) -> bool:
    """Whether the other side closes ``sock`` within ``seconds`` (data before that is skipped)."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_body_that_does_not_arrive_in_time_gets_408():
    app, _ = small_app(body_timeout=0.5)
    with served(app) as port, connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
                     + b"x" * 10)
        status, _, body = read_response(sock, seconds=5)
        assert status == 408
        assert json.loads(body) == {"error": "request body not received within 0.5 s"}


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft, 512)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        raised = raise_open_file_limit()
        assert raised == (lowered if hard == resource.RLIM_INFINITY else hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_full_search_queue_answers_503_and_logs_once(search_index, digits, caplog):
    """Beyond ``max_waiting`` queries waiting for the next batch, a search is refused at once
    (503 with Retry-After) instead of queueing; the queue's overload is logged once. (Requests
    read in one turn of the event loop, e.g. after a batch held it, all join the queue before
    the next batch starts.)"""
    from lenet_embed.search import Query
    from lenet_embed.serve.batcher import SearchBatcher
    from lenet_embed.serve.errors import ApiError

    batcher = SearchBatcher(search_index, threads=1, max_waiting=4)

    async def scenario():
        # Seven requests in one turn of the loop: four wait for the batch, three are refused.
        searches = [asyncio.ensure_future(batcher.search(Query(image=png(d)), 1))
                    for d in digits[:7]]
        outcomes = await asyncio.gather(*searches, return_exceptions=True)
        refused = outcomes[4:]
        for outcome in refused:
            assert isinstance(outcome, ApiError), outcome
        return outcomes[:4], refused

    with caplog.at_level(logging.WARNING, logger=SERVE_LOGGER):
        answered, refused = asyncio.run(scenario())
    assert [r.neighbors[0].id for r in answered] == [
        search_index.search(d, k=1)[0][0].id for d in digits[:4]]
    assert [(e.status, e.retry_after) for e in refused] == [(503, 1)] * 3
    lines = [r.message for r in caplog.records if "search queue full" in r.message]
    assert len(lines) == 1 and "4 queries waiting" in lines[0]


class _Timed:
    """A search index whose batches take ``delay`` seconds a query longer, recording the thread
    each batch ran in."""

    def __init__(self, index, delay: float) -> None:
        self.index, self.delay, self.threads = index, delay, []

    def __len__(self) -> int:
        return len(self.index)

    def query(self, queries, k):
        self.threads.append(threading.get_ident())
        time.sleep(self.delay * len(queries))
        return self.index.query(queries, k)


@pytest.mark.parametrize("delay", [0.0, 0.03])
def test_batches_of_a_slow_index_leave_the_event_loop_free(search_index, digits, delay):
    """Quick batches run on the event loop; once batches prove slow (an index at ~30 ms a
    query), they run in the batcher's own thread and the loop goes on meanwhile (here a ticker
    every 2 ms; on the loop it could not tick during a batch). The answers are the same."""
    from lenet_embed.search import Query
    from lenet_embed.serve.batcher import SearchBatcher

    timed = _Timed(search_index, delay)
    batcher = SearchBatcher(timed, threads=1)

    async def scenario():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.002)

        answers = []
        ticking = asyncio.ensure_future(ticker())
        for round_ in range(3):  # one batch of four a round
            began = len(ticks)
            answers += await asyncio.gather(*(batcher.search(Query(image=png(d)), 1)
                                              for d in digits[4 * round_:4 * round_ + 4]))
            if round_ > 0:
                during.append(len(ticks) - began)
        ticking.cancel()
        return answers, threading.get_ident()

    during: list[int] = []
    answers, loop_thread = asyncio.run(scenario())
    assert [a.neighbors[0].id for a in answers] == [
        search_index.search(d, k=1)[0][0].id for d in digits[:12]]
    assert len(timed.threads) == 3
    if delay:  # the first batch measured the index; the next two ran beside the loop
        assert timed.threads[0] == loop_thread
        assert timed.threads[1] == timed.threads[2] != loop_thread
        assert min(during) >= 10, during  # 120 ms a batch, a tick every 2 ms
    else:
        assert timed.threads == [loop_thread] * 3
    batcher.stop()  # as the app's shutdown does: no batcher thread is left running
    assert not [t for t in threading.enumerate() if t.name.startswith("search-batch")]
