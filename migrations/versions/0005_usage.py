"""usage ledger: one row per attempt that ran a job's generation (common/usage.py)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 06:00:00

Why these indexes:
- ix_usage_records_tenant_recorded: GET /v1/usage reads one tenant's rows in a time range.
- ix_usage_records_batch (partial): a batch object's `usage` sums its items' rows; interactive jobs are not in it.
- ix_usage_records_job: a job's own usage; and the cascade when a job is deleted.
- ix_usage_records_recorded: `letterpress status` reads the fleet's last minutes (images per minute per worker).
A new, empty table: plain CREATE INDEX blocks nothing.
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'usage_records',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=False),
        sa.Column('batch_id', sa.UUID(), nullable=True),
        sa.Column('preset', sa.String(length=64), nullable=True),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('worker_id', sa.String(length=255), nullable=False),
        sa.Column('gpu_kind', sa.String(length=128), nullable=False),
        sa.Column('capacity', sa.String(length=16), nullable=False),
        sa.Column('gpu_seconds', sa.Double(), nullable=False),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.Column('recorded_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_usage_records_tenant_recorded', 'usage_records', ['tenant_id', 'recorded_at'])
    op.create_index('ix_usage_records_batch', 'usage_records', ['batch_id'],
                    postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.create_index('ix_usage_records_job', 'usage_records', ['job_id'])
    op.create_index('ix_usage_records_recorded', 'usage_records', ['recorded_at'])


def downgrade() -> None:
    op.drop_table('usage_records')
