"""Creating (or resuming) a batch, for every front end that takes one (`POST /v1/batches` and the console's
upload form): the input opened as a source of lines (inline items, an uploaded JSONL, or an `s3://` object the
tenant may name, common/references.py), then created in common.batches, or resumed when the same input comes
again under the same Idempotency-Key. Raises common.batches.InvalidBatch with line-numbered errors."""
from __future__ import annotations

import logging
import tempfile
import uuid
from typing import IO

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import metrics
from api.schemas.batches import BatchCreate
from api.schemas.jobs import check_webhook_url
from common import batches
from common.batches import BatchOptions, InvalidBatch
from common.errors import Conflict
from common.models import Batch, JobStatus
from common.references import download_tenant_object, resolve_tenant_object
from common.settings import Settings
from common.storage import S3Storage, Storage

log = logging.getLogger(__name__)
SPOOL_BYTES = 8 * 1024 * 1024


async def submit_batch(body: BatchCreate, upload: UploadFile | None, *, session: Session, tenant_id: uuid.UUID,
                       settings: Settings, storage: Storage, idempotency_key: str | None = None
                       ) -> tuple[Batch, bool]:
    """The batch (committed, in `session`) and whether it was created now (False: resumed under its
    Idempotency-Key). Exactly one of `body.items`, `upload` and `body.input_url` is the input (the caller
    checked, api.schemas.batches)."""
    check_webhook_url(body.webhook_url, settings.webhooks)
    options = BatchOptions(skip_invalid=body.skip_invalid, metadata=body.metadata, webhook_url=body.webhook_url,
                           priority=body.priority)
    if body.items is not None:
        source, name, spool = batches.items_source(body.items), "inline", None
    elif upload is not None:
        spool = upload.file
        source, name = batches.jsonl_source(_rewinding(spool)), f"upload:{upload.filename or 'input.jsonl'}"
    else:
        spool = await run_in_threadpool(_fetch_s3, body.input_url, tenant_id, settings, storage)
        source, name = batches.jsonl_source(_rewinding(spool)), body.input_url
    try:
        return await run_in_threadpool(_create_or_resume, session, tenant_id, settings, storage, source, name, options,
                                       idempotency_key)
    finally:
        if spool is not None:
            spool.close()


def _fetch_s3(url: str, tenant_id: uuid.UUID, settings: Settings, storage: Storage) -> IO[bytes]:
    """Download the caller's s3:// JSONL into a spooled temporary file, only when common.references lets this
    tenant name that object (its own prefix or an allow-listed one); refusals and read errors are generic 422s."""
    bucket, key = resolve_tenant_object(url, tenant_id=tenant_id, storage_settings=settings.storage,
                                        allow=settings.api.input_url_allow, field="input_url")
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        download_tenant_object(bucket, key, spool, storage_settings=settings.storage, field="input_url",
                               client=storage.client if isinstance(storage, S3Storage) else None)
    except BaseException:
        spool.close()
        raise
    return spool


def _rewinding(file: IO[bytes]):
    def open_binary():
        file.seek(0)
        return iter(file)
    return open_binary


def _create_or_resume(session, tenant_id: uuid.UUID, settings: Settings, storage: Storage, source, name: str,
                         options: BatchOptions, idempotency_key: str | None) -> tuple[Batch, bool]:
    for _ in range(2):  # a second round when a concurrent request with the same key won the insert
        if idempotency_key is not None:
            existing = batches.find_by_idempotency_key(session, tenant_id=tenant_id, key=idempotency_key)
            if existing is not None:
                if existing.request_hash != batches.input_hash(source, options):
                    raise Conflict("Idempotency-Key was already used with a different batch input",
                                   field="Idempotency-Key")
                requeued = batches.rerun(session, batch=existing, statuses=(JobStatus.FAILED, JobStatus.CANCELED))
                session.commit()
                batches.refresh_statistics(session, rows_changed=requeued)
                log.info("batch %s resumed: %d item(s) queued again", existing.id, requeued)
                return existing, False
        try:
            batch = batches.create_batch(
                session, tenant_id=tenant_id, source=source, source_name=name, options=options,
                idempotency_key=idempotency_key, api=settings.api, storage_prefix=storage.prefix,
                max_attempts=settings.worker.max_attempts, storage=storage)
        except IntegrityError:
            session.rollback()
            continue
        except InvalidBatch:
            session.rollback()  # the refused batch's row was flushed: the caller's session must not show it
            raise
        session.commit()
        batches.refresh_statistics(session, rows_changed=batch.total)
        log.info("batch %s created: %d items from %s", batch.id, batch.total, name)
        metrics.BATCH_ITEMS_ACCEPTED.inc(batch.total)
        return batch, True
    raise Conflict("a concurrent request with the same Idempotency-Key is in flight", field="Idempotency-Key")
