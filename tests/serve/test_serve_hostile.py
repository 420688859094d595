"""The service against hostile input: log lines a request cannot forge, answers
that name no server folder, repeated single-valued headers, a bundle the service cannot write
to, and write tokens that are weak, exposed or not files at all.

Apps are built as in test_serve.py (create_app over the session bundle or a private copy) and
served for real with test_serve_limits.served (uvicorn with the service's protocol)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_serve import AUTH, TOKEN, add_upload, assert_error, png, upload
from test_serve_limits import connect, read_response, served

from lenet_embed.errors import LenetEmbedError
from lenet_embed.search import SearchIndex
from lenet_embed.serve import create_app
from lenet_embed.serve.auth import read_token, write_problem
from lenet_embed.serve.exposure import ESCAPED_LOGGERS, escape, shown_source
from lenet_embed.writer import BundleWriter, WriterLock
from scripts.harness.running import free_port


def unescape(text: str) -> str:
    """The inverse of :func:`escape` (its escapes are Python's)."""
    return text.encode("ascii", "backslashreplace").decode("unicode_escape")


class Lines(logging.Handler):
    """Every record of the escaped loggers, as a plain handler would print it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        self.lines: list[str] = []
        self._levels = {name: logging.getLogger(name).level for name in ESCAPED_LOGGERS}

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __enter__(self) -> Lines:
        for name in ESCAPED_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ESCAPED_LOGGERS:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self._levels[name])


@pytest.fixture(scope="module")
def service(search_index):
    """The read-only service over the session bundle, its lifespan running."""
    with TestClient(create_app(search_index)) as test_client:
        yield test_client


# ------------------------------------------------------------------------------ multipart bodies

BOUNDARY = "b0undary"


def multipart_body(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart/form-data body of (field, file name or None, bytes) parts."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def post_multipart(service, body: bytes, content_type: str | None = None):
    return service.post("/v1/search", content=body, headers={
        "content-type": content_type or f"multipart/form-data; boundary={BOUNDARY}"})


def test_a_multipart_upload_answers_as_the_plain_upload_whatever_fields_it_adds(service,
                                                                              digits_png):
    data = digits_png
    plain = upload(service, data).json()
    extra = post_multipart(service, multipart_body([
        ("note", None, b"hello"), ("file", "d.png", data), ("file", "second.png", b"junk")]))
    assert extra.status_code == 200, extra.text
    assert extra.json()["neighbors"] == plain["neighbors"]


def test_multipart_bodies_the_service_refuses(service, digits_png):
    data = digits_png
    nine = [("f", None, b"x")] * 8 + [("file", "d.png", data)]
    assert_error(post_multipart(service, multipart_body(nine)), 400, "more than 8 parts")
    assert_error(post_multipart(service, multipart_body([("file", "d.png", data)]),
                                "multipart/form-data"), 400, "boundary")
    assert_error(post_multipart(service, multipart_body([("file", None, data)])), 422,
                 "field 'file'")


@given(st.binary(max_size=300), st.integers(0, 400))
@settings(max_examples=150, deadline=None)
def test_any_multipart_body_is_an_answer_or_a_one_line_refusal(service, digits_png, noise, cut):
    """Truncated, garbled or padded multipart bodies: 200 or a 4xx JSON line, never a 500."""
    body = multipart_body([("file", "d.png", digits_png)])
    response = post_multipart(service, body[:cut] + noise)
    if response.status_code != 200:
        assert_error(response, response.status_code)
        assert 400 <= response.status_code < 500


# ------------------------------------------------------------------------------ log lines

@given(st.text())
@settings(max_examples=300, deadline=None)
def test_escaping_gives_one_printable_line_that_can_be_undone(text):
    escaped = escape(text)
    assert escaped.isprintable() and "\n" not in escaped and "\r" not in escaped
    assert unescape(escaped) == text


def test_a_forged_access_log_line_stays_one_line(service):
    with Lines() as log:
        assert service.get("/x%0d%0aINFO:%20FAKE%20LINE").status_code == 404
    assert len(log.lines) == 1 and "\n" not in log.lines[0]
    assert log.lines[0].startswith("INFO:lenet_embed.serve:GET /x\\r\\nINFO: FAKE LINE 404 ")


_BYTES = st.binary(max_size=40)


def encoded(data: bytes) -> str:
    """Every byte percent-encoded: any bytes at all reach the service's decoded path."""
    return "".join(f"%{byte:02X}" for byte in data)


@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS", "X-FORGE"]),
       path=_BYTES, query=_BYTES,
       agent=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
@settings(max_examples=80, deadline=None, database=None)
def test_every_request_is_exactly_one_access_log_line(service, method, path, query, agent):
    """Any path, query, method and User-Agent: one line for the request, naming its method and
    its path and query (escaped, so undoing the escapes gives them back)."""
    url = "/" + encoded(path) + ("?" + encoded(query) if query else "")
    with Lines() as log:
        service.request(method, url, headers={"user-agent": agent}, follow_redirects=False)
    assert len(log.lines) == 1, log.lines
    line = log.lines[0]
    assert line.isprintable() and line.startswith("INFO:lenet_embed.serve:")
    expected = f"{method} /{unquote(encoded(path))}" + ("?" + encoded(query) if query else "")
    assert unescape(line.removeprefix("INFO:lenet_embed.serve:")).startswith(expected + " ")


def test_a_real_server_logs_raw_control_bytes_as_one_line(search_index):
    """Through uvicorn and the service's protocol: a percent-encoded CR LF and a raw escape
    byte (which the HTTP parser refuses, with a warning of uvicorn's own) are each one line."""
    with Lines() as log, served(create_app(search_index)) as port:
        for request in (b"GET /a%0d%0aINFO:%20FAKE%1b[2J HTTP/1.1\r\nHost: localhost\r\n\r\n",
                        b"GET /a\x1b[2J HTTP/1.1\r\nHost: localhost\r\n\r\n"):
            with connect(port) as sock:
                sock.sendall(request)
                read_response(sock)
    access = [line for line in log.lines if line.startswith("INFO:lenet_embed.serve:GET")]
    assert access == [access[0]] and "/a\\r\\nINFO: FAKE\\x1b[2J 404" in access[0]
    assert all(line.isprintable() for line in log.lines), log.lines


# ------------------------------------------------------------------------------ server paths

@pytest.fixture(scope="module")
def picture_bundle(trained, mnist, tmp_path_factory):
    """A bundle built from an images folder (real digits filed by label), at an absolute
    path: (the folder, its index)."""
    from lenet_embed import build_index

    base = tmp_path_factory.mktemp("hostile-pictures")
    root = base / "secret-layout" / "pictures"
    for digit in range(3):
        (root / str(digit)).mkdir(parents=True)
        for row in np.flatnonzero(mnist.train.labels == digit)[:12]:
            Image.fromarray(mnist.train.images[row]).save(root / str(digit) / f"{row:05d}.png")
    build_index(images=root, model=trained.model, index_dir=base / "index")
    return root, SearchIndex.load(base / "index")


def test_search_results_name_sources_inside_the_images_folder(picture_bundle, mnist):
    root, index = picture_bundle
    image = png(mnist.test.images[0])
    with TestClient(create_app(index)) as hidden, \
            TestClient(create_app(index, show_sources=True)) as shown:
        # The fast path (k=N alone) and the route (any other query) alike.
        relative = upload(hidden, image, k=10).json()["neighbors"]
        routed = hidden.post("/v1/search?k=10&min_confidence=0",
                             files={"file": ("q.png", image)}).json()["neighbors"]
        full = upload(shown, image, k=10).json()["neighbors"]
        info, full_info = hidden.get("/v1/info").json(), shown.get("/v1/info").json()
    assert [n["source"] for n in full] == [str(root / n["source"]) for n in relative]
    assert [n["source"] for n in routed] == [n["source"] for n in relative]
    for neighbor in relative:
        label, name = neighbor["source"].split("/")
        assert label == str(neighbor["label"]) and name.endswith(".png")
    assert str(root.parent) not in str(info) and info["dataset"]["root"] == "…/pictures"
    assert full_info["dataset"]["root"] == str(root)


def test_a_source_outside_the_images_folder_is_its_file_name(picture_bundle, mnist,
                                                             tmp_path):
    root, built = picture_bundle
    index_dir = Path(str(built.path))
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    index = SearchIndex.load(copy)
    digit = mnist.test.images[1]
    [new_id] = index.add([digit], labels=[int(mnist.test.labels[1])],
                         sources=[str(tmp_path / "elsewhere" / "new.png")]).tolist()
    with TestClient(create_app(index)) as client:
        found = {n["id"]: n["source"] for n in upload(client, png(digit), k=3).json()["neighbors"]}
    assert found[new_id] == "new.png"


_SEGMENT = st.text(st.characters(blacklist_characters="/\\\0"), min_size=1, max_size=8).filter(
    lambda part: part not in (".", ".."))


@given(root=st.lists(_SEGMENT, max_size=4), rest=st.lists(_SEGMENT | st.just(".."),
                                                          min_size=1, max_size=4),
       inside=st.booleans())
def test_a_shown_source_never_names_a_folder_outside_the_root(root, rest, inside):
    root_path = "/".join(["/root", *root])
    source = "/".join([root_path if inside else "/elsewhere", *rest])
    shown = shown_source(source, root_path)
    if inside and ".." not in rest:
        assert shown == "/".join(rest)  # inside the root: relative to it
    else:  # outside (or climbing out): the file name alone, never a folder
        assert shown == (rest[-1] if rest[-1] != ".." else None)


def test_error_messages_name_no_server_folder(picture_bundle, mnist):
    _, index = picture_bundle
    size = len(index)
    with TestClient(create_app(index)) as client:
        message = assert_error(upload(client, png(mnist.test.images[0]), k=size + 1), 422,
                               f"k must be between 1 and {size} (the number of items in …/index)")
    assert str(Path(index.path).parent) not in message


# ------------------------------------------------------------------- repeated headers

@pytest.mark.parametrize("headers", [
    b"Host: localhost\r\nHost: rebind.example\r\n",
    b"Host: rebind.example\r\nHost: localhost\r\n",  # the last one used to win
    b"Host: localhost\r\nHost: localhost\r\n",
    b"Host: localhost\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n",
    b"Host: localhost\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\n",
])
def test_a_repeated_single_valued_header_is_400(search_index, headers):
    app = create_app(search_index, allowed_hosts=["localhost", "127.0.0.1"])
    with served(app) as port, connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
        status, response_headers, body = read_response(sock)
    assert status == 400 and response_headers["content-type"] == "application/json"
    assert b"more than one" in body and b"send it once" in body
    assert response_headers["x-content-type-options"] == "nosniff"


def test_repeated_other_headers_are_fine(search_index):
    with served(create_app(search_index)) as port, connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nAccept: a/b\r\n"
                     b"Accept: */*\r\n\r\n")
        assert read_response(sock)[0] == 200


