"""worker.png: the recipe chunk travels inside the PNG and reads back (with PIL and `read_recipe`), encoding is
deterministic, and the sha256 is the bytes' own."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from worker.png import RECIPE_CHUNK, encode_png, read_recipe, recipe, sha256_hex

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


def test_read_recipe_of_a_png_without_the_chunk_raises():
    buf = io.BytesIO()
    image().save(buf, format="PNG")
    with pytest.raises(KeyError):
        read_recipe(buf.getvalue())
