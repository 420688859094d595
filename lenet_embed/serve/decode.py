"""Turning a request body into a query: a multipart upload, or a JSON body holding base64 image
bytes, a 28x28 pixel array or an embedding vector (searches only), and for ``POST /v1/items`` a
label beside the image.

Image bytes are only read here; they are decoded later, in the decode pools (:mod:`.pools`),
under the package's decode budget (``preprocess.MAX_PIXELS``) and the service's time budget.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from ..labels import BadLabel, check_label
from ..preprocess import SIDE
from ..search import Query
from .errors import ApiError
from .wire import MAX_LABEL_LENGTH, ItemBody, validation_message

_BODY_HELP = (
    "send an image as multipart field 'file', or a JSON object with one of "
    "image_base64, pixels, vector"
)
# The parts a multipart body may have: the image, a label, and a few fields a form may add.
MAX_PARTS = 8
_ITEM_HELP = (
    "send an image as multipart field 'file' (and a field 'label'), or a JSON object with "
    "image_base64 or pixels, and label"
)


def _from_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image_base64 is not valid base64") from None


def image_query(name: str, data: bytes) -> Query:
    """The query of an uploaded image file's bytes (422 when empty)."""
    if not data:
        raise ApiError(422, f"{name}: the file is empty; {_BODY_HELP}")
    return Query(image=data, name=name)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _parse_json(body: bytes, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        status = 400 if any(error["type"] == "json_invalid" for error in errors) else 422
        raise ApiError(status, validation_message(errors)) from None


def _json_image(payload: Any) -> Query:
    """The image of a validated JSON body: ``image_base64`` or ``pixels``."""
    if payload.image_base64 is not None:
        return image_query("image_base64", _from_base64(payload.image_base64))
    pixels = np.asarray(payload.pixels, dtype=np.float64).reshape(SIDE, SIDE)
    return Query(image=pixels, name="pixels")


def json_query(body: bytes, body_model: type[BaseModel]) -> Query:
    """The query of a JSON search body (``body_model``): an embedding vector or an image."""
    payload = _parse_json(body, body_model)
    if payload.vector is not None:
        return Query(vector=np.asarray(payload.vector, dtype=np.float64), name="vector")
    return _json_image(payload)


async def _body(request: Request, help_text: str) -> bytes:
    body = await request.body()
    if not body:
        raise ApiError(400, f"empty request body; {help_text}")
    return body


class _Part:
    """One part of a multipart body: its field name, its file name (None for a plain field)
    and its bytes."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: str | None = None
        self.chunks: list[bytes] = []

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


async def _form(request: Request) -> dict[str, _Part]:
    """The parts of a ``multipart/form-data`` body by field name (the first of a repeated
    one), parsed by python-multipart as the body arrives. The body is held in memory once: the
    service's body limit (:data:`.middleware.MAX_BODY_BYTES`) bounds it. At most
    :data:`MAX_PARTS` parts; a malformed body is refused with 400."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary in its Content-Type header")
    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]

    def begin() -> None:
        if len(parts) == MAX_PARTS:
            raise ApiError(400, f"multipart body with more than {MAX_PARTS} parts")
        parts.append(_Part())

    def field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        parts[-1].headers[header[0].lower()] = header[1]
        header[:] = [b"", b""]

    def headers_finished() -> None:
        part = parts[-1]
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        part.filename = None if filename is None else filename.decode("utf-8", "replace")

    def data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": begin, "on_header_field": field, "on_header_value": value,
        "on_header_end": header_end, "on_headers_finished": headers_finished,
        "on_part_data": data})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    form: dict[str, _Part] = {}
    for part in parts:
        form.setdefault(part.name, part)
    return form


async def _upload(request: Request, help_text: str) -> tuple[Query, dict[str, _Part]]:
    """The image file (field ``file``) of a multipart form, and the form's parts."""
    if request.headers.get("content-length") == "0":
        raise ApiError(400, f"empty request body; {help_text}")
    form = await _form(request)
    upload = form.get("file")
    if upload is None or upload.filename is None:
        raise ApiError(422, "multipart upload needs an image file in the field 'file'")
    return image_query(upload.filename or "file", upload.data), form


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


async def read_query(request: Request, body_model: type[BaseModel]) -> Query:
    """The query of a ``POST /v1/search`` request, or :class:`ApiError`.

    ``body_model`` is the JSON body's model (:func:`~.wire.search_body_model`).
    """
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        query, _ = await _upload(request, _BODY_HELP)
        return query
    body = await _body(request, _BODY_HELP)
    if _is_json(media_type):
        return json_query(body, body_model)
    raise ApiError(415, f"unsupported content type {media_type or '(none)'!r}; {_BODY_HELP}")


async def read_item(request: Request) -> tuple[Query, int | str | None]:
    """The image and label of a ``POST /v1/items`` request, or :class:`ApiError`."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        query, form = await _upload(request, _ITEM_HELP)
        part = form.get("label")
        if part is not None and part.filename is not None:
            raise ApiError(422, "label: give it as a plain form field, not a file")
        label = part.data.decode("utf-8", "replace").strip() if part is not None else None
        if label is not None and len(label) > MAX_LABEL_LENGTH:
            raise ApiError(422, f"label: at most {MAX_LABEL_LENGTH} characters")
        return query, _item_label(label or None)  # a blank field: no label
    body = await _body(request, _ITEM_HELP)
    if _is_json(media_type):
        payload = _parse_json(body, ItemBody)
        return _json_image(payload), _item_label(payload.label)
    raise ApiError(415, f"unsupported content type {media_type or '(none)'!r}; {_ITEM_HELP}")


def _item_label(label: int | str | None) -> int | str | None:
    """A label as the library's one rule (:func:`..labels.check_label`) takes it, or 422: a
    number beyond int64 is refused here, not a 500 where it is stored."""
    try:
        return check_label(label)
    except BadLabel as exc:
        raise ApiError(422, str(exc)) from None
