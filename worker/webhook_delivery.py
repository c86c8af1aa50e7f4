"""The webhook delivery worker: `letterpress webhooks-worker`, i.e.
`celery -A worker.webhook_delivery worker -Q webhooks --pool threads --concurrency 8` (common.broker.webhooks_worker_argv).

A process of its own, never a GPU worker: a slow or dead receiver holds one of its threads for at most the
15 s timeout and never a GPU. The `webhooks.deliver` task's payload is an event id; it claims the event's next
attempt in Postgres (common.webhooks.outbox), signs the body per Standard Webhooks with the tenant's current secret (and
the previous one during a rotation), POSTs it through the SSRF-safe client (checked again at delivery, no
redirects) and records the attempt and the next step. The process also runs the due-events pass every
maintenance period, so retries parked in Postgres go out even where no GPU worker runs maintenance.
"""
from __future__ import annotations

import logging

from celery import signals

from common.broker import WEBHOOK_TASK, enqueue_webhook, get_celery
from common.db import session_scope
from common.settings import Settings, get_settings
from common.webhooks import outbox
from common.webhooks.client import deliver
from common.webhooks.signing import build_headers
from worker import metrics
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)
app = get_celery()
LEASE_MARGIN_S = 30.0  # an attempt holds its event for the HTTP timeout plus this


def run_delivery(event_id: str, settings: Settings, *, resolver=None, ssl_context=None) -> str:
    """One attempt of one event. Returns the outcome (success | retry | disable | refused) or "skipped"."""
    cfg = settings.webhooks
    with session_scope() as session:
        attempt = outbox.claim_attempt(session, event_id=event_id, lease_s=cfg.timeout_s + LEASE_MARGIN_S)
        if attempt is None:
            early_by = outbox.not_yet_due_s(session, event_id=event_id)
        else:
            secrets = outbox.signing_secrets(session, tenant_id=attempt.tenant_id)
    if attempt is None:
        if early_by is not None and early_by < settings.worker.maintenance_period_s:
            enqueue_webhook(event_id, countdown=early_by)  # arrived early (clock skew): come back when due
        return "skipped"
    headers = build_headers(attempt.event_id, attempt.body, secrets)
    result = deliver(attempt.url, attempt.body, headers, settings=cfg, resolver=resolver, ssl_context=ssl_context)
    with session_scope() as session:
        outcome = outbox.record_attempt(session, attempt=attempt, result=result, settings=cfg)
    metrics.WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
    metrics.WEBHOOK_DELIVERY_SECONDS.observe(result.duration_ms / 1000)
    log.info("webhook %s attempt %d (%s) to %s: %s in %d ms%s", attempt.event_id, attempt.attempt, attempt.trigger,
             attempt.url, result.status_code or "-", result.duration_ms, f" ({result.error})" if result.error else "")
    return outcome


@app.task(name=WEBHOOK_TASK)
def deliver_event(event_id: str) -> str:
    return run_delivery(event_id, get_settings())


@signals.worker_init.connect
def _start_due_pass(**_) -> None:
    """The due-events pass (common.webhooks.outbox.enqueue_due) every maintenance period."""
    settings = get_settings()
    metrics.serve(settings.webhooks.metrics_port, metrics.WEBHOOK_REGISTRY)
    PeriodicThread("webhooks-due", settings.worker.maintenance_period_s,
                   lambda: outbox.enqueue_due(settings)).start()
