"""API keys expire: `api_keys.expires_at` (None: never). A key past it authenticates nothing
(common.auth.usable_key), as a revoked one; `letterpress keys rotate --grace` sets it on the old key.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 07:00:00

A nullable column without a default: adding it rewrites nothing and holds its lock for an instant.
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('api_keys', 'expires_at')
