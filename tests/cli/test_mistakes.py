"""Operator mistakes at the CLI (and the service's label) are one line, never a hang or a traceback:
a FIFO, a device, a socket or a folder where a file is read; ``--wait nan``/``inf`` behind a held
writer lock; a label beyond int64.

Anything that could block runs either in a subprocess with a timeout or under ``no_hang`` (an
alarm that turns a blocked call into a failure), so a regression fails instead of hanging."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

import click
import numpy as np
import pytest
from cli_checks import ok, one_line_error
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lenet_embed import files
from lenet_embed.cli import _Label, _Seconds
from lenet_embed.data import load_image_folder, load_mnist, read_idx
from lenet_embed.errors import LenetEmbedError
from lenet_embed.files import NotRegularFile, open_regular
from lenet_embed.labels import MAX_LABEL, BadLabel, check_label
from lenet_embed.model import load_classifier
from lenet_embed.preprocess import open_image, to_mnist
from lenet_embed.search import SearchIndex
from lenet_embed.serve import create_app
from lenet_embed.store.milvus import token_from_file
from lenet_embed.writer import WriterLock

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# A subprocess that takes longer than this hangs (a bundle loads in seconds).
SUBPROCESS_TIMEOUT = 120
HUGE = "99999999999999999999"  # over 2**63 - 1


@pytest.fixture
def no_hang():
    """Fail (instead of blocking for ever) a test whose call blocks: SIGALRM interrupts a blocked
    open() or read() with an exception."""
    def blocked(signum, frame):
        raise TimeoutError("blocked: a read that should have been refused waited for ever")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def specials(tmp_path) -> dict[str, Path]:
    """One path of each kind that is not a regular file, and what the error calls it."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    sock_path = tmp_path / "sock.png"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    linked = tmp_path / "link-to-pipe.png"
    linked.symlink_to(fifo)
    yield {"a FIFO": fifo, "a character device": Path("/dev/zero"), "a folder": folder,
           "a socket": sock_path, "a FIFO ": linked}  # a link is followed to what it names
    server.close()


@pytest.fixture(scope="module")
def digit_png(bundle_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digit") / "seven.png"
    Image.fromarray(bundle_data.test.images[0]).save(path)
    return path


# Every function that reads a file a user names.
READERS = {
    "open_image": open_image,
    "to_mnist": to_mnist,
    "read_idx": read_idx,
    "load_mnist": load_mnist,  # (a folder is a data folder: its IDX files are looked for)
    "token_from_file": token_from_file,
    "load_classifier": lambda path: load_classifier(str(path)),
    "open_regular": open_regular,
}


@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_what_is_not_a_regular_file(reader, specials, no_hang):
    for kind, path in specials.items():
        if reader == "load_mnist" and kind == "a folder":
            continue
        with pytest.raises(NotRegularFile) as refused:
                READERS[reader](path)
        message = str(refused.value)
        assert message.startswith(f"{path}: not a regular file ({kind.strip()}); give ")
        assert "\n" not in message


def test_a_file_swapped_for_a_fifo_after_the_check_is_still_refused(tmp_path, monkeypatch,
                                                                     no_hang):
    """Fault injection: the path is a regular file when stat looks and a FIFO when it is opened;
    the O_NONBLOCK open does not wait for a writer and fstat refuses it."""
    regular = tmp_path / "regular.png"
    regular.write_bytes(b"x")
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stat_before_the_swap(path, *args, **kwargs):
        return real_stat(regular if Path(path) == fifo else path, *args, **kwargs)

    monkeypatch.setattr(files.os, "stat", stat_before_the_swap)
    with pytest.raises(NotRegularFile, match=r"swapped.png: not a regular file \(a FIFO\)"):
        open_regular(fifo, "an image file")


def test_a_regular_file_reads_as_with_open(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"\x00\x01" * 1000)
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    for name in (path, link):
        with open_regular(name) as fh:
            assert fh.read() == path.read_bytes()
            assert os.get_blocking(fh.fileno())  # O_NONBLOCK cleared: a plain descriptor
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


def _cli(cmd: list[str], *args: object, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    """The real command in a process of its own; a hang fails on the timeout."""
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, env=env)


def test_query_answers_the_image_and_refuses_a_fifo_and_a_device(lenet_embed_cmd, bundle_dir,
                                                                 specials, digit_png):
    fifo = specials["a FIFO"]
    result = _cli(lenet_embed_cmd, "query", fifo, "/dev/zero", digit_png,
                  "--index-dir", bundle_dir, "--json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("Error")] == [
        f"Error: {fifo}: not a regular file (a FIFO); give an image file",
        "Error: /dev/zero: not a regular file (a character device); give an image file",
    ]
    assert result.stdout.count("\n") == 1 and str(digit_png) in result.stdout  # answered


def test_add_refuses_a_fifo_and_commits_nothing(lenet_embed_cmd, bundle_copy, specials):
    before = SearchIndex.load(bundle_copy).version
    fifo = specials["a FIFO"]
    result = _cli(lenet_embed_cmd, "add", fifo, "--label", "3", "--index-dir", bundle_copy)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"Error: {fifo}: not a regular file (a FIFO); "
                                              "give an image file")
    assert SearchIndex.load(bundle_copy).version == before


