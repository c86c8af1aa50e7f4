"""The schema is built by Alembic; downgrade to base and back up works on a real Postgres."""
from __future__ import annotations

import os

from sqlalchemy import create_engine, inspect

from tests.support import scratch_database


def test_upgrade_downgrade_upgrade(services):
    from common.db import downgrade, migrate

    with scratch_database(services, "lp_migrations", migrated=False) as url:
        migrate(url)
        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        assert {"tenants", "api_keys", "jobs", "job_images", "alembic_version"} <= tables
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        migrate(url)
        assert "jobs" in inspect(engine).get_table_names()
        engine.dispose()
    assert os.environ.get("LETTERPRESS_DATABASE__URL") != url
