"""Gallery thumbnails (the console's, api/console/gallery.py), kept in storage beside each image
(`<image key>.thumb.webp`, inside the tenant's prefix). The worker writes one as it stores the image (`store_for`,
from the image it already holds: no decode); the console makes one on first view for an image that has none (an
older image, a copy from the result cache) and keeps it, so a gallery page never resizes full images."""
from __future__ import annotations

import io
import logging

from PIL import Image

from common.storage import Storage

log = logging.getLogger(__name__)
CONTENT_TYPE = "image/webp"


def thumbnail_key(image_key: str) -> str:
    return image_key.rsplit(".", 1)[0] + ".thumb.webp"


def encode_thumbnail(image: Image.Image, longest_side: int) -> bytes:
    small = image.convert("RGB")  # a copy: the caller's image is left as it was
    small.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="WEBP", quality=80, method=4)
    return out.getvalue()


def make_thumbnail(data: bytes, longest_side: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return encode_thumbnail(image, longest_side)


def store_for(storage: Storage, image_key: str, image: Image.Image, longest_side: int) -> None:
    """The worker's side: the thumbnail of an image it has just stored under `image_key`."""
    storage.put(thumbnail_key(image_key), encode_thumbnail(image, longest_side), content_type=CONTENT_TYPE)


def thumbnail(storage: Storage, image_key: str, longest_side: int) -> bytes:
    """The image's thumbnail: from storage when made before, else made now and stored for the next view."""
    key = thumbnail_key(image_key)
    if storage.exists(key):
        return storage.get(key)
    data = make_thumbnail(storage.get(image_key), longest_side)
    storage.put(key, data, content_type=CONTENT_TYPE)
    return data
