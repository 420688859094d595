"""The ``lenet-embed`` command: every command's output (human and JSON), every error path as
one ``Error:`` line without a traceback, and a real process free of TensorFlow chatter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from cli_checks import ok, one_line_error
from PIL import Image

from lenet_embed import load_mnist, majority_label, write_samples
from lenet_embed.bundle import LABELS_FILE, read_manifest
from lenet_embed.cli import main
from lenet_embed.model import load_classifier
from lenet_embed.preprocess import scale_pixels
from lenet_embed.recipes import DEFAULT_RECIPE, RECIPES

# Lines TensorFlow's C++ runtime prints at start-up unless silenced.
CHATTER = ("onednn", "cuda", "cpu_feature_guard", "absl::initializelog",
           "tensorflow binary is optimized", "xnnpack", "tensorflow lite")
NEIGHBOR_KEYS = {"rank", "id", "label", "distance", "source"}


@pytest.fixture(scope="module")
def pngs(small, tmp_path_factory) -> list[Path]:
    """A few real MNIST test digits written as PNG files by the package's own sample writer."""
    return write_samples(tmp_path_factory.mktemp("samples"), n=4, data=small)


def _label_of(path: Path) -> int:
    return int(re.search(r"label-(\d+)\.png$", str(path)).group(1))


# ------------------------------------------------------------------------------------ train


def _tiny_accuracy(model_path: str, tiny_idx_dir: Path) -> float:
    test = load_mnist(tiny_idx_dir).test
    probabilities = load_classifier(model_path).predict(scale_pixels(test.images)[..., None],
                                                        verbose=0)
    return float(np.mean(probabilities.argmax(axis=1) == test.labels))


def test_train_json(run, tiny_idx_dir, tmp_path):
    out = tmp_path / "models" / "lenet.keras"
    result = ok(run("train", "--data", tiny_idx_dir, "--epochs", 1, "--seed", 0, "--out", out,
                    "--json"))
    assert len(result.stdout.strip().splitlines()) == 1
    payload = json.loads(result.stdout)
    assert set(payload) == {"test_accuracy", "epochs", "seconds", "cpu_seconds", "model",
                            "encoder", "recipe", "style"}
    assert payload["cpu_seconds"] > 0
    assert (payload["epochs"], payload["recipe"], payload["style"]) == (
        1, DEFAULT_RECIPE, "sequential")
    assert payload["model"] == str(out) and out.is_file()
    assert Path(payload["encoder"]).is_file()
    assert payload["test_accuracy"] == pytest.approx(_tiny_accuracy(str(out), tiny_idx_dir),
                                                     abs=1e-6)
    assert "loss" in result.stderr  # Keras's per-epoch line goes to stderr, not stdout


def test_train_human(run, tiny_idx_dir, tmp_path):
    out = tmp_path / "m.keras"
    result = ok(run("train", "--data", tiny_idx_dir, "--epochs", 1, "--seed", 1, "--style",
                    "functional", "--batch-size", 64, "--out", out))
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"model: {out}"
    assert lines[1] == f"encoder: {out.with_name('m.encoder.keras')}"
    assert lines[-1] == f"test accuracy: {_tiny_accuracy(str(out), tiny_idx_dir):.4f}"


def test_train_lists_its_recipes(run, tiny_idx_dir, tmp_path):
    """`train --help` names every recipe with what it does and the default; an unknown recipe
    is a one-line error naming the choices, before any data is read or anything written."""
    text = "".join(ok(run("train", "--help")).stdout.split())  # however click wraps it
    for name, recipe in RECIPES.items():
        assert "".join(f"{name}: {recipe.description}".split()) in text
    assert f"[default:{DEFAULT_RECIPE}]" in text
    out = tmp_path / "m.keras"
    result = run("train", "--data", tmp_path / "no-such-data", "--recipe", "fancy", "--out", out)
    line = one_line_error(result)
    assert result.exit_code == 2
    assert "--recipe" in line and all(f"'{name}'" in line for name in RECIPES)
    assert not out.exists()


# ------------------------------------------------------------------------------ build-index


