"""Batches: JSONL in (one job request a line, with the caller's `custom_id`), one job per line, counts, the
OpenAI-Batch-like status roll-up, the results manifest, resume and retry.

Shape of the work:
- Ingest validates every line with the same `JobRequest`/`to_params` as `POST /v1/jobs` and bulk-inserts the jobs
  with COPY, all in the caller's transaction: a refused batch (422) leaves nothing behind.
- Jobs of a batch are NOT enqueued at submit. They wait in Postgres with `enqueued_at` NULL, and the feeder
  (worker/feeder.py) hands a bounded number at a time to the broker, by weighted fair share across tenants and
  batches (priority lanes: common/fair_share.py).
  `feed_candidates` and `reset_stale_fed` below are its SQL.
- Whoever sees a batch with nothing queued or running (the feeder pass, in every worker) finalizes it: a
  compare-and-set to `finalizing`, the manifest written to storage, then `completed | failed | cancelled`.
  Every step is idempotent, so two observers, or one that crashed half-way, do no harm.
Status transitions of the jobs themselves stay in common/job_states.py; this module only selects which jobs.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

from pydantic import ValidationError
from sqlalchemy import BigInteger, Double, and_, cast, column, exists, func, or_, select, text, update, values
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Session

from common import fair_share, input_images, job_states, quotas
from common.adapters import TenantAdapters
from common.batch_counts import RequestCounts, request_counts
from common.broker import BATCH_QUEUE
from common.db import get_owned
from common.errors import Conflict, InvalidRequest
from common.job_request import JobRequest, RequestError, to_params
from common.models import Batch, BatchStatus, Job, JobImage, JobStatus, Tenant
from common.presets import steps_run
from common.settings import ApiSettings, BatchSettings, get_settings
from common.storage import Storage
from common.webhooks import outbox

B, S = BatchStatus, JobStatus
MAX_CUSTOM_ID = 255
# A line is either a JobRequest body with a `custom_id` beside its fields, or the OpenAI Batch envelope
# {"custom_id": ..., "body": {...}} (method/url are accepted and ignored) so existing files convert as they are.
ENVELOPE_KEYS = frozenset({"custom_id", "body", "method", "url"})


def manifest_key(prefix: str, tenant_id: object, batch_id: object) -> str:
    """Beside the images: `{prefix}/{tenant}/batches/{batch_id}/manifest.jsonl`."""
    return "/".join(p for p in (prefix.strip("/"), str(tenant_id), "batches", str(batch_id), "manifest.jsonl") if p)


# ---------------------------------------------------------------------------------------------------- input

LineSource = Callable[[], Iterator[tuple[int, Any]]]  # yields (1-based line number, raw str line or dict item)


def jsonl_source(open_binary: Callable[[], Iterable[bytes]]) -> LineSource:
    """Lines of a JSONL file; `open_binary` is called once per pass (a replay hashes the input again)."""
    def lines() -> Iterator[tuple[int, Any]]:
        for number, raw in enumerate(open_binary(), start=1):
            if isinstance(raw, bytes):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark, as editors on Windows write
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield number, raw  # undecodable: parse_item refuses it (never silently replaced)
                    continue
            text = raw.strip()
            if text:
                yield number, text
    return lines


def items_source(items: list[Any]) -> LineSource:
    return lambda: iter(enumerate(items, start=1))


@dataclass(frozen=True)
class BatchOptions:
    skip_invalid: bool = False
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None
    priority: str = fair_share.DEFAULT_PRIORITY  # a scheduling choice, not input: left out of the input hash


def _canonical(raw: Any) -> bytes:
    if isinstance(raw, bytes):
        return raw
    return raw.encode() if isinstance(raw, str) else json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()


def _options_digest(options: BatchOptions) -> bytes:
    return json.dumps({k: v for k, v in asdict(options).items() if k != "priority"}, sort_keys=True).encode()


def input_hash(source: LineSource, options: BatchOptions) -> str:
    """What the caller sent, to tell an idempotent resubmission from a conflicting reuse of the key."""
    digest = hashlib.sha256(_options_digest(options))
    for _, raw in source():
        digest.update(hashlib.sha256(_canonical(raw)).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class LineError:
    line: int
    message: str
    field: str | None = None
    custom_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BatchItem:
    line: int
    custom_id: str
    params: dict[str, Any]
    metadata: dict[str, Any] | None


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "body"


def parse_item(line: int, raw: Any, api: ApiSettings) -> BatchItem | list[LineError]:
    """One line -> a validated item, or its errors (each naming the field)."""
    if isinstance(raw, bytes):
        return [LineError(line, "not valid UTF-8")]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            return [LineError(line, f"not valid JSON: {exc.msg} (column {exc.colno})")]
        except RecursionError:
            return [LineError(line, "not valid JSON: nested too deeply")]
    if not isinstance(raw, dict):
        return [LineError(line, "each line must be a JSON object")]
    custom_id = raw.get("custom_id")
    errors: list[LineError] = []
    if (not isinstance(custom_id, str) or not custom_id.strip() or len(custom_id) > MAX_CUSTOM_ID
            or "\x00" in custom_id):
        errors.append(LineError(line, f"custom_id is required: a non-blank string of at most {MAX_CUSTOM_ID} "
                                      "characters, without NUL", "custom_id"))
        custom_id = custom_id if isinstance(custom_id, str) else None
    if isinstance(raw.get("body"), dict) and set(raw) <= ENVELOPE_KEYS:
        body = raw["body"]
    else:
        body = {k: v for k, v in raw.items() if k != "custom_id"}
    for per_batch in ("webhook_url", "priority"):
        if per_batch in body:
            errors.append(LineError(line, f"{per_batch} is set on the batch, not per line", per_batch, custom_id))
            body = {k: v for k, v in body.items() if k != per_batch}
    try:
        request = JobRequest.model_validate(body)
        params = to_params(request, api)
    except ValidationError as exc:
        return errors + [LineError(line, e["msg"], _loc(tuple(e["loc"])), custom_id) for e in exc.errors()[:5]]
    except RequestError as exc:
        return errors + [LineError(line, str(exc), exc.field, custom_id)]
    if errors:
        return errors
    return BatchItem(line=line, custom_id=custom_id, params=params, metadata=request.metadata)


def _with_adapters(item: BatchItem, adapters: TenantAdapters) -> BatchItem | list[LineError]:
    """The item with its adapters' names resolved to sha256 inside the tenant, or the line's error."""
    try:
        loras = adapters.resolve(item.params["loras"])
    except InvalidRequest as exc:
        return [LineError(item.line, exc.message, exc.field, item.custom_id)]
    return replace(item, params={**item.params, "loras": loras})


def _with_image(item: BatchItem, resolve: Callable[[Any], dict[str, Any]]) -> BatchItem | list[LineError]:
    """The item with its remix image resolved inside the tenant (common.input_images), or the line's error."""
    try:
        image = resolve(item.params["image"])
    except InvalidRequest as exc:
        return [LineError(item.line, exc.message, exc.field, item.custom_id)]
    return replace(item, params={**item.params, "image": image})


