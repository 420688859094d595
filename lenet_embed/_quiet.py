"""Keep native libraries' start-up chatter off the user's terminal.

TensorFlow and LiteRT write informational lines (oneDNN, CUDA stub, cpu_feature_guard, XNNPACK)
straight to file descriptor 2 from C++, where no Python logging setting reaches them. Pointing fd 2
at /dev/null while they start is the only reliable way to keep normal runs quiet; ``--verbose``
turns this off.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Let native start-up messages through (True) or hide them (False, the default)."""
    global _verbose
    _verbose = verbose


def is_verbose() -> bool:
    """Whether ``--verbose`` was given."""
    return _verbose


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send fd 2 to /dev/null for the duration, unless verbose."""
    if _verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
