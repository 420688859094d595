"""A write touches only what it wrote (lenet_embed/garbage.py): cleaning up removes names the
bundle's layout gives and its records or a writer's intent journal name, never a user's file,
never through a symbolic link; it reports the bytes it unlinked; ``info`` counts what is left;
a bundle that cannot be written is one line; a held lock names its holder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_checks import ok, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lenet_embed import LenetEmbedError, SearchIndex, inspect_bundle
from lenet_embed.bundle import LOCK_FILE, MANIFEST, VERSIONS_DIR, read_manifest
from lenet_embed.calibration import calibrate
from lenet_embed.updates import add_vectors, compact, reclaim, remove
from lenet_embed.writer import BundleWriter

# Files a user might leave in a bundle, some named like the layout's own (a segment, a record,
# a staged manifest), in each of its folders.
PLANTED = {
    "NOTES.txt": b"keep\n",
    ".manifest.json.new-0badc0de": b"not a staged manifest\n",
    "segments/NOTES.txt": b"keep\n",
    "segments/s00000099-0badc0de.npy": b"looks like a segment\n",
    "segments/mine/data.bin": b"\x00\x01\x02",
    "encoders/NOTES.txt": b"keep\n",
    "deletions/d00000099-0badc0de.npy": b"looks like deletions\n",
    "versions/NOTES.txt": b"keep\n",
    "versions/00000099.json": b"\xff not a record",
}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links not followed), by relative name, with its bytes."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            found[path.relative_to(root).as_posix()] = (
                b"link:" + os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return found


def _plant(bundle: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)


def _live(bundle: Path) -> set[str]:
    manifest = read_manifest(bundle)
    return {*manifest.files, MANIFEST, LOCK_FILE, f"{VERSIONS_DIR}/{manifest.version:08d}.json"}


def _info(run, bundle: Path) -> dict:
    return json.loads(ok(run("info", "--index-dir", bundle, "--json")).stdout)


def _png(tmp_path: Path, pixels: np.ndarray) -> Path:
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    return path


def _rows(bundle: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and images of the first ``n`` live items, to add again (no encoder needed)."""
    snapshot = SearchIndex.load(bundle).snapshot
    rows = snapshot.live_rows()[:n]
    return snapshot.vectors(rows), snapshot.images(rows)


def _age_records(bundle: Path) -> None:
    """As if every version had been committed long ago: their grace periods are over."""
    for record in (bundle / VERSIONS_DIR).iterdir():
        os.utime(record, (record.stat().st_mtime - 100,) * 2)


# ------------------------------------------------------------------------------ user's files

def test_files_of_the_user_survive_add_remove_and_compact(run, bundle_copy, mnist, tmp_path):
    _plant(bundle_copy, PLANTED)
    png = _png(tmp_path, mnist.test.images[0])
    for args in (("add", png), ("remove", 3), ("add", png), ("compact",), ("compact",)):
        ok(run(*args, "--index-dir", bundle_copy))
    on_disk = _files(bundle_copy)
    assert {name: on_disk.get(name) for name in PLANTED} == PLANTED
    info = _info(run, bundle_copy)
    assert info["old_files_bytes"] == 0  # the compaction removed every old file...
    assert set(on_disk) - _live(bundle_copy) == set(PLANTED)  # ...and only those
    assert info["unknown_files"] == sorted(PLANTED)
    text = ok(run("info", "--index-dir", bundle_copy)).output
    assert "NOTES.txt" in text and "never touched" in text


def test_a_symlinked_folder_is_refused_and_the_other_folder_is_intact(run, bundle_copy, mnist,
                                                                      tmp_path):
    other = tmp_path / "elsewhere"
    shutil.move(bundle_copy / "segments", other)
    (bundle_copy / "segments").symlink_to(other)
    _plant(other, {"mine.txt": b"mine\n", "sub/deeper.txt": b"deeper\n"})
    before, manifest = _files(other), (bundle_copy / MANIFEST).read_bytes()
    png = _png(tmp_path, mnist.test.images[0])
    for args in (("add", png), ("remove", 3), ("compact",)):
        message = one_line_error(run(*args, "--index-dir", bundle_copy))
        assert message.startswith(f"Error: {bundle_copy / 'segments'}: is a symbolic link")
    with pytest.raises(LenetEmbedError, match="is a symbolic link"):
        reclaim(bundle_copy)
    assert _files(other) == before and (bundle_copy / MANIFEST).read_bytes() == manifest
    assert SearchIndex.load(bundle_copy).search(mnist.test.images[:1], k=1)  # still readable


def test_a_symlinked_file_is_refused(bundle_copy, tmp_path):
    name = next(n for n in read_manifest(bundle_copy).files if n.endswith("labels.npy"))
    outside = tmp_path / "labels.npy"
    shutil.move(bundle_copy / name, outside)
    (bundle_copy / name).symlink_to(outside)
    with pytest.raises(LenetEmbedError, match=f"{bundle_copy / name}: is a symbolic link"):
        remove(bundle_copy, [1])
    assert outside.is_file() and read_manifest(bundle_copy).version == 1


