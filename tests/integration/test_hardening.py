"""Hardening, on real MNIST data: hostile image files, decompression bombs, operator
errors and the scripts' error handling.

1. Decode fuzzing: real MNIST digits saved by Pillow as PNG, JPEG, GIF, TIFF and BMP (several
   modes and compressions) are mutated by hypothesis (bit flips, truncation, insertion, deletion,
   chunk duplication, header fields set to interesting values) and decoded from bytes and from
   files. Every case gives a (28, 28) float32 array in [0, 1] or raises ``LenetEmbedError``;
   no other exception and no warning reaches the caller; each decode takes < 2 s of CPU (and
   < 10 s of wall time, room for a busy machine) and < 300 MB of traced memory, and the whole
   run grows the peak RSS by < 300 MB.
2. Decompression bombs (9000x9000, 13000x13000 and 30000x30000 1-bit PNGs) through ``lenet-embed
   query`` (one line, exit 1, bounded RSS and time against a normal query), ``SearchIndex`` and
   ``build-index --images``; a 4096x4096 digit, the largest allowed, is answered.
3. Operator errors: a full disk during ``build-index``, ``add`` and ``compact`` (a small tmpfs;
   needs root, skipped otherwise), ``--index-dir .`` inside a foreign folder and inside a bundle,
   ``--threads 100000``, a manifest whose ``classes`` are too short: one line, non-zero exit,
   the old bundle intact.
4. The scripts under ``scripts/`` stop with one line when MNIST is not there.

Environment:

``LENET_EMBED_FUZZ_EXAMPLES``
    Number of decode fuzz cases (hypothesis examples; each is decoded from bytes and from a
    file). Default 2000, about 30 s on two busy cores; e.g. ``LENET_EMBED_FUZZ_EXAMPLES=20000``
    for a deeper run (about ten times as long). The cases are derandomized: the same number
    gives the same cases, run after run.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_checks import ok, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex
from lenet_embed.build import STAGES
from lenet_embed.fonts import font_file
from lenet_embed.preprocess import WORK_SIDE, ImageTooLarge, open_image, to_mnist
from lenet_embed.search import Query

REPO = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES = int(os.environ.get("LENET_EMBED_FUZZ_EXAMPLES", "2000"))
# Per case: CPU time of the decoding thread (the work done), and wall time with room for a busy
# machine's scheduling (a hang, e.g. waiting on I/O, still fails).
CASE_SECONDS = 2.0
CASE_WALL_SECONDS = 10.0
CASE_TRACED_BYTES = 300 * 2**20
RSS_GROWTH_BYTES = 300 * 2**20
CLI_RSS_BYTES = 400 * 2**20
CLI_EXTRA_SECONDS = 2.0
MiB = 2**20


def _maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # kilobytes on Linux


# =============================================================================== 1. fuzzing

def _digit(mnist, i: int, scale: int = 1, invert: bool = False) -> Image.Image:
    pixels = mnist.test.images[i]
    image = Image.fromarray(255 - pixels if invert else pixels)
    return image.resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR) if scale > 1 \
        else image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seed_files(mnist) -> list[tuple[str, str, bytes]]:
    """(kind, suffix, bytes): real digits in every format and a few modes each."""
    seeds = []
    for i in range(3):
        plain, big = _digit(mnist, i), _digit(mnist, i, scale=3, invert=True)
        rgba = big.convert("RGBA")
        rgba.putalpha(Image.fromarray(255 - np.asarray(big)))
        palette = big.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        sixteen = Image.fromarray(mnist.test.images[i].astype(np.uint16) * 257)
        bilevel = big.point(lambda v: 255 if v > 128 else 0).convert("1")
        seeds += [
            ("png-L", ".png", _encode(plain, "PNG")),
            ("png-RGBA", ".png", _encode(rgba, "PNG")),
            ("png-P", ".png", _encode(palette, "PNG", transparency=0)),
            ("png-1", ".png", _encode(bilevel, "PNG")),
            ("png-I16", ".png", _encode(sixteen, "PNG")),
            ("jpeg-L", ".jpg", _encode(plain, "JPEG", quality=90)),
            ("jpeg-RGB-progressive", ".jpg",
             _encode(big.convert("RGB"), "JPEG", quality=80, progressive=True)),
            ("jpeg-CMYK", ".jpg", _encode(big.convert("CMYK"), "JPEG")),
            ("gif", ".gif", _encode(palette, "GIF")),
            ("gif-transparent", ".gif", _encode(palette, "GIF", transparency=0)),
            ("gif-2-frames", ".gif", _encode(palette, "GIF", save_all=True,
                                             append_images=[plain.convert("P")])),
            ("tiff-raw", ".tif", _encode(plain, "TIFF")),
            ("tiff-lzw", ".tif", _encode(big, "TIFF", compression="tiff_lzw")),
            ("tiff-deflate", ".tif", _encode(big.convert("RGB"), "TIFF",
                                             compression="tiff_adobe_deflate")),
            ("tiff-packbits", ".tif", _encode(plain, "TIFF", compression="packbits")),
            ("tiff-group4", ".tif", _encode(bilevel, "TIFF", compression="group4")),
            ("tiff-I16", ".tif", _encode(sixteen, "TIFF")),
            ("bmp-L", ".bmp", _encode(plain, "BMP")),
            ("bmp-RGB", ".bmp", _encode(big.convert("RGB"), "BMP")),
            ("bmp-1", ".bmp", _encode(bilevel, "BMP")),
        ]
    return seeds


def _png_crc_fix(data: bytearray) -> None:
    """Recompute the IHDR chunk's CRC, so an edited header field is read, not refused."""
    if len(data) >= 33:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


