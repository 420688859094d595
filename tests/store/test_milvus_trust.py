"""What a bundle's manifest names is not trusted: no Milvus token follows it to a host of its
choosing, no Milvus Lite file is opened (or made) outside the bundle, and ``info --verify``
checks a Milvus bundle's collection.

The credential rule is tested against a real listener: a TCP server on 127.0.0.1 that records
every connection and every byte it receives.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lenet_embed import LenetEmbedError, build_index  # noqa: E402
from lenet_embed.bundle import MANIFEST, SEAL, read_manifest, sealed_json  # noqa: E402
from lenet_embed.store import kept_in_folder, milvus  # noqa: E402
from lenet_embed.store.milvus import TOKEN_ENV, URI_ENV, allow_uri, allowed_uri  # noqa: E402

TOKEN = "root:s3cret-token-of-the-operator"


class Listener:
    """A TCP server on a free port of 127.0.0.1 that accepts (each accept bounded by a timeout)
    and records what every connection sends, until :meth:`close`."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1.0)
                try:
                    while chunk := conn.recv(65536):
                        self.received += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.socket.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def no_names(monkeypatch):
    """Nothing named by the operator: no $LENET_EMBED_MILVUS_URI, and none of the names that
    earlier tests of this process gave (builds name their Milvus)."""
    monkeypatch.delenv(URI_ENV, raising=False)
    monkeypatch.setattr(milvus, "_NAMED", set())


def _point_store_at(bundle: Path, uri: str) -> None:
    """Turn a FAISS bundle into one whose manifest says its items are in Milvus at ``uri``,
    sealed again as a writer would (what a hostile bundle looks like)."""
    path = bundle / MANIFEST
    body = json.loads(path.read_text(encoding="utf-8"))
    del body[SEAL]
    body.update(store={"kind": "milvus", "uri": uri, "collection": "lenet_embed_v1_0a1b2c3d",
                       "index": "FLAT"}, segments=[], deletions=None, rows=body["count"],
                files={name: entry for name, entry in body["files"].items()
                       if name.startswith(("encoders/", "calibration/"))})
    path.write_text(sealed_json(body), encoding="utf-8")
    assert read_manifest(bundle).store.uri == uri


def _one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def test_a_bundle_cannot_send_the_token_to_a_server_it_names(bundle_copy, listener, run,
                                                             monkeypatch, no_names, tmp_path,
                                                             bundle_data):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _point_store_at(bundle_copy, listener.uri)
    png = tmp_path / "digit.png"
    Image.fromarray(bundle_data.test.images[0]).save(png)
    for command in (["info"], ["info", "--verify"], ["query", png], ["add", png],
                    ["remove", "3"]):
        line = _one_line(run(*command, "--index-dir", bundle_copy))
        assert f"names the Milvus server {listener.uri}" in line, (command, line)
        assert f"--milvus-uri {listener.uri}" in line and URI_ENV in line
    # Another server named does not allow this one.
    line = _one_line(run("info", "--index-dir", bundle_copy, "--milvus-uri", "http://127.0.0.1:1"))
    assert listener.uri in line
    listener.close()
    assert listener.connections == 0 and listener.received == b""


