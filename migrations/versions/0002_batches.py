"""batches: the batch table, and jobs.batch_id / custom_id / batch_line with the indexes the feeder needs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:00:00

Why these indexes:
- uq_jobs_batch_custom_id: a caller's custom_id is unique inside its batch (also the resume lookup).
- ix_jobs_batch_status: request_counts is a GROUP BY status over one batch, an index-only scan.
- ix_jobs_batch_unfed (partial): the feeder takes the next not-yet-enqueued queued items of a batch in line
  order; rows leave this index as they are fed, so the lookup stays O(depth) even deep into a 1M-item batch.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'batches',
        sa.Column('id', sa.UUID(), nullable=False),
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('request_hash', sa.String(length=64), nullable=False),
        sa.Column('idempotency_key', sa.String(length=255), nullable=True),
        sa.Column('input_source', sa.Text(), nullable=True),
        sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('webhook_url', sa.Text(), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('invalid', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('manifest_key', sa.Text(), nullable=False),
        sa.Column('manifest_written_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_fed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('in_progress_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finalizing_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('tenant_id', 'idempotency_key', name='uq_batches_tenant_idempotency'),
    )
    op.create_index('ix_batches_tenant_created', 'batches', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_index('ix_batches_status', 'batches', ['status'], unique=False)

    op.add_column('jobs', sa.Column('batch_id', sa.UUID(), nullable=True))
    op.add_column('jobs', sa.Column('custom_id', sa.String(length=255), nullable=True))
    op.add_column('jobs', sa.Column('batch_line', sa.Integer(), nullable=True))
    op.create_foreign_key('fk_jobs_batch_id', 'jobs', 'batches', ['batch_id'], ['id'], ondelete='CASCADE')
    op.create_index('uq_jobs_batch_custom_id', 'jobs', ['batch_id', 'custom_id'], unique=True)
    op.create_index('ix_jobs_batch_status', 'jobs', ['batch_id', 'status'], unique=False)
    op.create_index('ix_jobs_batch_unfed', 'jobs', ['batch_id', 'batch_line'], unique=False,
                    postgresql_where=sa.text("batch_id IS NOT NULL AND status = 'queued' AND enqueued_at IS NULL"))


def downgrade() -> None:
    op.drop_index('ix_jobs_batch_unfed', table_name='jobs')
    op.drop_index('ix_jobs_batch_status', table_name='jobs')
    op.drop_index('uq_jobs_batch_custom_id', table_name='jobs')
    op.drop_constraint('fk_jobs_batch_id', 'jobs', type_='foreignkey')
    op.drop_column('jobs', 'batch_line')
    op.drop_column('jobs', 'custom_id')
    op.drop_column('jobs', 'batch_id')
    op.drop_index('ix_batches_status', table_name='batches')
    op.drop_index('ix_batches_tenant_created', table_name='batches')
    op.drop_table('batches')