# A header field: (offset, size in bytes, byte order).
Field = tuple[int, int, str]


def _png_fields(data: bytes) -> list[Field]:
    fields = [(16, 4, "big"), (20, 4, "big"), (24, 1, "big"), (25, 1, "big"), (26, 1, "big"),
              (27, 1, "big"), (28, 1, "big")]
    position = 8
    while position + 8 <= len(data):  # every chunk's length
        fields.append((position, 4, "big"))
        position += 12 + int.from_bytes(data[position:position + 4], "big")
    return fields


def _jpeg_fields(data: bytes) -> list[Field]:
    fields: list[Field] = []
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        length = int.from_bytes(data[position + 2:position + 4], "big")
        fields.append((position + 2, 2, "big"))
        body = position + 4
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width, components
            fields += [(body, 1, "big"), (body + 1, 2, "big"), (body + 3, 2, "big"),
                       (body + 5, 1, "big")]
            fields += [(body + 6 + 3 * c + k, 1, "big") for c in range(3) for k in range(3)]
        elif marker in (0xC4, 0xDB, 0xDA, 0xDD):  # DHT, DQT, SOS, DRI: their first fields
            fields += [(body, 1, "big"), (body + 1, 1, "big")]
        if marker == 0xDA:
            break
        position += 2 + length
    return [f for f in fields if f[0] + f[1] <= len(data)]


def _gif_fields(data: bytes) -> list[Field]:
    fields: list[Field] = [(6, 2, "little"), (8, 2, "little"), (10, 1, "little"),
                           (11, 1, "little")]
    position = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while position < len(data) and data[position] == 0x21:  # extensions: skip their blocks
        position += 2
        while position < len(data) and data[position]:
            position += data[position] + 1
        position += 1
    if position + 10 < len(data) and data[position] == 0x2C:  # the image descriptor
        fields += [(position + 1 + 2 * k, 2, "little") for k in range(4)]
        fields += [(position + 9, 1, "little"), (position + 10, 1, "little")]
    return fields


def _tiff_fields(data: bytes) -> list[Field]:
    order = "little" if data[:2] == b"II" else "big"
    fields: list[Field] = [(4, 4, order)]
    ifd = int.from_bytes(data[4:8], order)
    if ifd + 2 > len(data):
        return fields
    fields.append((ifd, 2, order))
    for k in range(int.from_bytes(data[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(data):
            break
        fields += [(entry + 2, 2, order), (entry + 4, 4, order), (entry + 8, 4, order),
                   (entry + 8, 2, order)]
    return fields


def _bmp_fields(data: bytes) -> list[Field]:
    return [(2, 4, "little"), (10, 4, "little"), (14, 4, "little"), (18, 4, "little"),
            (22, 4, "little"), (26, 2, "little"), (28, 2, "little"), (30, 4, "little"),
            (34, 4, "little"), (46, 4, "little")]


FIELDS = {"png": _png_fields, "jpeg": _jpeg_fields, "gif": _gif_fields, "tiff": _tiff_fields,
          "bmp": _bmp_fields}
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 24, 32, 127, 128, 255, 256, 1023, 1024, 4095, 4096,
               4097, 8191, 16384, 30000, 32767, 32768, 65535, 65536, 2**24, 2**31 - 1, 2**31,
               2**32 - 1]

POSITION = st.integers(0, 2**31)
HEADER_EDIT = st.tuples(st.just("header"), POSITION,
                        st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**32 - 1)))
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 64)),
    st.tuples(st.just("duplicate"), POSITION, st.integers(1, 1024), POSITION),
    HEADER_EDIT,
    HEADER_EDIT,  # twice as likely: header fields reach the most code in Pillow's plugins
)


def _mutate(kind: str, seed: bytes, mutations: list[tuple]) -> bytes:
    data = bytearray(seed)
    family = kind.split("-")[0]
    fields = FIELDS[family](seed)
    for mutation in mutations:
        op, where = mutation[0], mutation[1]
        if op == "header":
            offset, size, order = fields[where % len(fields)]
            if offset + size <= len(data):
                value = mutation[2] & ((1 << (8 * size)) - 1)
                data[offset:offset + size] = value.to_bytes(size, order)
                if family == "png":
                    _png_crc_fix(data)
        elif op == "truncate":
            del data[where % (len(data) + 1):]
        elif op == "insert":
            position = where % (len(data) + 1)
            data[position:position] = mutation[2]
        elif not data:
            continue
        elif op == "flip":
            data[where % len(data)] ^= 1 << mutation[2]
        elif op == "delete":
            position = where % len(data)
            del data[position:position + mutation[2]]
        elif op == "duplicate":  # copy a chunk of the file to another place
            start = where % len(data)
            chunk = data[start:start + mutation[2]]
            target = mutation[3] % (len(data) + 1)
            data[target:target] = chunk
    return bytes(data)


