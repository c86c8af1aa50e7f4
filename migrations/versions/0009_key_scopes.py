"""API key scopes: `api_keys.scopes` (common.auth.SCOPES: read, submit, admin)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 15:00:00

Every existing key keeps what it could do (read and submit); none becomes an admin key. A constant default on a
new column is stored in the catalog (Postgres 11+): adding it rewrites nothing.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('scopes', postgresql.JSONB(), nullable=False,
                                        server_default=sa.text('\'["read", "submit"]\'::jsonb')))


def downgrade() -> None:
    op.drop_column('api_keys', 'scopes')
