"""The two encoder runners: LiteRT against Keras on real digits, batching, the ``auto`` fallback,
and a query path (API and CLI) that never imports TensorFlow or Keras."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex
from lenet_embed.bundle import MANIFEST, SEAL, read_manifest, sealed_json, sha256_file
from lenet_embed.embed import BATCH_SIZE, KerasEncoder, LiteRTEncoder, load_encoder
from lenet_embed.preprocess import scale_pixels

PARITY_N = 1000
HEAVY = ("tensorflow", "keras")


def _keras_file(bundle: Path) -> Path:
    return bundle / read_manifest(bundle).encoder_path


def _litert_file(bundle: Path) -> Path:
    return bundle / read_manifest(bundle).litert_path


@pytest.fixture(scope="module")
def keras_encoder(bundle_dir) -> KerasEncoder:
    return KerasEncoder.load(_keras_file(bundle_dir))


@pytest.fixture(scope="module")
def litert_encoder(bundle_dir) -> LiteRTEncoder:
    return LiteRTEncoder(_litert_file(bundle_dir))


@pytest.fixture(scope="module")
def digits(mnist) -> np.ndarray:
    """1,500 real test digits scaled to [0, 1]."""
    return scale_pixels(mnist.test.images[:1500])


# ------------------------------------------------------------------------------------ parity


def test_litert_file_is_the_one_the_manifest_fingerprints(bundle_dir):
    manifest = read_manifest(bundle_dir)
    assert manifest.litert_path == f"{manifest.encoder}/encoder.tflite"
    entry = manifest.files[manifest.litert_path]
    assert entry.sha256 == sha256_file(bundle_dir / manifest.litert_path)
    assert entry.bytes == (bundle_dir / manifest.litert_path).stat().st_size
    # Both runners live in the one encoder folder the manifest names.
    assert manifest.encoder_sha256 == sha256_file(bundle_dir / manifest.encoder_path)
    assert (bundle_dir / manifest.encoder_path).parent == (bundle_dir / manifest.litert_path).parent


def test_litert_matches_keras_on_real_digits(keras_encoder, litert_encoder, search_index,
                                              digits):
    pixels = digits[:PARITY_N]
    from_keras = keras_encoder.embed(pixels)
    from_litert = litert_encoder.embed(pixels)
    assert keras_encoder.dim == litert_encoder.dim == 84
    assert from_keras.shape == from_litert.shape == (PARITY_N, 84)
    assert from_keras.dtype == from_litert.dtype == np.float32
    assert float(np.abs(from_keras - from_litert).max()) <= 1e-4
    top_keras = [row[0].id for row in search_index.search_vectors(from_keras, k=1)]
    top_litert = [row[0].id for row in search_index.search_vectors(from_litert, k=1)]
    assert top_keras == top_litert


@pytest.mark.parametrize("runner", ["litert", "keras"])
def test_odd_batch_sizes_match_one_by_one(keras_encoder, litert_encoder, digits, runner):
    encoder = litert_encoder if runner == "litert" else keras_encoder
    # One by one: every digit for LiteRT (cheap), every 15th for Keras (a call costs ms there).
    rows = np.arange(len(digits)) if runner == "litert" else np.arange(0, len(digits), 15)
    singles = {int(i): encoder.embed(digits[i : i + 1])[0] for i in rows}
    for n in (1, 7, len(digits)):  # 1500 spans two chunks of BATCH_SIZE = 1024
        batch = encoder.embed(digits[:n])
        assert batch.shape == (n, 84)
        for i in rows[rows < n]:
            assert np.allclose(batch[i], singles[int(i)], atol=1e-5), (runner, n, i)
    assert len(digits) > BATCH_SIZE


def test_litert_small_chunks_and_progress(litert_encoder, digits):
    calls = []
    chunked = litert_encoder.embed(digits, batch_size=7,
                                   on_progress=lambda done, total: calls.append((done, total)))
    whole = litert_encoder.embed(digits)
    assert np.allclose(chunked, whole, atol=1e-5)
    n = len(digits)
    assert calls == [(min(start + 7, n), n) for start in range(0, n, 7)]
    assert litert_encoder.embed(digits[:0]).shape == (0, 84)


# ------------------------------------------------------------------------------ load_encoder


def _encoder_copy(bundle_dir: Path, folder: Path, with_litert: bool) -> tuple[Path, Path]:
    folder.mkdir()
    keras_file, litert_file = _keras_file(bundle_dir), _litert_file(bundle_dir)
    shutil.copy(keras_file, folder / keras_file.name)
    if with_litert:
        shutil.copy(litert_file, folder / litert_file.name)
    return folder / keras_file.name, folder / litert_file.name


def test_load_encoder_auto_prefers_litert(bundle_dir, tmp_path, caplog):
    keras_path, litert_path = _encoder_copy(bundle_dir, tmp_path / "both", with_litert=True)
    with caplog.at_level(logging.WARNING, logger="lenet_embed"):
        encoder = load_encoder(keras_path, litert_path, "auto")
    assert isinstance(encoder, LiteRTEncoder) and encoder.path == litert_path
    assert caplog.records == []
    assert isinstance(load_encoder(keras_path, litert_path, "litert"), LiteRTEncoder)
    assert isinstance(load_encoder(keras_path, litert_path, "keras"), KerasEncoder)


def test_load_encoder_auto_falls_back_to_keras_with_a_warning(bundle_dir, tmp_path, caplog,
                                                              monkeypatch, keras_encoder,
                                                              digits):
    keras_path, litert_path = _encoder_copy(bundle_dir, tmp_path / "keras-only",
                                            with_litert=False)
    monkeypatch.setattr(logging.getLogger("lenet_embed"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="lenet_embed"):
        encoder = load_encoder(keras_path, litert_path, "auto")
    assert isinstance(encoder, KerasEncoder)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.name == "lenet_embed.embed"
    assert str(litert_path) in record.getMessage() and "Keras" in record.getMessage()
    assert np.array_equal(encoder.embed(digits[:20]), keras_encoder.embed(digits[:20]))


def test_load_encoder_refuses_litert_without_its_file_and_unknown_backends(bundle_dir, tmp_path):
    keras_path, litert_path = _encoder_copy(bundle_dir, tmp_path / "keras-only",
                                            with_litert=False)
    with pytest.raises(LenetEmbedError, match="cannot use LiteRT") as caught:
        load_encoder(keras_path, litert_path, "litert")
    assert str(litert_path) in str(caught.value)
    with pytest.raises(LenetEmbedError, match="unknown backend"):
        load_encoder(keras_path, litert_path, "onnx")


def test_bundle_without_litert_entry_is_refused(bundle_copy):
    """Format 2 always ships both runners: a manifest that stops listing encoder.tflite cannot
    skip its check, and the error names the unlisted file."""
    litert = read_manifest(bundle_copy).litert_path
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    del manifest["files"][litert], manifest[SEAL]
    (bundle_copy / MANIFEST).write_text(sealed_json(manifest))  # sealed again: not a torn file
    with pytest.raises(LenetEmbedError, match="file list does not match") as caught:
        SearchIndex.load(bundle_copy)
    assert litert in str(caught.value)


def test_keras_backend_on_a_bundle_gives_the_same_results(bundle_dir, search_index, mnist):
    index = SearchIndex.load(bundle_dir, backend="keras")
    assert isinstance(index.encoder, KerasEncoder)
    assert isinstance(SearchIndex.load(bundle_dir, backend="litert").encoder, LiteRTEncoder)
    queries = mnist.test.images[:20]
    assert [[n.id for n in row] for row in index.search(queries, k=3)] == [
        [n.id for n in row] for row in search_index.search(queries, k=3)]


def test_bundle_missing_its_litert_file_is_refused(bundle_copy):
    litert = bundle_copy / read_manifest(bundle_copy).litert_path
    litert.unlink()
    with pytest.raises(LenetEmbedError, match="missing from the bundle") as caught:
        SearchIndex.load(bundle_copy)
    assert str(litert) in str(caught.value)


# ----------------------------------------------------------------- no TensorFlow on queries


# What a query or `--help` never imports: TensorFlow and Keras (seconds), and pydantic (the
# service's models; it and its validators took a tenth of a second, and the manifest is msgspec's).
_REPORT_HEAVY = (
    "print(json.dumps(sorted(m for m in sys.modules"
    " if m.split('.')[0] in ('tensorflow', 'keras', 'pydantic'))))"
)


def test_query_path_never_imports_tensorflow_or_pydantic(bundle_dir, search_index, mnist,
                                                         tmp_path, quiet_env):
    png = tmp_path / "digit.png"
    Image.fromarray(mnist.test.images[3]).save(png)
    code = "\n".join([
        "import json, sys",
        "from lenet_embed import SearchIndex",
        "from lenet_embed.cli import main",
        "bundle, png = sys.argv[1], sys.argv[2]",
        "index = SearchIndex.load(bundle)",
        "print(json.dumps([n.id for n in index.search(png, k=5)[0]]))",
        "main(['query', png, '--index-dir', bundle, '-k', '5', '--json'], standalone_mode=False)",
        _REPORT_HEAVY,
    ])
    done = subprocess.run([sys.executable, "-c", code, str(bundle_dir), str(png)],
                          capture_output=True, text=True, env=quiet_env, timeout=120)
    assert done.returncode == 0, done.stderr
    api_line, cli_line, modules_line = done.stdout.strip().splitlines()
    expected = [n.id for n in search_index.search(png, k=5)[0]]
    assert json.loads(api_line) == expected
    assert [n["id"] for n in json.loads(cli_line)["neighbors"]] == expected
    assert json.loads(modules_line) == []


def test_help_never_imports_tensorflow_or_pydantic(quiet_env):
    script = Path(sys.executable).with_name("lenet-embed")
    if not script.is_file():
        pytest.skip("no lenet-embed console script next to this Python")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                          env=quiet_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ") and done.stderr == ""
    code = "\n".join([
        "import json, sys",
        "from lenet_embed.cli import main",
        "codes = [main(['--help'], standalone_mode=False)]",
        "for name in sorted(main.commands):",
        "    codes.append(main([name, '--help'], standalone_mode=False))",
        "assert codes == [0] * len(codes), codes",
        _REPORT_HEAVY,
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=quiet_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
