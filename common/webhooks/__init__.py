"""Webhook building blocks, free of the database: Standard Webhooks signing, the SSRF guard, one delivery
attempt over HTTP and the retry schedule. The outbox tables and the delivery queue use these."""
from common.webhooks.client import DeliveryResult, deliver
from common.webhooks.schedule import MAX_RETRY_AFTER_S, Outcome, classify, next_attempt_delay, parse_retry_after
from common.webhooks.signing import build_headers, generate_secret, sign, signature_header
from common.webhooks.ssrf import ResolvedTarget, UnsafeURLError, blocked_reason, check_url, resolve_safe

__all__ = [
    "DeliveryResult", "deliver",
    "MAX_RETRY_AFTER_S", "Outcome", "classify", "next_attempt_delay", "parse_retry_after",
    "build_headers", "generate_secret", "sign", "signature_header",
    "ResolvedTarget", "UnsafeURLError", "blocked_reason", "check_url", "resolve_safe",
]
