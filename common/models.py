"""SQLAlchemy 2.0 models: the system of record. The schema is built by Alembic (migrations/), never create_all."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from common.secrets_at_rest import EncryptedText


class Base(DeclarativeBase):
    pass


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # this tenant's own limits over the defaults (common/quotas.py; migration 0010): {"max_active_jobs": n}
    limits: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"), default=dict)
    feed_pass: Mapped[float | None] = mapped_column(Double())  # batch lane fair share (common/fair_share.py)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # migration 0006; None: never
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # to the minute (api/key_use.py)
    # what the key may do (common.auth.SCOPES; migration 0009): read, submit, admin
    scopes: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[\"read\", \"submit\"]'::jsonb"))

    tenant: Mapped[Tenant] = relationship()


class BatchStatus:
    """OpenAI-Batch-like statuses; the roll-up from item counts lives in common/batches.py."""
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
    ALL = (VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED, FAILED, CANCELLING, CANCELLED)


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_batches_tenant_idempotency"),
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_batches_status", "status"),
        CheckConstraint("priority IN ('high', 'normal', 'low')", name="ck_batches_priority"),
    )
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.VALIDATING)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    input_source: Mapped[str | None] = mapped_column(Text)       # "inline", "upload:<name>", "s3://..."
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    invalid: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # {count, lines}: skipped (skip_invalid=true)
    manifest_key: Mapped[str] = mapped_column(Text)
    manifest_written_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_fed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last fed by the feeder
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")  # its lane
    feed_pass: Mapped[float | None] = mapped_column(Double())  # fair share inside its tenant

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_queue_created", "status", "queue", "created_at"),
        # Batches (migration 0002): custom_id unique in its batch; counts by status; the feeder's unfed items.
        Index("uq_jobs_batch_custom_id", "batch_id", "custom_id", unique=True),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_batch_unfed", "batch_id", "batch_line",
              postgresql_where=text("batch_id IS NOT NULL AND status = 'queued' AND enqueued_at IS NULL")),
        # Queue position and ETA (migration 0004, common/queue_position.py): the broker's lists in send order; the
        # newest starts. (0004 also adds extended statistics on (status, queue), which SQLAlchemy does not model.)
        Index("ix_jobs_queued_sent", "queue", "enqueued_at", "created_at", "batch_line", "id",
              postgresql_where=text("status = 'queued' AND enqueued_at IS NOT NULL")),
        Index("ix_jobs_started", "started_at", postgresql_where=text("started_at IS NOT NULL")),
        # Quotas (migration 0010, common/quotas.py): a tenant's active jobs, counted up to its limit.
        Index("ix_jobs_tenant_active", "tenant_id",
              postgresql_where=text("status IN ('queued', 'running') AND (batch_id IS NULL OR enqueued_at IS NOT NULL)")),
        # Magic prompt (migration 0014, worker/attempt.py): queued jobs whose magic prompt is not answered yet.
        Index("ix_jobs_magic_pending", "created_at",
              postgresql_where=text("status = 'queued' AND jsonb_typeof(params -> 'magic_prompt') = 'string'")),
        # A batch's recent finishes (migration 0015, common.batch_counts.completion_rate): its rate and ETA.
        Index("ix_jobs_batch_finished", "batch_id", "finished_at",
              postgresql_where=text("batch_id IS NOT NULL AND status IN ('succeeded', 'failed')")),
        # Adapter-aware feeding (migration 0008): a batch's unfed items one adapter group after another.
        Index("ix_jobs_batch_unfed_group", "batch_id", "adapter_group", "batch_line",
              postgresql_where=text("batch_id IS NOT NULL AND status = 'queued' AND enqueued_at IS NULL")),
    )
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    queue: Mapped[str] = mapped_column(String(32), default="interactive")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    # The normalized request: prompt xor caption, preset, width, height, seed, num_images, steps, guidance...
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Set for the items of a batch (common/batches.py): its batch, the caller's id and the input line number.
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE",
                                                                  name="fk_jobs_batch_id"))
    custom_id: Mapped[str | None] = mapped_column(String(255))
    batch_line: Mapped[int | None] = mapped_column(Integer)
    # which adapters a batch item loads (common.batches.adapter_group; None: none), for the feeder (migration 0008)
    adapter_group: Mapped[str | None] = mapped_column(String(16))

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    preemptions: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())

    images: Mapped[list["JobImage"]] = relationship(order_by="JobImage.index", cascade="all, delete-orphan",
                                                    lazy="selectin")


class JobImage(Base):
    __tablename__ = "job_images"
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)


class UsageRecord(Base):
    """The usage ledger (migration 0005, common/usage.py): one row for each attempt that ran a job's generation on
    a device, written by the worker in the transaction that records the attempt's outcome. `gpu_seconds` is the
    generation time billed to this job (a co-batched call's time split evenly among its jobs); the model's warm-up
    is billed to nobody. Rows are never updated."""
    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_tenant_recorded", "tenant_id", "recorded_at"),
        Index("ix_usage_records_batch", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
        Index("ix_usage_records_job", "job_id"),
        Index("ix_usage_records_recorded", "recorded_at"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    preset: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))  # succeeded | failed | retried | preempted | canceled
    worker_id: Mapped[str] = mapped_column(String(255))
    gpu_kind: Mapped[str] = mapped_column(String(128))  # the device name ("NVIDIA H200"), or "cpu"
    capacity: Mapped[str] = mapped_column(String(16))  # on_demand | spot (worker.capacity)
    gpu_seconds: Mapped[float] = mapped_column(Double)
    images: Mapped[int] = mapped_column(Integer)  # images stored by this attempt (0 unless it succeeded)
    # answered from the result cache: copies of an earlier run, no generation (migration 0013)
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookEventStatus:
    PENDING = "pending"        # an attempt is due at next_attempt_at
    DELIVERED = "delivered"    # a 2xx answer came back
    FAILED = "failed"          # the retry schedule ran out, or the SSRF guard refused the target
    DISABLED = "disabled"      # the endpoint answered 410 Gone (or was already disabled): not sent
    ALL = (PENDING, DELIVERED, FAILED, DISABLED)


class WebhookEvent(Base):
    """The outbox: one row per event, written in the transaction of the state change it reports (migration 0003).
    `id` is the Standard Webhooks `webhook-id`, identical on every attempt and redelivery."""
    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_webhook_events_job", "job_id"),
        Index("ix_webhook_events_batch", "batch_id"),
        Index("ix_webhook_events_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        Index("ix_webhook_events_redeliver", "redeliver_requested_at",
              postgresql_where=text("redeliver_requested_at IS NOT NULL")),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=WebhookEventStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)             # every HTTP attempt, redeliveries too
    scheduled_attempts: Mapped[int] = mapped_column(Integer, default=0)   # position in the retry schedule
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # an attempt is in flight
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))   # handed to the broker
    redeliver_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())


class WebhookDelivery(Base):
    """One row per HTTP attempt (the delivery log)."""
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_webhook_deliveries_event", "event_id", "attempt"),
    )
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(16))  # scheduled | redeliver
    url: Mapped[str] = mapped_column(Text)
    ip: Mapped[str | None] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))  # success | retry | disable | refused
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    event: Mapped[WebhookEvent] = relationship(lazy="joined")


class WebhookSecret(Base):
    """A tenant's signing secret (`whsec_...`), and during a rotation the previous one until it expires."""
    __tablename__ = "webhook_secrets"
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    # encrypted at rest (common/secrets_at_rest.py): the columns hold `enc:v1:<token>`, the attributes plaintext
    secret: Mapped[str] = mapped_column(EncryptedText)
    previous_secret: Mapped[str | None] = mapped_column(EncryptedText)
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDisabledEndpoint(Base):
    """An endpoint that answered 410 Gone: nothing more is sent to it for this tenant until re-enabled."""
    __tablename__ = "webhook_disabled_endpoints"
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(String(40))
    disabled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Adapter(Base):
    """A tenant's registered LoRA (migration 0007, common/adapters.py): a name pointing at a content-addressed file
    in storage (`{prefix}/{tenant}/adapters/{sha256}.safetensors`) and what was read from it at registration.
    Jobs store the sha256, never only the name, so re-pointing a name changes no stored job."""
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_name"),)
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(Text)  # the storage key of the file
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[str]] = mapped_column(JSONB)
    layers: Mapped[int] = mapped_column(Integer)
    layout: Mapped[str] = mapped_column(String(16))  # diffusers | converted (ai-toolkit / kohya)
    base_model: Mapped[str | None] = mapped_column(String(200))  # what the file's metadata names, if anything
    checked_against: Mapped[str | None] = mapped_column(Text)  # the model whose layer shapes it was checked on
    source: Mapped[str] = mapped_column(Text)  # "upload:<filename>" or the uri it was read from
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ResultCacheEntry(Base):
    """The result cache (migration 0011, common/result_cache.py): a request's images by its cache key, pointing at
    the objects of the job that made them."""
    __tablename__ = "result_cache"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    images: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)  # StoredImage fields of each image, in order
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