def test_build_index_json_human_and_info(run, tiny_idx_dir, trained, tmp_path):
    index_dir = tmp_path / "index"
    count = len(load_mnist(tiny_idx_dir).train)
    result = ok(run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                    "--index-dir", index_dir, "--json"))
    summary = json.loads(result.stdout)
    assert summary["count"] == count
    assert (summary["dim"], summary["metric"], summary["factory"]) == (84, "cosine", "Flat")
    assert (summary["index_dir"], summary["skipped"]) == (str(index_dir), 0)

    result = ok(run("build-index", "--data", tiny_idx_dir, "--model", trained.model,
                    "--index-dir", index_dir, "--metric", "l2"))
    assert re.fullmatch(rf"wrote {re.escape(str(index_dir))}: {count} vectors, dim 84, "
                        r"metric l2, factory Flat, \d+\.\d s\n"
                        rf"index: {count} vectors x 84 d: Flat \(exact search is fast up to "
                        r"10000 vectors; [\d.]+ KB within the 2 GB budget\)\n"
                        rf"model: {re.escape(str(trained.model))} \(--model\)\n", result.stdout)

    manifest = read_manifest(index_dir)
    assert (manifest.version, manifest.operation, manifest.metric) == (2, "build", "l2")
    on_disk = sum((index_dir / name).stat().st_size for name in manifest.files)
    # The first build's files and record, kept for readers a few seconds after the rebuild.
    first = json.loads((index_dir / "versions" / "00000001.json").read_text())["files"]
    old = (index_dir / "versions" / "00000001.json").stat().st_size + sum(
        (index_dir / name).stat().st_size for name in set(first) - set(manifest.files))
    for verify in ([], ["--verify"]):
        report = json.loads(ok(run("info", "--index-dir", index_dir, "--json", *verify)).stdout)
        extra = {key: report.pop(key)
                 for key in ("deleted", "bytes", "reclaimable_bytes", "checks", "verified",
                             "old_files_bytes", "unknown_files", "compaction_hint")}
        assert report == manifest.to_dict()
        assert extra == {"deleted": 0, "bytes": on_disk, "reclaimable_bytes": old, "checks": "ok",
                         "verified": bool(verify), "old_files_bytes": old, "unknown_files": [],
                         "compaction_hint": None}
    rows = {}
    for line in ok(run("info", "--index-dir", index_dir)).stdout.splitlines():
        key, _, value = line.partition(":")
        rows[key] = value.strip()
    assert rows["items"] == f"{count} live, 0 removed"
    assert rows["version"].startswith("2 (build, ")
    assert rows["segments"] == "1 (1 sealed, 0 from adds)"
    assert rows["dim"] == "84" and rows["metric"] == "l2" and rows["factory"] == "Flat"
    assert rows["size on disk"] == f"{on_disk} bytes"
    assert rows["encoder sha256"] == manifest.encoder_sha256
    assert rows["checks"].startswith("ok") and "info --verify" in rows["checks"]
    verified = ok(run("info", "--index-dir", index_dir, "--verify")).stdout
    assert "every file matches its checksum" in verified


def test_build_index_from_images_reports_skipped_files(run, trained, pngs, tmp_path):
    root = tmp_path / "pictures"
    for path in pngs:
        (root / str(_label_of(path))).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / str(_label_of(path)) / path.name)
    broken = root / "broken.png"
    broken.write_text("not a picture")
    result = ok(run("build-index", "--images", root, "--model", trained.model, "--index-dir",
                    tmp_path / "index", "--json"))
    assert json.loads(result.stdout)["count"] == len(pngs)
    assert json.loads(result.stdout)["skipped"] == 1
    assert "skipped 1 unreadable file(s)" in result.stderr
    assert any(line.startswith("warning: ") and str(broken) in line
               for line in result.stderr.splitlines())


# ------------------------------------------------------------------------------------ query


def test_query_json(run, bundle_dir, search_index, pngs):
    k = 3
    result = ok(run("query", *pngs, "--index-dir", bundle_dir, "-k", k, "--json"))
    assert result.stderr == ""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(pngs)
    expected = search_index.search(pngs, k=k)
    answers = search_index.query(pngs, k=k)
    for line, path, neighbors, answer in zip(lines, pngs, expected, answers, strict=True):
        record = json.loads(line)
        assert list(record) == ["query", "predicted_label", "match", "confidence", "reason",
                                "neighbors"]
        assert record["query"] == str(path)
        # The label is the majority of the 5 neighbours calibration judges, given on a match.
        five = search_index.search(path, k=5)[0]
        assert record["predicted_label"] == (majority_label(five) if answer.match else None)
        assert (record["match"], record["reason"]) == (answer.match, answer.reason)
        assert record["confidence"] == pytest.approx(answer.confidence, abs=1e-6)
        assert len(record["neighbors"]) == k
        for got, want in zip(record["neighbors"], neighbors, strict=True):
            assert set(got) == NEIGHBOR_KEYS
            assert (got["rank"], got["id"], got["label"], got["source"]) == (
                want.rank, want.id, want.label, None)
            assert got["distance"] == pytest.approx(want.distance, abs=1e-6)


