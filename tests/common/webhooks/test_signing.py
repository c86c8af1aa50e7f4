import base64
import json
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from common.webhooks.signing import (
    build_headers,
    generate_secret,
    sign,
    signature_header,
)

BODY = json.dumps({"type": "job.succeeded", "data": {"id": "job_1", "status": "succeeded"}}).encode()


def test_generated_secrets_are_whsec_base64_and_unique():
    a, b = generate_secret(), generate_secret()
    assert a.startswith("whsec_") and a != b
    assert len(base64.b64decode(a.removeprefix("whsec_"))) == 32
    assert len(base64.b64decode(generate_secret(24).removeprefix("whsec_"))) == 24
    with pytest.raises(ValueError):
        generate_secret(8)


def test_sign_matches_the_reference_library():
    secret = generate_secret()
    ts = 1_700_000_000
    expected = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    assert sign(secret, "msg_1", ts, BODY) == expected
    assert expected.startswith("v1,")


def test_build_headers_verify_with_standardwebhooks():
    secret = generate_secret()
    headers = build_headers("msg_2", BODY, [secret])
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["webhook-id"] == "msg_2"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_rotation_sends_both_signatures_and_each_secret_verifies():
    new, old = generate_secret(), generate_secret()
    headers = build_headers("msg_3", BODY, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_tampered_body_id_or_timestamp_is_rejected():
    secret = generate_secret()
    headers = build_headers("msg_4", BODY, [secret])
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "msg_5"})
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)})


def test_stale_timestamp_is_rejected_so_each_attempt_needs_fresh_headers():
    secret = generate_secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, build_headers("msg_6", BODY, [secret], now=time.time() - 3600))


def test_signature_header_dedupes_and_needs_a_secret():
    s = generate_secret()
    assert signature_header([s, s], "m", 1, b"{}") == sign(s, "m", 1, b"{}")
    with pytest.raises(ValueError):
        signature_header([], "m", 1, b"{}")
    with pytest.raises(ValueError):
        sign("whsec_!!!not-base64", "m", 1, b"{}")
    # Unpadded secrets are accepted, as by the reference libraries.
    assert sign(s.rstrip("="), "m", 1, b"{}") == sign(s, "m", 1, b"{}")
