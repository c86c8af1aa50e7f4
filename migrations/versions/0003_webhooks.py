"""webhooks: the outbox (webhook_events), the delivery log (webhook_deliveries), tenant signing secrets and
disabled endpoints

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 04:00:00

Why these indexes:
- ix_webhook_events_due (partial, status = 'pending'): the due-events pass asks for pending events whose
  next_attempt_at passed; delivered/failed rows leave the index, so it stays as small as the backlog.
- ix_webhook_events_redeliver (partial): redeliveries the broker lost, found by the same pass.
- *_tenant_created: cursor pagination of the listings, newest first, per tenant.
- ix_webhook_events_job / _batch: the deliveries listing filtered by job or batch.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'webhook_events',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('type', sa.String(length=64), nullable=False),
        sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('batch_id', sa.UUID(), nullable=True),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('scheduled_attempts', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('redeliver_requested_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed', 'disabled')",
                           name='ck_webhook_events_status'),
    )
    op.create_index('ix_webhook_events_tenant_created', 'webhook_events', ['tenant_id', 'created_at', 'id'])
    op.create_index('ix_webhook_events_job', 'webhook_events', ['job_id'])
    op.create_index('ix_webhook_events_batch', 'webhook_events', ['batch_id'])
    op.create_index('ix_webhook_events_due', 'webhook_events', ['next_attempt_at'],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_webhook_events_redeliver', 'webhook_events', ['redeliver_requested_at'],
                    postgresql_where=sa.text('redeliver_requested_at IS NOT NULL'))

    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.UUID(), nullable=False),
        sa.Column('event_id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('trigger', sa.String(length=16), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('ip', sa.String(length=64), nullable=True),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('duration_ms', sa.Integer(), nullable=False),
        sa.Column('response_excerpt', sa.Text(), nullable=True),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['event_id'], ['webhook_events.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_webhook_deliveries_tenant_created', 'webhook_deliveries', ['tenant_id', 'created_at', 'id'])
    op.create_index('ix_webhook_deliveries_event', 'webhook_deliveries', ['event_id', 'attempt'])

    op.create_table(
        'webhook_secrets',
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('secret', sa.Text(), nullable=False),
        sa.Column('previous_secret', sa.Text(), nullable=True),
        sa.Column('previous_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('rotated_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id'),
    )

    op.create_table(
        'webhook_disabled_endpoints',
        sa.Column('tenant_id', sa.UUID(), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('event_id', sa.String(length=40), nullable=True),
        sa.Column('disabled_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', 'url'),
    )


def downgrade() -> None:
    op.drop_table('webhook_disabled_endpoints')
    op.drop_table('webhook_secrets')
    op.drop_index('ix_webhook_deliveries_event', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_tenant_created', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_events_redeliver', table_name='webhook_events')
    op.drop_index('ix_webhook_events_due', table_name='webhook_events')
    op.drop_index('ix_webhook_events_batch', table_name='webhook_events')
    op.drop_index('ix_webhook_events_job', table_name='webhook_events')
    op.drop_index('ix_webhook_events_tenant_created', table_name='webhook_events')
    op.drop_table('webhook_events')
