"""the index of queued jobs whose magic prompt is not answered yet (worker/attempt.py enhances them with the
prompts of the job it runs, in one enhancer call)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 18:00:00

Partial: only queued jobs whose params.magic_prompt is still the requested mode (a string; once answered it is an
object). Built CONCURRENTLY, outside the migration's transaction: claims and heartbeats keep writing `jobs`.
"""
from alembic import op
import sqlalchemy as sa

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index('ix_jobs_magic_pending', 'jobs', ['created_at'], unique=False, postgresql_concurrently=True,
                        postgresql_where=sa.text("status = 'queued' AND jsonb_typeof(params -> 'magic_prompt') = "
                                                 "'string'"))


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_jobs_magic_pending', table_name='jobs', postgresql_concurrently=True)
