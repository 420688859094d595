"""The base install (no ``train`` extra): everything but training (and building with a Keras
model of your own) works without TensorFlow or Keras, and what needs them says in one line what
to install. Building with the shipped default model: tests/test_default_model.py.

Each check runs in a subprocess whose import system refuses ``tensorflow`` and ``keras`` as an
install without them would (``ModuleNotFoundError``) and records every attempt, so a test also
fails when code merely tries to import them and copes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_embed import SearchIndex
from lenet_embed.bundle import read_manifest

MISSING = ('needs TensorFlow, which this install lacks; pip install "lenet-embed[train]"')

# Run first in every subprocess: tensorflow and keras are "not installed". On exit a line on
# stderr lists every import of them that was attempted, and those loaded.
NO_TENSORFLOW = """
import atexit, importlib.abc, json, sys

HEAVY = ("tensorflow", "keras")
tried = []


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY:
            tried.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())


@atexit.register
def report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    print(json.dumps({"tried": tried, "loaded": loaded}), file=sys.stderr)
"""

CLI = NO_TENSORFLOW + """
from lenet_embed.cli import main
main(sys.argv[1:], prog_name="lenet-embed")
"""


def _run(code: str, *args: object, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> tuple[int, str, str, dict[str, list[str]]]:
    """Run ``code`` without TensorFlow; returns exit status, stdout, stderr (less the import
    report) and the report."""
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=180)
    lines = done.stderr.splitlines()
    reports = [i for i, line in enumerate(lines) if line.startswith('{"tried": ')]
    assert reports, done.stderr
    report = json.loads(lines.pop(reports[-1]))
    return done.returncode, done.stdout, "\n".join(lines), report


def run_cli(*args: object, **kwargs) -> tuple[int, str, str, dict[str, list[str]]]:
    """Run ``lenet-embed ARGS`` without TensorFlow."""
    return _run(CLI, *args, **kwargs)


def _clean(report: dict[str, list[str]]) -> None:
    assert report == {"tried": [], "loaded": []}


@pytest.fixture(scope="module")
def pngs(mnist, tmp_path_factory) -> list[Path]:
    """Five real MNIST test digits (not in the session bundle) as PNG files."""
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i in range(5):
        path = folder / f"digit-{i}-label-{mnist.test.labels[i]}.png"
        Image.fromarray(mnist.test.images[i]).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def with_tensorflow(bundle_dir) -> SearchIndex:
    """The same bundle searched with the Keras encoder, TensorFlow's own answer."""
    return SearchIndex.load(bundle_dir, backend="keras")


# ------------------------------------------------------------------------------------- CLI


def test_query_answers_as_with_tensorflow(bundle_dir, pngs, with_tensorflow):
    status, out, err, report = run_cli("query", *pngs, "--index-dir", bundle_dir, "-k", 5,
                                           "--json")
    assert status == 0, err
    _clean(report)
    answers = [json.loads(line) for line in out.splitlines()]
    expected = with_tensorflow.search(pngs, k=5)
    assert len(answers) == len(expected) == len(pngs)
    for answer, neighbors in zip(answers, expected, strict=True):
        assert [n["id"] for n in answer["neighbors"]] == [n.id for n in neighbors]
        assert [n["label"] for n in answer["neighbors"]] == [n.label for n in neighbors]
        assert np.allclose([n["distance"] for n in answer["neighbors"]],
                           [n.distance for n in neighbors], atol=1e-4)


def test_info_add_remove_compact_without_tensorflow(bundle_copy, pngs):
    status, out, err, report = run_cli("info", "--index-dir", bundle_copy, "--json")
    assert status == 0, err
    _clean(report)
    before = json.loads(out)
    assert before["count"] == 2000 and before["checks"] == "ok"

    status, out, err, report = run_cli("add", pngs[0], "--label", 7, "--index-dir",
                                           bundle_copy, "--json")
    assert status == 0, err
    _clean(report)
    (new_id,) = json.loads(out)["ids"]
    assert new_id == before["next_id"]
    status, out, err, report = run_cli("query", pngs[0], "--index-dir", bundle_copy, "-k", 1,
                                           "--json")
    assert status == 0, err
    _clean(report)
    (top,) = json.loads(out)["neighbors"]
    assert (top["id"], top["label"]) == (new_id, 7) and top["distance"] < 1e-5

    status, out, err, report = run_cli("remove", new_id, 0, "--index-dir", bundle_copy,
                                           "--json")
    assert status == 0, err
    _clean(report)
    assert json.loads(out)["removed"] == 2
    status, out, err, report = run_cli("compact", "--index-dir", bundle_copy, "--wait", 0,
                                           "--json")
    assert status == 0, err
    _clean(report)
    assert json.loads(out)["count"] == 1999
    after = SearchIndex.load(bundle_copy)
    assert after.manifest.count == 1999 and new_id not in after.snapshot.ids.tolist()


