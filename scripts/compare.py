"""Run a benchmark on this checkout and on an earlier commit, and print their tables side by side.

    python scripts/compare.py [--ref 4395071] scripts/bench_updates.py [ARGS...]

Every figure a benchmark prints is meant to stand beside its baseline from the same run. A
benchmark that measures a change against the code before it cannot hold that code itself, so this
script exports the package and scripts of ``--ref`` (``git archive``, into a temporary folder),
runs the benchmark of that commit on that commit's package, then this checkout's benchmark on this
checkout's package, one after the other on the same machine with the same arguments, and prints:

- each run's output as it was (its own tables, with their own in-run baselines and goals);
- one table joining the rows of both runs by their first cell (the figure), this checkout's value
  beside the earlier commit's.

Both runs see the same data and model arguments; the benchmark decides what they are. The earlier
commit's benchmark is the one that commit shipped, so a figure it did not have shows "-".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lenet_embed.cli import run_script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REF = "4395071"  # the code the integrity and redesign issues measured


def export(ref: str, into: Path) -> Path:
    """The package and scripts of ``ref``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "lenet_embed", "scripts"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(code: Path, script: str, args: list[str]) -> str:
    """Run ``script`` (a path relative to the repository) of the tree at ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    print(f"== {script} on {code}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, str(code / script), *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(f"warning: {script} on {code} exited {done.returncode}", file=sys.stderr)
    return done.stdout


def table_rows(output: str) -> dict[str, list[str]]:
    """The rows of every Markdown table in ``output``, keyed by their first cell (a figure name;
    a repeated name gets ``#2``, ``#3``)."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set("".join(cells)) <= set("-: "):
            continue
        key, number = cells[0], 2
        while key in rows:
            key, number = f"{cells[0]} #{number}", number + 1
        rows[key] = cells[1:]
    return rows


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=DEFAULT_REF,
                        help="the earlier commit (default: %(default)s)")
    parser.add_argument("script", help="a benchmark under scripts/, e.g. scripts/bench_updates.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lenet-embed-baseline-") as folder:
        before = run(export(options.ref, Path(folder)), options.script, options.args)
    after = run(REPO, options.script, options.args)
    print(f"## {options.script} at {options.ref}\n\n{before}\n## {options.script} now\n\n{after}")
    old, new = table_rows(before), table_rows(after)
    print(f"## side by side\n\n| row | now | at {options.ref} |\n|---|---|---|")
    for key in [*new, *(k for k in old if k not in new)]:
        print(f"| {key} | {' / '.join(new.get(key, ['-']))} | {' / '.join(old.get(key, ['-']))} |")


if __name__ == "__main__":
    run_script(main)
