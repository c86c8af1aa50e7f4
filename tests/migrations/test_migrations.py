"""The schema is built by Alembic; downgrade to base and back up works on a real Postgres."""
from __future__ import annotations

import os
import uuid

from sqlalchemy import create_engine, inspect, text


def test_upgrade_downgrade_upgrade(services):
    from common.db import downgrade, migrate

    name = f"lp_migrations_{uuid.uuid4().hex[:8]}"
    server = services["database_url"].rsplit("/", 1)[0]
    admin = create_engine(server + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{server}/{name}"
    migrate(url)
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert {"tenants", "api_keys", "jobs", "job_images", "alembic_version"} <= tables
    downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    migrate(url)
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}"'))
    admin.dispose()
    assert os.environ.get("LETTERPRESS_DATABASE__URL") != url
