"""the index of a batch's finished items by when they finished (common.batch_counts.completion_rate: the rate and
ETA of GET /v1/batches/{id}/events)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-09 12:00:00

Partial: only batch items that succeeded or failed, so reading a batch's latest finishes touches those entries
only, however large the batch. Built CONCURRENTLY, outside the migration's transaction: claims and heartbeats keep
writing `jobs`.
"""
from alembic import op
import sqlalchemy as sa

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index('ix_jobs_batch_finished', 'jobs', ['batch_id', 'finished_at'], unique=False,
                        postgresql_concurrently=True,
                        postgresql_where=sa.text("batch_id IS NOT NULL AND status IN ('succeeded', 'failed')"))


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_jobs_batch_finished', table_name='jobs', postgresql_concurrently=True)
