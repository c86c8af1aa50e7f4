"""common.batches.reset_stale_fed on a real Postgres: it locks the stale rows in id order (as every multi-row job
writer does, so it cannot deadlock with a batch cancel) before it marks them unfed. All in one transaction that
is rolled back, so no feeder of another test ever sees these items."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import event, func, select, update

from common import batches
from common.batches import BatchOptions, items_source
from common.models import Job
from common.settings import get_settings

LINE = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}


def test_reset_stale_fed_locks_in_id_order_then_unfeeds(stack_env, tenant):
    from common.db import session_factory

    session = session_factory()()
    statements: list[str] = []
    try:
        batch = batches.create_batch(
            session, tenant_id=tenant.id, source=items_source([{**LINE, "custom_id": f"c{i}"} for i in range(6)]),
            source_name="inline", options=BatchOptions(), idempotency_key=None, api=get_settings().api,
            storage_prefix="test", max_attempts=2)
        mine = set(session.scalars(select(Job.id).where(Job.batch_id == batch.id)))
        session.execute(update(Job).where(Job.batch_id == batch.id)
                        .values(enqueued_at=func.now() - timedelta(hours=1)))  # fed long ago, message lost
        event.listen(session.connection(), "before_cursor_execute",
                     lambda _c, _cur, sql, *_: statements.append(" ".join(sql.split())))
        assert batches.reset_stale_fed(session, older_than_s=60) >= len(mine)
        assert set(session.scalars(select(Job.id).where(Job.batch_id == batch.id, Job.enqueued_at.is_(None)))) == mine
    finally:
        session.rollback()
        session.close()
    lock = next(i for i, s in enumerate(statements) if s.startswith("SELECT jobs.id") and "FOR UPDATE" in s)
    write = next(i for i, s in enumerate(statements) if s.startswith("UPDATE jobs SET enqueued_at"))
    assert lock < write and "ORDER BY jobs.id" in statements[lock]
