"""Gallery thumbnails: made once per image, on first view, and kept in storage beside the image
(`<image key>.thumb.webp`, inside the tenant's prefix), so a gallery page never resizes full images again."""
from __future__ import annotations

import io
import logging

from PIL import Image

from common.storage import Storage

log = logging.getLogger(__name__)
CONTENT_TYPE = "image/webp"


def thumbnail_key(image_key: str) -> str:
    return image_key.rsplit(".", 1)[0] + ".thumb.webp"


def make_thumbnail(data: bytes, longest_side: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="WEBP", quality=80, method=4)
        return out.getvalue()


def thumbnail(storage: Storage, image_key: str, longest_side: int) -> bytes:
    """The image's thumbnail: from storage when made before, else made now and stored for the next view."""
    key = thumbnail_key(image_key)
    if storage.exists(key):
        return storage.get(key)
    data = make_thumbnail(storage.get(image_key), longest_side)
    storage.put(key, data, content_type=CONTENT_TYPE)
    return data
