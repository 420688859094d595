"""The wire formats: pydantic models of the JSON bodies, and validation errors as one line.

The models document the API in the OpenAPI schema (``/openapi.json``); the search request body is
built per index, since the length of a ``vector`` query is the index's dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..labels import MAX_LABEL, MAX_LABEL_LENGTH, RULE
from ..preprocess import SIDE

MAX_K = 100
DEFAULT_K = 5


class SearchParams(BaseModel):
    """The query parameters of ``POST /v1/search``, checked by pydantic in the route itself
    (:func:`search_params`): the same rules and messages as a FastAPI parameter's, without
    FastAPI's per-request dependency resolution (a tenth of the route's CPU time)."""

    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="Neighbours to return.")
    min_confidence: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="Answer only when the calibrated confidence is at least this (default: the "
        "bundle's threshold).")


def search_params(query: Mapping[str, str]) -> SearchParams:
    """The search parameters of a request's query string (its last value of each name, as
    FastAPI takes them); a ``ValidationError`` names what is wrong."""
    return SearchParams.model_validate({name: query[name] for name in SearchParams.model_fields
                                        if name in query})


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI ``parameters`` of a route whose query string ``model`` describes."""
    properties = model.model_json_schema()["properties"]
    return [{"name": name, "in": "query", "required": False,
             "description": prop.get("description", ""),
             "schema": {key: value for key, value in prop.items() if key != "description"}}
            for name, prop in properties.items()]


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="What was wrong with the request, in one line.")


class Health(BaseModel):
    """``GET /healthz``."""

    status: str = Field(examples=["ok"])
    count: int = Field(description="Number of live indexed items.")
    version: int = Field(description="The bundle version being served.")


class Info(BaseModel):
    """``GET /v1/info``: what the loaded bundle holds and how it is searched."""

    count: int = Field(description="Live items.")
    deleted: int = Field(description="Removed items still stored until `lenet-embed compact`.")
    version: int = Field(description="The bundle version being served.")
    committed_at: str = Field(description="When that version was committed (UTC).")
    writes: bool = Field(description="Whether POST/DELETE /v1/items are enabled.")
    dim: int
    metric: str
    factory: str | None
    search_params: dict[str, int]
    dataset: dict[str, Any] | None = Field(description="What the bundle was built from; folders "
                                           "of server paths shown as …/ unless the service "
                                           "runs with --show-sources.")
    classes: list[str]
    created_at: str | None
    lenet_embed_version: str | None
    encoder: str = Field(description="Encoder runner in use: litert or keras.")
    max_k: int = Field(description="Largest k a search accepts.")


class NeighborOut(BaseModel):
    """One search result, as in ``query --json``."""

    rank: int
    id: int
    label: int | str | None
    distance: float = Field(description="Smaller is nearer: 1 - cos (cosine) or Euclidean (l2).")
    source: str | None = Field(description="Where the item came from: its path relative to the "
                               "images folder the bundle was built from, else its file name "
                               "(the full path when the service runs with --show-sources).")


class SearchResult(BaseModel):
    """``POST /v1/search``: the same object as one line of ``query --json``."""

    query: str = Field(description="The upload's file name, or image_base64, pixels or vector.")
    predicted_label: int | str | None = Field(
        description="Majority label of the neighbours when it is a match, else null.")
    match: bool = Field(description="Whether the query looks like the indexed items and the "
                        "confidence reaches the threshold (true in a bundle without "
                        "calibration).")
    confidence: float | None = Field(description="Calibrated probability that the majority "
                                     "label is right; null in a bundle without calibration.")
    reason: str | None = Field(description='Why there is no match: "not a digit" or "unsure"; '
                               "a hint in a bundle without calibration; else null.")
    neighbors: list[NeighborOut]


class ItemCreated(BaseModel):
    """``POST /v1/items``: the new item."""

    id: int = Field(description="The new item's id (ids are never reused).")
    label: int | str | None
    version: int = Field(description="The bundle version that holds it.")
    count: int = Field(description="Live items after the commit.")


# Strict: JSON numbers only ("7" or true are refused, not converted).
Pixel = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False, strict=True)]
PixelRow = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]
PixelsField = (
    Annotated[list[Pixel], Field(min_length=SIDE * SIDE, max_length=SIDE * SIDE)]
    | Annotated[list[PixelRow], Field(min_length=SIDE, max_length=SIDE)]
    | None
)
_PIXELS_HELP = "28x28 grayscale, nested or 784 flat; 0-255, or 0-1 floats."
_BASE64_HELP = "An image file (PNG, JPEG, ...) in base64; a data: URL works too."


# Strict: JSON true/false or 7.5 are not labels (lax pydantic would store true as 1). The rule
# itself is lenet_embed.labels.check_label's, which read_item applies to every label.
Label = (Annotated[int, Field(ge=0, le=MAX_LABEL, strict=True)]
         | Annotated[str, Field(min_length=1, max_length=MAX_LABEL_LENGTH)] | None)


class ItemBody(BaseModel):
    """The JSON body of ``POST /v1/items``: one image (exactly one of the two fields) and its
    label."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str | None = Field(None, description=_BASE64_HELP)
    pixels: PixelsField = Field(None, description=_PIXELS_HELP)
    label: Label = Field(None, description="A digit, or a class name in a bundle built from "
                         "folders; null for none.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ItemBody:
        if (self.image_base64 is None) == (self.pixels is None):
            raise ValueError("give exactly one of image_base64, pixels")
        return self


def search_body_model(dim: int) -> type[BaseModel]:
    """The JSON request body of ``POST /v1/search`` for an index of ``dim``-d vectors."""

    class SearchBody(BaseModel):
        """Exactly one of the three fields."""

        model_config = ConfigDict(extra="forbid")

        image_base64: str | None = Field(None, description=_BASE64_HELP)
        pixels: PixelsField = Field(None, description=_PIXELS_HELP)
        vector: (
            Annotated[list[Annotated[float, Field(strict=True, allow_inf_nan=False)]],
                      Field(min_length=dim, max_length=dim)]
            | None
        ) = Field(None, description=f"An embedding to search by: {dim} floats.")

        @model_validator(mode="after")
        def _exactly_one(self) -> SearchBody:
            given = [name for name in ("image_base64", "pixels", "vector")
                     if getattr(self, name) is not None]
            if len(given) != 1:
                raise ValueError("give exactly one of image_base64, pixels, vector")
            return self

    return SearchBody


# The pixels field is a union (nested or flat), whose raw errors read badly: one rule instead.
_PIXELS_RULE = "pixels: give 28 rows of 28 numbers or 784 numbers, each 0-255 (or 0-1 floats)"
# So is the label (a whole number or a name).
_LABEL_RULE = f"label: {RULE}, or null"


def validation_message(errors: list[Any]) -> str:
    """Pydantic/FastAPI validation errors as one line: ``where: what; where: what``."""
    parts: list[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if loc and loc[0] == "pixels":
            part = _PIXELS_RULE
        elif loc and loc[0] == "label":
            part = _LABEL_RULE
        else:
            part = f"{'.'.join(loc)}: {message}" if loc else message
        if part not in parts:
            parts.append(part)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more