# ------------------------------------------------------------------------------ reclaiming

def test_a_compact_killed_in_its_wait_is_finished_by_the_next(run, bundle_copy):
    """``lenet-embed compact`` is a compaction's commit, then a wait and a sweep; killed in the
    wait (here: the commit alone, as the API's compact does it), its old files stay: ``info``
    counts them and the next ``compact`` removes them, reporting the bytes it unlinked."""
    remove(bundle_copy, [1, 2])
    compact(bundle_copy)
    old = {name: (bundle_copy / name).stat().st_size
           for name in set(_files(bundle_copy)) - _live(bundle_copy)}
    assert old and any(name.startswith("segments/") for name in old)
    info = _info(run, bundle_copy)
    assert info["old_files_bytes"] == sum(old.values())
    assert info["reclaimable_bytes"] == sum(old.values())  # no removed row is left
    summary = json.loads(ok(run("compact", "--index-dir", bundle_copy, "--json")).stdout)
    assert summary["freed_bytes"] == sum(old.values())
    assert set(_files(bundle_copy)) == _live(bundle_copy)
    assert _info(run, bundle_copy)["old_files_bytes"] == 0
    assert "already compact (version 3" in ok(run("compact", "--index-dir", bundle_copy)).output


def test_bytes_freed_are_the_bytes_unlinked(bundle_copy, tmp_path):
    """What a cleanup reports is what the files it unlinked held (measured before), counting
    neither a file another name still holds (a hard link outside) nor the user's files."""
    _plant(bundle_copy, PLANTED)
    remove(bundle_copy, [5])
    vectors, images = _rows(bundle_copy, 3)
    add_vectors(bundle_copy, vectors, images)
    compact(bundle_copy)
    live = next(n for n in read_manifest(bundle_copy).files if n.endswith("vectors.npy"))
    first = json.loads((bundle_copy / VERSIONS_DIR / "00000001.json").read_text())
    first_segment = f"segments/{first['segments'][0]['name']}/ids.npy"
    kept_elsewhere = tmp_path / "linked.npy"
    os.link(bundle_copy / first_segment, kept_elsewhere)  # this one's bytes are not freed
    sizes = {name: os.lstat(bundle_copy / name) for name in _files(bundle_copy)}
    freed = reclaim(bundle_copy)
    gone = set(sizes) - set(_files(bundle_copy))
    assert first_segment in gone and live not in gone
    assert freed == sum(sizes[n].st_size for n in gone if n != first_segment) > 0
    assert kept_elsewhere.stat().st_size == sizes[first_segment].st_size


def test_what_a_killed_writer_created_is_removed_and_nothing_else(bundle_copy):
    """A writer killed before its commit leaves its files and the lock saying ``busy`` with its
    intent journal; the next writer removes exactly the journaled names."""
    _plant(bundle_copy, PLANTED)
    vectors, images = _rows(bundle_copy, 4)
    writer = BundleWriter(bundle_copy).__enter__()
    current = writer.require_current()
    ids = np.arange(current.next_id, current.next_id + 4, dtype=np.int64)
    _, files = writer.new_segment(vectors=vectors, ids=ids, labels=np.full(4, -1),
                                  images=images)
    writer.new_deletions(np.array([1, 2]))
    (writer.scratch() / "asset").write_bytes(b"x" * 100)
    writer._close_unflushed()
    os.close(writer.lock.fd)  # killed: the kernel drops the flock, nothing else happens
    left = set(_files(bundle_copy)) - _live(bundle_copy) - set(PLANTED)
    assert set(files) < left and any(n.startswith(".tmp/") for n in left)
    report = inspect_bundle(bundle_copy)
    assert report.old_files_bytes == sum((bundle_copy / n).stat().st_size for n in left)
    add_vectors(bundle_copy, vectors[:1], images[:1])
    assert set(_files(bundle_copy)) - _live(bundle_copy) - {
        f"{VERSIONS_DIR}/00000001.json"} == set(PLANTED)
    assert not (bundle_copy / ".tmp").exists()
    assert {n: (bundle_copy / n).read_bytes() for n in PLANTED} == PLANTED


# ------------------------------------------------------------------------------ unwritable

