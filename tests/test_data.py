"""Where data comes from: IDX files (raw, gz, dot-variant names), Keras npz, validation errors
that name the file at fault, ``--images`` folders, and sample PNGs."""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_embed import LenetEmbedError, load_image_folder, load_mnist, write_samples
from lenet_embed.data import ENV_VAR, read_idx
from lenet_embed.preprocess import scale_pixels

# ------------------------------------------------------------------------------- real MNIST


def test_real_mnist_loads_byte_exact(mnist, mnist_path, idx_encoder):
    """Re-encoding what load_mnist returned reproduces the canonical files' MD5 sums."""
    sums_file = mnist_path / "MD5SUMS.uncompressed"
    if not sums_file.is_file():
        pytest.skip(f"{sums_file} not present")
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    arrays = {
        "train-images-idx3-ubyte": mnist.train.images,
        "train-labels-idx1-ubyte": mnist.train.labels.astype(np.uint8),
        "t10k-images-idx3-ubyte": mnist.test.images,
        "t10k-labels-idx1-ubyte": mnist.test.labels.astype(np.uint8),
    }
    for name, array in arrays.items():
        assert hashlib.md5(idx_encoder(array)).hexdigest() == sums[name], name


def test_real_mnist_shapes_and_types(mnist):
    for split in (mnist.train, mnist.test):
        assert split.images.dtype == np.uint8
        assert split.images.shape == (len(split.labels), 28, 28)
        assert split.labels.dtype == np.int64
        assert set(np.unique(split.labels)) == set(range(10))
    assert len(mnist.train) > len(mnist.test) > 0


def test_head_takes_the_first_items(mnist):
    sub = mnist.head(7, 3)
    assert len(sub.train) == 7 and len(sub.test) == 3
    assert np.array_equal(sub.train.images, mnist.train.images[:7])
    assert np.array_equal(sub.test.labels, mnist.test.labels[:3])
    assert sub.source.startswith(mnist.source) and "subset" in sub.source


def test_a_loaded_dataset_is_passed_through(small):
    assert load_mnist(small) is small


def test_environment_variable_is_used(monkeypatch, tiny_idx_dir):
    monkeypatch.setenv(ENV_VAR, str(tiny_idx_dir))
    data = load_mnist()
    assert str(tiny_idx_dir) in data.source
    assert len(data.train) == len(read_idx(tiny_idx_dir / "train-labels-idx1-ubyte.gz"))