# ------------------------------------------------------------------ a read-only bundle

def _deny_writes(monkeypatch, folder: Path) -> None:
    """Make os.access say what it says on a read-only disk for ``folder`` and what it holds
    (the tests run as root, for whom permission bits grant everything)."""
    real = os.access

    def access(path, mode, **kwargs):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(folder.resolve()):
            return False
        return real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_bundle_starts_with_writes_off(bundle_copy, digits_png, monkeypatch,
                                                   caplog):
    _deny_writes(monkeypatch, bundle_copy)
    index = SearchIndex.load(bundle_copy)
    with caplog.at_level(logging.WARNING, logger="lenet_embed.serve"):
        app = create_app(index, write_token=TOKEN)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "writes disabled" in warning and str(bundle_copy) in warning
    version = index.version
    with TestClient(app) as client:
        assert client.get("/v1/info").json()["writes"] is False
        for response in (add_upload(client, digits_png), client.delete("/v1/items/3",
                                                                        headers=AUTH)):
            message = assert_error(response, 403, "writes are disabled", "cannot write")
            assert str(bundle_copy) not in message
        assert client.get("/v1/items/3/image.png").status_code == 200
    assert SearchIndex.load(bundle_copy).version == version


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_a_folder_without_write_permission_is_a_write_problem(bundle_copy):
    mode = bundle_copy.stat().st_mode
    bundle_copy.chmod(mode & ~0o222)
    try:
        assert str(bundle_copy) in write_problem(bundle_copy)
    finally:
        bundle_copy.chmod(mode)