def test_a_rebuild_leaves_the_collection_of_an_unnamed_server_alone(
        bundle_copy, listener, trained, bundle_data, monkeypatch, no_names, caplog):
    """A rebuild drops the collection the previous version used, but not on a server only the
    previous manifest names."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _point_store_at(bundle_copy, listener.uri)
    build_index(data=bundle_data.head(200, 10), model=trained.model, index_dir=bundle_copy,
                factory="Flat")
    assert read_manifest(bundle_copy).store is None
    assert f"names the Milvus server {listener.uri}" in caplog.text
    assert "its collection lenet_embed_v1_0a1b2c3d is left there" in caplog.text
    listener.close()
    assert listener.connections == 0


def test_the_server_the_operator_names_is_connected(bundle_copy, listener, run, monkeypatch,
                                                    no_names):
    """The other side of the rule: named in $LENET_EMBED_MILVUS_URI (here spelled without the
    scheme's case and with a default-less port), the bundle's server is connected; it is no
    Milvus, so the command fails, in one line."""
    monkeypatch.setattr(milvus, "_CONNECT_TIMEOUT", 3)
    _point_store_at(bundle_copy, listener.uri)
    monkeypatch.setenv(URI_ENV, f"http://elsewhere.example:19530, HTTP://127.0.0.1:{listener.port}")
    line = _one_line(run("info", "--index-dir", bundle_copy))
    assert f"cannot reach Milvus at {listener.uri}" in line
    assert listener.connections >= 1
    # Named on the command line instead: this process connects, and the processes it starts
    # (serve's workers) inherit the name.
    monkeypatch.delenv(URI_ENV)
    monkeypatch.setattr(milvus, "_NAMED", set())
    connections = listener.connections
    line = _one_line(run("info", "--index-dir", bundle_copy, "--milvus-uri", listener.uri))
    assert f"cannot reach Milvus at {listener.uri}" in line
    assert listener.connections > connections
    check = ("import sys; from pathlib import Path; "
             "from lenet_embed.store.milvus import allowed_uri; "
             "print(allowed_uri(sys.argv[1], Path(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", check, listener.uri, str(bundle_copy)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == listener.uri, done.stderr
    listener.close()


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_a_lite_file_outside_the_bundle_is_refused_and_never_made(bundle_copy, tmp_path, run,
                                                                  no_names, where):
    outside = tmp_path / "elsewhere" / "x.db"
    outside.parent.mkdir()
    uri = {"parent": "../elsewhere/x.db", "absolute": str(outside), "symlink": "link.db"}[where]
    if where == "symlink":  # inside by its name, outside once resolved
        (bundle_copy / "link.db").symlink_to(outside)
    _point_store_at(bundle_copy, uri)
    for command in ("info", "query"):
        args = [command] + (["digit.png"] if command == "query" else [])
        line = _one_line(run(*args, "--index-dir", bundle_copy))
        assert f"names the Milvus Lite file {outside}, outside the bundle" in line, line
        assert f"--milvus-uri {outside}" in line
    # Named by the operator it is allowed, but a read never makes a Milvus Lite file.
    line = _one_line(run("info", "--index-dir", bundle_copy, "--milvus-uri", str(outside)))
    assert f"{outside}: no Milvus Lite file there" in line
    assert list(outside.parent.iterdir()) == []


def test_a_malformed_milvus_uri_is_one_line(bundle_copy, run, no_names, monkeypatch):
    _point_store_at(bundle_copy, "http://user:pw@127.0.0.1:1")
    line = _one_line(run("info", "--index-dir", bundle_copy))
    assert "is not a Milvus server URI (credentials do not go in the URI" in line
    result = run("info", "--index-dir", bundle_copy, "--milvus-uri", "ftp://host:1")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "the scheme must be http, https or tcp" in result.output
    _point_store_at(bundle_copy, "http://127.0.0.1:1")
    monkeypatch.setenv(URI_ENV, "http://bad host:1")
    line = _one_line(run("info", "--index-dir", bundle_copy))
    assert f"${URI_ENV}: 'http://bad host:1' is not a Milvus URI" in line


_URL_PARTS = st.tuples(
    st.sampled_from(["http", "HTTPS", "tcp", "grpc", "unix", "ftp", "h"]),
    st.sampled_from(["", "user@", "u:p@"]),
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "milvus.example", "bad_host", "", "a b",
                     "x\n", "[zz]"]),
    st.sampled_from(["", ":19530", ":0", ":65536", ":x", ":"]),
    st.sampled_from(["", "/", "/db", "/a/b", "?q=1", "#f", "/x.db"]),
).map(lambda parts: "{}://{}{}{}{}".format(*parts))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uri=st.one_of(_URL_PARTS, st.text(max_size=40)), name_it=st.booleans())
def test_only_named_servers_and_lite_files_inside_the_bundle_are_allowed(
        uri, name_it, tmp_path, monkeypatch):
    """The promise of allowed_uri, for any text a manifest may hold: it is refused in one line,
    or it is a server the operator named, or a Milvus Lite file inside the bundle."""
    monkeypatch.delenv(URI_ENV, raising=False)
    monkeypatch.setattr(milvus, "_NAMED", set())
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "index"
    bundle.mkdir(exist_ok=True)
    named = None
    if name_it:
        try:
            named = allow_uri(uri)
        except LenetEmbedError as exc:
            assert "\n" not in str(exc)
    try:
        target = allowed_uri(uri, bundle)
    except LenetEmbedError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc)
        assert named is None or not milvus.is_server(uri)  # a named server is allowed
        return
    if milvus.is_server(uri):
        assert named == milvus.server_address(uri) and target == uri
        assert "@" not in uri and not any(c.isspace() for c in uri)
    else:
        assert target.endswith(".db")
        assert Path(target).is_relative_to(bundle.resolve()) or target == named
    assert os.listdir(bundle) == []  # a check connects nowhere and makes nothing


@pytest.fixture(scope="module")
def lite_inside(trained, bundle_data, tmp_path_factory) -> Path:
    """300 digits in a Milvus Lite file inside the bundle's own folder: no naming needed."""
    bundle = tmp_path_factory.mktemp("milvus-inside") / "index"
    build_index(data=bundle_data.head(300, 10), model=trained.model, index_dir=bundle,
                store_uri=str(bundle / "digits.db"), factory="Flat")
    return bundle


def test_info_verify_on_a_milvus_lite_bundle(lite_inside, run, no_names):
    manifest = read_manifest(lite_inside)
    assert manifest.store.uri == "digits.db"
    # The file is the bundle's own (a rebuild into the folder keeps it), not the user's.
    assert kept_in_folder(manifest) == {"digits.db"}
    result = run("info", "--verify", "--index-dir", lite_inside)
    assert result.exit_code == 0, result.output
    assert "every file matches its checksum" in result.output and "300 live" in result.output
    # Labels the manifest's classes do not cover (the manifest sealed again, then restored).
    text = (lite_inside / MANIFEST).read_text(encoding="utf-8")
    body = json.loads(text)
    del body[SEAL]
    (lite_inside / MANIFEST).write_text(sealed_json({**body, "classes": ["zero", "one"]}),
                                        encoding="utf-8")
    line = _one_line(run("info", "--verify", "--index-dir", lite_inside))
    assert "its labels name classes the manifest does not list" in line
    (lite_inside / MANIFEST).write_text(text, encoding="utf-8")
    # Damage only the collection can show: an item's image replaced by hand (same count).
    store = milvus.open_store(lite_inside, manifest)
    [row] = store._call("reading", "query", store.collection, filter="id == 5",
                        output_fields=["id", "vector", "label", "source"])
    store.delete(np.array([5]))
    store._call("inserting", "insert", store.collection,
                [{**row, "image": "bm90IGEgZGlnaXQ=", "vector": list(row["vector"])}])
    assert run("info", "--index-dir", lite_inside).exit_code == 0  # counts agree
    line = _one_line(run("info", "--verify", "--index-dir", lite_inside))
    assert f"Milvus collection {store.collection} does not hold" in line
    assert "item 5's image is not a 28x28 digit" in line


def test_a_bundle_keeping_its_lite_file_inside_is_rebuilt_there(lite_inside, trained,
                                                                 bundle_data, no_names):
    old = read_manifest(lite_inside).store.collection
    build_index(data=bundle_data.head(200, 10), model=trained.model, index_dir=lite_inside,
                store_uri=str(lite_inside / "digits.db"), factory="Flat")
    manifest = read_manifest(lite_inside)
    assert manifest.store.uri == "digits.db" and manifest.count == 200
    store = milvus.open_store(lite_inside, manifest)
    assert store.collection != old and not milvus.MilvusStore(
        store.uri, old, manifest.metric, manifest.dim).exists()
