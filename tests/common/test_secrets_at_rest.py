"""Secrets at rest (common/secrets_at_rest.py): webhook signing secrets are stored encrypted under a key derived
from LETTERPRESS_SECRET_KEY; rotating that key with LETTERPRESS_PREVIOUS_SECRET_KEYS and `letterpress secrets
reencrypt` keeps every secret readable, and a key change without the old key is a clear error. Against a real
Postgres database of its own (a re-encryption rewrites every row)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from common.auth import get_or_create_tenant
from common.db import migrate, reset_engines, session_scope
from common.secrets_at_rest import PREFIX, SecretKeyMismatch
from common.settings import get_settings, use_settings
from common.webhooks import outbox

OLD, NEW = "the-old-secret-key-0123456789", "the-new-secret-key-9876543210"


@pytest.fixture(scope="module")
def database(services, stack_env):
    from tests.conftest import _fresh_database

    if services["pg"] is not None:
        name = f"secrets_{uuid.uuid4().hex[:6]}"
        services["pg"].create_database(name)
        url = services["pg"].url(name)
    else:
        url = _fresh_database(services["database_url"])
    migrate(url)
    yield url
    reset_engines()


def keyed(url: str, key: str, previous: tuple[str, ...] = ()):
    settings = get_settings().model_copy(update={
        "database": get_settings().database.model_copy(update={"url": url}),
        "secret_key": SecretStr(key), "previous_secret_keys": [SecretStr(k) for k in previous]})
    return use_settings(settings)


def stored(tenant_id: uuid.UUID) -> tuple[str, str | None]:
    with session_scope() as session:
        return tuple(session.execute(text("SELECT secret, previous_secret FROM webhook_secrets WHERE tenant_id = :t"),
                                     {"t": tenant_id}).one())


def new_secret(name: str, *, rotate: bool = False) -> tuple[uuid.UUID, str]:
    with session_scope() as session:
        tenant = get_or_create_tenant(session, name)
        row = outbox.get_secret(session, tenant_id=tenant.id)
        if rotate:
            row = outbox.rotate_secret(session, tenant_id=tenant.id, previous_valid_for_s=3600)
        return tenant.id, row.secret


def read_secret(tenant_id: uuid.UUID) -> list[str]:
    with session_scope() as session:
        return outbox.signing_secrets(session, tenant_id=tenant_id)


def test_the_database_holds_ciphertext_and_the_code_sees_the_secret(database):
    with keyed(database, OLD):
        tenant_id, secret = new_secret(f"enc-{uuid.uuid4().hex[:6]}", rotate=True)
        raw_secret, raw_previous = stored(tenant_id)
        assert secret.startswith("whsec_")
        for raw in (raw_secret, raw_previous):
            assert raw.startswith(PREFIX) and "whsec_" not in raw
        current, previous = read_secret(tenant_id)
        assert current == secret and previous.startswith("whsec_") and previous != secret


def test_rotating_the_secret_key_keeps_every_secret_readable(database):
    with keyed(database, OLD):
        tenant_id, secret = new_secret(f"rot-{uuid.uuid4().hex[:6]}", rotate=True)
        before = read_secret(tenant_id)
    with keyed(database, NEW):  # the new key alone: the old rows do not open, and it says why
        with pytest.raises(SecretKeyMismatch, match="LETTERPRESS_PREVIOUS_SECRET_KEYS"):
            read_secret(tenant_id)
    with keyed(database, NEW, previous=(OLD,)):
        assert read_secret(tenant_id) == before
        env = {**os.environ, "LETTERPRESS_DATABASE__URL": database, "LETTERPRESS_SECRET_KEY": NEW,
               "LETTERPRESS_PREVIOUS_SECRET_KEYS": f'["{OLD}"]'}
        result = subprocess.run([sys.executable, "-m", "common.cli.main", "secrets", "reencrypt"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.split()[0]) >= 1
    with keyed(database, NEW):  # the old key is gone now: everything opens under the new one
        assert read_secret(tenant_id) == before
        with session_scope() as session:
            assert outbox.reencrypt_secrets(session) == 0  # nothing left to rewrite


def test_rows_written_before_encryption_are_read_then_encrypted(database):
    with keyed(database, NEW, previous=(OLD,)):  # whichever key the module's other rows are under
        with session_scope() as session:
            tenant = get_or_create_tenant(session, f"legacy-{uuid.uuid4().hex[:6]}")
            session.execute(text("INSERT INTO webhook_secrets (tenant_id, secret) VALUES (:t, 'whsec_legacyvalue')"),
                            {"t": tenant.id})
            tenant_id = tenant.id
        assert read_secret(tenant_id) == ["whsec_legacyvalue"]
        with session_scope() as session:
            assert outbox.reencrypt_secrets(session) >= 1
        assert stored(tenant_id)[0].startswith(PREFIX)
        assert read_secret(tenant_id) == ["whsec_legacyvalue"]