def test_build_index_images_skips_a_fifo_with_a_warning(lenet_embed_cmd, trained, bundle_data,
                                                        tmp_path):
    root = tmp_path / "pictures"
    for i in range(12):
        label = int(bundle_data.train.labels[i])
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(bundle_data.train.images[i]).save(root / str(label) / f"{i}.png")
    os.mkfifo(root / "3" / "pipe.png")
    os.mkfifo(root / "pipe-without-suffix")
    result = _cli(lenet_embed_cmd, "build-index", "--images", root, "--model", trained.model,
                  "--index-dir", tmp_path / "index", "--factory", "Flat", "--json")
    assert result.returncode == 0, result.stderr
    for name in (root / "3" / "pipe.png", root / "pipe-without-suffix"):
        assert (f"warning: skipped {name}: not a regular file (a FIFO); give an image file"
                in result.stderr.splitlines()), result.stderr
    assert "skipped 2 unreadable file(s)" in result.stderr
    assert len(SearchIndex.load(tmp_path / "index")) == 12


def test_image_folder_names_a_fifo_among_the_pictures(bundle_data, tmp_path, no_hang, caplog):
    Image.fromarray(bundle_data.train.images[0]).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    loaded = load_image_folder(tmp_path)
    assert loaded.sources == [str(tmp_path / "a.png")]
    assert loaded.skipped == [str(tmp_path / "b.png")]
    assert "b.png: not a regular file (a FIFO)" in caplog.text


def test_data_folder_with_a_fifo_for_an_idx_file(tmp_path, no_hang):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(NotRegularFile, match="train-images-idx3-ubyte: not a regular file "
                                             r"\(a FIFO\); give an IDX file"):
        load_mnist(tmp_path)


def test_samples_and_build_index_refuse_a_fifo_as_data(run, specials, no_hang):
    fifo = specials["a FIFO"]
    for args in (("samples", "out", "--data", fifo),
                 ("build-index", "--data", fifo, "--model", "missing.keras")):  # data first
        line = one_line_error(run(*args))
        assert f"{fifo}: not a regular file (a FIFO)" in line


def test_milvus_token_file_fifo(run, specials, no_hang):
    fifo = specials["a FIFO"]
    line = one_line_error(run("build-index", "--store", "milvus", "--milvus-uri", "x.db",
                              "--milvus-token-file", fifo))
    assert line == (f"Error: {fifo}: not a regular file (a FIFO); give a file holding the "
                    "Milvus token")


# ------------------------------------------------------------------------------------ --wait

@contextlib.contextmanager
def held_lock(bundle: Path):
    """The bundle's writer lock held by this test, as another writer would hold it."""
    fd = os.open(bundle / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("wait", ["nan", "NaN", "inf", "-inf", "1e400", "-1", "3601"])
def test_wait_must_be_finite_and_bounded(run, bundle_copy, digit_png, wait, no_hang):
    with held_lock(bundle_copy):
        for command in (("add", digit_png, "--label", "7"), ("remove", "1"), ("compact",),
                        ("calibrate",)):
            result = run(*command, "--index-dir", bundle_copy, "--wait", wait)
            assert result.exit_code == 2, result.output
            assert one_line_error(result).startswith("Error: Invalid value for '--wait': ")


def test_a_short_wait_behind_a_held_lock_ends_in_one_line(run, bundle_copy, digit_png, no_hang):
    with held_lock(bundle_copy):
        result = run("add", digit_png, "--index-dir", bundle_copy, "--wait", "0.2")
    assert result.exit_code == 1
    assert "is writing to this bundle; waited 0.2 s, try again" in one_line_error(result)


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, -0.5, np.float32("nan"),
                                     "5", True, None])
def test_writer_lock_refuses_a_timeout_it_could_never_reach(bundle_copy, timeout, no_hang):
    with held_lock(bundle_copy), pytest.raises(LenetEmbedError, match="finite number of "
                                                                      "seconds >= 0"):
        WriterLock(bundle_copy, timeout).acquire()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                 st.text(max_size=12)))
def test_seconds_type_gives_a_finite_bounded_value_or_clicks_error(value):
    """Whatever is typed after --wait: a finite number in [0, 3600] or click's usage error."""
    try:
        seconds = _Seconds(0, 3600).convert(str(value), None, None)
    except click.BadParameter:
        return
    assert math.isfinite(seconds) and 0 <= seconds <= 3600


# ------------------------------------------------------------------------------------ --label

