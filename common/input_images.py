"""Remix inputs: the image a job starts from (`image`), checked, stored by content inside the tenant's prefix, and
named in the job's params as `{"sha256", "key"}` (the worker reads the key and checks the sha256,
worker/attempt.py).

What a request may name (common.job_request.IMAGE_PATTERN / ImageRef), always inside the caller's tenant:
- `upload:<sha256>`: an image it uploaded (POST /v1/uploads), stored at `{prefix}/{tenant}/inputs/{sha256}`;
- `{"job_id", "index"}`: one of its own earlier images (another tenant's is "not found", as a missing one);
- `s3://bucket/key`: an object inside its own storage prefix or an operator-allowed one (common.references);
- `https://...`: fetched through the SSRF guard (common.webhooks.fetch), size-capped.
The last two are read once, at submit, then stored like an upload; a batch line may use the first two only (a
batch is validated line by line in one transaction: no downloads there).

Every image is checked before it is stored (`check_image`): PNG, JPEG or WebP, at most `input_image_max_bytes`
bytes and `input_image_max_pixels` pixels (read from the header, before any decoding, so a decompression bomb is
refused without being decoded), in a mode that converts to RGB, and it must decode completely. Any refusal is
InvalidRequest naming `image` (a 422); a storage error never reaches the caller verbatim.
"""
from __future__ import annotations

import io
import logging
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import InvalidRequest
from common.image_files import sha256_hex
from common.models import Job, JobImage
from common.references import resolve_tenant_object
from common.settings import Settings
from common.storage import S3Storage, Storage
from common.webhooks.fetch import FetchError, fetch

log = logging.getLogger(__name__)

FIELD = "image"
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"})  # what converts to RGB faithfully
UPLOAD = "upload:"


@dataclass(frozen=True)
class CheckedImage:
    sha256: str
    format: str
    width: int
    height: int
    size_bytes: int


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """The image's facts, or InvalidRequest naming `image` saying what is wrong with it."""
    if len(data) > max_bytes:
        raise InvalidRequest(f"the image is larger than {max_bytes} bytes", field=FIELD)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            if image.format not in FORMATS:
                raise InvalidRequest(f"the image must be PNG, JPEG or WebP, not {image.format}", field=FIELD)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest(f"the image has {width}x{height} pixels, more than {max_pixels}", field=FIELD)
            if image.mode not in MODES:
                raise InvalidRequest(f"the image's mode {image.mode} is not supported (RGB, RGBA, grayscale, "
                                     "palette, CMYK)", field=FIELD)
            image.load()  # decodes it all: a truncated or corrupt file fails here
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"the image has more than {max_pixels} pixels", field=FIELD) from None
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for a file that is not a (whole) image
        raise InvalidRequest("the image could not be read: not a complete PNG, JPEG or WebP file",
                             field=FIELD) from None
    return CheckedImage(sha256=sha256_hex(data), format=image.format, width=width, height=height,
                        size_bytes=len(data))


def input_key(prefix: str, tenant_id: object, sha256: str) -> str:
    return f"{prefix}/{tenant_id}/inputs/{sha256}"


def store_input(storage: Storage, tenant_id: uuid.UUID, data: bytes, settings: Settings) -> CheckedImage:
    """Check an image and store it by content inside the tenant's prefix (once: the same bytes, the same key)."""
    checked = check_image(data, max_bytes=settings.api.input_image_max_bytes,
                          max_pixels=settings.api.input_image_max_pixels)
    key = input_key(storage.prefix, tenant_id, checked.sha256)
    if not storage.exists(key):
        storage.put(key, data, content_type=FORMATS[checked.format])
    return checked


def resolve_image(ref: str | dict, *, session: Session, tenant_id: uuid.UUID, storage: Storage, settings: Settings,
                  downloads: bool = True) -> dict[str, Any]:
    """The job params' `image` for what the request named (module doc); InvalidRequest naming `image` otherwise.
    `downloads=False` (a batch line) refuses the forms that would be downloaded."""
    if isinstance(ref, dict):
        return _earlier_image(session, tenant_id, ref)
    if ref.startswith(UPLOAD):
        sha = ref[len(UPLOAD):]
        key = input_key(storage.prefix, tenant_id, sha)
        if not storage.exists(key):  # only checked images are stored there (store_input): no need to read it again
            raise InvalidRequest(f"no upload {sha} of yours: upload it with POST /v1/uploads", field=FIELD)
        return {"sha256": sha, "key": key}
    if not downloads:
        raise InvalidRequest("a batch line names its image as upload:<sha256> (POST /v1/uploads) or "
                             "{job_id, index}", field=FIELD)
    data = _download_s3(ref, tenant_id, storage, settings) if ref.startswith("s3://") else _fetch_https(ref, settings)
    checked = store_input(storage, tenant_id, data, settings)
    return {"sha256": checked.sha256, "key": input_key(storage.prefix, tenant_id, checked.sha256)}


def _earlier_image(session: Session, tenant_id: uuid.UUID, ref: dict) -> dict[str, Any]:
    row = session.execute(select(JobImage).join(Job, Job.id == JobImage.job_id).where(
        Job.id == uuid.UUID(str(ref["job_id"])), Job.tenant_id == tenant_id,
        JobImage.index == int(ref.get("index", 0)))).scalar_one_or_none()
    if row is None:
        raise InvalidRequest(f"no image {ref.get('index', 0)} of job {ref['job_id']} of yours", field=FIELD)
    return {"sha256": row.sha256, "key": row.key}


def _download_s3(url: str, tenant_id: uuid.UUID, storage: Storage, settings: Settings) -> bytes:
    bucket, key = resolve_tenant_object(url, tenant_id=tenant_id, storage_settings=settings.storage,
                                        allow=settings.api.input_url_allow, field=FIELD)
    limit = settings.api.input_image_max_bytes
    try:
        client = storage.client if isinstance(storage, S3Storage) else S3Storage(bucket, "", settings.storage).client
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if size > limit:
            raise InvalidRequest(f"the image is larger than {limit} bytes", field=FIELD)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read(limit + 1)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the store said stays server-side
        log.warning("reading image s3://%s/%s failed: %s", bucket, key, exc)
        raise InvalidRequest("image could not be read", field=FIELD) from None


def _fetch_https(url: str, settings: Settings) -> bytes:
    try:
        return fetch(url, max_bytes=settings.api.input_image_max_bytes,
                     timeout_s=settings.api.input_image_fetch_timeout_s,
                     allow_loopback=settings.webhooks.allow_loopback)
    except FetchError as exc:
        raise InvalidRequest(f"image {url} was not fetched: {exc}", field=FIELD) from None

