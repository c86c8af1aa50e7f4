"""What a caller may ask for, validated once for every entry point (REST jobs, batch lines, the CLI).

Ideogram API names where one exists: `rendering_speed`, `magic_prompt`, `seed`, `num_images`, `resolution`.
`to_params()` normalizes a request into the job's stored `params`: everything the worker needs, with the seed
chosen by the server when omitted, so the stored job alone reproduces its images.
"""
from __future__ import annotations

import json
import re
import secrets
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.captions import Caption
from common.fair_share import Priority
from common.image_files import DEFAULT_QUALITY, OutputFormat
from common.input_limits import PlainText, StorableJson
from common.model_files import has_component
from common.presets import PRESETS, RENDERING_SPEED, get_preset, remix_steps
from common.prompt_tokens import tokens_over_limit
from common.settings import AdapterSettings, ApiSettings, ModelSettings, get_settings

MAX_SEED = 2**32 - 1
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PresetName = Literal["V4_QUALITY_48", "V4_HIGH_34", "V4_DEFAULT_20", "V4_FAST_16", "V4_TURBO_12", "V4_FAST_20",
                     "V4_INSTANT_8"]


class ImageRef(BaseModel):
    """A remix input that is one of the caller's own earlier images: its job and the image's index."""
    model_config = ConfigDict(extra="forbid")

    job_id: uuid.UUID
    index: int = Field(0, ge=0, le=7, strict=True)


# A remix input named by a string: an upload (POST /v1/uploads answers with this form), an s3:// object or an
# https URL (common/input_images.py says which a request may use where)
IMAGE_PATTERN = r"^(upload:[0-9a-f]{64}|s3://\S+|https://\S+)$"
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default: the last 80% of the schedule


class LoraRequest(BaseModel):
    """One adapter of a job: a name of the caller's registry (`GET /v1/adapters`) and its strength."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, max_length=64)
    scale: float = Field(1.0, strict=True, allow_inf_nan=False,
                         description="the adapter's weight; bounded by the server (default |scale| <= 2)")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: PlainText | None = Field(None, min_length=1, max_length=8000)
    caption: Caption | None = None
    preset: PresetName | None = None
    rendering_speed: Literal["TURBO", "DEFAULT", "QUALITY"] | None = None
    # Numbers and flags are strict: a JSON integer (not "256", true or 2.5), a JSON number for guidance_scale,
    # true/false for magic_prompt, as the OpenAPI document says; lax parsing read `"seed": true` as seed 1.
    width: int | None = Field(None, ge=16, le=8192, strict=True)
    height: int | None = Field(None, ge=16, le=8192, strict=True)
    resolution: str | None = Field(None, pattern=r"^\d+x\d+$", description="WIDTHxHEIGHT, e.g. 1024x1024")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    num_images: int = Field(1, ge=1, le=8, strict=True)
    steps: int | None = Field(None, ge=1, le=200, strict=True)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, strict=True)  # strict float still takes 4 as 4.0
    magic_prompt: bool | Literal["AUTO", "ON", "OFF"] = Field(
        False, description="rewrite the text prompt into a structured caption with the model's prompt enhancer: "
                           "true or ON (fail the job when the enhancer gives no valid caption), AUTO (keep the text "
                           "prompt then), false or OFF. The caption is stored on the job and in the image's recipe")
    output_format: OutputFormat = Field("png", description="png (lossless), webp or jpeg; the recipe is inside "
                                                          "every format")
    output_quality: int | None = Field(None, ge=1, le=100, strict=True,
                                       description=f"webp and jpeg only; default {DEFAULT_QUALITY}")
    loras: list[LoraRequest] | None = Field(None, description="registered adapters (LoRA) to apply, by name; "
                                                               "at most a server-set few (default 3)")
    image: ImageRef | str | None = Field(
        None, description="remix: start from this image, `upload:<sha256>` (POST /v1/uploads), `s3://bucket/key` of "
                          "your storage, an `https://` URL, or {job_id, index} of one of your images")
    strength: float | None = Field(None, gt=0.0, le=1.0, strict=True, allow_inf_nan=False,
                                   description="remix: how far from the image to go, the share of the schedule run "
                                               "(default 0.8; 1.0 keeps only the image's layout of latents)")
    cache: bool = Field(True, strict=True, description="answer from an identical earlier image of yours when there "
                                                        "is one (an explicit seed only); false: always generate")
    metadata: StorableJson | None = None
    webhook_url: PlainText | None = Field(None, max_length=2048)
    priority: Priority = Field("normal", description="its lane: jobs of a higher lane start first; every lane "
                                                     "goes before batch work (a batch has its own priority)")

    @field_validator("magic_prompt", mode="before")
    @classmethod
    def _a_magic_prompt_mode(cls, v: Any) -> Any:
        if v is True or v is False or v in ("AUTO", "ON", "OFF"):
            return v
        raise ValueError("magic_prompt must be true, false, \"AUTO\", \"ON\" or \"OFF\"")

    @field_validator("image", mode="before")
    @classmethod
    def _an_image_reference(cls, v: Any) -> Any:
        """One error naming `image` for any bad form (not one per member of the union)."""
        if v is None or isinstance(v, ImageRef):
            return v
        if isinstance(v, dict):
            try:
                return ImageRef.model_validate(v)
            except ValidationError as exc:
                raise ValueError(f"an earlier image is {{job_id, index}}: {exc.errors()[0]['msg']}") from None
        if isinstance(v, str) and len(v) <= 2048 and re.match(IMAGE_PATTERN, v):
            return v
        raise ValueError("image must be upload:<sha256>, s3://bucket/key, an https:// URL or {job_id, index}")

    @field_validator("output_quality")
    @classmethod
    def _quality_of_a_lossy_format(cls, v: int | None, info) -> int | None:
        if v is not None and info.data.get("output_format", "png") == "png":
            raise ValueError("output_quality applies to webp and jpeg; a png is lossless")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @model_validator(mode="after")
    def _one_of_prompt_or_caption(self) -> "JobRequest":
        if (self.prompt is None) == (self.caption is None):
            raise ValueError("give exactly one of `prompt` (text) or `caption` (structured)")
        if self.preset and self.rendering_speed:
            raise ValueError("give `preset` or `rendering_speed`, not both")
        if self.resolution and (self.width or self.height):
            raise ValueError("give `resolution` or `width`/`height`, not both")
        return self


class RequestError(ValueError):
    """A request that parses but breaks a server limit; carries the field it names."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _check_side(name: str, value: int, lo: int, hi: int) -> None:
    if value % 16:
        raise RequestError(name, f"{name} must be a multiple of 16, got {value}")
    if not lo <= value <= hi:
        raise RequestError(name, f"{name} must be between {lo} and {hi}, got {value}")