def _decode_checked(decode, outcomes: Counter, label: str, case: str = ""
                    ) -> tuple[float, float, int]:
    """Run one decode: a valid MNIST array or LenetEmbedError, no warning, time and memory
    bounded. Returns its CPU seconds, wall seconds and traced peak bytes."""
    tracing = tracemalloc.is_tracing()  # traced here only: hypothesis itself is not measured
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    collecting = gc.isenabled()
    gc.disable()  # a collection of the test's own garbage is no part of a decode's cost
    started, cpu_started = time.perf_counter(), time.thread_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                result = decode()
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                if not tracing:
                    tracemalloc.stop()
                if collecting:
                    gc.enable()
        except LenetEmbedError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes[f"{label} error"] += 1
        else:
            assert isinstance(result, np.ndarray)
            assert result.shape == (28, 28) and result.dtype == np.float32
            assert np.isfinite(result).all()
            assert result.min() >= 0.0 and result.max() <= 1.0
            outcomes[f"{label} array"] += 1
    seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    if cpu >= CASE_SECONDS and not tracing:
        # tracemalloc slows allocation-heavy Python code in Pillow's plugins (a BMP palette
        # loop: 0.04 s plain, 5 s traced): the cost a user pays is the decode's untraced time.
        started, cpu_started = time.perf_counter(), time.thread_time()
        with contextlib.suppress(LenetEmbedError):
            decode()
        seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    assert not caught, ([f"{w.category.__name__}: {w.message}" for w in caught], case)
    assert cpu < CASE_SECONDS, f"{label} decode took {cpu:.2f} s of CPU: {case}"
    assert seconds < CASE_WALL_SECONDS, f"{label} decode took {seconds:.2f} s: {case}"
    assert peak < CASE_TRACED_BYTES, f"{label} decode traced {peak / MiB:.0f} MB: {case}"
    return cpu, seconds, peak


@pytest.fixture(scope="module")
def fuzz_seeds(mnist) -> list[tuple[str, str, bytes]]:
    return _seed_files(mnist)


def test_seed_files_decode_to_their_digits(fuzz_seeds):
    """The unmutated seeds are good images: each decodes, with no warning, to a digit."""
    for kind, _, data in fuzz_seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pixels = to_mnist(open_image(data, kind), kind)
        assert pixels.shape == (28, 28) and pixels.max() > 0.5, kind


def test_decode_fuzz(fuzz_seeds, tmp_path_factory):
    """Mutated real image files, decoded from bytes and from files: an array or one error."""
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    worst = [0.0, 0.0, 0]  # CPU s, wall s, traced bytes of the costliest decodes
    slowest = [0.0, ""]
    rss_before = _maxrss_bytes()
    started = time.perf_counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, len(fuzz_seeds) - 1),
           mutations=st.lists(MUTATION, min_size=1, max_size=4))
    def case(seed: int, mutations: list[tuple]) -> None:
        kind, suffix, original = fuzz_seeds[seed]
        data = _mutate(kind, original, mutations)
        kinds[kind] += 1
        name = f"fuzz-{kind}{suffix}"

        def from_bytes():
            image = open_image(data, name)
            assert max(image.size) <= WORK_SIDE  # nothing larger is worked on after decoding
            return to_mnist(image, name)

        described = f"{kind} {mutations}"
        path = folder / name
        path.write_bytes(data)
        for figures in (_decode_checked(from_bytes, outcomes, "bytes", described),
                        _decode_checked(lambda: to_mnist(path), outcomes, "file", described)):
            worst[:] = [max(pair) for pair in zip(worst, figures, strict=True)]
            slowest[:] = max(slowest, [figures[0], described])

    case()
    seconds = time.perf_counter() - started
    growth = _maxrss_bytes() - rss_before
    cases = sum(kinds.values())
    print(f"\ndecode fuzz: {cases} cases x 2 decodes in {seconds:.1f} s; {dict(outcomes)}; "
          f"slowest decode {worst[0] * 1000:.0f} ms CPU, {worst[1] * 1000:.0f} ms wall; "
          f"largest traced peak {worst[2] / MiB:.1f} MB; peak RSS growth {growth / MiB:.0f} MB; "
          f"slowest case: {slowest[1][:200]}")
    assert cases >= FUZZ_EXAMPLES
    assert growth < RSS_GROWTH_BYTES
    if FUZZ_EXAMPLES >= 500:
        # Every format was exercised; the mutations broke files and left some readable.
        assert {kind.split("-")[0] for kind in kinds} == set(FIELDS)
        assert outcomes["bytes error"] and outcomes["bytes array"]


TOO_LARGE, ERROR = "too large", "error"


