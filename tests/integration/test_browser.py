"""The draw-a-digit page in real headless Chromium against the real `lenet-embed serve`.

Debian's `chromium` at /usr/bin/chromium, driven by Playwright (no browser download). The service
runs as a subprocess on 127.0.0.1 over the session bundle (2,000 real MNIST digits); the tests that
add to the index run a second one, with a write token, over a copy of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.harness.running import running_service

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

TOKEN = "browser-test-token-0123456789"
SCREENSHOT = Path("/tmp/page_add.png")
TOKEN_KEY = "lenet-embed-write-token"  # the page's sessionStorage key

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not at /usr/bin/chromium (apt-get install chromium)",
)


def serving(command: list[str], log_path: Path):
    """`lenet-embed serve` (``command``, less its port) on a free loopback port."""
    return running_service(lambda port: [*command, "--port", str(port)], log_path)


@pytest.fixture(scope="module")
def service(lenet_embed_cmd, bundle_dir, tmp_path_factory):
    """The read-only service over the session bundle; yields (base URL, log file path)."""
    log_path = tmp_path_factory.mktemp("service") / "serve.log"
    with serving([*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir)], log_path) as (url, _):
        yield url, log_path


@pytest.fixture(scope="module")
def writable_service(lenet_embed_cmd, bundle_dir, tmp_path_factory):
    """The service with a write token over a copy of the session bundle; yields (base URL, log
    file path, bundle path)."""
    folder = tmp_path_factory.mktemp("writable")
    bundle = Path(shutil.copytree(bundle_dir, folder / "index"))
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    log_path = folder / "serve.log"
    command = [*lenet_embed_cmd, "serve", "--index-dir", str(bundle),
               "--write-token-file", str(token_file)]
    with serving(command, log_path) as (url, _):
        yield url, log_path, bundle


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def open_page(browser, url: str, prepare=None):
    """A fresh page on the service at ``url``, failing the test on any script error or any
    request that leaves the service (the page must work offline). ``prepare(page)`` runs before
    the page loads (to route requests, say)."""
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("request", lambda request: None if request.url.startswith(url)
            else problems.append(f"request outside the service: {request.url}"))
    if prepare is not None:
        prepare(page)
    try:
        page.goto(url)
        page.wait_for_function("() => document.getElementById('info').textContent.length > 0")
        yield page
    finally:
        context.close()
    assert problems == []


@pytest.fixture
def page(browser, service):
    with open_page(browser, service[0]) as opened:
        yield opened


@pytest.fixture
def writable_page(browser, writable_service):
    with open_page(browser, writable_service[0]) as opened:
        yield opened


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
    # A minimum confidence no answer reaches: the same digit is "unsure", neighbours still shown.
    page.fill("#min-confidence", "1")
    page.dispatch_event("#min-confidence", "change")
    page.wait_for_function("() => document.querySelector('#predicted').textContent === 'unsure'",
                           timeout=15000)
    assert len(neighbours(page)) == 4
    page.fill("#min-confidence", "")
    page.dispatch_event("#min-confidence", "change")
    page.wait_for_function(f"() => document.querySelector('#predicted').textContent === '{label}'",
                           timeout=15000)


def test_a_text_file_shows_the_service_error(page, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\n")
    page.set_input_files("#file", str(path))
    status = page.locator("#status.error")
    status.wait_for(timeout=15000)
    assert "notes.txt: not a readable image" in status.inner_text()
    assert page.locator("#neighbors li").count() == 0


# ------------------------------------------------------------------------- adding to the index

FIRST_IS = """(src) => {
    const first = document.querySelector('#neighbors li img');
    return first !== null && first.getAttribute('src') === src && first.complete
        && first.naturalWidth > 0;
}"""


def draw_seven(page) -> None:
    """One stroke: a bar across the top, then down to the lower left."""
    pad = page.locator("#pad").bounding_box()
    x, y = pad["x"], pad["y"]
    page.mouse.move(x + 70, y + 60)
    page.mouse.down()
    page.mouse.move(x + 210, y + 60, steps=15)
    page.mouse.move(x + 120, y + 230, steps=20)
    page.mouse.up()


def test_add_controls_are_hidden_without_writes(page):
    assert "items" in page.locator("#info").inner_text()
    assert page.locator("#add").is_hidden()
    assert not page.locator("#token").is_visible()
    assert not page.locator("#add-button").is_visible()


def test_adding_a_drawing_makes_it_its_own_nearest_neighbour(writable_page, writable_service):
    page = writable_page
    url, log_path, bundle = writable_service
    new_id = json.loads((bundle / "manifest.json").read_text())["next_id"]
    new_src = f"/v1/items/{new_id}/image.png"
    assert page.locator("#add").is_visible()
    assert page.locator("#add-kind").inner_text() == "digit"
    assert page.locator("#add-label option").all_inner_texts() == [str(d) for d in range(10)]
    assert not page.locator("#add-class").is_visible()
    assert page.locator("#token").get_attribute("type") == "password"

    draw_seven(page)
    page.wait_for_function(ALL_LOADED, timeout=15000)
    assert neighbours(page)[0]["src"] != new_src
    page.select_option("#add-label", "7")

    # A wrong token: the service's one-line refusal, and nothing added.
    page.fill("#token", "not-the-write-token-at-all")
    page.click("#add-button")
    page.locator("#add-status.error").wait_for(timeout=15000)
    assert "this needs the write token" in page.locator("#add-status").inner_text()

    page.fill("#token", TOKEN)
    page.click("#add-button")
    page.wait_for_function(
        "() => document.getElementById('add-status').textContent.startsWith('added as id')",
        timeout=15000)
    assert page.locator("#add-status").inner_text() == (
        f"added as id {new_id} (label 7); the index holds 2,001 items")
    # The page searches the drawing again: the new item is its own nearest neighbour.
    page.wait_for_function(FIRST_IS, arg=new_src, timeout=15000)
    first = neighbours(page)[0]
    assert (first["label"], first["distance"]) == ("7", 0)
    assert "added" in page.locator("#neighbors li").first.get_attribute("class")
    page.wait_for_function(
        "() => document.getElementById('info').textContent.includes('2,001 items')", timeout=15000)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Searching the same drawing afresh finds it first too.
    page.click("#clear")
    draw_seven(page)
    page.wait_for_function(FIRST_IS, arg=new_src, timeout=15000)
    assert neighbours(page)[0]["label"] == "7"

    # The token stays in this tab's sessionStorage only, and fills the field again on reload.
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == TOKEN
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    page.reload()
    page.wait_for_function("() => document.getElementById('info').textContent.length > 0")
    assert page.locator("#token").input_value() == TOKEN

    assert httpx.get(f"{url}{new_src}").status_code == 200
    log = log_path.read_text()
    assert "POST /v1/items 403 " in log and "POST /v1/items 201 " in log


def test_class_name_bundles_get_a_free_text_label(browser, writable_service):
    """With class names in /v1/info (routed here: the bundle holds digits), the label is free
    text offered the known names; the service's refusal of a name shows as one line."""
    url = writable_service[0]
    info = httpx.get(f"{url}/v1/info").json() | {"classes": ["cat", "dog"]}

    def with_classes(page) -> None:
        page.route(f"{url}/v1/info", lambda route: route.fulfill(json=info))

    with open_page(browser, url, prepare=with_classes) as page:
        assert page.locator("#add-kind").inner_text() == "class"
        assert not page.locator("#add-label").is_visible()
        assert page.locator("#add-class").is_visible()
        values = page.eval_on_selector_all("#add-classes option", "options => "
                                           "options.map((option) => option.value)")
        assert values == ["cat", "dog"]
        page.fill("#token", TOKEN)
        page.fill("#add-class", "dog")
        page.click("#add-button")
        assert page.locator("#add-status.error").inner_text() == "Draw a digit first."
        draw_seven(page)
        page.wait_for_function(ALL_LOADED, timeout=15000)
        page.click("#add-button")
        page.wait_for_function(
            "() => document.getElementById('add-status').textContent.includes(\"label 'dog'\")",
            timeout=15000)
        assert "whole numbers" in page.locator("#add-status.error").inner_text()