def to_params(req: JobRequest, api: ApiSettings, model: ModelSettings | None = None,
              adapters: AdapterSettings | None = None) -> dict[str, Any]:
    """Normalize a validated request into stored job params. Raises RequestError naming the field. `model`
    (default: the process settings') gives the tokenizer and token limit the prompt text is checked against;
    `adapters` (the same default) the bounds of `loras`. `loras` come out as [{"name", "scale"}]: the caller
    resolves the names inside the tenant (common.adapters.resolve_loras) before the job is stored."""
    preset_name = req.preset or (RENDERING_SPEED[req.rendering_speed] if req.rendering_speed else api.default_preset)
    preset = get_preset(preset_name)
    if req.resolution:
        width, height = (int(x) for x in req.resolution.split("x"))
        _check_side("resolution", width, api.min_side, api.max_width)
        _check_side("resolution", height, api.min_side, api.max_height)
    else:
        width, height = req.width or 1024, req.height or 1024
        _check_side("width", width, api.min_side, api.max_width)
        _check_side("height", height, api.min_side, api.max_height)
    if req.metadata is not None and len(json.dumps(req.metadata, ensure_ascii=False).encode()) > api.max_metadata_bytes:
        raise RequestError("metadata", f"metadata must serialize to at most {api.max_metadata_bytes} bytes")
    steps = req.steps or preset.steps
    seed_generated = req.seed is None
    seed = secrets.randbelow(MAX_SEED - 8) if seed_generated else req.seed
    params: dict[str, Any] = {
        "preset": preset.name, "width": width, "height": height, "steps": steps, "mu": preset.mu, "std": preset.std,
        "guidance_schedule": list(preset.guidance_schedule(steps, req.guidance_scale)),
        "guidance_scale": req.guidance_scale, "seed": seed, "seed_generated": seed_generated,
        "num_images": req.num_images,
    }
    if req.output_format != "png":  # a PNG job's params (and request hash) stay what they were before formats
        params.update(output_format=req.output_format, output_quality=req.output_quality or DEFAULT_QUALITY)
    if req.loras:  # absent when empty: a job without adapters keeps the params (and request hash) it always had
        params["loras"] = _check_loras(req.loras, adapters if adapters is not None else get_settings().adapters)
    if req.caption is not None:
        params["caption"] = req.caption.model_dump(exclude_none=True)
        params["prompt_text"] = req.caption.to_prompt_text()
    else:
        params["prompt"] = req.prompt
        params["prompt_text"] = req.prompt
    _check_prompt_tokens("caption" if req.caption is not None else "prompt", params["prompt_text"],
                         model if model is not None else get_settings().model)
    if req.image is not None or req.strength is not None:
        params.update(_remix(req, steps))
    magic = MAGIC_MODES[req.magic_prompt]
    if magic != "OFF":
        params["magic_prompt"] = _check_magic(magic, req, model if model is not None else get_settings().model)
    if not req.cache:  # absent when true: the params (and request hash) of a cached job stay what they were
        params["cache"] = False
    return params


