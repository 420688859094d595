"""The manifest's own costs, now beside an earlier commit's, in one run.

    python scripts/bench_manifest.py [--ref 1c85243] [--segments 60] [--repeats 300]

A manifest is parsed once per new version by every reader, and made (``Manifest.next``) and
serialised (``manifest_json``) at every commit. This measures the three on a manifest like one
after many adds (``--segments`` unsealed segments, a calibration with an 84 x 10 head), with
the package of this checkout and with the package of ``--ref`` (``git archive`` into a temporary
folder), each in a child process of its own, one after the other on the same machine:

1. ``parse_manifest`` of the manifest's text, not cached (each text parsed once), median;
2. ``Manifest.next`` of one more unsealed segment, median;
3. ``manifest_json`` of that manifest, median.

Both trees build the same manifest through the same public constructor; their texts are compared
(the same bytes: the format did not change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lenet_embed.cli import run_script

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import hashlib, json, statistics, sys, time
import numpy as np
from lenet_embed import bundle
from lenet_embed.bundle import Calibration, FileEntry, LogisticModel, Manifest, Segment

segments, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
def entry(name):
    return FileEntry(bytes=1000, sha256=hashlib.sha256(name.encode()).hexdigest())
def model(names):
    n = len(names)
    return LogisticModel(features=list(names), mean=rng.random(n).tolist(),
                         scale=(rng.random(n) + 1).tolist(), weights=rng.random(n).tolist(),
                         bias=0.5)
calibration = Calibration(
    k=5, ood=model(("log_d1", "log_dk", "energy")), confidence=model(("msp", "agree")),
    ood_thresholds={"0.99": 1.5, "0.995": 2.0}, default_keep="0.995", min_confidence=0.5,
    head_weights=rng.random((84, 10)).tolist(), head_bias=rng.random(10).tolist(),
    fitted_on={"items": 1000, "nondigits": 3000, "items_wrong": 12})
sealed = Segment(name="s00000001-00000000", rows=60000, sealed=True)
parts = [sealed] + [Segment(name=f"s{i:08d}-00000000", rows=4, sealed=False)
                    for i in range(2, segments + 2)]
files = {"encoders/e1/encoder.keras": entry("k"), "encoders/e1/encoder.tflite": entry("t")}
for s in parts:
    files.update({name: entry(name) for name in s.files()})
rows = sum(s.rows for s in parts)
manifest = Manifest(
    version=segments + 1, operation="add", created_at="2026-01-01T00:00:00.000+00:00",
    committed_at="2026-01-01T00:00:00.000+00:00", lenet_embed_version="0.1.0", dim=84,
    metric="cosine", factory="Flat", search_params={}, dataset={"kind": "idx"}, classes=[],
    encoder="encoders/e1", segments=parts, deletions=None, count=rows, rows=rows,
    next_id=rows, files=files, calibration=calibration)
text = bundle.manifest_json(manifest)

def median_ms(run):
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3

texts = [text.replace('"operation":"add"', f'"operation":"add{i}"') for i in range(repeats)]
texts = [bundle.sealed_json({k: v for k, v in json.loads(t).items() if k != bundle.SEAL})
         for t in texts]
parse = median_ms(lambda i: bundle.parse_manifest(texts[i], "bench"))
extra = Segment(name="s99999999-00000000", rows=1, sealed=False)
grown = {**files, extra.entry: entry("x")}
nxt = median_ms(lambda i: manifest.next("add", segments=[*parts, extra], files=grown,
                                        count=rows + 1, rows=rows + 1, next_id=rows + 1))
after = manifest.next("add", segments=[*parts, extra], files=grown, count=rows + 1,
                      rows=rows + 1, next_id=rows + 1)
serialise = median_ms(lambda i: bundle.manifest_json(after))
print(json.dumps({"parse": parse, "next": nxt, "json": serialise, "bytes": len(text),
                  "sha": hashlib.sha256(text.encode()).hexdigest()}))
"""


def measure(code: Path, segments: int, repeats: int) -> dict:
    """The figures of the package at ``code``, from a child process."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(segments), str(repeats)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure both trees and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="1c85243", help="the earlier commit (baseline)")
    parser.add_argument("--segments", type=int, default=60, help="unsealed segments")
    parser.add_argument("--repeats", type=int, default=300, help="timings per figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.ref, "lenet_embed"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        before = measure(Path(folder), args.segments, args.repeats)
    now = measure(REPO, args.segments, args.repeats)
    print(f"manifest of {args.segments + 1} segments with a calibration, {now['bytes']:,} "
          f"bytes; median of {args.repeats}; load average {os.getloadavg()[0]:.1f}\n")
    print(f"| figure | now | at {args.ref} (same run) | ratio |")
    print("|---|---|---|---|")
    for key, name in (("parse", "1. parse_manifest (not cached)"), ("next", "2. Manifest.next"),
                      ("json", "3. manifest_json")):
        print(f"| {name} | {now[key]:.3f} ms | {before[key]:.3f} ms | "
              f"{now[key] / before[key]:.2f}x |")
    same = "the same bytes" if now["sha"] == before["sha"] else "DIFFERENT bytes"
    print(f"| the manifest's text | sha256 {now['sha'][:12]} | sha256 {before['sha'][:12]} | "
          f"{same} |")


if __name__ == "__main__":
    run_script(main)