def test_environment_variable_pointing_nowhere_is_named(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(LenetEmbedError) as info:
        load_mnist()
    assert str(missing) in str(info.value) and ENV_VAR in str(info.value)


def test_explicit_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(LenetEmbedError, match=re.escape(str(missing))):
        load_mnist(missing)


# --------------------------------------------------------------------- well-formed variants


@pytest.fixture
def few(mnist):
    return mnist.head(50, 20)


def _assert_same(loaded, expected):
    for got, want in ((loaded.train, expected.train), (loaded.test, expected.test)):
        assert np.array_equal(got.images, want.images)
        assert np.array_equal(got.labels, want.labels)
        assert got.labels.dtype == np.int64


def test_raw_and_gz_files_load_alike(few, tmp_path, idx_writer):
    folder = tmp_path / "data"
    folder.mkdir()
    idx_writer(folder / "train-images-idx3-ubyte", few.train.images)  # raw
    idx_writer(folder / "train-labels-idx1-ubyte.gz", few.train.labels.astype(np.uint8))
    idx_writer(folder / "t10k-images-idx3-ubyte.gz", few.test.images)
    idx_writer(folder / "t10k-labels-idx1-ubyte", few.test.labels.astype(np.uint8))  # raw
    _assert_same(load_mnist(folder), few)


def test_dot_variant_file_names(few, tmp_path, idx_writer):
    folder = tmp_path / "data"
    folder.mkdir()
    idx_writer(folder / "train-images.idx3-ubyte", few.train.images)
    idx_writer(folder / "train-labels.idx1-ubyte.gz", few.train.labels.astype(np.uint8))
    idx_writer(folder / "t10k-images.idx3-ubyte.gz", few.test.images)
    idx_writer(folder / "t10k-labels.idx1-ubyte", few.test.labels.astype(np.uint8))
    _assert_same(load_mnist(folder), few)


@pytest.mark.parametrize("dtype", [np.dtype(np.uint8), np.dtype(">i2"), np.dtype(">i4")])
def test_labels_in_wider_integer_types(few, tmp_path, idx_folder_writer, idx_writer, dtype):
    folder = idx_folder_writer(tmp_path / "data", few)
    idx_writer(folder / "train-labels-idx1-ubyte.gz", few.train.labels.astype(dtype))
    _assert_same(load_mnist(folder), few)


def test_keras_style_npz(few, tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=few.train.images, y_train=few.train.labels.astype(np.uint8),
             x_test=few.test.images, y_test=few.test.labels.astype(np.uint8))
    loaded = load_mnist(path)
    _assert_same(loaded, few)
    assert str(path) in loaded.source


def test_npz_missing_an_array_is_named(few, tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=few.train.images, y_train=few.train.labels, x_test=few.test.images)
    with pytest.raises(LenetEmbedError) as info:
        load_mnist(path)
    assert str(path) in str(info.value) and "y_test" in str(info.value)


def test_npz_with_wrong_image_size_is_named(few, tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=few.train.images[:, :27, :27], y_train=few.train.labels,
             x_test=few.test.images, y_test=few.test.labels)
    with pytest.raises(LenetEmbedError, match=re.escape(str(path))):
        load_mnist(path)


def test_file_that_is_not_npz_is_named(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"this is not a zip archive\n" * 20)
    with pytest.raises(LenetEmbedError, match=re.escape(str(path))):
        load_mnist(path)


def test_npy_instead_of_npz_is_named(few, tmp_path):
    path = tmp_path / "mnist.npy"
    np.save(path, few.train.images)
    with pytest.raises(LenetEmbedError, match=re.escape(str(path))):
        load_mnist(path)


# -------------------------------------------------------------------------- malformed IDX


def _bad_magic(folder: Path, few, idx_writer) -> Path:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    return path


def _bad_type_code(folder: Path, few, idx_writer) -> Path:
    path = folder / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x42
    path.write_bytes(bytes(raw))
    return path


def _truncated_data(folder: Path, few, idx_writer) -> Path:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _truncated_header(folder: Path, few, idx_writer) -> Path:
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    return path


def _truncated_gzip(folder: Path, few, idx_writer) -> Path:
    (folder / "train-images-idx3-ubyte").unlink()
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress((folder.parent / "source.bin").read_bytes())[:-200])
    return path


def _count_mismatch(folder: Path, few, idx_writer) -> Path:
    return idx_writer(folder / "train-labels-idx1-ubyte", few.train.labels[:-1].astype(np.uint8))


def _label_out_of_range(folder: Path, few, idx_writer) -> Path:
    labels = few.test.labels.astype(np.uint8)
    labels[3] = 10
    return idx_writer(folder / "t10k-labels-idx1-ubyte", labels)


def _wrong_image_size(folder: Path, few, idx_writer) -> Path:
    return idx_writer(folder / "train-images-idx3-ubyte", few.train.images[:, :27, :27].copy())


def _float_images(folder: Path, few, idx_writer) -> Path:
    return idx_writer(folder / "t10k-images-idx3-ubyte", few.test.images.astype(">f4"))


def _two_dimensional_labels(folder: Path, few, idx_writer) -> Path:
    labels = few.train.labels.astype(np.uint8)[:, None]
    return idx_writer(folder / "train-labels-idx1-ubyte", labels)


CORRUPTIONS = [_bad_magic, _bad_type_code, _truncated_data, _truncated_header, _truncated_gzip,
               _count_mismatch, _label_out_of_range, _wrong_image_size, _float_images,
               _two_dimensional_labels]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_malformed_idx_raises_naming_the_file(corrupt, few, tmp_path, idx_folder_writer,
                                              idx_writer, idx_encoder):
    (tmp_path / "source.bin").write_bytes(idx_encoder(few.train.images))
    folder = idx_folder_writer(tmp_path / "data", few, gz=False)
    assert len(load_mnist(folder).train) == len(few.train)  # well-formed before the damage
    bad = corrupt(folder, few, idx_writer)
    with pytest.raises(LenetEmbedError) as info:
        load_mnist(folder)
    message = str(info.value)
    assert str(bad) in message
    assert "\n" not in message


