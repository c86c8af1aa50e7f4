"""tenant quotas: `tenants.limits` (a tenant's own limits over the defaults) and the index that counts a tenant's
active jobs (common/quotas.py)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 16:00:00

- tenants.limits: JSONB, `{}` for every tenant (the defaults apply); a constant default rewrites nothing.
- ix_jobs_tenant_active (partial: queued or running, interactive or already fed): a submit counts its tenant's
  active jobs up to the limit on it. Only active jobs are in it, never a batch's unfed backlog or finished jobs.
  Built CONCURRENTLY, outside the migration's transaction: claims and heartbeats keep writing `jobs`.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('limits', postgresql.JSONB(), nullable=False,
                                       server_default=sa.text("'{}'::jsonb")))
    with op.get_context().autocommit_block():
        op.create_index('ix_jobs_tenant_active', 'jobs', ['tenant_id'], unique=False, postgresql_concurrently=True,
                        postgresql_where=sa.text("status IN ('queued', 'running') "
                                                 "AND (batch_id IS NULL OR enqueued_at IS NOT NULL)"))


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_jobs_tenant_active', table_name='jobs', postgresql_concurrently=True)
    op.drop_column('tenants', 'limits')
