"""common.input_images.check_image: what a remix input must be, each refusal a 422 naming `image`, and a
decompression bomb refused from its header, never decoded."""
from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from common.errors import InvalidRequest
from common.input_images import check_image

LIMITS = dict(max_bytes=200_000, max_pixels=512 * 512)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_taken(fmt):
    data = encoded(Image.new("RGB", (64, 48), (10, 200, 30)), fmt)
    checked = check_image(data, **LIMITS)
    assert (checked.format, checked.width, checked.height, checked.size_bytes) == (fmt, 64, 48, len(data))
    assert len(checked.sha256) == 64


@pytest.mark.parametrize("data,message", [
    (b"not an image at all", "could not be read"),
    (b"", "could not be read"),
    (encoded(Image.new("RGB", (64, 64)), "GIF"), "must be PNG, JPEG or WebP"),
    (encoded(Image.new("RGB", (64, 64)), "BMP"), "must be PNG, JPEG or WebP"),
    (encoded(Image.new("I;16", (64, 64))), "mode I;16 is not supported"),
    (encoded(Image.new("RGB", (600, 600))), "more than 262144"),               # too many pixels
    (encoded(Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3))), "larger than 200000 bytes"),
    (encoded(Image.effect_noise((64, 64), 100).convert("RGB"))[:-200], "could not be read"),  # truncated
])
def test_each_refusal_names_the_image(data, message):
    with pytest.raises(InvalidRequest, match=message) as refused:
        check_image(data, **LIMITS)
    assert refused.value.field == "image"


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    bomb = encoded(Image.new("1", (20_000, 20_000)))  # 400 megapixels in a few dozen kilobytes
    assert len(bomb) < LIMITS["max_bytes"]
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the bomb was decoded"))
    with pytest.raises(InvalidRequest, match="pixels"):
        check_image(bomb, max_bytes=LIMITS["max_bytes"], max_pixels=4096 * 4096)
