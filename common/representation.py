"""The public shape of a job (and of a batch), in one place: `GET /v1/jobs/{id}` (api/routers/jobs.py) and the
payload of the job's webhook events (common/webhooks/outbox.py) are both built here, so a receiver gets exactly what a
poll returns.

Pure: no request, no session. The caller says where the job lives (`self_url`), how an image is reached
(`image_url`) and, for a queued job, its queue position and ETA (common.queue_position.queue_place).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.broker import priority_of
from common.models import Batch, Job, JobImage

REQUEST_FIELDS = ("prompt", "caption", "preset", "width", "height", "seed", "num_images", "steps", "guidance_scale",
                  "output_format", "output_quality", "loras", "image", "strength")


def job_representation(job: Job, *, self_url: str, image_url: Callable[[JobImage], str],
                       queue_position: int | None = None, eta_s: float | None = None) -> dict[str, Any]:
    """The job object (`object: "job"`) as a dict of plain values and datetimes; api.schemas.jobs.JobOut validates
    it for responses, `common.webhooks.outbox.to_json` serializes it the same way for webhooks."""
    total = job.progress_total or job.params["steps"]
    return {
        "id": str(job.id), "object": "job", "status": job.status, "queue": job.queue,
        "priority": priority_of(job.queue),
        "request": {k: job.params[k] for k in REQUEST_FIELDS if job.params.get(k) is not None},
        "metadata": job.metadata_,
        "progress": {"step": job.progress_step, "total": total, "fraction": round(job.progress_step / total, 4)},
        "queue_position": queue_position, "eta_s": eta_s,
        "attempts": job.attempts, "max_attempts": job.max_attempts, "preemptions": job.preemptions,
        "error": job.error,
        "images": [{"index": i.index, "seed": i.seed, "url": image_url(i), "key": i.key, "sha256": i.sha256,
                    "width": i.width, "height": i.height, "size_bytes": i.size_bytes} for i in job.images],
        "timings": job.timings, "cache_hit": bool((job.timings or {}).get("cached")),
        "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at,
        "urls": {"self": self_url, "cancel": self_url + "/cancel"},
    }


def batch_representation(batch: Batch, counts: Any, usage: Any, *, self_url: str) -> dict[str, Any]:
    """The batch object (`object: "batch"`), the shape of api/routers/batches.py's BatchOut; `counts` is a
    common.batch_counts.RequestCounts, `usage` a common.usage.Usage. The payload of batch.* webhook events."""
    return {
        "id": str(batch.id), "object": "batch", "status": batch.status, "input_source": batch.input_source,
        "request_counts": {"total": counts.total, "queued": counts.queued, "running": counts.running,
                           "succeeded": counts.succeeded, "failed": counts.failed, "canceled": counts.canceled},
        "usage": usage.as_dict(),
        "cache_hit_rate": round(usage.cache_hits / counts.succeeded, 4) if counts.succeeded else None,
        "invalid": batch.invalid, "metadata": batch.metadata_, "webhook_url": batch.webhook_url,
        "priority": batch.priority,
        "manifest_key": batch.manifest_key, "results_url": self_url + "/results", "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at, "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at, "failed_at": batch.failed_at, "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at, "manifest_written_at": batch.manifest_written_at,
        "urls": {"self": self_url, "cancel": self_url + "/cancel", "retry": self_url + "/retry",
                 "priority": self_url + "/priority",
                 "results": self_url + "/results"},
    }
