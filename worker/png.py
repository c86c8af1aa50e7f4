"""PNGs that carry their own reproduction recipe in text chunks.

Chunk `letterpress` holds compact JSON: prompt or caption, preset, seed, size, steps, guidance schedule, model id
and revision. Nothing time-dependent goes in, so the same recipe and pixels encode to the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

RECIPE_CHUNK = "letterpress"


def recipe(params: dict[str, Any], *, seed: int, model_id: str, revision: str | None) -> dict[str, Any]:
    body = {k: params[k] for k in ("preset", "width", "height", "steps", "mu", "std", "guidance_schedule")}
    body.update({"seed": seed, "model": model_id, "revision": revision})
    if "caption" in params:
        body["caption"] = params["caption"]
    else:
        body["prompt"] = params["prompt"]
    return body


def encode_png(image: Image.Image, recipe_body: dict[str, Any]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_CHUNK, json.dumps(recipe_body, sort_keys=True, separators=(",", ":")))
    if "prompt" in recipe_body:
        info.add_text("Description", recipe_body["prompt"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def read_recipe(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as im:
        return json.loads(im.text[RECIPE_CHUNK])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