def test_samples_without_tensorflow_when_mnist_is_local(mnist_path, tmp_path):
    status, out, err, report = run_cli("samples", tmp_path / "s", "-n", 3, "--data",
                                           mnist_path)
    assert status == 0, err
    _clean(report)
    assert len(list((tmp_path / "s").glob("*.png"))) == 3


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("command", [
    ["train", "--epochs", 1, "--out", "models/lenet.keras"],
    ["build-index", "--model", "MODEL", "--index-dir", "index"],
])
def test_train_and_build_index_say_what_to_install(command, bundle_copy, mnist_path, trained,
                                                   tmp_path):
    # build-index with a Keras model (the shipped default needs no TensorFlow) over an existing
    # bundle: refused before anything on disk is touched.
    args = [str(a) for a in command]
    if command[0] == "build-index":
        args[2], args[-1] = str(trained.model), str(bundle_copy)
    version = read_manifest(bundle_copy).version
    work = tmp_path / "cwd"
    work.mkdir()
    status, out, err, report = run_cli(*args, "--data", mnist_path, cwd=work)
    assert status == 1 and out == ""
    assert _one_line(err) == f"Error: {command[0]} {MISSING}"
    assert report["loaded"] == [] and report["tried"]
    assert list(work.iterdir()) == []
    assert read_manifest(bundle_copy).version == version


def test_keras_fallbacks_say_what_to_install(bundle_dir, pngs, tmp_path):
    status, _, err, _ = run_cli("query", pngs[0], "--index-dir", bundle_dir,
                                    "--backend", "keras")
    assert status == 1 and _one_line(err) == f"Error: the Keras encoder {MISSING}"
    # No data given and none in $LENET_EMBED_MNIST: Keras's downloader would be the only source.
    env = {k: v for k, v in os.environ.items() if k != "LENET_EMBED_MNIST"}
    status, _, err, _ = run_cli("samples", tmp_path / "s", env=env)
    assert status == 1
    assert _one_line(err) == ("Error: downloading MNIST (no --data and no $LENET_EMBED_MNIST) "
                              f"{MISSING}")


def test_missing_litert_and_tensorflow_is_one_line(bundle_dir, pngs):
    # Where ai-edge-litert has no wheel the base install has no encoder at all: say which extra.
    code = CLI.replace('HEAVY = ("tensorflow", "keras")',
                       'HEAVY = ("tensorflow", "keras", "ai_edge_litert")')
    status, _, err, _ = _run(code, "query", pngs[0], "--index-dir", bundle_dir)
    assert status == 1
    assert _one_line(err) == ("Error: the Keras encoder, used because ai-edge-litert is not "
                              f"installed, {MISSING}")


# ------------------------------------------------------------------------------ Python API

API = NO_TENSORFLOW + """
from lenet_embed import LenetEmbedError, SearchIndex, build_index

bundle, png, data, model = sys.argv[1:5]
index = SearchIndex(bundle)
print(json.dumps([n.id for n in index.search(png, k=5)[0]]))
print(json.dumps([n.id for n in index.query([png], k=5)[0].neighbors]))
(added,) = index.add([png], labels=[4]).tolist()
other = SearchIndex(bundle)
top_after_add = other.search(png, k=1)[0][0].id
index.remove([added])
refreshed = other.refresh()
print(json.dumps({"added": added, "top_after_add": top_after_add, "refreshed": refreshed,
                  "top_after_remove": other.search(png, k=1)[0][0].id, "tried": list(tried)}))
try:
    build_index(data=data, model=model, index_dir=bundle + "-rebuilt")
except LenetEmbedError as exc:
    print(json.dumps(str(exc)))
"""


def test_search_index_without_tensorflow(bundle_copy, pngs, with_tensorflow, mnist_path,
                                        trained):
    status, out, err, report = _run(API, bundle_copy, pngs[0], mnist_path, trained.model)
    assert status == 0, err
    searched, queried, updates, refused = map(json.loads, out.splitlines())
    expected = [n.id for n in with_tensorflow.search(pngs[0], k=5)[0]]
    assert searched == queried == expected
    assert updates["top_after_add"] == updates["added"] == read_manifest(bundle_copy).next_id - 1
    assert updates["refreshed"] is True and updates["top_after_remove"] == expected[0]
    assert updates["tried"] == []  # searching and updating never even tried to import TensorFlow
    assert refused == f"build-index {MISSING}"
    # Only the refused build tried to import TensorFlow; nothing loaded it.
    assert report["loaded"] == [] and report["tried"]


SERVICE = NO_TENSORFLOW + """
from fastapi.testclient import TestClient
from lenet_embed.search import SearchIndex
from lenet_embed.serve import create_app

with TestClient(create_app(SearchIndex.load(sys.argv[1]))) as client:
    data = open(sys.argv[2], "rb").read()
    answer = client.post("/v1/search?k=5", files={"file": ("d.png", data, "image/png")})
    assert answer.status_code == 200, answer.text
    print(answer.text)
"""


def test_service_answers_without_tensorflow(bundle_dir, pngs, with_tensorflow):
    status, out, err, report = _run(SERVICE, bundle_dir, pngs[1])
    assert status == 0, err
    _clean(report)
    answer = json.loads(out)
    assert [n["id"] for n in answer["neighbors"]] == [
        n.id for n in with_tensorflow.search(pngs[1], k=5)[0]]