@settings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                 st.integers().map(str), st.text(max_size=250)))
def test_check_label_accepts_only_what_stores_as_int64_or_a_name(label):
    """The promise: an accepted label is None, an int that fits int64 and is >= 0, or a name of
    1-200 characters; everything else is BadLabel (one line), never another exception."""
    try:
        stored = check_label(label)
    except BadLabel as exc:
        assert "\n" not in str(exc) and str(exc).startswith("label ")
        return
    if isinstance(stored, int):
        assert 0 <= stored <= MAX_LABEL and np.int64(stored) == stored
    else:
        assert stored is None or 1 <= len(stored) <= 200


def test_check_label_edges():
    assert check_label(str(MAX_LABEL)) == check_label(MAX_LABEL) == MAX_LABEL
    assert check_label(" 007 ") == 7
    assert check_label("cat") == "cat"
    for bad in (MAX_LABEL + 1, str(MAX_LABEL + 1), HUGE, "9" * 5000, 10**5000, -1, True, 7.0,
                "", " ", "x" * 201):
        with pytest.raises(BadLabel):
            check_label(bad)


def test_add_label_over_int64_is_a_usage_error(run, bundle_copy, digit_png):
    before = SearchIndex.load(bundle_copy).version
    result = run("add", digit_png, "--label", HUGE, "--index-dir", bundle_copy)
    assert result.exit_code == 2
    assert one_line_error(result) == (
        f"Error: Invalid value for '--label': label '{HUGE}': give a whole number from 0 to "
        f"{MAX_LABEL}, or a class name of 1 to 200 characters")
    assert SearchIndex.load(bundle_copy).version == before
    # The largest label there is goes in, and comes back as itself.
    added = json.loads(ok(run("add", digit_png, "--label", MAX_LABEL, "--index-dir",
                              bundle_copy, "--json")).stdout)
    index = SearchIndex.load(bundle_copy)
    assert index.version == before + 1
    assert index.snapshot.label_of(added["ids"][0]) == MAX_LABEL


def test_label_type_never_raises_anything_but_a_usage_error():
    label = _Label()
    assert label.convert("7", None, None) == 7
    with pytest.raises(click.BadParameter, match="give a whole number"):
        label.convert(HUGE, None, None)


def test_service_refuses_a_label_over_int64_with_422(bundle_copy, digit_png):
    index = SearchIndex.load(bundle_copy)
    before = index.version
    pixels = np.asarray(Image.open(digit_png)).tolist()
    with TestClient(create_app(index, write_token=TOKEN)) as client:
        requests = [
            lambda: client.post("/v1/items", headers=AUTH, data={"label": HUGE},
                                files={"file": ("d.png", digit_png.read_bytes(), "image/png")}),
            lambda: client.post("/v1/items", headers=AUTH, json={"pixels": pixels,
                                                                 "label": 2**64}),
            lambda: client.post("/v1/items", headers=AUTH, json={"pixels": pixels,
                                                                 "label": HUGE}),
        ]
        for request in requests:
            response = request()
            assert response.status_code == 422, response.text
            assert "give a whole number from 0 to 9223372036854775807" in response.json()["error"]
        assert index.version == before
        created = client.post("/v1/items", headers=AUTH, json={"pixels": pixels,
                                                               "label": str(MAX_LABEL)})
        assert created.status_code == 201, created.text
        assert created.json()["label"] == MAX_LABEL


def test_fifos_inside_a_bundle_never_block_a_reader_or_a_writer(run, bundle_copy, digit_png,
                                                               no_hang):
    """A bundle is input too: a FIFO where its manifest, a version record or a file the manifest
    names should be is refused in one line (or, for a record the sweep reads, passed over), and
    nothing blocks."""
    # A superseded version's record replaced by a FIFO: the next writer's sweep passes it over.
    os.mkfifo(bundle_copy / "versions" / "00000000.json")
    ok(run("add", digit_png, "--label", "7", "--index-dir", bundle_copy, "--json"))
    ok(run("compact", "--index-dir", bundle_copy))
    # A file the manifest names: a load refuses it by its kind, before opening it.
    named = next(p for p in (bundle_copy / "encoders").rglob("*.tflite"))
    saved = named.read_bytes()
    named.unlink()
    os.mkfifo(named)
    for args in (("info",), ("info", "--verify"), ("query", digit_png)):
        line = one_line_error(run(*args, "--index-dir", bundle_copy))
        assert f"{named}: not a regular file" in line, line
    named.unlink()
    named.write_bytes(saved)
    # The manifest itself.
    manifest = bundle_copy / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    for args in (("info",), ("query", digit_png), ("add", digit_png)):
        line = one_line_error(run(*args, "--index-dir", bundle_copy))
        assert f"{manifest}: not a regular file (a FIFO)" in line, line


def test_a_symlink_loop_as_the_bundle_says_so(run, tmp_path, digit_png):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for args in (("info",), ("query", digit_png), ("add", digit_png)):
        line = one_line_error(run(*args, "--index-dir", tmp_path / "a"))
        assert "loop of symbolic links" in line, line