def _image_resolver(session: Session, tenant_id: uuid.UUID, storage: Storage | None) -> Callable[[Any], dict]:
    """Resolves a line's `image` once per distinct reference of the batch (a sweep over one upload reads it once);
    only the forms that need no download (common.input_images)."""
    seen: dict[str, dict[str, Any] | InvalidRequest] = {}

    def resolve(ref: Any) -> dict[str, Any]:
        if storage is None:
            raise InvalidRequest("remix lines are not taken here", field="image")
        key = json.dumps(ref, sort_keys=True)
        if key not in seen:
            try:
                seen[key] = input_images.resolve_image(ref, session=session, tenant_id=tenant_id, storage=storage,
                                                       settings=get_settings(), downloads=False)
            except InvalidRequest as exc:
                seen[key] = exc
        found = seen[key]
        if isinstance(found, InvalidRequest):
            raise found
        return found
    return resolve


class InvalidBatch(InvalidRequest):
    """422 with line-numbered errors (`errors`), at most `max_errors_reported` of `invalid_count`."""
    type = "invalid_batch"

    def __init__(self, message: str, errors: list[LineError], invalid_count: int):
        super().__init__(message, field="input")
        self.errors = errors
        self.invalid_count = invalid_count


# --------------------------------------------------------------------------------------------------- ingest

