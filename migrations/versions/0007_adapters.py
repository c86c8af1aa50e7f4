"""adapters: a tenant's registered LoRA files (common/adapters.py)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 13:00:00

The unique (tenant_id, name) constraint is also the index every lookup uses (a job naming its adapters, the list).
A new, empty table: creating it blocks nothing.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'adapters',
        sa.Column('id', sa.UUID(), nullable=False),
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('key', sa.Text(), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('rank', sa.Integer(), nullable=False),
        sa.Column('target_modules', postgresql.JSONB(), nullable=False),
        sa.Column('layers', sa.Integer(), nullable=False),
        sa.Column('layout', sa.String(length=16), nullable=False),
        sa.Column('base_model', sa.String(length=200), nullable=True),
        sa.Column('checked_against', sa.Text(), nullable=True),
        sa.Column('source', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('tenant_id', 'name', name='uq_adapters_tenant_name'),
    )


def downgrade() -> None:
    op.drop_table('adapters')
