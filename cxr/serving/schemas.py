"""The request and response shapes of ``cxr serve``, as pydantic models: FastAPI publishes them in
``/openapi.json`` (and ``/docs``) so that clients can be generated and the server fuzzed against
its own schema (Schemathesis, ``tests/test_serve_openapi.py``).

The upload itself is read by the server's own capped reader (``cxr.serving.app``), not by FastAPI's
body parsing, so its schema is declared here by hand (:data:`UPLOAD_BODY`, :data:`BATCH_BODY`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error: one line."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="what went wrong, in one line")


class Identity(BaseModel):
    """Which model file answered."""

    model_sha256: str | None = Field(description="sha256 of the model file that scored the image")
    card_model_sha256: str | None = Field(description="the sha256 its card names")
    verified_model: bool = Field(description="the two agree (a served model always does)")


class Prediction(Identity):
    """``cxr predict --json``'s record for one image."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the upload's name (?name=, or the multipart file name)")
    label: Literal["NORMAL", "PNEUMONIA", "OUT_OF_DOMAIN"]
    probability: float | None = Field(description="P(pneumonia); null when the image is out of domain")
    ood_score: float | None = Field(
        description="content-check score (> 1: unlike the training films); null without one"
    )
    in_domain: bool | None
    threshold: float = Field(description="P(pneumonia) at or above which the label is PNEUMONIA")
    threshold_source: str
    intended_use: bool = Field(description="false when the DICOM's metadata says it is not a chest radiograph")
    outside_intended_use: str | None = Field(default=None, description="the field that says so, when allowed")


class BatchItemError(BaseModel):
    """One file of a batch that could not be scored."""

    model_config = ConfigDict(extra="forbid")

    path: str
    error: str
    status: int = Field(description="the status a single /predict of this file would have answered")


class BatchResult(BaseModel):
    """``POST /predict/batch``: one record per file, in the order sent."""

    model_config = ConfigDict(extra="forbid")

    results: list[Prediction | BatchItemError]


class Health(Identity):
    """``GET /health``."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"]
    model: str


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int
    max_batch_files: int
    max_image_pixels: int
    max_image_bytes: int
    decode_budget_bytes: int


class ModelInfo(Identity):
    """``GET /model``: the card and what the server does with it."""

    model_config = ConfigDict(extra="forbid")

    model: str
    model_file: str
    threshold: float
    threshold_source: str
    limits: Limits
    card: dict[str, Any] = Field(description="the model card, unchanged")


class Reloaded(BaseModel):
    """``POST /reload``."""

    model_config = ConfigDict(extra="allow")

    reloaded: bool
    model_sha256: str | None = None


_BINARY = {"type": "string", "format": "binary"}
_RAW_TYPES = ("application/octet-stream", "application/dicom", "image/jpeg", "image/png", "image/bmp")

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one JPEG, PNG, BMP or DICOM file: the multipart field `file`, or the raw body",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
            },
            **{kind: {"schema": _BINARY} for kind in _RAW_TYPES},
        },
    }
}

BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "several image files as repeated multipart fields `files`",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": _BINARY}},
                    "required": ["files"],
                }
            }
        },
    }
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each status with the one-line error body."""
    words = {
        400: "an empty or malformed upload",
        404: "no such path",
        409: "nothing to reload",
        413: "the upload is over --max-upload-mb, or its decode could never fit the memory budget",
        422: "not a readable image, over a decode cap, or outside the intended use",
        503: "busy decoding other images: retry after Retry-After seconds",
    }
    return {status: {"model": ErrorBody, "description": words.get(status, "error")} for status in statuses}