_COPY_JOBS = ("COPY jobs (id, tenant_id, queue, status, params, request_hash, metadata, batch_id, custom_id, "
              "batch_line, attempts, max_attempts, preemptions, cancel_requested, progress_step, progress_total, "
              "adapter_group) FROM STDIN")


def _copy_rows(session: Session, rows: list[tuple]) -> None:
    """Bulk insert through COPY on the session's own connection, inside its transaction."""
    raw = session.connection().connection.driver_connection
    with raw.cursor() as cur, cur.copy(_COPY_JOBS) as copy:
        for row in rows:
            copy.write_row(row)


def _job_row(batch: Batch, item: BatchItem, max_attempts: int) -> tuple:
    return (uuid.uuid4(), batch.tenant_id, BATCH_QUEUE, S.QUEUED, json.dumps(item.params, separators=(",", ":")),
            job_states.request_hash(item.params, item.metadata, None),
            json.dumps(item.metadata) if item.metadata is not None else None, batch.id, item.custom_id, item.line,
            0, max_attempts, 0, False, 0, steps_run(item.params), adapter_group(item.params))


def adapter_group(params: dict[str, Any]) -> str | None:
    """Which adapters a job loads, as a short key (None: none): the feeder sends a batch's items group by group
    (feed_candidates), so a worker keeps the adapters it has loaded. Scales do not matter here: changing only the
    scale of a loaded adapter loads nothing."""
    shas = sorted({lora["sha256"] for lora in params.get("loras", ())})
    return hashlib.sha256("|".join(shas).encode()).hexdigest()[:16] if shas else None


def create_batch(session: Session, *, tenant_id: uuid.UUID, source: LineSource, source_name: str,
                 options: BatchOptions, idempotency_key: str | None, api: ApiSettings, storage_prefix: str,
                 max_attempts: int, settings: BatchSettings | None = None, storage: Storage | None = None) -> Batch:
    """Validate every line and insert one queued job per valid line, in one pass and the caller's transaction.
    Raises InvalidBatch (line-numbered) when a line is invalid and `skip_invalid` is off, when no line is valid,
    or past `max_lines`; the caller's rollback then leaves nothing behind."""
    settings = settings or get_settings().batches
    batch_id = uuid.uuid4()
    batch = Batch(id=batch_id, tenant_id=tenant_id, status=B.VALIDATING, request_hash="", total=0,
                  idempotency_key=idempotency_key, input_source=source_name, metadata_=options.metadata,
                  webhook_url=options.webhook_url, priority=options.priority,
                  manifest_key=manifest_key(storage_prefix, tenant_id, batch_id))
    session.add(batch)
    session.flush()  # the jobs' foreign key needs the row; an Idempotency-Key race fails here (IntegrityError)

    digest = hashlib.sha256(_options_digest(options))
    errors: list[LineError] = []
    invalid_count = valid = 0
    first_line_of: dict[str, int] = {}
    rows: list[tuple] = []
    adapters = TenantAdapters(session, tenant_id)
    images = _image_resolver(session, tenant_id, storage)
    for line, raw in source():
        digest.update(hashlib.sha256(_canonical(raw)).digest())
        if valid + invalid_count >= settings.max_lines:
            raise InvalidBatch(f"a batch holds at most {settings.max_lines} lines", [], 0)
        parsed = parse_item(line, raw, api)
        if isinstance(parsed, BatchItem) and parsed.custom_id in first_line_of:
            parsed = [LineError(line, f"duplicate custom_id (first on line {first_line_of[parsed.custom_id]})",
                                "custom_id", parsed.custom_id)]
        if isinstance(parsed, BatchItem) and "loras" in parsed.params:
            parsed = _with_adapters(parsed, adapters)
        if isinstance(parsed, BatchItem) and "image" in parsed.params:
            parsed = _with_image(parsed, images)
        if isinstance(parsed, list):
            invalid_count += 1
            if len(errors) < settings.max_errors_reported:
                errors.extend(parsed[:settings.max_errors_reported - len(errors)])
            continue
        first_line_of[parsed.custom_id] = line
        valid += 1
        if invalid_count and not options.skip_invalid:
            continue  # refused anyway: keep validating to report every bad line, stop inserting
        rows.append(_job_row(batch, parsed, max_attempts))
        if len(rows) >= settings.insert_chunk:
            _copy_rows(session, rows)
            rows.clear()
    if invalid_count and not options.skip_invalid:
        raise InvalidBatch(f"{invalid_count} invalid line(s); fix them or pass skip_invalid=true", errors,
                           invalid_count)
    if not valid:
        raise InvalidBatch("the batch has no valid lines", errors, invalid_count)
    if rows:
        _copy_rows(session, rows)
    batch.request_hash = digest.hexdigest()
    batch.total = valid
    batch.invalid = {"count": invalid_count, "lines": [e.to_dict() for e in errors]} if invalid_count else None
    batch.status, batch.in_progress_at = B.IN_PROGRESS, func.now()
    session.flush()
    session.refresh(batch)
    return batch


