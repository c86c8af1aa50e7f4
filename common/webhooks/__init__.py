"""Webhooks, one home: events and their outbox (`outbox`), Standard Webhooks signing (`signing`), the SSRF guard
(`ssrf`), one delivery attempt over HTTP (`client`) and the retry schedule (`schedule`). The delivery task that
drives them lives in worker/webhook_delivery.py; the HTTP routes in api/routers/webhooks.py."""
