"""Shared fixtures: real MNIST (never downloaded), a small trained model and a small bundle.

Data is found through ``$LENET_EMBED_MNIST`` or ``<repo>/../shared/data/mnist``; when neither
exists, every test that needs it is skipped. The expensive fixtures are session-scoped so the
whole suite trains one small model and builds one small bundle.
"""

from __future__ import annotations

import gzip
import importlib
import logging
import os
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
DEFAULT_MNIST = REPO_DIR.parent / "shared" / "data" / "mnist"
SEED = 1234
# Small slices of real MNIST: enough to learn something in one epoch, quick on two cores.
TRAIN_N, TEST_N = 5000, 500
BUNDLE_N = 2000
TINY_TRAIN_N, TINY_TEST_N = 600, 100


def _find_mnist() -> Path | None:
    env = os.environ.get("LENET_EMBED_MNIST")
    candidates = ([Path(env)] if env else []) + [DEFAULT_MNIST]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return None


MNIST_PATH = _find_mnist()
if MNIST_PATH is not None:
    # CLI commands run by the tests (in-process or as subprocesses) find the data this way.
    os.environ["LENET_EMBED_MNIST"] = str(MNIST_PATH)


def pytest_configure(config):
    # Keras 3 on numpy 2 warns on every model call; it says nothing about this package.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    )


# --------------------------------------------------------------------------- helpers as fixtures

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The bytes of an IDX file holding ``array`` (magic 0, 0, type code, ndim; big-endian dims)."""
    array = np.asarray(array)
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder(">"))
    code = _IDX_CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``gz`` (default: name ends .gz)."""
    data = idx_bytes(array)
    if gz if gz is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx_folder(folder: Path, dataset, gz: bool = True) -> Path:
    """Write a Dataset as the four standard IDX files (uint8 images, uint8 labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {
        "train_images": dataset.train.images,
        "train_labels": dataset.train.labels.astype(np.uint8),
        "test_images": dataset.test.images,
        "test_labels": dataset.test.labels.astype(np.uint8),
    }
    for key, array in arrays.items():
        write_idx(folder / f"{IDX_NAMES[key]}{suffix}", array)
    return folder


@pytest.fixture(scope="session")
def idx_writer() -> Callable[..., Path]:
    """``write_idx(path, array, gz=None)``: write a well-formed IDX file."""
    return write_idx


@pytest.fixture(scope="session")
def idx_folder_writer() -> Callable[..., Path]:
    """``write_idx_folder(folder, dataset, gz=True)``: the four standard files for a Dataset."""
    return write_idx_folder


@pytest.fixture(scope="session")
def idx_encoder() -> Callable[[np.ndarray], bytes]:
    """``idx_bytes(array)``: the raw bytes of an IDX file."""
    return idx_bytes


def console_script() -> list[str]:
    """How to run the installed ``lenet-embed`` command in a subprocess."""
    script = Path(sys.executable).with_name("lenet-embed")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from lenet_embed.cli import main; main()"]


@pytest.fixture(scope="session")
def lenet_embed_cmd() -> list[str]:
    return console_script()


@pytest.fixture(scope="session")
def quiet_env() -> dict[str, str]:
    """The environment for subprocesses, without anything that would hide TensorFlow's chatter
    on its own (so a quiet run proves the package silenced it)."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


# ----------------------------------------------------------------------------- isolation

def _verbosity_module():
    """The module holding the CLI's ``--verbose`` switch (it has moved between modules)."""
    for name in ("lenet_embed._quiet", "lenet_embed._keras"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "set_verbose"):
            return module
    return None


@pytest.fixture(autouse=True)
def _restore_package_logging():
    """The CLI reconfigures the ``lenet_embed`` logger (own handler, no propagation) and
    ``--verbose`` flips a module flag: undo both after every test so tests stay independent."""
    logger = logging.getLogger("lenet_embed")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
    verbosity = _verbosity_module()
    if verbosity is not None:
        verbosity.set_verbose(False)


# --------------------------------------------------------------------------------- real data

@pytest.fixture(scope="session")
def mnist_path() -> Path:
    if MNIST_PATH is None:
        pytest.skip(f"MNIST not found: set $LENET_EMBED_MNIST or provide {DEFAULT_MNIST}")
    return MNIST_PATH


@pytest.fixture(scope="session")
def mnist(mnist_path):
    from lenet_embed import load_mnist

    return load_mnist(mnist_path)


@pytest.fixture(scope="session")
def small(mnist):
    """A few thousand real MNIST digits: what the session model is trained on."""
    return mnist.head(TRAIN_N, TEST_N)


@pytest.fixture(scope="session")
def tiny_idx_dir(mnist, tmp_path_factory) -> Path:
    """A data folder holding a small IDX copy of real MNIST written by the tests themselves."""
    folder = tmp_path_factory.mktemp("tiny-mnist")
    return write_idx_folder(folder, mnist.head(TINY_TRAIN_N, TINY_TEST_N))


# ------------------------------------------------------------------------- model and bundle

@pytest.fixture(scope="session")
def trained(small, tmp_path_factory):
    """One epoch of the tutorial's recipe on 5,000 real digits, seed fixed (a TrainResult)."""
    from lenet_embed import train

    out = tmp_path_factory.mktemp("model") / "lenet.keras"
    return train(small, recipe="seed", epochs=1, seed=SEED, verbose=0, out=out)


@pytest.fixture(scope="session")
def classifier(trained):
    from lenet_embed.model import load_classifier

    return load_classifier(trained.model)


@pytest.fixture(scope="session")
def bundle_data(mnist):
    """What the session bundle indexes: the first 2,000 training digits."""
    return mnist.head(BUNDLE_N, 100)


@pytest.fixture(scope="session")
def built(trained, bundle_data, tmp_path_factory):
    """A cosine/Flat bundle of 2,000 real training digits (a BuildResult)."""
    from lenet_embed import build_index

    index_dir = tmp_path_factory.mktemp("bundle") / "index"
    return build_index(data=bundle_data, model=trained.model, index_dir=index_dir)


@pytest.fixture(scope="session")
def bundle_dir(built) -> Path:
    return Path(built.path)


@pytest.fixture(scope="session")
def search_index(bundle_dir):
    from lenet_embed import SearchIndex

    return SearchIndex.load(bundle_dir)


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path) -> Path:
    """A private copy of the session bundle, free to damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "index"))


@pytest.fixture
def run(monkeypatch, tmp_path):
    """Invoke the CLI in-process from an empty working folder (so default paths such as
    ``index/`` and ``models/`` can never touch the repository)."""
    from click.testing import CliRunner

    from lenet_embed.cli import main

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args])

    return invoke
