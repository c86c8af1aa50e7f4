"""common.image_files: the recipe travels inside the PNG (text chunk), WebP and JPEG (XMP) and reads back (with
PIL and `read_recipe`), encoding is deterministic, and the sha256 is the bytes' own."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from common.image_files import (
    DEFAULT_QUALITY,
    RECIPE_CHUNK,
    NoRecipe,
    content_type_of,
    encode_image,
    read_recipe,
    recipe,
    sha256_hex,
)

encode_png = encode_image  # PNG is the default format

PARAMS = {"prompt": "a sign that says OPEN", "prompt_text": "a sign that says OPEN", "preset": "V4_TURBO_12",
          "width": 32, "height": 16, "steps": 12, "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0] * 11 + [3.0],
          "seed": 5, "seed_generated": False, "num_images": 2, "guidance_scale": None}
CAPTION = {"high_level_description": "a poster", "compositional_deconstruction": {"background": "blue", "elements": []}}


def image(seed: int = 0, size=(32, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_recipe_keeps_what_reproduces_the_image_and_nothing_else():
    body = recipe(PARAMS, seed=6, model_id="tiny", revision="abc")
    assert body == {"preset": "V4_TURBO_12", "width": 32, "height": 16, "steps": 12, "mu": 0.5, "std": 1.75,
                    "guidance_schedule": [7.0] * 11 + [3.0], "seed": 6, "model": "tiny", "revision": "abc",
                    "prompt": "a sign that says OPEN"}


def test_recipe_of_a_caption_job_carries_the_caption_not_a_prompt():
    params = {**{k: v for k, v in PARAMS.items() if k != "prompt"}, "caption": CAPTION}
    body = recipe(params, seed=1, model_id="m", revision=None)
    assert body["caption"] == CAPTION and "prompt" not in body and body["revision"] is None


def test_recipe_chunk_round_trips_through_pil():
    body = recipe(PARAMS, seed=6, model_id="tiny", revision=None)
    data = encode_png(image(), body)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (32, 16)
        assert json.loads(im.text[RECIPE_CHUNK]) == body
        assert im.text["Description"] == "a sign that says OPEN"
        # the pixels are the image's, losslessly
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(image()))
    assert read_recipe(data) == body


def test_a_caption_png_has_no_description_chunk():
    params = {**{k: v for k, v in PARAMS.items() if k != "prompt"}, "caption": CAPTION}
    data = encode_png(image(), recipe(params, seed=1, model_id="m", revision=None))
    with Image.open(io.BytesIO(data)) as im:
        assert "Description" not in im.text
        assert json.loads(im.text[RECIPE_CHUNK])["caption"] == CAPTION


def test_same_recipe_and_pixels_encode_to_the_same_bytes():
    body = recipe(PARAMS, seed=6, model_id="tiny", revision="r1")
    first, second = encode_png(image(1), body), encode_png(image(1), dict(reversed(list(body.items()))))
    assert first == second  # key order does not matter: the chunk is sorted JSON
    assert encode_png(image(2), body) != first
    assert encode_png(image(1), {**body, "seed": 7}) != first


def test_sha256_hex_is_the_digest_of_the_bytes():
    data = encode_png(image(), recipe(PARAMS, seed=6, model_id="tiny", revision=None))
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert len(sha256_hex(data)) == 64 and sha256_hex(data) != sha256_hex(data + b"\0")
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_read_recipe_of_an_image_without_one_raises(fmt):
    buf = io.BytesIO()
    image().save(buf, format=fmt.upper())
    with pytest.raises(NoRecipe, match="no Letterpress recipe"):
        read_recipe(buf.getvalue())


def test_read_recipe_of_something_else_raises():
    with pytest.raises(NoRecipe, match="not an image"):
        read_recipe(b"%PDF-1.7 not an image")


@pytest.mark.parametrize("fmt, pil, magic", [("webp", "WEBP", b"RIFF"), ("jpeg", "JPEG", b"\xff\xd8\xff")])
def test_webp_and_jpeg_carry_the_recipe_in_xmp(fmt, pil, magic):
    params = {**PARAMS, "prompt": 'a sign: <OPEN> & "CLOSED" </letterpress:recipe> ünï', "output_format": fmt,
              "output_quality": 80}
    body = recipe(params, seed=6, model_id="tiny", revision=None)
    assert body["output_format"] == fmt and body["output_quality"] == 80
    data = encode_image(image(), body, fmt, 80)
    assert data.startswith(magic)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == pil and im.size == (32, 16)
        assert b"letterpress:recipe" in im.info["xmp"]  # where image tools look for it
    assert read_recipe(data) == body  # markup in the prompt is escaped, not parsed
    assert encode_image(image(), body, fmt, 80) == data  # deterministic
    assert encode_image(image(), body, fmt, 30) != data  # quality is honoured


def test_a_png_recipe_is_unchanged_by_formats_and_quality_defaults():
    assert "output_format" not in recipe({**PARAMS, "output_format": "png"}, seed=1, model_id="m", revision=None)
    assert recipe({**PARAMS, "output_format": "jpeg"}, seed=1, model_id="m", revision=None)["output_quality"] == \
        DEFAULT_QUALITY


def test_content_types_by_key():
    assert content_type_of("images/t/j/0.png") == "image/png"
    assert content_type_of("images/t/j/0.webp") == "image/webp"
    assert content_type_of("images/t/j/0.jpg") == "image/jpeg"
