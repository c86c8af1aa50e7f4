"""Guessing keys is slowed (api/wrong_keys.py): in-process API, the suite's real Postgres and Redis (the shared
per-minute counter), each test from its own client address."""
from __future__ import annotations

import itertools
import uuid

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.settings import get_settings, use_settings
from tests.support import make_tenant

LIMIT = 5
_addresses = itertools.count(1)


@pytest.fixture
def settings(stack_env):
    api = get_settings().api.model_copy(update={"wrong_keys_per_minute": LIMIT, "wrong_key_block_s": 60})
    with use_settings(get_settings().model_copy(update={"api": api})) as installed:
        yield installed


def client(app, address: str | None = None) -> TestClient:
    """A client from `address`, or from an address no other test of this run uses."""
    return TestClient(app, raise_server_exceptions=False, client=(address or f"10.9.0.{next(_addresses)}", 4000))


def guess(http: TestClient) -> int:
    return http.get("/v1/jobs", headers={"Authorization": f"Bearer lp_{uuid.uuid4().hex}"}).status_code


def test_an_address_guessing_keys_is_refused_but_good_keys_still_work(settings):
    app = create_app()
    good = make_tenant()
    guesser = client(app, "10.1.2.3")
    assert guesser.get("/v1/jobs", headers={"Authorization": f"Bearer {good.key}"}).status_code == 200  # worked
    assert [guess(guesser) for _ in range(LIMIT)] == [401] * LIMIT
    refused = guesser.get("/v1/jobs", headers={"Authorization": f"Bearer lp_{uuid.uuid4().hex}"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["field"] == "Authorization"
    # a real key is not a guess: it was seen working, so the address's good clients keep working
    assert guesser.get("/v1/jobs", headers={"Authorization": f"Bearer {good.key}"}).status_code == 200
    # a key this process never saw work is refused while the block lasts, even a valid one: a guess cannot pass
    fresh = make_tenant()
    assert guesser.get("/v1/jobs", headers={"Authorization": f"Bearer {fresh.key}"}).status_code == 429
    # other addresses are not affected
    assert guess(client(app)) == 401
    assert client(app).get("/v1/jobs", headers={"Authorization": f"Bearer {fresh.key}"}).status_code == 200


def test_answers_that_come_before_the_key_is_checked_do_not_vouch_for_it(settings):
    """A 422 (the one-statement submit validates the body before it looks at the key) must not make a guessed key
    "one that worked": otherwise a guesser could clear each guess past the block."""
    app = create_app()
    guesser = client(app)
    guessed = f"Bearer lp_{uuid.uuid4().hex}"
    assert guesser.post("/v1/jobs", json={"prompt": ""}, headers={"Authorization": guessed}).status_code == 422
    assert [guess(guesser) for _ in range(LIMIT)] == [401] * LIMIT
    assert guesser.get("/v1/jobs", headers={"Authorization": guessed}).status_code == 429


def test_the_counter_is_shared_by_api_processes(settings):
    """Two apps stand in for two API processes: their failures add up in Redis."""
    first, second = create_app(), create_app()
    address = "10.4.5.6"
    statuses = [guess(client(app, address)) for app in (first, second) * LIMIT]
    assert statuses[:LIMIT] == [401] * LIMIT  # the LIMIT-th failure (across both) starts the block
    assert 429 in statuses[LIMIT:]


def test_requests_without_a_key_are_not_guesses(settings):
    http = client(create_app())
    assert [http.get("/v1/jobs").status_code for _ in range(LIMIT * 2)] == [401] * (LIMIT * 2)


def test_off_when_the_limit_is_zero(stack_env):
    api = get_settings().api.model_copy(update={"wrong_keys_per_minute": 0})
    with use_settings(get_settings().model_copy(update={"api": api})):
        http = client(create_app())
        assert {guess(http) for _ in range(LIMIT * 3)} == {401}
