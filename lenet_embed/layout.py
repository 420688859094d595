"""The names of a bundle's parts on disk (``index/README.md`` documents the layout).

A bundle is a folder that changes only by **commits**. Every commit (a build, an add, a remove, a
compaction) writes new files under names never used before, then makes a new ``manifest.json``
current with one ``os.replace``; files are never modified after they are written. A reader reads
``manifest.json`` once and opens only what that version names, so it sees one version from start
to end. Layout::

    manifest.json                    the current version (the commit point)
    versions/00000007.json           the manifests of recent versions (kept while readers may
                                     still be opening their files)
    segments/<segment>/vectors.npy   a sealed segment: float32 (n, dim), as indexed
                       ids.npy       int64 (n,), strictly increasing, never reused
                       labels.npy    int64 (n,), -1 = no label, else a digit or a class code
                       images.npy    uint8 (n, 28, 28), the digits as the encoder saw them
                       sources.json  optional: the source path of each row (or null)
                       index.faiss   the FAISS index of the rows
    segments/<segment>.npy           an unsealed segment (from add): the same, one record a row
    encoders/<fingerprint>/encoder.keras, encoder.tflite
    deletions/<name>.npy             int64, sorted: ids removed since the last compaction
    calibration/<name>.npy           float32 (n, dim), unit rows: the embeddings of the known
                                     non-digits the calibration measures queries against
    .lock                            the writer lock (:mod:`lenet_embed.lock`)
    .tmp/                            writers' scratch space, emptied by the next writer

What a manifest holds is defined in :mod:`lenet_embed.bundle`, its seal in
:mod:`lenet_embed.seal`.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"
VERSIONS_DIR = "versions"
SEGMENTS_DIR = "segments"
ENCODERS_DIR = "encoders"
DELETIONS_DIR = "deletions"
CALIBRATION_DIR = "calibration"
LOCK_FILE = ".lock"
# A commit's manifest is written under this name in the bundle, then renamed to manifest.json.
STAGED_PREFIX = ".manifest.json.new-"
SCRATCH_DIR = ".tmp"
# Files of one segment.
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
IMAGES_FILE = "images.npy"
SOURCES_FILE = "sources.json"
INDEX_FILE = "index.faiss"
SEGMENT_FILES = (VECTORS_FILE, IDS_FILE, LABELS_FILE, IMAGES_FILE)
# Files of the encoder.
ENCODER_FILE = "encoder.keras"
LITERT_FILE = "encoder.tflite"
DEFAULT_INDEX_DIR = Path("index")
# Everything a bundle folder may hold besides the user's own files.
LAYOUT = frozenset({MANIFEST, VERSIONS_DIR, SEGMENTS_DIR, ENCODERS_DIR, DELETIONS_DIR,
                    CALIBRATION_DIR, LOCK_FILE, SCRATCH_DIR})
# Files that may sit in a folder that is not yet a bundle and stay there (the repository's
# index/README.md documents the format).
KEPT_FILES = frozenset({"README.md", ".gitignore", ".gitkeep"})
# What every error about a bundle that cannot be read tells the user to do.
REBUILD = "rebuild it with `lenet-embed build-index`"
# One part of a name inside the bundle: a segment, an encoder folder, a file.
PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# A name a manifest may list in its ``files``: a file in a segment or encoder folder, or an
# unsealed segment, a deletions file or a calibration's non-digits.
DATA_NAME = (rf"({SEGMENTS_DIR}|{ENCODERS_DIR})/{PART}/{PART}"
             rf"|({SEGMENTS_DIR}|{DELETIONS_DIR}|{CALIBRATION_DIR})/{PART}\.npy")
