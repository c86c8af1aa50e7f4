"""adapter-aware feeding: jobs.adapter_group and the feeder's index over it (common/batches.py feed_candidates)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 14:00:00

- jobs.adapter_group: a short key of the adapters a batch item loads (None: none), written at ingest.
- ix_jobs_batch_unfed_group (partial, a batch's unfed items): the feeder takes a batch's next items one adapter
  group after another, in line order inside each, so workers switch adapters once a group instead of once a job.
A nullable column without a default rewrites nothing; the index is built CONCURRENTLY (outside the migration's
transaction), so claims and heartbeats keep writing `jobs` while it scans the table. Items ingested before this
migration have no group and feed in line order, as before.
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('adapter_group', sa.String(length=16), nullable=True))
    with op.get_context().autocommit_block():
        op.create_index('ix_jobs_batch_unfed_group', 'jobs', ['batch_id', 'adapter_group', 'batch_line'],
                        unique=False, postgresql_concurrently=True,
                        postgresql_where=sa.text("batch_id IS NOT NULL AND status = 'queued' AND enqueued_at IS NULL"))


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_jobs_batch_unfed_group', table_name='jobs', postgresql_concurrently=True)
    op.drop_column('jobs', 'adapter_group')
