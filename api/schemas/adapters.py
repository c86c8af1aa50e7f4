"""Adapter (LoRA) shapes: the registration body (JSON with a `uri`; the multipart upload is documented in
`ADAPTER_REQUEST_BODY`) and the adapter as the API shows it."""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from api.pagination import ListPage
from common.input_limits import PlainText
from common.job_request import ADAPTER_NAME_PATTERN


class AdapterCreate(BaseModel):
    """Register a file already in storage (`s3://` inside your own prefix or an allow-listed one), on the
    server (`file:///...` inside an operator's `LETTERPRESS_ADAPTERS__PATH_ALLOW` directory), or on the Hugging
    Face Hub (`hf://org/repo[@revision]/file.safetensors`, where the operator enables it)."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, max_length=64)
    uri: PlainText = Field(max_length=2048, description="s3://bucket/key.safetensors, file:///path.safetensors or "
                                                        "hf://org/repo[@revision]/file.safetensors")
    replace: bool = Field(False, strict=True, description="point an existing name at this file")


class AdapterOut(BaseModel):
    object: str = "adapter"
    name: str
    sha256: str = Field(description="what jobs store and reproduce with: re-pointing the name changes no job")
    size_bytes: int
    rank: int
    target_modules: list[str] = Field(description="the transformer's Linear layers it wraps, without layer index")
    layers: int = Field(description="how many Linear layers it wraps")
    layout: str = Field(description="diffusers (peft keys), or converted (ai-toolkit / kohya keys)")
    base_model: str | None = Field(description="what the file's own metadata names, when it names anything")
    checked_against: str | None = Field(description="the model whose layer shapes it was checked on")
    created_at: datetime


class AdapterList(ListPage[AdapterOut]):
    pass


# POST /v1/adapters reads its body itself (multipart upload or JSON, api/routers/adapters.py): this is the requestBody
# its OpenAPI operation shows.
_UPLOAD_SCHEMA = {
    "type": "object", "title": "AdapterUpload", "required": ["name", "file"],
    "properties": {
        "name": {"type": "string", "pattern": ADAPTER_NAME_PATTERN, "maxLength": 64},
        "file": {"type": "string", "format": "binary", "description": "a .safetensors LoRA file"},
        "replace": {"type": "string", "enum": ["true", "false"], "description": "point an existing name at it"},
    },
}
ADAPTER_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
        "application/json": {"schema": AdapterCreate.model_json_schema()},
    },
}
