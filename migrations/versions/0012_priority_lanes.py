"""priority lanes: `batches.priority` and the feeder's weighted fair share state (common/fair_share.py)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 16:00:00

- batches.priority: high | normal | low, `normal` for every existing batch (a constant default rewrites nothing).
- batches.feed_pass, tenants.feed_pass: the stride scheduler's pass of each batch inside its tenant and of each
  tenant in the batch lane (virtual time: one turn adds 1/weight). NULL until first fed: the scheduler places a
  newcomer at the front of the current round.
"""
from alembic import op
import sqlalchemy as sa

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('batches', sa.Column('priority', sa.String(8), nullable=False, server_default='normal'))
    op.create_check_constraint('ck_batches_priority', 'batches', "priority IN ('high', 'normal', 'low')")
    op.add_column('batches', sa.Column('feed_pass', sa.Double()))
    op.add_column('tenants', sa.Column('feed_pass', sa.Double()))


def downgrade() -> None:
    op.drop_column('tenants', 'feed_pass')
    op.drop_column('batches', 'feed_pass')
    op.drop_constraint('ck_batches_priority', 'batches')
    op.drop_column('batches', 'priority')