def test_a_writable_bundle_has_no_write_problem(bundle_copy):
    assert write_problem(bundle_copy) is None


@pytest.mark.parametrize("fault", ["lock", "commit"])
def test_a_write_that_fails_on_the_disk_is_503_not_500(bundle_copy, digits_png, monkeypatch,
                                                       caplog, fault):
    """Fault injection: the lock file became unwritable after the start, or the disk filled up
    during the commit: 503 with a line in the log, the bundle unchanged."""
    index = SearchIndex.load(bundle_copy)
    version = index.version

    def lock_denied(self, before_creating=None):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    def disk_full(self, manifest):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fault == "lock":
        monkeypatch.setattr(WriterLock, "acquire", lock_denied)
    else:
        monkeypatch.setattr(BundleWriter, "commit", disk_full)
    with TestClient(create_app(index, write_token=TOKEN)) as client, \
            caplog.at_level(logging.WARNING, logger="lenet_embed.serve"):
        for response in (add_upload(client, digits_png), client.delete("/v1/items/3",
                                                                        headers=AUTH)):
            message = assert_error(response, 503, "cannot write to its bundle")
            assert response.headers["retry-after"] == "1" and str(bundle_copy) not in message
    assert any("a write failed" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert SearchIndex.load(bundle_copy).version == version


@pytest.fixture(scope="module")
def digits_png(bundle_data) -> bytes:
    return png(bundle_data.test.images[0])


# ------------------------------------------------------------------------- write tokens

GOOD = "Zq3-vL9xT2mK8wR5pN7cY4bH"


def _token_file(path: Path, token: str = GOOD, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lenet_embed.serve" and r.levelno == logging.WARNING]


def test_a_private_strong_token_file_is_read_without_a_word(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lenet_embed.serve"):
        assert read_token(_token_file(tmp_path / "token")) == GOOD
    assert _warnings(caplog) == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o602])
def test_a_token_file_others_may_read_gets_a_chmod_warning(tmp_path, caplog, mode):
    path = _token_file(tmp_path / "token", mode=mode)
    with caplog.at_level(logging.WARNING, logger="lenet_embed.serve"):
        assert read_token(path) == GOOD
        assert read_token(path, warn=False) == GOOD  # worker processes: warned once already
    [warning] = _warnings(caplog)
    assert str(path) in warning and f"chmod 600 {path}" in warning and f"{mode:03o}" in warning


@pytest.mark.parametrize("token", ["a" * 16, "abababababababababab", "changeme-changeme"])
def test_a_weak_token_gets_a_warning(tmp_path, caplog, monkeypatch, token):
    with caplog.at_level(logging.WARNING, logger="lenet_embed.serve"):
        assert read_token(_token_file(tmp_path / "token", token)) == token
        monkeypatch.setenv("LENET_EMBED_WRITE_TOKEN", token)
        assert read_token(None) == token
    warnings = _warnings(caplog)
    assert len(warnings) == 2 and "$LENET_EMBED_WRITE_TOKEN" in warnings[1]
    assert all(f"uses {len(set(token))} different characters" in w and "secrets.token_urlsafe"
               in w for w in warnings)


def test_a_token_that_cannot_be_sent_in_a_header_is_refused(tmp_path):
    with pytest.raises(LenetEmbedError, match="printable ASCII"):
        read_token(_token_file(tmp_path / "token", "zq3vl9xt2mk8wr5pn7cy4bh\u00e9"))


def _refused_in_time(path: Path) -> str:
    """read_token(path)'s error; fails (instead of hanging the run) if it blocks."""
    outcome: list[BaseException | str | None] = []

    def attempt() -> None:
        try:
            outcome.append(read_token(path))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive() and stat.S_ISFIFO(os.stat(path).st_mode):
        with open(path, "w"):  # let the blocked open go
            pass
        worker.join(5)
        pytest.fail(f"read_token({path}) blocked")
    [result] = outcome
    assert isinstance(result, LenetEmbedError), result
    return str(result)


def test_a_token_path_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, kind in ((fifo, "a FIFO"), (folder, "a folder"),
                       (Path("/dev/zero"), "a character device")):
        message = _refused_in_time(path)
        assert message == (f"{path}: not a regular file ({kind}); give a file holding the "
                           "token on its first line")


def test_serve_with_a_fifo_as_token_file_is_one_line(lenet_embed_cmd, bundle_dir, tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    result = subprocess.run([*lenet_embed_cmd, "serve", "--index-dir", str(bundle_dir),
                             "--port", str(free_port()), "--write-token-file", str(fifo)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and f"{fifo}: not a regular file" in lines[0], lines