ANALYZE_AFTER_ROWS = 10_000


def refresh_statistics(session: Session, *, rows_changed: int) -> None:
    """ANALYZE jobs after a bulk write of many rows (an ingest, a big resume). Until autovacuum gets to it, the
    planner believes almost no job is queued and serves the feeder's next-items query from the (status, queue)
    index, walking every queued row: 2.8 s a pass for a fresh 1M-item batch, against 0.03 ms once analyzed
    (measured; docs/PERFORMANCE.md). ANALYZE samples, so it costs under a second at any size. Call after commit."""
    if rows_changed >= ANALYZE_AFTER_ROWS:
        session.execute(text("ANALYZE jobs"))
        session.commit()


def find_by_idempotency_key(session: Session, *, tenant_id: uuid.UUID, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key))


def get_batch(session: Session, batch_id: uuid.UUID | str, *, tenant_id: uuid.UUID | None = None) -> Batch:
    """A batch by id; another tenant's batch is NotFound (no existence leak)."""
    return get_owned(session, Batch, batch_id, tenant_id=tenant_id, noun="batch")


# ----------------------------------------------------------------------------------------- control: cancel, rerun

def lock_batch(session: Session, batch: Batch) -> None:
    """Row-lock the batch (and read its current status) before touching its jobs. The one lock order for batches
    and jobs: batch rows first, then jobs in id order (common.job_states.lock_in_id_order). The feeder stamps the
    batches it feeds before it marks their jobs, so a cancel or a re-run that locked jobs first could deadlock
    with it."""
    session.execute(select(Batch.id).where(Batch.id == batch.id).with_for_update())
    session.refresh(batch)


def cancel_batch(session: Session, *, batch: Batch) -> Batch:
    """Queued items are canceled at once; running ones finish. The batch is `cancelling` until nothing runs,
    then the finalizer makes it `cancelled` (with a manifest of what was done)."""
    lock_batch(session, batch)
    if batch.status in B.TERMINAL or batch.status == B.FINALIZING:
        raise Conflict(f"batch {batch.id} is already {batch.status}", field="status")
    job_states.cancel_queued_where(session, Job.batch_id == batch.id)
    if batch.status != B.CANCELLING:
        batch.status, batch.cancelling_at = B.CANCELLING, func.now()
    session.flush()
    session.refresh(batch)
    return batch


def set_priority(session: Session, *, batch: Batch, priority: str) -> Batch:
    """Move a batch to another lane (common.fair_share). It takes effect at the feeder's next pass; items already
    in the broker keep their place. A batch that has ended has no lane to change (409)."""
    lock_batch(session, batch)
    if batch.status in B.TERMINAL or batch.status == B.FINALIZING:
        raise Conflict(f"batch {batch.id} is already {batch.status}", field="status")
    batch.priority = priority
    session.flush()
    session.refresh(batch)
    return batch


