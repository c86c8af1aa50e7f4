"""`letterpress keys create|list|revoke|rotate` as an operator runs them (a real process on the suite's Postgres),
and what each does to the key at the API (in-process, both the one-statement job path and the ORM path): a
revoked or expired key is a 401 on its very next request; a rotated key keeps working for its grace only."""
from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, update

from api.main import create_app
from common.db import session_scope
from common.models import ApiKey
from tests.common.cli.test_main import letterpress

JOB = {"prompt": "a poster that says KEYS", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


@pytest.fixture(scope="module")
def http(stack_env):
    return TestClient(create_app(), raise_server_exceptions=False)


def works(http, key: str) -> bool:
    """Whether the key authenticates, on the ORM path (list) and the one-statement path (submit), which agree."""
    auth = {"Authorization": f"Bearer {key}"}
    listed = http.get("/v1/jobs", headers=auth).status_code
    submitted = http.post("/v1/jobs", json=JOB, headers=auth)
    if submitted.status_code == 202:
        http.post(f"/v1/jobs/{submitted.json()['id']}/cancel", headers=auth)
    assert (listed == 200) == (submitted.status_code == 202), (listed, submitted.text)
    assert listed in (200, 401)
    return listed == 200


def create(stack_env, tenant: str, *args: str) -> str:
    result = letterpress("keys", "create", "--name", "ci", "--tenant", tenant, *args, env=stack_env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def listed(stack_env, tenant: str) -> list[dict]:
    result = letterpress("keys", "list", "--tenant", tenant, "--json", env=stack_env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_list_shows_prefixes_and_expiry_never_the_key(stack_env, http):
    tenant = f"keys-{uuid.uuid4().hex[:8]}"
    key = create(stack_env, tenant, "--expires-in", "1h")
    (info,) = listed(stack_env, tenant)
    assert info["prefix"] == key[:10] and info["tenant"] == tenant and info["usable"] is True
    assert info["expires_at"] and info["revoked_at"] is None and info["last_used_at"] is None
    table = letterpress("keys", "list", "--tenant", tenant, env=stack_env)
    assert key[:10] in table.stdout and key not in table.stdout + json.dumps(info)
    assert works(http, key)
    (used,) = listed(stack_env, tenant)  # written after the answer went out, once a minute at most
    assert used["last_used_at"] is not None


def test_revoke_takes_effect_on_the_next_request(stack_env, http):
    tenant = f"keys-{uuid.uuid4().hex[:8]}"
    key, other = create(stack_env, tenant), create(stack_env, tenant)
    assert works(http, key)
    result = letterpress("keys", "revoke", key[:10], env=stack_env)
    assert result.returncode == 0 and "revoked" in result.stdout, result.stderr
    assert not works(http, key)
    assert works(http, other)  # only that key
    again = letterpress("keys", "revoke", key[:10], env=stack_env)
    assert again.returncode == 0  # revoking twice changes nothing
    assert [k["usable"] for k in listed(stack_env, tenant)] == [False, True]


def test_rotate_with_grace_then_without(stack_env, http):
    tenant = f"keys-{uuid.uuid4().hex[:8]}"
    old = create(stack_env, tenant)
    result = letterpress("keys", "rotate", old[:10], "--grace", "1h", env=stack_env)
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip()
    assert new.startswith("lp_") and new != old and "works until" in result.stderr
    assert works(http, old) and works(http, new)  # both, during the grace
    with session_scope() as session:  # the grace runs out
        session.execute(update(ApiKey).where(ApiKey.prefix == old[:10])
                        .values(expires_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 1)))
    assert not works(http, old) and works(http, new)

    rotated = letterpress("keys", "rotate", new[:10], env=stack_env)  # no grace: the old one stops at once
    assert rotated.returncode == 0, rotated.stderr
    assert not works(http, new) and works(http, rotated.stdout.strip())


def test_a_key_created_to_expire_now_never_works(stack_env, http):
    key = create(stack_env, f"keys-{uuid.uuid4().hex[:8]}", "--expires-in", "0s")
    assert not works(http, key)


def test_unknown_keys_and_bad_durations_are_clear_errors(stack_env):
    missing = letterpress("keys", "revoke", "lp_nothere", env=stack_env)
    assert missing.returncode == 1 and "no API key 'lp_nothere'" in missing.stderr
    bad = letterpress("keys", "create", "--name", "x", "--expires-in", "soon", env=stack_env)
    assert bad.returncode == 2 and "not a duration" in bad.stderr