def test_query_human(run, bundle_dir, search_index, pngs):
    k = 4
    result = ok(run("query", *pngs[:2], "--index-dir", bundle_dir, "-k", k))
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    answers = search_index.query(pngs[:2], k=k)
    for block, path, neighbors, answer in zip(blocks, pngs[:2],
                                              search_index.search(pngs[:2], k=k), answers,
                                              strict=True):
        lines = block.splitlines()
        assert lines[0] == str(path)
        assert lines[1].split() == ["rank", "id", "label", "distance"]
        for line, n in zip(lines[2 : 2 + k], neighbors, strict=True):
            assert line.split() == [str(n.rank), str(n.id), str(n.label), f"{n.distance:.4f}"]
        label = majority_label(search_index.search(path, k=5)[0])
        assert lines[-1] == (
            f"predicted label: {label} (confidence {answer.confidence:.3f})" if answer.match
            else f"predicted label: none ({answer.reason}; nearest label {label}, "
                 f"confidence {answer.confidence:.3f})")
        assert len(lines) == k + 3


def test_query_reports_bad_files_and_answers_the_rest(run, bundle_dir, pngs, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run("query", pngs[0], bad, "--index-dir", bundle_dir, "--json")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert [json.loads(line)["query"] for line in result.stdout.splitlines()] == [str(pngs[0])]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and str(bad) in line


# ---------------------------------------------------------------------------- samples, info


def test_samples(run, tiny_idx_dir, tmp_path):
    out = tmp_path / "samples"
    n = 3
    result = ok(run("samples", out, "-n", n, "--data", tiny_idx_dir))
    assert result.stdout.strip() == f"wrote {n} PNG files to {out}"
    test = load_mnist(tiny_idx_dir).test
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [
        f"mnist-test-{i:05d}-label-{int(test.labels[i])}.png" for i in range(n)]
    for i, path in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(path)), test.images[i])


def test_samples_find_data_through_the_environment(run, mnist, tmp_path):
    out = tmp_path / "samples"
    ok(run("samples", out, "-n", 2))  # no --data: $LENET_EMBED_MNIST, set by conftest
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"mnist-test-{i:05d}-label-{int(mnist.test.labels[i])}.png"
                     for i in range(2)]


@pytest.mark.parametrize("command", [None, *sorted(main.commands)])
def test_help(run, command):
    args = [command] if command else []
    for flag in ("--help", "-h"):
        result = ok(run(*args, flag))
        assert result.stdout.startswith("Usage: ")
        assert "--help" in result.stdout
    if command is None:
        for name in main.commands:
            assert name in result.stdout


def test_version(run):
    assert version("lenet-embed") in ok(run("--version")).stdout


# ------------------------------------------------------------------------------- error paths


def test_missing_bundle(run, pngs, tmp_path):
    missing = tmp_path / "no-index"
    for args in (("query", pngs[0], "--index-dir", missing), ("info", "--index-dir", missing)):
        assert str(missing) in one_line_error(run(*args))


def test_corrupt_bundle(run, bundle_copy, pngs):
    """Labels rewritten in place, same size: a load checks sizes only (it costs O(files)), so
    `query` and `info` cannot tell; `info --verify` names the file."""
    (segment,) = read_manifest(bundle_copy).segments
    labels_path = bundle_copy / segment.file(LABELS_FILE)
    labels = np.load(labels_path)
    np.save(labels_path, labels[::-1].copy())
    ok(run("query", pngs[0], "--index-dir", bundle_copy))
    ok(run("info", "--index-dir", bundle_copy))
    line = one_line_error(run("info", "--verify", "--index-dir", bundle_copy))
    assert str(labels_path) in line and "checksum" in line and "build-index" in line
    np.save(labels_path, labels[:-1].copy())  # one label fewer: the size differs, found at load
    for args in (("query", pngs[0], "--index-dir", bundle_copy),
                 ("info", "--index-dir", bundle_copy)):
        line = one_line_error(run(*args))
        assert str(labels_path) in line and "size" in line


