"""POST /v1/uploads: its multipart body and its answer."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class UploadOut(BaseModel):
    object: str = "upload"
    image: str = Field(description="what a job's `image` takes to remix from it: upload:<sha256>")
    sha256: str
    format: str = Field(description="PNG, JPEG or WEBP")
    width: int
    height: int
    size_bytes: int


UPLOAD_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "title": "ImageUpload", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "a PNG, JPEG or WebP image (bounded bytes and pixels)"}}}}},
}
