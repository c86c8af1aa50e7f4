"""Image files that carry their own reproduction recipe: PNG, WebP or JPEG (`output_format`).

The recipe is compact JSON: prompt or caption, preset, seed, size, steps, guidance schedule, model id and revision
(and the format and quality when not PNG). A PNG holds it in a `letterpress` text chunk; WebP and JPEG in an XMP
packet (`letterpress:recipe`, the JSON escaped as XML text), the metadata both formats carry and every image tool
keeps. Nothing time-dependent goes in, so the same recipe and pixels encode to the same bytes.

Here in `common`, not in the worker: the worker writes these files, the API names their content types and
`letterpress recipe FILE` reads a recipe back from any of them.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, PngImagePlugin

OutputFormat = Literal["png", "webp", "jpeg"]
RECIPE_CHUNK = "letterpress"  # the PNG text chunk
DEFAULT_QUALITY = 90  # WebP and JPEG, when the request names none
_XMP_TAG = "letterpress:recipe"
_XMP_NAMESPACE = "urn:letterpress:recipe:1"
_XMP_RECIPE = re.compile(rb"<letterpress:recipe>(.*?)</letterpress:recipe>", re.S)


@dataclass(frozen=True)
class ImageFormat:
    name: OutputFormat
    extension: str
    content_type: str
    pil_format: str


FORMATS: dict[str, ImageFormat] = {f.name: f for f in (
    ImageFormat("png", "png", "image/png", "PNG"),
    ImageFormat("webp", "webp", "image/webp", "WEBP"),
    ImageFormat("jpeg", "jpg", "image/jpeg", "JPEG"),
)}
CONTENT_TYPES = {f".{f.extension}": f.content_type for f in FORMATS.values()}


def content_type_of(key: str) -> str:
    """The content type of a stored image by its key's extension (keys made by common.storage.image_key)."""
    return next((ct for ext, ct in CONTENT_TYPES.items() if key.endswith(ext)), "application/octet-stream")


def recipe(params: dict[str, Any], *, seed: int, model_id: str, revision: str | None) -> dict[str, Any]:
    body = {k: params[k] for k in ("preset", "width", "height", "steps", "mu", "std", "guidance_schedule")}
    body.update({"seed": seed, "model": model_id, "revision": revision})
    if "caption" in params:
        body["caption"] = params["caption"]
    else:
        body["prompt"] = params["prompt"]
    if params.get("loras"):  # adapters by sha256 (what reproduces) with the name and scale used
        body["loras"] = [{"name": lora["name"], "sha256": lora["sha256"], "scale": lora["scale"]}
                         for lora in params["loras"]]
    if isinstance(params.get("magic_prompt"), dict):  # the prompt the caption was written from, and how
        body["magic_prompt"] = {k: params["magic_prompt"][k] for k in ("mode", "prompt", "enhanced")}
    if params.get("image"):  # a remix: its input by sha256 (what reproduces) and how far from it
        body.update(image_sha256=params["image"]["sha256"], strength=params["strength"])
    fmt = params.get("output_format", "png")
    if fmt != "png":  # a PNG's recipe stays what it always was (same bytes as before formats existed)
        body.update(output_format=fmt, output_quality=params.get("output_quality") or DEFAULT_QUALITY)
    return body


def _recipe_json(recipe_body: dict[str, Any]) -> str:
    return json.dumps(recipe_body, sort_keys=True, separators=(",", ":"))


def _xmp(recipe_body: dict[str, Any]) -> bytes:
    text = html.escape(_recipe_json(recipe_body), quote=False)
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:letterpress="{_XMP_NAMESPACE}">'
            f"<{_XMP_TAG}>{text}</{_XMP_TAG}></rdf:Description></rdf:RDF></x:xmpmeta>"
            '<?xpacket end="r"?>').encode()


def encode_image(image: Image.Image, recipe_body: dict[str, Any], output_format: str = "png",
                 quality: int | None = None) -> bytes:
    """The image file in `output_format` with its recipe inside."""
    fmt = FORMATS[output_format]
    buf = io.BytesIO()
    if fmt.name == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(RECIPE_CHUNK, _recipe_json(recipe_body))
        if "prompt" in recipe_body:
            info.add_text("Description", recipe_body["prompt"])
        image.save(buf, format="PNG", pnginfo=info, compress_level=6)
    else:
        image.convert("RGB").save(buf, format=fmt.pil_format, quality=quality or DEFAULT_QUALITY,
                                  xmp=_xmp(recipe_body))
    return buf.getvalue()


class NoRecipe(ValueError):
    """The file is not an image, or an image without a Letterpress recipe."""


def read_recipe(data: bytes) -> dict[str, Any]:
    """The recipe inside a PNG, WebP or JPEG written by `encode_image`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = getattr(im, "text", {}).get(RECIPE_CHUNK) if im.format == "PNG" else None
            xmp = im.info.get("xmp") or b""
    except (OSError, SyntaxError, ValueError) as exc:
        raise NoRecipe("not an image Letterpress can read (PNG, WebP or JPEG)") from exc
    if text is None:
        match = _XMP_RECIPE.search(xmp if isinstance(xmp, bytes) else xmp.encode())
        if match is None:
            raise NoRecipe("this image carries no Letterpress recipe")
        text = html.unescape(match.group(1).decode())
    return json.loads(text)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
