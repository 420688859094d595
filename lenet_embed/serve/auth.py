"""The write token: ``POST`` and ``DELETE /v1/items`` need ``Authorization: Bearer <token>``.

Writes are off unless the service is started with a token (``--write-token-file`` or
``$LENET_EMBED_WRITE_TOKEN``); the read API never needs one.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from pathlib import Path

from fastapi import Request

from ..bundle import CALIBRATION_DIR, DELETIONS_DIR, LOCK_FILE, SEGMENTS_DIR, VERSIONS_DIR
from ..errors import LenetEmbedError
from ..files import open_regular
from .errors import ApiError

log = logging.getLogger(__package__)

TOKEN_ENV = "LENET_EMBED_WRITE_TOKEN"
MIN_TOKEN_LENGTH = 16
# Fewer different characters than this gets a warning at start (see read_token).
MIN_DISTINCT_CHARACTERS = 10
# A token file's first line is read from at most this many bytes.
MAX_TOKEN_FILE_BYTES = 4096
_MAKE_ONE = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def read_token(path: str | os.PathLike[str] | None, warn: bool = True) -> str | None:
    """The write token from ``path`` (its first line), else from ``$LENET_EMBED_WRITE_TOKEN``,
    else None (writes off).

    Refused (:class:`LenetEmbedError`, one line): a ``path`` that is not a regular file (a FIFO,
    a device or a folder is refused from ``os.stat`` before it is opened, so reading never
    blocks), a token shorter than 16 characters, or one with a character that is not printable
    ASCII (no client could send it in a header). With ``warn``, one warning line each for a
    token with fewer than 10 different characters (``aaaa…``, ``changeme-changeme``), and for a
    token file that other users may read or change (``chmod 600 FILE``). A weak token is only
    warned about: a rule on its characters cannot tell a pattern from chance (a random
    16-digit hex token has fewer than 10 different characters a quarter of the time), and the
    length rule already refuses what no generator makes.
    """
    mode = None
    if path is not None:
        (token, mode), where = _first_line(Path(path)), str(path)
    elif os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise LenetEmbedError(
            f"{where}: the write token must be at least {MIN_TOKEN_LENGTH} characters; {_MAKE_ONE}")
    if not (token.isascii() and token.isprintable()):
        raise LenetEmbedError(f"{where}: the write token must be printable ASCII (clients send it "
                              f"in a header); {_MAKE_ONE}")
    if warn:
        distinct = len(set(token))
        if distinct < MIN_DISTINCT_CHARACTERS:
            log.warning("%s: the write token uses %d different characters (fewer than %d), so it "
                        "is easy to guess; %s", where, distinct, MIN_DISTINCT_CHARACTERS,
                        _MAKE_ONE)
        if mode is not None and mode & 0o077:
            log.warning("%s: other users may read or change the write token (mode %03o); "
                        "chmod 600 %s", where, stat.S_IMODE(mode), where)
    return token


def _first_line(path: Path) -> tuple[str, int]:
    """The first line (stripped) of the regular file ``path``, and the file's mode."""
    try:
        with open_regular(path, "a file holding the token on its first line") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read(MAX_TOKEN_FILE_BYTES)
        lines = data.decode("utf-8").splitlines()
    except OSError as exc:
        raise LenetEmbedError(f"{path}: cannot read the write token ({exc.strerror or exc})"
                              ) from None
    except UnicodeDecodeError as exc:
        raise LenetEmbedError(f"{path}: cannot read the write token ({exc})") from None
    return (lines[0].strip() if lines else ""), mode


def write_problem(index_dir: str | os.PathLike[str]) -> str | None:
    """Why this process cannot write to the bundle in ``index_dir`` (the folder, its writer
    lock or the folders a commit writes to are not writable for it, or on a read-only disk),
    or None when it can. Checked with ``os.access`` (what the kernel would allow), so nothing
    is written."""
    folder = Path(index_dir)
    checks = [(folder, os.W_OK | os.X_OK)]
    checks += [(folder / name, os.W_OK | os.X_OK)
               for name in (VERSIONS_DIR, SEGMENTS_DIR, DELETIONS_DIR, CALIBRATION_DIR)]
    checks.append((folder / LOCK_FILE, os.R_OK | os.W_OK))
    for where, wanted in checks:
        if (where == folder or where.exists()) and not os.access(where, wanted):
            return f"{where} is not writable by this process"
    return None


def require_writer(request: Request, token: str | None, problem: str | None = None) -> None:
    """Refuse (403) a write when writes are off (no token, or ``problem``: the bundle is not
    writable) or the request lacks the token."""
    if token is None:
        raise ApiError(403, "writes are disabled; start the service with --write-token-file "
                            f"or ${TOKEN_ENV} to enable them")
    if problem is not None:
        raise ApiError(403, "writes are disabled: the service cannot write to its bundle (it is "
                            "read-only for the service); its operator can see why in its log")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                               token.encode()):
        raise ApiError(403, "this needs the write token: send 'Authorization: Bearer <token>'")