@pytest.mark.parametrize("kind, edit, expected", [
    ("png-L", {16: (16384).to_bytes(4, "big"), 20: (4096).to_bytes(4, "big")}, TOO_LARGE),
    ("png-L", {16: (4096).to_bytes(4, "big"), 20: (4096).to_bytes(4, "big")}, ERROR),  # allowed
    ("png-L", {16: (2**31 - 1).to_bytes(4, "big"), 20: (2**31 - 1).to_bytes(4, "big")},
     TOO_LARGE),
    # The IDAT chunk claims 2 GB or 4 GB: Pillow skips the rest of it with one read() of that
    # length, which from a file allocates all of it (lenet_embed.preprocess._File caps it).
    ("png-L", {33: (2**31 - 1).to_bytes(4, "big")}, None),
    ("png-L", {33: (2**32 - 1).to_bytes(4, "big")}, None),
    ("bmp-L", {18: (60000).to_bytes(4, "little"), 22: (60000).to_bytes(4, "little")}, TOO_LARGE),
    ("bmp-L", {22: (-4096 & 0xFFFFFFFF).to_bytes(4, "little"),
               18: (4096).to_bytes(4, "little")}, ERROR),  # top-down, allowed, data missing
    ("gif", {6: b"\xff\xff", 8: b"\xff\xff"}, None),
    ("jpeg-L", "sof", TOO_LARGE),
    ("tiff-raw", "tiff", TOO_LARGE),
])
def test_header_dimensions(fuzz_seeds, tmp_path, kind, edit, expected):
    """Header fields claiming huge or allowed-but-absent pixel data, from bytes and from a file:
    refused from the header (too large) or one error, with bounded time and memory."""
    seed = next(data for k, _, data in fuzz_seeds if k == kind)
    data = bytearray(seed)
    if edit == "sof":
        position = data.find(b"\xff\xc0")
        data[position + 5:position + 9] = struct.pack(">HH", 65500, 65500)
    elif edit == "tiff":  # ImageWidth and ImageLength 50000
        order = "little" if data[:2] == b"II" else "big"
        ifd = int.from_bytes(data[4:8], order)
        for k in range(int.from_bytes(data[ifd:ifd + 2], order)):
            entry = ifd + 2 + 12 * k
            if int.from_bytes(data[entry:entry + 2], order) in (256, 257):
                size = 2 if int.from_bytes(data[entry + 2:entry + 4], order) == 3 else 4
                data[entry + 8:entry + 8 + size] = (50000).to_bytes(size, order)
    else:
        for offset, value in edit.items():
            data[offset:offset + len(value)] = value
        if kind.startswith("png"):
            _png_crc_fix(data)
    path = tmp_path / f"edited-{kind}"
    path.write_bytes(bytes(data))
    outcomes: Counter = Counter()
    _decode_checked(lambda: to_mnist(open_image(bytes(data), kind), kind), outcomes, "bytes")
    _decode_checked(lambda: to_mnist(path), outcomes, "file")
    if expected is not None:
        assert outcomes == {"bytes error": 1, "file error": 1}
    if expected == TOO_LARGE:
        for source in (bytes(data), path):
            with pytest.raises(ImageTooLarge, match="over the limit"):
                open_image(source, kind)


@pytest.mark.parametrize("kind", ["tiff-raw", "tiff-I16"])
def test_tiff_strip_offsets_of_another_type(fuzz_seeds, tmp_path, kind):
    """Found by fuzzing: StripOffsets typed UNDEFINED (bytes) makes Pillow's loader raise a
    TypeError; it is one LenetEmbedError like any other damaged file."""
    data = bytearray(next(data for k, _, data in fuzz_seeds if k == kind))
    ifd = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        entry = ifd + 2 + 12 * k
        if int.from_bytes(data[entry:entry + 2], "little") == 273:  # StripOffsets
            data[entry + 2:entry + 4] = (7).to_bytes(2, "little")  # type UNDEFINED
    with pytest.raises(TypeError), Image.open(io.BytesIO(bytes(data))) as image:
        image.load()  # what Pillow itself does with it
    path = tmp_path / "strips.tif"
    path.write_bytes(bytes(data))
    for source in (bytes(data), path):
        with pytest.raises(LenetEmbedError, match="not a readable image"):
            open_image(source, "strips.tif")
        with pytest.raises(LenetEmbedError, match="not a readable image"):
            to_mnist(path)


