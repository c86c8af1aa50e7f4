"""`python -m worker.bench.list_positions [--queued 2700] [--page 200]`: the queue positions of a `GET /v1/jobs`
page, one statement a queued job (`queue_place`, as before) against `queue_places`, side by side on one throwaway
Postgres holding `--queued` interactive jobs of one tenant."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import select, text

from common import queue_position as qp
from common.auth import get_or_create_tenant
from common.db import migrate, session_scope
from common.devstack.servers import PostgresServer
from common.models import Job
from common.settings import get_settings, use_settings

QUEUED_SQL = text("""
INSERT INTO jobs (id, tenant_id, queue, status, params, request_hash, attempts, max_attempts, preemptions,
                  cancel_requested, progress_step, progress_total, enqueued_at, created_at)
SELECT gen_random_uuid(), :tenant, 'interactive', 'queued', '{"steps": 2, "num_images": 1}'::jsonb, 'x', 0, 3, 0,
       false, 0, 2, now() - (i || ' ms')::interval, now() - (i || ' ms')::interval
FROM generate_series(1, :n) i""")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=2700)
    parser.add_argument("--page", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    pg = PostgresServer(Path(tempfile.mkdtemp(prefix="lp-list-")) / "pg", fsync=False)
    pg.start()
    try:
        url = pg.create_database("bench")
        migrate(url)
        settings = get_settings()
        with use_settings(settings.model_copy(update={"database": settings.database.model_copy(update={"url": url})})):
            with session_scope() as session:
                tenant = get_or_create_tenant(session, "bench").id
                session.execute(QUEUED_SQL, {"tenant": tenant, "n": args.queued})
                session.execute(text("ANALYZE jobs"))
            with session_scope() as session:
                page = list(session.scalars(select(Job).where(Job.tenant_id == tenant)
                                            .order_by(Job.created_at.desc()).limit(args.page)))
                each, once = [], []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    alone = [qp.queue_place(session, job=job) for job in page]
                    each.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    together = qp.queue_places(session, page)
                    once.append(time.perf_counter() - t0)
                assert [p.position for p in alone] == [together[job.id].position for job in page]
        print(f"{args.page} queued jobs of {args.queued}: one statement a job {statistics.median(each) * 1000:.1f} "
              f"ms, queue_places {statistics.median(once) * 1000:.1f} ms (median of {args.repeat})")
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