def test_not_an_image(run, bundle_dir, tmp_path):
    fake = tmp_path / "digit.png"
    fake.write_bytes(b"%PDF-1.4 certainly not a PNG")
    line = one_line_error(run("query", fake, "--index-dir", bundle_dir))
    assert str(fake) in line and "not a readable image" in line


def test_missing_image(run, bundle_dir, tmp_path):
    line = one_line_error(run("query", tmp_path / "nope.png", "--index-dir", bundle_dir))
    assert "nope.png" in line


def test_blank_image(run, bundle_dir, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 48), 255).save(blank)
    line = one_line_error(run("query", blank, "--index-dir", bundle_dir))
    assert str(blank) in line and "blank" in line


def test_k_larger_than_the_index(run, bundle_dir, pngs):
    count = read_manifest(bundle_dir).count
    line = one_line_error(run("query", pngs[0], "--index-dir", bundle_dir, "-k", count + 1))
    assert str(count) in line and str(count + 1) in line
    ok(run("query", pngs[0], "--index-dir", bundle_dir, "-k", count, "--json"))


def test_k_zero_is_refused(run, bundle_dir, pngs):
    result = run("query", pngs[0], "--index-dir", bundle_dir, "-k", 0)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "-k" in last


def test_k_zero_is_one_line(run, bundle_dir, pngs):
    one_line_error(run("query", pngs[0], "--index-dir", bundle_dir, "-k", 0))


def test_missing_data_folder(run, trained, tmp_path):
    missing = tmp_path / "no-data"
    for args in (("train", "--data", missing, "--out", tmp_path / "m.keras"),
                 ("build-index", "--data", missing, "--model", trained.model,
                  "--index-dir", tmp_path / "index"),
                 ("samples", tmp_path / "samples", "--data", missing)):
        assert str(missing) in one_line_error(run(*args))
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / "index").exists()


def test_bad_idx_file(run, tiny_idx_dir, tmp_path):
    data = Path(shutil.copytree(tiny_idx_dir, tmp_path / "data"))
    bad = data / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"\x08\x01\x00\x00" + bytes(600))
    line = one_line_error(run("train", "--data", data, "--out", tmp_path / "m.keras"))
    assert str(bad) in line


def test_corrupt_gzip_idx_file(run, tiny_idx_dir, tmp_path):
    data = Path(shutil.copytree(tiny_idx_dir, tmp_path / "data"))
    bad = data / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    for i in range(10, 42):
        raw[i] ^= 0xFF
    bad.write_bytes(bytes(raw))
    assert str(bad) in one_line_error(run("samples", tmp_path / "out", "--data", data))


# ------------------------------------------------------------------------- a real process


def _chatter(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(c in line.lower() for c in CHATTER)]


def test_real_process_is_quiet(lenet_embed_cmd, quiet_env, bundle_dir, search_index, pngs):
    done = subprocess.run([*lenet_embed_cmd, "query", str(pngs[0]), "--index-dir",
                           str(bundle_dir), "-k", "3", "--json"],
                          capture_output=True, text=True, env=quiet_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _chatter(done.stderr) == []
    assert done.stderr == ""
    record = json.loads(done.stdout)
    assert [n["id"] for n in record["neighbors"]] == [
        n.id for n in search_index.search(pngs[0], k=3)[0]]

    done = subprocess.run([*lenet_embed_cmd, "info", "--index-dir", str(bundle_dir)],
                          capture_output=True, text=True, env=quiet_env, timeout=300)
    assert done.returncode == 0 and done.stderr == ""
    assert re.search(r"^checks:\s+ok \(", done.stdout, re.MULTILINE)


def test_verbose_lets_tensorflow_speak(lenet_embed_cmd, quiet_env, bundle_dir, pngs):
    """The control for the test above: the same query with --verbose does show the chatter,
    so its absence there is the package's doing."""
    done = subprocess.run([*lenet_embed_cmd, "--verbose", "query", str(pngs[0]), "--index-dir",
                           str(bundle_dir), "--json"],
                          capture_output=True, text=True, env=quiet_env, timeout=300)
    assert done.returncode == 0, done.stderr
    if not _chatter(done.stderr):
        pytest.skip("this TensorFlow build prints no start-up chatter to hide")
    assert json.loads(done.stdout)["query"] == str(pngs[0])
