"""result cache: a request's stored images by its cache key (common/result_cache.py)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 17:00:00

A new, empty table: creating it and its indexes blocks nothing. The indexes serve the cascades (a tenant or a job
deleted takes its entries along).
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'result_cache',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=False),
        sa.Column('images', postgresql.JSONB(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('key'),
    )
    op.create_index('ix_result_cache_tenant_id', 'result_cache', ['tenant_id'])
    op.create_index('ix_result_cache_job_id', 'result_cache', ['job_id'])


def downgrade() -> None:
    op.drop_table('result_cache')