# ====================================================================== 2. decompression bombs

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` white pixels, compressed row block by row
    block (Pillow would hold the whole image in memory to write it): a few hundred KB at most."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte "none", then the packed pixels
    compressor = zlib.compressobj(1)
    block = max(1, 2**20 // len(row))
    parts = [compressor.compress(row * min(block, height - done))
             for done in range(0, height, block)]
    parts.append(compressor.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))
    return path


BOMB_SIDES = (9000, 13000, 30000)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, mnist, search_index) -> dict[str, Path]:
    """Three bombs, a real test digit as a 28x28 PNG, and the same digit at 4096x4096 (the
    largest size allowed), black on white; the digit is one the session index gets right."""
    folder = tmp_path_factory.mktemp("bombs")
    files = {f"bomb-{side}": write_bomb_png(folder / f"bomb-{side}.png", side, side)
             for side in BOMB_SIDES}
    for i in range(50):
        label = int(mnist.test.labels[i])
        hits = search_index.search(mnist.test.images[i], k=5)[0]
        if all(hit.label == label for hit in hits):
            break
    else:
        pytest.fail("the session index gets none of the first 50 test digits right")
    digit = Image.fromarray(mnist.test.images[i])
    files["digit"] = folder / f"digit-label-{label}.png"
    digit.save(files["digit"])
    big = Image.fromarray(255 - mnist.test.images[i]).resize((4096, 4096),
                                                             Image.Resampling.BILINEAR)
    files["digit-4096"] = folder / f"digit-4096-label-{label}.png"
    big.save(files["digit-4096"])
    for side in BOMB_SIDES:  # really that many pixels, in tiny files
        header = files[f"bomb-{side}"].read_bytes()[:33]
        assert struct.unpack(">II", header[16:24]) == (side, side)
        assert files[f"bomb-{side}"].stat().st_size < 1_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(files["bomb-13000"]) as image:  # Pillow reads it as a valid PNG
            assert image.size == (13000, 13000) and image.mode == "1"
    return files


def _label_of(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


@dataclass
class Measured:
    """A finished command: exit status, output, wall seconds and its own peak RSS (bytes)."""

    returncode: int
    stdout: str
    stderr: str
    wall: float
    rss: int


# Runs a command from a small process and records its own peak RSS and wall time. Measured from
# pytest directly, a child's ru_maxrss would include pytest's own (large) RSS: Linux keeps the
# high-water mark of the memory the child had between fork and exec.
_LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(f"{usage.ru_maxrss * 1024} {time.perf_counter() - started}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _measure(argv: list, tmp_path: Path, timeout: float = 120, **options) -> Measured:
    """Run ``argv`` to the end: its exit status, output, wall time and peak RSS."""
    figures = tmp_path / "measured"
    launcher = [sys.executable, "-c", _LAUNCHER, str(figures), *map(str, argv)]
    with open(os.devnull, "rb") as stdin, open(tmp_path / "stdout", "w+b") as out, \
            open(tmp_path / "stderr", "w+b") as err:
        process = subprocess.Popen(launcher, stdin=stdin, stdout=out, stderr=err,
                                   start_new_session=True, **options)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            pytest.fail(f"{argv} did not finish in {timeout} s")
        out.seek(0)
        err.seek(0)
        rss, wall = figures.read_text().split()
        return Measured(returncode, out.read().decode(), err.read().decode(), float(wall),
                        int(rss))


def _single_error_line(stderr: str) -> str:
    """The one line a failed command printed; no traceback, no raw library warning."""
    assert "Traceback" not in stderr, stderr
    assert "Warning" not in stderr and "DecompressionBomb" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


def test_bombs_through_query_cli(bombs, bundle_dir, lenet_embed_cmd, tmp_path):
    """`lenet-embed query BOMB`: one line naming the file, exit 1, at the cost of a normal query;
    a 4096x4096 digit is answered within the same bounds."""
    query = [*lenet_embed_cmd, "query", "--index-dir", bundle_dir]
    before = _measure([*query, bombs["digit"]], tmp_path)
    runs = {name: _measure([*query, bombs[name]], tmp_path)
            for name in (*(f"bomb-{side}" for side in BOMB_SIDES), "digit-4096")}
    after = _measure([*query, bombs["digit"]], tmp_path)
    for baseline in (before, after):
        assert baseline.returncode == 0, baseline.stderr
    base_wall, base_rss = max(before.wall, after.wall), max(before.rss, after.rss)
    report = [f"baseline query: {base_wall:.2f} s, {base_rss / MiB:.0f} MB"]
    for name, run in runs.items():
        report.append(f"{name}: exit {run.returncode}, {run.wall:.2f} s "
                      f"({run.wall - base_wall:+.2f}), {run.rss / MiB:.0f} MB "
                      f"({(run.rss - base_rss) / MiB:+.0f})")
    print("\n" + "\n".join(report))
    for side in BOMB_SIDES:
        run = runs[f"bomb-{side}"]
        assert run.returncode == 1, run.stderr
        line = _single_error_line(run.stderr)
        assert str(bombs[f"bomb-{side}"]) in line and "over the limit" in line
        assert run.stdout == ""
        assert run.rss - base_rss < 64 * MiB  # refused from the header: nothing decoded
    big = runs["digit-4096"]
    assert big.returncode == 0 and big.stderr == "", big.stderr
    assert f"predicted label: {_label_of(bombs['digit-4096'])}" in big.stdout
    for run in runs.values():
        assert run.rss <= CLI_RSS_BYTES
        assert run.wall <= base_wall + CLI_EXTRA_SECONDS


def test_bombs_through_search_index(bombs, search_index):
    """`SearchIndex.search` and `.query` refuse bombs with ImageTooLarge (a LenetEmbedError),
    without a warning; the 4096x4096 digit is answered."""
    rss_before = _maxrss_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for side in BOMB_SIDES:
            path = bombs[f"bomb-{side}"]
            with pytest.raises(ImageTooLarge, match="over the limit") as raised:
                search_index.search(path, k=3)
            assert isinstance(raised.value, LenetEmbedError) and str(path) in str(raised.value)
            (result,) = search_index.query([Query(image=path.read_bytes(), name=path.name)], k=3)
            assert isinstance(result.error, ImageTooLarge) and path.name in str(result.error)
        hits = search_index.search(bombs["digit-4096"], k=5)[0]
    assert not caught, [str(w.message) for w in caught]
    label = _label_of(bombs["digit-4096"])
    assert [hit.label for hit in hits].count(label) >= 3
    assert _maxrss_bytes() - rss_before < RSS_GROWTH_BYTES


def _digit_folder(mnist, root: Path, n: int = 30, names: list[str] | None = None) -> Path:
    """Real test digits as PNG files in one subfolder per label (named by ``names``)."""
    for i in range(n):
        label = int(mnist.test.labels[i])
        folder = root / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mnist.test.images[i]).save(folder / f"test-{i:04d}.png")
    return root


def test_build_index_images_skips_bombs(run, trained, bombs, mnist, tmp_path):
    """`build-index --images` with bombs among real digits: each bomb skipped with a warning
    naming it, every digit indexed."""
    folder = _digit_folder(mnist, tmp_path / "digits")
    planted = [folder / "7" / "bomb-13000.png", folder / "bomb-30000.png",
               folder / "2" / "bomb-9000.png"]
    for target in planted:
        shutil.copy(bombs[target.stem], target)
    out = tmp_path / "bundle"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ok(run("build-index", "--images", folder, "--model", trained.model,
                        "--index-dir", out))
    assert not [w for w in caught if "PIL" in w.filename or "Image" in str(w.category)]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == len(planted), result.stderr
    for target in planted:
        assert any(str(target) in line and "over the limit" in line for line in warned)
    assert f"skipped {len(planted)} unreadable file(s)" in result.stderr
    assert "Traceback" not in result.output and "DecompressionBomb" not in result.output
    index = SearchIndex.load(out)
    assert len(index) == 30
    sources = {index.snapshot.source(row) for row in range(len(index))}
    assert not {str(target) for target in planted} & sources


# ========================================================================= 3. operator errors

def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (the lock file's state word aside)."""
    return {str(p.relative_to(folder)): (b"" if p.name == ".lock" else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _answers(bundle: Path, mnist) -> list:
    index = SearchIndex.load(bundle)
    return [[(n.id, n.label, round(n.distance, 6)) for n in hits]
            for hits in index.search(mnist.test.images[:20], k=5)]


def _intact(bundle: Path, before: dict[str, bytes], answers: list, mnist) -> None:
    """The bundle is byte for byte what it was, and answers the same."""
    after = _files(bundle)
    assert after["manifest.json"] == before["manifest.json"]
    assert after == before, sorted(set(after) ^ set(before))
    assert _answers(bundle, mnist) == answers


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(free_bytes, bundle)``: a copy of ``bundle`` on a fresh tmpfs with about that much
    space left over. Needs root (mount); skipped otherwise. Unmounted afterwards."""
    mounted: list[Path] = []

    def make(free: int, bundle: Path) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        pages = sum(-(-p.stat().st_size // 4096) for p in bundle.rglob("*") if p.is_file())
        size_kb = (pages * 4096 + free) // 1024
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                                   str(point)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot mount a small tmpfs to fill up ({exc})")
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): "
                        f"{done.stderr.strip()}")
        mounted.append(point)
        copy = Path(shutil.copytree(bundle, point / "index"))
        left = shutil.disk_usage(point).free
        assert free - 64 * 1024 <= left <= free + 64 * 1024, left
        return copy

    yield make
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _build_error_line(result) -> str:
    """The one error line of a failed in-process `build-index`; progress lines ("embedding:
    600/600 ...", one per stage and ten seconds on a non-terminal) may come before it, one
    kind per stage the build reports (`lenet_embed.build.STAGES`)."""
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines()
             if not re.match(rf"({'|'.join(STAGES)}): \d", line)]
    assert len(lines) == 1, result.stderr
    return one_line_error(SimpleNamespace(exit_code=result.exit_code,
                                          exception=result.exception, output=result.output,
                                          stderr=lines[0]))


def _disk_full_line(line: str, bundle: Path) -> None:
    assert str(bundle) in line, line
    assert "No space left on device" in line and "the bundle is unchanged" in line, line


@pytest.mark.parametrize("free_kb", [64, 400], ids=["in-keras-save", "in-litert-export"])
def test_disk_full_during_build_index(run, trained, bundle_dir, mnist, tmpfs, tmp_path,
                                      free_kb, monkeypatch):
    """A rebuild that runs out of space (while Keras saves the encoder, as with ``--backend
    keras``: an OSError; or while TensorFlow exports it to LiteRT, staged in the bundle before
    anything is embedded: a ResourceExhaustedError): one line, exit 1, the old bundle intact."""
    import lenet_embed.writer

    converted: list[str] = []
    real = lenet_embed.writer._disk_error

    def spy(exc):
        converted.append(type(exc).__name__)
        return real(exc)

    monkeypatch.setattr(lenet_embed.writer, "_disk_error", spy)
    bundle = tmpfs(free_kb * 1024, bundle_dir)
    before, answers = _files(bundle), _answers(bundle, mnist)
    digits = _digit_folder(mnist, tmp_path / "digits")
    backend = ["--backend", "keras"] if free_kb == 64 else []
    line = _build_error_line(run("build-index", "--images", digits, "--model", trained.model,
                                 *backend, "--index-dir", bundle))
    _disk_full_line(line, bundle)
    _intact(bundle, before, answers, mnist)
    # The two sizes fail where intended: Keras's own OSError, or TensorFlow's error converted.
    assert converted == ([] if free_kb == 64 else ["ResourceExhaustedError"])


def test_disk_full_during_add(bundle_dir, mnist, tmpfs, tmp_path, lenet_embed_cmd):
    """`add` of many images to a bundle on a full disk: one line, exit 1, bundle intact."""
    bundle = tmpfs(64 * 1024, bundle_dir)
    before, answers = _files(bundle), _answers(bundle, mnist)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(300):
        Image.fromarray(mnist.test.images[i]).save(pictures / f"test-{i:04d}.png")
    run = _measure([*lenet_embed_cmd, "add", "--images", pictures, "--index-dir", bundle],
                   tmp_path)
    assert run.returncode == 1
    _disk_full_line(_single_error_line(run.stderr), bundle)
    _intact(bundle, before, answers, mnist)


@pytest.mark.parametrize("free_kb, fails_on", [(64, "vectors.npy"), (2560, "index.faiss")],
                         ids=["in-arrays", "in-faiss-index"])
def test_disk_full_during_compact(run, bundle_copy, mnist, tmpfs, free_kb, fails_on,
                                  monkeypatch):
    """`compact` on a full disk, failing while writing the arrays or, after 2.2 MB of them, the
    FAISS index: one line, exit 1, the bundle intact."""
    import lenet_embed.durable
    from lenet_embed.updates import remove

    failed: list[str] = []
    real = lenet_embed.durable.write_new

    def spy(path, write):
        try:
            return real(path, write)
        except OSError:
            failed.append(Path(path).name)
            raise

    monkeypatch.setattr(lenet_embed.durable, "write_new", spy)
    remove(bundle_copy, [1, 2, 3])  # something to compact
    bundle = tmpfs(free_kb * 1024, bundle_copy)
    before, answers = _files(bundle), _answers(bundle, mnist)
    _disk_full_line(one_line_error(run("compact", "--index-dir", bundle)), bundle)
    assert failed == [fails_on]
    _intact(bundle, before, answers, mnist)


def test_build_index_dot_in_a_foreign_folder(run, trained, mnist, tmp_path, monkeypatch):
    """`build-index --index-dir .` from a folder of someone's files: refused, nothing touched."""
    digits = _digit_folder(mnist, tmp_path / "digits")
    work = tmp_path / "my-work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me\n")
    (work / "data.csv").write_text("a,b\n1,2\n")
    shutil.copy(next(digits.rglob("*.png")), work / "sub" / "digit.png")
    before = _files(work)
    monkeypatch.chdir(work)
    line = one_line_error(run("build-index", "--images", digits, "--model", trained.model,
                              "--index-dir", "."))
    assert "not an index bundle" in line
    assert _files(work) == before and not (work / ".lock").exists()


def test_build_index_dot_inside_a_bundle(run, trained, bundle_copy, mnist, tmp_path,
                                         monkeypatch):
    """`build-index --index-dir .` from inside a bundle commits a rebuild into it (the documented
    behaviour of a build into an existing bundle): a new version with the new items, the user's
    own files beside the bundle kept."""
    from lenet_embed.bundle import read_manifest

    old = read_manifest(bundle_copy)
    (bundle_copy / "README.md").write_text("# my bundle\n")
    (bundle_copy / "notes.txt").write_text("keep me\n")
    digits = _digit_folder(mnist, tmp_path / "digits")
    monkeypatch.chdir(bundle_copy)
    result = ok(run("build-index", "--images", digits, "--model", trained.model,
                    "--index-dir", "."))
    assert "wrote ." in result.stdout
    new = read_manifest(bundle_copy)
    assert (new.version, new.operation, new.count) == (old.version + 1, "build", 30)
    assert (bundle_copy / "README.md").read_text() == "# my bundle\n"
    assert (bundle_copy / "notes.txt").read_text() == "keep me\n"
    index = SearchIndex.load(".")
    hits = index.search(mnist.test.images[0], k=1)[0]
    assert hits[0].source and Path(hits[0].source).parent.parent == digits


@pytest.mark.parametrize("command", [["query", "digit.png"], ["build-index"], ["serve"],
                                     ["evaluate"]], ids=lambda c: c[0])
def test_threads_out_of_range(run, command):
    """`--threads 100000`: click refuses it, one line, exit 2, before anything is loaded."""
    result = run(*command, "--threads", "100000")
    line = one_line_error(result)
    assert result.exit_code == 2
    assert "--threads" in line and "100000" in line


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def named_bundle(trained, mnist, tmp_path_factory) -> Path:
    """A bundle of real digits in folders named by words: labels are positions in `classes`."""
    from lenet_embed import build_index

    root = tmp_path_factory.mktemp("named")
    digits = _digit_folder(mnist, root / "digits", names=NAMES)
    return Path(build_index(images=digits, model=trained.model, index_dir=root / "index").path)


def test_manifest_classes_shorter_than_labels(named_bundle, tmp_path, lenet_embed_cmd):
    """A manifest whose `classes` list is cut short. Edited by hand, its own checksum refuses it
    at load. Sealed again (everything else valid, as a faulty writer would leave it), a load does
    not read every label: `query` stops with one line when a result's label is not a class,
    `info --verify` checks every label, and both name the classes."""
    from lenet_embed.bundle import MANIFEST, SEAL, parse_manifest, sealed_json

    bundle = Path(shutil.copytree(named_bundle, tmp_path / "index"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert len(manifest["classes"]) >= 5
    manifest["classes"] = manifest["classes"][:2]
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(LenetEmbedError, match="does not match its own checksum"):
        SearchIndex.load(bundle)
    del manifest[SEAL]
    text = sealed_json(manifest)
    parse_manifest(text, "edited")  # the manifest itself is well-formed
    (bundle / MANIFEST).write_text(text)
    index = SearchIndex.load(bundle)
    digit = next(p for p in (named_bundle.parent / "digits").rglob("*.png")
                 if p.parent.name not in manifest["classes"])
    with pytest.raises(LenetEmbedError, match="classes"):
        index.search(digit, k=1)
    for argv in (["query", digit, "--index-dir", bundle],
                 ["info", "--verify", "--index-dir", bundle]):
        run = _measure([*lenet_embed_cmd, *argv], tmp_path)
        assert run.returncode == 1, run.stdout
        line = _single_error_line(run.stderr)
        assert str(bundle) in line and "classes" in line


# ============================================================================== 4. scripts

# Every benchmark that reads MNIST (bench_quality, bench_service, bench_speed, bench_updates, and
# any added later: those that name $LENET_EMBED_MNIST or --data) reads it first.
SCRIPTS = sorted(path.name for path in (REPO / "scripts").glob("bench_*.py")
                 if "LENET_EMBED_MNIST" in path.read_text() or "--data" in path.read_text())


def test_every_script_runs_main_through_run_script():
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert {"bench_quality.py", "bench_service.py", "bench_speed.py", "bench_updates.py",
            "font_digits.py"} <= {path.name for path in scripts}
    for path in scripts:
        text = path.read_text()
        assert text.rstrip().endswith('if __name__ == "__main__":\n    run_script(main)'), path
        assert "from lenet_embed.cli import run_script" in text, path


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_stop_with_one_line_without_mnist(script, tmp_path):
    """With `$LENET_EMBED_MNIST` at an empty folder and no --data, each benchmark stops at once
    with the CLI's one-line error (before any training), exit 1."""
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    env = {**os.environ, "LENET_EMBED_MNIST": str(empty)}
    run = _measure([sys.executable, REPO / "scripts" / script], tmp_path, timeout=60, env=env,
                   cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    line = _single_error_line(run.stderr)
    assert str(empty) in line and "train-images-idx3-ubyte" in line
    assert run.wall < 30
    assert not (tmp_path / "models").exists()


def test_font_digits_stops_with_one_line(tmp_path):
    """font_digits.py reads no MNIST; its failures are one line too: no fonts, and a bundle
    that is not there (with `$LENET_EMBED_MNIST` empty all the same)."""
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    env = {**os.environ, "LENET_EMBED_MNIST": str(empty)}
    script = [sys.executable, REPO / "scripts" / "font_digits.py", tmp_path / "out"]
    run = _measure([*script, "--fonts", empty], tmp_path, timeout=60, env=env, cwd=tmp_path)
    assert run.returncode == 1
    assert "no .ttf fonts" in _single_error_line(run.stderr)
    one_font = tmp_path / "fonts"
    one_font.mkdir()
    shutil.copy(font_file("DejaVuSans.ttf"), one_font)
    missing = tmp_path / "no-bundle"
    run = _measure([*script, "--fonts", one_font, "--index-dir", missing], tmp_path,
                   timeout=60, env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stdout
    assert run.stderr.startswith(f"wrote 40 images to {tmp_path / 'out'}\n")  # then the query
    line = _single_error_line(run.stderr.split("\n", 1)[1])
    assert str(missing) in line and "no index bundle" in line


def test_run_script(capsys):
    """`lenet_embed.cli.run_script`: the scripts' shared entry point."""
    from lenet_embed.cli import run_script

    def fails() -> None:
        raise LenetEmbedError("something: wrong; do this")

    def interrupted() -> None:
        raise KeyboardInterrupt

    for main, status, message in [(fails, 1, "Error: something: wrong; do this\n"),
                                  (interrupted, 1, "Error: interrupted\n"),
                                  (lambda: None, 0, ""), (lambda: 3, 3, "")]:
        with pytest.raises(SystemExit) as exited:
            run_script(main)
        assert exited.value.code == status
        assert capsys.readouterr().err == message
    with pytest.raises(ValueError):  # a bug still shows its traceback
        run_script(lambda: int("x"))