@contextlib.contextmanager
def _read_only_copy(source: Path, where: Path):
    """A copy of ``source`` on a file system mounted read-only (needs root)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
    try:
        shutil.copytree(source, where / "index")
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where / "index"
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only file system needs root")
def test_a_read_only_bundle_is_one_line_for_every_write(run, bundle_dir, trained, tiny_idx_dir,
                                                        mnist, tmp_path):
    png = _png(tmp_path, mnist.test.images[0])
    with _read_only_copy(bundle_dir, tmp_path / "ro") as bundle:
        before = _files(bundle)
        for args in (("add", png), ("remove", 3), ("compact",), ("calibrate",),
                     ("build-index", "--data", tiny_idx_dir, "--model", trained.model)):
            message = one_line_error(run(*args, "--index-dir", bundle))
            assert message == (f"Error: {bundle}: is on a read-only file system, so lenet-embed "
                               "cannot write to this bundle (searching it works); copy it to a "
                               "writable folder or mount it read-write"), args
        assert _files(bundle) == before
        assert SearchIndex.load(bundle).search(mnist.test.images[:1], k=1)


def test_a_symlink_loop_as_index_dir_is_one_line(run, trained, tiny_idx_dir, mnist, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    png = _png(tmp_path, mnist.test.images[0])
    for args in (("add", png), ("remove", 3), ("compact",), ("calibrate",),
                 ("build-index", "--data", tiny_idx_dir, "--model", trained.model)):
        message = one_line_error(run(*args, "--index-dir", loop))
        assert message.startswith(f"Error: {loop}"), args
        assert "symbolic link" in message or "unreadable manifest" in message, message
    assert os.readlink(loop) == str(loop)


# ------------------------------------------------------------------------------ the lock

def test_a_held_lock_names_the_process_holding_it(run, bundle_copy, mnist, tmp_path):
    """The lock file still says the previous writer (this process: an add just finished);
    the process holding the lock now (not lenet-embed: a bare flock) is the one named."""
    vectors, images = _rows(bundle_copy, 1)
    add_vectors(bundle_copy, vectors, images)
    assert f"idle {os.getpid()}" in (bundle_copy / LOCK_FILE).read_text()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\nsys.stdin.read()", str(bundle_copy / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = one_line_error(run("remove", 1, "--index-dir", bundle_copy, "--wait", 0.1))
        assert f"(pid {holder.pid})" in message and str(os.getpid()) not in message
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ------------------------------------------------------------------------------ the property

_FOLDERS = ["", "segments/", "encoders/", "deletions/", "calibration/", "versions/", "@segment/",
            "@encoder/"]
_NAME = st.sampled_from(["NOTES.txt", "s00000007-0123abcd.npy", "00000042.json", "x.npy",
                         ".manifest.json.new-00ff", "index.faiss", "e00000003-0a0b0c0d"])
_OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 5)),
    st.tuples(st.just("remove"), st.integers(0, 1999)),
    st.tuples(st.just("compact"), st.just(0)),
    st.tuples(st.just("calibrate"), st.just(0)),
    st.tuples(st.just("age"), st.just(0)),
    st.tuples(st.just("sweep"), st.just(0)),
    st.tuples(st.just("killed add"), st.integers(1, 3)),
    st.tuples(st.just("plant"),
              st.tuples(st.sampled_from(_FOLDERS), _NAME, st.binary(max_size=64))),
), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=_OPS)
def test_foreign_files_survive_any_sequence_of_writes(bundle_dir, tmp_path, ops):
    """After any sequence of adds, removes, compactions, calibrations, sweeps and writers killed
    before their commit, with foreign files planted among the bundle's own: every foreign file is
    there byte for byte, nothing outside the bundle changed, and a full sweep leaves only the
    current version's files and the foreign ones."""
    example = tmp_path / f"example{len(list(tmp_path.iterdir()))}"  # one per example
    bundle = Path(shutil.copytree(bundle_dir, example / "index"))
    outside = example / "outside"
    _plant(outside, {"a.txt": b"a", "segments/b.npy": b"b"})
    outside_before = _files(outside)
    planted: dict[str, bytes] = {}
    vectors, images = _rows(bundle, 5)
    for op, arg in ops:
        if op == "add":
            add_vectors(bundle, vectors[:arg], images[:arg])
        elif op == "remove":
            remove(bundle, [arg])
        elif op == "compact":
            compact(bundle)
        elif op == "calibrate":
            calibrate(bundle)  # a new file of known non-digits; the old one is garbage
        elif op == "age":
            _age_records(bundle)
        elif op == "sweep":
            with BundleWriter(bundle) as writer:
                writer.collect_garbage(grace=0, force=True)
        elif op == "killed add":
            writer = BundleWriter(bundle).__enter__()
            current = writer.require_current()
            ids = np.arange(current.next_id, current.next_id + arg, dtype=np.int64)
            writer.new_segment(vectors=vectors[:arg], ids=ids, labels=np.full(arg, -1),
                               images=images[:arg])
            writer._close_unflushed()
            os.close(writer.lock.fd)
        else:
            folder, name, data = arg
            manifest = read_manifest(bundle)
            if folder == "@segment/":
                sealed = [s for s in manifest.segments if s.sealed]
                if not sealed:
                    continue
                folder = f"{sealed[0].entry}/"
            elif folder == "@encoder/":
                folder = f"{manifest.encoder}/"
            target = f"{folder}{name}"
            if target in _files(bundle) and target not in planted:
                continue  # the bundle's own file: not for planting over
            planted[target] = data
            _plant(bundle, {target: data})
    on_disk = _files(bundle)
    assert {name: on_disk.get(name) for name in planted} == planted
    _age_records(bundle)
    with BundleWriter(bundle) as writer:
        writer.collect_garbage(grace=0, force=True)
    on_disk = _files(bundle)
    assert {name: on_disk.get(name) for name in planted} == planted
    assert set(on_disk) - _live(bundle) == set(planted)
    assert _files(outside) == outside_before
    assert len(SearchIndex.load(bundle)) == read_manifest(bundle).count