MAGIC_MODES = {True: "ON", False: "OFF", "ON": "ON", "AUTO": "AUTO", "OFF": "OFF"}


def magic_prompt_available(model: ModelSettings) -> bool:
    """Whether this server can rewrite prompts: the model has a prompt_enhancer_head, or an endpoint is set."""
    return bool(get_settings().magic_prompt.endpoint or has_component(model, "prompt_enhancer_head"))


def _check_magic(mode: str, req: JobRequest, model: ModelSettings) -> str:
    """A magic prompt the server can honour: a text prompt, and an enhancer (the model's prompt_enhancer_head, or
    LETTERPRESS_MAGIC_PROMPT__ENDPOINT)."""
    if req.caption is not None:
        raise RequestError("magic_prompt", "magic_prompt rewrites a text prompt; this request gives a caption")
    if not magic_prompt_available(model):
        raise RequestError("magic_prompt", "magic_prompt is not available on this server: the model has no "
                                           "prompt_enhancer_head and no LETTERPRESS_MAGIC_PROMPT__ENDPOINT is set")
    return mode


def _remix(req: JobRequest, steps: int) -> dict[str, Any]:
    """`image` as given (the caller resolves it: common.input_images) and its `strength`."""
    if req.image is None:
        raise RequestError("strength", "strength is for a remix: give `image` too")
    strength = req.strength if req.strength is not None else DEFAULT_STRENGTH
    if remix_steps(steps, strength) < 1:
        raise RequestError("strength", f"strength {strength} of {steps} steps runs no step: raise one of them")
    image = req.image.model_dump(mode="json") if isinstance(req.image, ImageRef) else req.image
    return {"image": image, "strength": strength}


def _check_loras(loras: list[LoraRequest], adapters: AdapterSettings) -> list[dict[str, Any]]:
    if len(loras) > adapters.max_per_job:
        raise RequestError("loras", f"at most {adapters.max_per_job} adapters a job, got {len(loras)}")
    seen = set()
    for i, lora in enumerate(loras):
        if abs(lora.scale) > adapters.max_scale:
            raise RequestError(f"loras.{i}.scale", f"scale must be between -{adapters.max_scale} and "
                                                   f"{adapters.max_scale}, got {lora.scale}")
        if lora.name in seen:
            raise RequestError(f"loras.{i}.name", f"adapter {lora.name!r} is named twice")
        seen.add(lora.name)
    return [{"name": lora.name, "scale": lora.scale} for lora in loras]


def _check_prompt_tokens(field: str, prompt_text: str, model: ModelSettings) -> None:
    tokens = tokens_over_limit(prompt_text, model)
    if tokens is not None:
        raise RequestError(field, f"{field} is {tokens:,} tokens long (with the chat template), over the model's "
                                  f"limit of {model.max_sequence_length:,}: shorten it")


def image_seeds(params: dict[str, Any]) -> list[int]:
    """One seed per image: seed, seed+1, ... (wrapping), so image i is reproducible on its own."""
    return [(params["seed"] + i) % (MAX_SEED + 1) for i in range(params["num_images"])]


assert set(PRESETS) == set(PresetName.__args__)  # the Literal and the table must agree
