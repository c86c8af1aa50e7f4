"""/v1/uploads: an image a tenant uploads to remix from. Checked (common.input_images.check_image: PNG, JPEG or
WebP, bounded bytes and pixels, decodes completely) and stored by content inside the tenant's own prefix; the
answer names it as `upload:<sha256>`, what a job's `image` takes. Uploading the same bytes twice is the same
upload. Another tenant cannot name it: `upload:` is looked up inside the caller's own prefix only."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import CurrentTenant, SettingsDep, StorageDep
from api.schemas.errors import error_responses
from api.schemas.uploads import UPLOAD_REQUEST_BODY, UploadOut
from common.errors import InvalidRequest
from common.input_images import UPLOAD, store_input

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post("", status_code=201, response_model=UploadOut, openapi_extra={"requestBody": UPLOAD_REQUEST_BODY},
             responses={201: {"description": "Stored (or already stored: the same bytes)"},
                        **error_responses(400, 413, 422)})
async def create_upload(request: Request, tenant: CurrentTenant, settings: SettingsDep,
                        storage: StorageDep) -> UploadOut:
    """A multipart `file`: an image to remix from. 422 naming `image` says what is wrong with it."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send the image as a multipart upload, field `file`", field="file")
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("`file` must be a file part (the image)", field="file")
    data = await upload.read()
    checked = await run_in_threadpool(store_input, storage, tenant.id, data, settings)
    log.info("upload %s of tenant %s stored (%dx%d %s, %d bytes)", checked.sha256, tenant.id, checked.width,
             checked.height, checked.format, checked.size_bytes)
    return UploadOut(image=f"{UPLOAD}{checked.sha256}", sha256=checked.sha256, format=checked.format,
                     width=checked.width, height=checked.height, size_bytes=checked.size_bytes)
