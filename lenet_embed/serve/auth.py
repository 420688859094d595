"""The write token: ``POST`` and ``DELETE /v1/items`` need ``Authorization: Bearer <token>``.

Writes are off unless the service is started with a token (``--write-token-file`` or
``$LENET_EMBED_WRITE_TOKEN``); the read API never needs one.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Request

from ..errors import LenetEmbedError
from .errors import ApiError

TOKEN_ENV = "LENET_EMBED_WRITE_TOKEN"
MIN_TOKEN_LENGTH = 16


def read_token(path: str | os.PathLike[str] | None) -> str | None:
    """The write token from ``path`` (its first line), else from ``$LENET_EMBED_WRITE_TOKEN``,
    else None (writes off). A token shorter than 16 characters is refused."""
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LenetEmbedError(f"{path}: cannot read the write token ({exc})") from None
        token, where = (lines[0].strip() if lines else ""), str(path)
    elif os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise LenetEmbedError(
            f"{where}: the write token must be at least {MIN_TOKEN_LENGTH} characters; make one "
            "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def require_writer(request: Request, token: str | None) -> None:
    """Refuse (403) a write when writes are off or the request lacks the token."""
    if token is None:
        raise ApiError(403, "writes are disabled; start the service with --write-token-file "
                            f"or ${TOKEN_ENV} to enable them")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                               token.encode()):
        raise ApiError(403, "this needs the write token: send 'Authorization: Bearer <token>'")
