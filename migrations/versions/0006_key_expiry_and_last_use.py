"""API keys expire and show their last use: `api_keys.expires_at` (None: never; a key past it authenticates
nothing, common.auth.usable_key, as a revoked one; `letterpress keys rotate --grace` sets it on the old key) and
`api_keys.last_used_at` (written at most once a minute per key and API process, api/key_use.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 07:00:00

Nullable columns without a default: adding them rewrites nothing and holds the lock for an instant.
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_keys', sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('api_keys', 'last_used_at')
    op.drop_column('api_keys', 'expires_at')
