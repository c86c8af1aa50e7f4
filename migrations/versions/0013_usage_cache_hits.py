"""usage_records.cached: the attempt was answered from the result cache (common/result_cache.py), so usage and the
batch object can show cache hits and their rate

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 17:00:00

A constant default rewrites nothing; rows written before are generations (false).
"""
from alembic import op
import sqlalchemy as sa

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('usage_records', sa.Column('cached', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column('usage_records', 'cached')