def rerun(session: Session, *, batch: Batch, statuses: tuple[str, ...]) -> int:
    """Put the batch's items in `statuses` (failed and/or canceled) back in the queue; succeeded items are kept.
    Resume (same input, same Idempotency-Key) re-runs failed and canceled items; retry only failed ones.
    Returns how many items were requeued."""
    lock_batch(session, batch)
    n = job_states.requeue_finished_where(session, Job.batch_id == batch.id, statuses=statuses)
    if n:
        # back to work: a finalizer still holding `finalizing` loses its compare-and-set and writes nothing
        session.execute(update(Batch).where(Batch.id == batch.id).values(
            status=B.IN_PROGRESS, in_progress_at=func.now(), finalizing_at=None, completed_at=None, failed_at=None,
            cancelling_at=None, cancelled_at=None, manifest_written_at=None))
    session.flush()
    session.refresh(batch)
    return n


# ------------------------------------------------------------------------------------------- feeder SQL

def feed_candidates(session: Session, *, room: int, group_by_adapter: bool = True,
                    weights: dict[str, float] | None = None) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Up to `room` (job id, batch id) pairs to hand to the broker next, in the order to send them. Slots go by
    weighted fair share (common.fair_share): to the tenant with the lowest pass, inside it to the batch with the
    lowest pass, each weighted by priority; so over passes every tenant gets its weighted share of the GPUs
    whatever its number of batches, and no batch starves. A batch gives its items in line order
    (`group_by_adapter`: one adapter group after another, each in line order; items without adapters last). A
    tenant with a limit of active jobs (common.quotas) gets no more turns than it has room for. The passes of the
    tenants and batches fed are saved, so the next pass continues from them."""
    if room <= 0:
        return []
    weights = weights or get_settings().batches.priority_weights
    unfed = exists().where(Job.batch_id == Batch.id, Job.batch_id.is_not(None), Job.status == S.QUEUED,
                           Job.enqueued_at.is_(None))
    active = session.execute(
        select(Batch.id, Batch.tenant_id, Batch.priority, Batch.feed_pass, Batch.created_at)
        .where(Batch.status == B.IN_PROGRESS, unfed).order_by(Batch.created_at, Batch.id).limit(1000)).all()
    if not active:
        return []
    by_tenant: dict[uuid.UUID, list] = defaultdict(list)
    for row in active:
        by_tenant[row.tenant_id].append(row)
    allowance = quotas.room_left(session, by_tenant)  # tenants with a limit of active jobs: turns they may take
    by_tenant = {t: rows for t, rows in by_tenant.items() if allowance.get(t, 1) > 0}
    if not by_tenant:
        return []
    slack = fair_share.slack(weights)
    tenant_rows = session.execute(select(Tenant.id, Tenant.feed_pass, Tenant.created_at)
                                  .where(Tenant.id.in_(by_tenant))).all()
    tenant_pass = fair_share.effective_passes({t.id: t.feed_pass for t in tenant_rows}, slack)
    tenants = fair_share.Stride({t.id: ((t.created_at, str(t.id)), max(weights[r.priority] for r in by_tenant[t.id]),
                                        tenant_pass[t.id]) for t in tenant_rows})
    inside: dict[uuid.UUID, fair_share.Stride] = {}
    for t, rows in by_tenant.items():
        batch_pass = fair_share.effective_passes({r.id: r.feed_pass for r in rows}, slack)
        inside[t] = fair_share.Stride({r.id: ((r.created_at, str(r.id)), weights[r.priority], batch_pass[r.id])
                                       for r in rows})
    # inside a batch: items of one adapter group after another (by ix_jobs_batch_unfed_group), in line order in
    # each, so workers keep their adapters loaded; without adapters that is plain line order
    order = (Job.adapter_group, Job.batch_line) if group_by_adapter else (Job.batch_line,)
    ready: dict[uuid.UUID, Iterator[uuid.UUID]] = {}
    picked: list[tuple[uuid.UUID, uuid.UUID]] = []
    fed_tenants: dict[uuid.UUID, float] = {}
    fed_batches: dict[uuid.UUID, float] = {}
    while tenants and len(picked) < room:
        tenant = tenants.peek()
        batches_of = inside[tenant]
        if not batches_of or allowance.get(tenant, 1) <= 0:
            tenants.remove(tenant)
            continue
        bid = batches_of.peek()
        if bid not in ready:
            ready[bid] = iter(session.scalars(
                select(Job.id).where(Job.batch_id == bid, Job.status == S.QUEUED, Job.enqueued_at.is_(None))
                .order_by(*order).limit(room)).all())
        jid = next(ready[bid], None)
        if jid is None:  # its last items were sent by this pass
            batches_of.remove(bid)
            continue
        picked.append((jid, bid))
        tenants.advance(tenant)
        batches_of.advance(bid)
        fed_tenants[tenant], fed_batches[bid] = tenants.pass_of(tenant), batches_of.pass_of(bid)
        if tenant in allowance:
            allowance[tenant] -= 1
    _save_passes(session, Tenant, fed_tenants)
    _save_passes(session, Batch, fed_batches, last_fed_at=func.clock_timestamp())
    return picked


def _save_passes(session: Session, model: type, passes: dict[uuid.UUID, float], **also: Any) -> None:
    """Store the fair-share passes of the tenants or batches just fed (one UPDATE from a VALUES list)."""
    if not passes:
        return
    new = values(column("id", UUID(as_uuid=True)), column("pass", Double()), name="fed").data(list(passes.items()))
    session.execute(update(model).where(model.id == new.c.id).values(feed_pass=new.c["pass"], **also)
                    .execution_options(synchronize_session=False))


def reset_stale_fed(session: Session, *, older_than_s: float) -> int:
    """Items fed longer ago than `older_than_s` and still queued, when the caller saw the broker's batch list
    empty: their messages were lost (Redis restarted or flushed). Marking them unfed lets the feeder send them
    again; a duplicate delivery is a no-op at claim. Locks their batches, then the jobs in id order, as every
    writer of batches and jobs does (lock_batch), so it cannot deadlock with a batch cancel."""
    stale = (Job.batch_id.is_not(None), Job.queue == BATCH_QUEUE, Job.status == S.QUEUED,
             Job.enqueued_at < func.now() - timedelta(seconds=older_than_s))
    # the one lock order: their batches' rows first (lock_batch), then the jobs
    session.execute(select(Batch.id).where(Batch.id.in_(select(Job.batch_id).where(*stale).distinct()))
                    .order_by(Batch.id).with_for_update())
    if not job_states.lock_in_id_order(session, *stale):
        return 0
    return session.execute(update(Job).where(*stale).values(enqueued_at=None)
                           .execution_options(synchronize_session=False)).rowcount


# ------------------------------------------------------------------------------------ roll-up and manifest

def _open_items(batch_id_col):
    return exists().where(Job.batch_id == batch_id_col, Job.status.in_((S.QUEUED, S.RUNNING)))


def due_for_finalizing(session: Session, *, retry_after_s: float) -> list[uuid.UUID]:
    """Batches with nothing queued or running, and those whose finalizer died half-way. First re-cancels
    anything that went back to `queued` (a lost lease) in a cancelling batch, so cancelling always ends."""
    cancelling = select(Batch.id).where(Batch.status == B.CANCELLING)
    job_states.cancel_queued_where(session, Job.batch_id.in_(cancelling))
    return list(session.scalars(select(Batch.id).where(or_(
        and_(Batch.status.in_((B.IN_PROGRESS, B.CANCELLING)), ~_open_items(Batch.id)),
        and_(Batch.status == B.FINALIZING,
             Batch.finalizing_at < func.now() - timedelta(seconds=retry_after_s))))))


def begin_finalizing(session: Session, *, batch_id: uuid.UUID, retry_after_s: float) -> Batch | None:
    """Compare-and-set to `finalizing`; None when another observer got there first or work came back."""
    stale = Batch.finalizing_at < func.now() - timedelta(seconds=retry_after_s)
    row = session.execute(
        update(Batch).where(Batch.id == batch_id, or_(
            and_(Batch.status.in_((B.IN_PROGRESS, B.CANCELLING)), ~_open_items(Batch.id)),
            and_(Batch.status == B.FINALIZING, stale)))
        .values(status=B.FINALIZING, finalizing_at=func.clock_timestamp())
        .returning(Batch.id)).one_or_none()
    if row is None:
        return None
    batch = session.get(Batch, batch_id)
    session.refresh(batch)
    return batch


def final_status(batch: Batch, counts: RequestCounts) -> str:
    """cancelled if it was cancelled; failed when nothing succeeded and something failed; else completed
    (individual failures are in the counts and the manifest, as in OpenAI's Batch API)."""
    if batch.cancelling_at is not None:
        return B.CANCELLED
    if counts.succeeded == 0 and counts.failed > 0:
        return B.FAILED
    return B.COMPLETED


def finish_finalizing(session: Session, *, batch: Batch) -> str | None:
    """`finalizing` -> final status, after the manifest is stored. Only the finalizer that holds this
    `finalizing_at` wins; returns the status, or None when a resume/retry took the batch back meanwhile."""
    status = final_status(batch, request_counts(session, [batch.id])[batch.id])
    stamp = {B.CANCELLED: "cancelled_at", B.FAILED: "failed_at", B.COMPLETED: "completed_at"}[status]
    row = session.execute(
        update(Batch).where(Batch.id == batch.id, Batch.status == B.FINALIZING,
                            Batch.finalizing_at == batch.finalizing_at)
        .values(status=status, manifest_written_at=func.now(), **{stamp: func.now()})
        .returning(Batch.id, Batch.webhook_url)).one_or_none()
    if row is not None and row.webhook_url:  # batch.completed | batch.failed | batch.cancelled, same transaction
        outbox.record_batch_event(session, batch_id=batch.id, status=status)
    return status if row is not None else None


@dataclass
class ManifestLine:
    custom_id: str
    line: int
    job_id: str
    status: str
    seed: int | None
    key: str | None = None
    url: str | None = None
    sha256: str | None = None
    error: dict[str, Any] | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    loras: list[dict[str, Any]] | None = None  # the adapters' name, sha256 and scale, when the line used any

    def to_json(self) -> str:
        body = {"custom_id": self.custom_id, "line": self.line, "job_id": self.job_id, "status": self.status,
                "seed": self.seed, "key": self.key, "url": self.url, "sha256": self.sha256, "error": self.error}
        if len(self.images) > 1:  # one image (the common case): its fields are the line's seed/key/url/sha256
            body["images"] = self.images
        if self.loras:  # a line without adapters keeps the manifest line it always had
            body["loras"] = self.loras
        return json.dumps(body, separators=(",", ":"))


UrlFor = Callable[[uuid.UUID, int, str], str | None]  # (job id, image index, key) -> URL


def manifest_lines(session: Session, *, batch_id: uuid.UUID, url_for: UrlFor | None = None,
                   chunk: int = 2000) -> Iterator[ManifestLine]:
    """One line per input line, in input order, streamed through a server-side cursor (a million items never
    sit in memory). Not-yet-finished items appear with their current status."""
    seed = cast(Job.params["seed"].astext, BigInteger)  # seeds reach 2**32 - 1: past a Postgres integer
    query = (select(Job.id, Job.custom_id, Job.batch_line, Job.status, seed, Job.error, Job.params["loras"],
                    JobImage.index, JobImage.seed, JobImage.key, JobImage.sha256)
             .outerjoin(JobImage, JobImage.job_id == Job.id)
             .where(Job.batch_id == batch_id).order_by(Job.batch_line, JobImage.index)
             .execution_options(yield_per=chunk))
    current: ManifestLine | None = None
    for jid, custom_id, line, status, seed, error, loras, index, img_seed, key, sha in session.execute(query):
        if current is None or current.job_id != str(jid):
            if current is not None:
                yield current
            current = ManifestLine(custom_id=custom_id, line=line, job_id=str(jid), status=status, seed=seed,
                                   error=error, loras=loras)
        if index is not None:
            image = {"index": index, "seed": img_seed, "key": key, "sha256": sha,
                     "url": url_for(jid, index, key) if url_for else None}
            current.images.append(image)
            if index == 0:
                current.seed, current.key, current.sha256, current.url = img_seed, key, sha, image["url"]
    if current is not None:
        yield current


def manifest_bytes(session: Session, *, batch_id: uuid.UUID) -> bytes:
    """The stored manifest: keys, not URLs (presigned URLs expire; the key names the object beside it)."""
    return b"".join((m.to_json() + "\n").encode() for m in manifest_lines(session, batch_id=batch_id))
