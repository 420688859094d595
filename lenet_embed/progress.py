"""Progress of long stages on stderr: a tqdm bar with rate and ETA on a terminal, and one plain
line every :data:`LOG_INTERVAL` seconds otherwise (CI logs, ``2> build.log``), where a redrawn
bar would either vanish or pile up as thousands of carriage returns.

The core reports progress through a plain callback, ``on_progress(stage, done, total)``; this
module draws it, so the core never imports tqdm.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

# Seconds between lines when stderr is not a terminal.
LOG_INTERVAL = 10.0
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {elapsed} elapsed, " \
               "{remaining} left, {rate_fmt}"


class _Lines:
    """A file for tqdm that turns each redraw (``\\r`` + status) into one line of its own."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, label: str, unit: str = "it", stream: IO[str] | None = None) -> tqdm:
    """A progress bar for ``total`` steps named ``label``, drawn on ``stream`` (stderr)."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=label, unit=unit, file=stream, dynamic_ncols=True,
                    unit_scale=True)
    # miniters=1: tqdm's monitor thread would otherwise add a line of its own now and then.
    return tqdm(total=total, desc=label, unit=unit, file=_Lines(stream), mininterval=LOG_INTERVAL,
                miniters=1, bar_format=_LINE_FORMAT)


class StageBars:
    """An ``on_progress(stage, done, total)`` callback that shows one bar per stage, closing the
    previous stage's bar when the next stage starts."""

    def __init__(self, unit: str = "items", stream: IO[str] | None = None) -> None:
        self.unit = unit
        self.stream = stream
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = bar(total, stage, self.unit, self.stream)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Finish the current bar (its last line shows the stage's total time)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = None