def test_missing_file_is_named(few, tmp_path, idx_folder_writer):
    folder = idx_folder_writer(tmp_path / "data", few)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(LenetEmbedError) as info:
        load_mnist(folder)
    assert str(folder) in str(info.value) and "t10k-labels-idx1-ubyte" in str(info.value)


def test_corrupt_gzip_stream_is_named(few, tmp_path, idx_folder_writer):
    folder = idx_folder_writer(tmp_path / "data", few)
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    for i in range(10, 42):  # the start of the deflate stream, just after the gzip header
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(LenetEmbedError, match=re.escape(str(path))):
        load_mnist(folder)


# ---------------------------------------------------------------------------- image folders


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_image_folder_labels_sources_and_skips(mnist, tmp_path, caplog):
    digits, labels = mnist.test.images[:6], mnist.test.labels[:6]
    root = tmp_path / "pictures"
    written = {}
    for i, (pixels, label) in enumerate(zip(digits, labels, strict=True)):
        path = _png(root / str(int(label)) / f"d{i}.png", pixels)
        written[str(path)] = (pixels, int(label))
    loose = _png(root / "loose.png", mnist.test.images[6])
    written[str(loose)] = (mnist.test.images[6], -1)
    broken = root / str(int(labels[0])) / "broken.png"
    broken.write_text("not really a PNG\n")
    (root / "notes.txt").write_text("a text file is ignored, not reported\n")
    _png(root / ".hidden.png", mnist.test.images[7])

    with caplog.at_level(logging.WARNING, logger="lenet_embed"):
        folder = load_image_folder(root)

    assert folder.sources == sorted(written)
    assert folder.classes == []
    assert folder.skipped == [str(broken)]
    assert any(str(broken) in r.getMessage() for r in caplog.records)
    assert not any("notes.txt" in r.getMessage() for r in caplog.records)
    for source, image, label in zip(folder.sources, folder.images, folder.labels, strict=True):
        pixels, expected_label = written[source]
        assert label == expected_label
        assert np.array_equal(image, scale_pixels(pixels))


def test_image_folder_with_named_classes(mnist, tmp_path):
    root = tmp_path / "pictures"
    for i, name in enumerate(["dog", "cat", "2", "cat", "10"]):
        _png(root / name / f"{i}.png", mnist.test.images[i])
    _png(root / "unlabelled.png", mnist.test.images[9])
    folder = load_image_folder(root)
    assert sorted(folder.classes) == ["10", "2", "cat", "dog"]
    assert folder.classes.index("2") < folder.classes.index("10")  # numbers sort as numbers
    for source, label in zip(folder.sources, folder.labels, strict=True):
        parent = Path(source).parent
        if parent == root:
            assert label == -1
        else:
            assert folder.classes[label] == parent.name


def test_unicode_digit_like_folder_name_is_a_class(mnist, tmp_path):
    root = tmp_path / "pictures"
    _png(root / "²" / "a.png", mnist.test.images[0])
    _png(root / "3" / "b.png", mnist.test.images[1])
    folder = load_image_folder(root)
    assert sorted(folder.classes) == ["3", "²"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(LenetEmbedError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here\n")
    with pytest.raises(LenetEmbedError, match="no readable image"):
        load_image_folder(tmp_path / "empty")


# ---------------------------------------------------------------------------------- samples


def test_write_samples(few, tmp_path):
    n = 5
    paths = write_samples(tmp_path / "samples", n=n, data=few)
    assert len(paths) == n
    for i, path in enumerate(paths):
        assert path.name == f"mnist-test-{i:05d}-label-{int(few.test.labels[i])}.png"
        assert np.array_equal(np.asarray(Image.open(path)), few.test.images[i])


def test_write_samples_bounds(few, tmp_path):
    assert len(write_samples(tmp_path / "all", n=len(few.test) + 10, data=few)) == len(few.test)
    with pytest.raises(LenetEmbedError):
        write_samples(tmp_path / "none", n=0, data=few)
