"""What the service lets out about its requests and its machine: log lines that a request cannot
forge, and answers that do not tell clients how the server's disk is laid out.

Two promises, each kept in one place:

- **One event, one log line.** Every record of the service's loggers (``lenet_embed.serve``, and
  uvicorn's ``uvicorn.access`` and ``uvicorn.error``) is rendered once by :class:`EscapeFilter`
  with its control characters escaped (:func:`escape`): a request whose path, query, method or
  headers hold ``\\r\\n`` cannot start a second line, and nothing a client sends can move the
  terminal's cursor or hide text. (A traceback attached to a record stays as Python prints it.)
- **No server paths in answers.** Folders of absolute paths are cut out of what the service
  tells clients (:func:`without_paths`: error messages, ``/v1/info``'s data set), and a search
  result's source is given relative to the images folder the bundle was built from, or as its
  file name (:func:`shown_source`), unless the operator starts the service with
  ``--show-sources``.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

# The loggers whose lines a request can reach: the service's own and uvicorn's.
ESCAPED_LOGGERS = ("lenet_embed.serve", "uvicorn.access", "uvicorn.error")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    """``text`` with every character that is not printable (``str.isprintable``: control
    characters, line and paragraph separators, format characters such as bidi overrides)
    written as an escape: ``\\r``, ``\\n``, ``\\t``, else ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``; a backslash becomes ``\\\\``, so the escaping can be undone unambiguously.
    The result is a single line of printable characters."""
    if text.isprintable() and "\\" not in text:  # the common case, at C speed
        return text
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else (
        f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


class EscapeFilter(logging.Filter):
    """Renders a record's message once, escaped (:func:`escape`): the record then holds the
    final text and no arguments, so every handler prints the same single line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging's handler reports it as it would have
            return True
        record.msg, record.args = escape(message), ()
        return True


def escape_log_lines() -> None:
    """Install :class:`EscapeFilter` on :data:`ESCAPED_LOGGERS` (once; uvicorn's logging set-up
    keeps a logger's filters)."""
    for name in ESCAPED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(known, EscapeFilter) for known in logger.filters):
            logger.addFilter(EscapeFilter())


_ABSOLUTE = re.compile(r"(?<![\w.~])(?:[A-Za-z]:)?[/\\](?:[^\s/\\]+[/\\])+")


def without_paths(value: Any) -> Any:
    """``value`` (a string, or a dict of them) with the folders of absolute paths cut out
    (``/srv/data/mnist`` -> ``…/mnist``): the service does not tell its clients how its
    machine's disk is laid out."""
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, str):
        return _ABSOLUTE.sub("…/", value)
    return value


def shown_source(source: str | None, root: str | None) -> str | None:
    """A search result's source as clients see it: relative to ``root`` (the images folder the
    bundle was built from) when it lies inside it, else its file name (None when it has none,
    e.g. ``/a/..``); never a folder outside ``root``. ``None`` stays ``None``."""
    if not source:
        return source
    # A bundle built on Windows names its files with backslashes; POSIX with slashes.
    flavour = PureWindowsPath if "\\" in source else PurePosixPath
    path = flavour(source)
    if root:
        try:
            inside = path.relative_to(flavour(root))
        except ValueError:
            inside = None
        if inside is not None and inside.parts and ".." not in inside.parts:
            return inside.as_posix()
    return path.name if path.name not in ("", ".", "..") else None
