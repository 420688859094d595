"""The draw-a-digit page in real headless Chromium against the real `lenet-embed serve`.

Debian's `chromium` at /usr/bin/chromium, driven by Playwright (no browser download). The service
runs as a subprocess on 127.0.0.1 over the session bundle (2,000 real MNIST digits).
"""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
# Root, no network, no GPU: nothing may reach out or need a sandbox.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
]
ALL_LOADED = """() => {
    const images = [...document.querySelectorAll('#neighbors img')];
    return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not at /usr/bin/chromium (apt-get install chromium)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(lenet_embed_cmd, bundle_dir, tmp_path_factory):
    """`lenet-embed serve` on a free loopback port; yields (base URL, log file path)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("service") / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir), "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the service did not start within 60 s"
                time.sleep(0.2)
            yield url, log_path
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, service):
    """A fresh page on the service, failing the test on any script error or any request that
    leaves the service (the page must work offline)."""
    url, _ = service
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("request", lambda request: None if request.url.startswith(url)
            else problems.append(f"request outside the service: {request.url}"))
    page.goto(url)
    page.wait_for_function("document.getElementById('info').textContent.length > 0")
    yield page
    context.close()
    assert problems == []


def neighbours(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#neighbors li",
        """items => items.map((item) => ({
            label: item.querySelector('.label').textContent,
            distance: Number(item.querySelector('.distance').textContent),
            width: item.querySelector('img').naturalWidth,
            src: item.querySelector('img').getAttribute('src'),
        }))""",
    )


def test_drawing_a_one_shows_its_neighbours(page, service, tmp_path):
    pad = page.locator("#pad").bounding_box()
    assert (pad["width"], pad["height"]) == (280, 280)
    x = pad["x"] + pad["width"] / 2
    page.mouse.move(x, pad["y"] + 40)
    page.mouse.down()
    page.mouse.move(x + 4, pad["y"] + pad["height"] - 40, steps=25)
    page.mouse.up()
    page.wait_for_function(ALL_LOADED, timeout=15000)

    assert page.locator("#predicted").inner_text() == "1"
    found = neighbours(page)
    assert len(found) == 8  # the page's default k
    assert all(item["width"] == 28 for item in found)  # the indexed 28x28 digits, loaded
    assert all(item["src"].startswith("/v1/items/") for item in found)
    assert sum(item["label"] == "1" for item in found) >= 5
    distances = [item["distance"] for item in found]
    assert distances == sorted(distances)
    assert "nearest neighbours of canvas.png" in page.locator("#status").inner_text()
    screenshot = tmp_path / "draw-a-one.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] == 1000
    print(f"screenshot: {screenshot}")
    _, log_path = service
    assert "POST /v1/search?k=8 200" in log_path.read_text()


def test_clear_empties_the_results(page):
    pad = page.locator("#pad").bounding_box()
    page.mouse.move(pad["x"] + 140, pad["y"] + 60)
    page.mouse.down()
    page.mouse.move(pad["x"] + 140, pad["y"] + 220, steps=10)
    page.mouse.up()
    page.wait_for_function(ALL_LOADED, timeout=15000)
    page.click("#clear")
    assert page.locator("#neighbors li").count() == 0
    assert page.locator("#predicted").inner_text() == "–"
    blank = page.evaluate("""() => {
        const data = document.getElementById('pad').getContext('2d')
            .getImageData(0, 0, 280, 280).data;
        return data.every((value, i) => i % 4 === 3 || value === 0);
    }""")
    assert blank


def test_uploading_a_real_digit_predicts_its_label(page, bundle_data, tmp_path):
    image, label = bundle_data.test.images[0], int(bundle_data.test.labels[0])
    path = tmp_path / "seven.png"
    buffer = io.BytesIO()
    Image.fromarray(255 - np.asarray(image)).save(buffer, format="PNG")  # black on white
    path.write_bytes(buffer.getvalue())
    page.fill("#k", "4")
    page.set_input_files("#file", str(path))
    page.wait_for_function(ALL_LOADED, timeout=15000)
    assert page.locator("#predicted").inner_text() == str(label) == "7"
    assert len(neighbours(page)) == 4
    assert "seven.png" in page.locator("#status").inner_text()


def test_a_text_file_shows_the_service_error(page, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\n")
    page.set_input_files("#file", str(path))
    status = page.locator("#status.error")
    status.wait_for(timeout=15000)
    assert "notes.txt: not a readable image" in status.inner_text()
    assert page.locator("#neighbors li").count() == 0
