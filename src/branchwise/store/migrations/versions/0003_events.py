"""Durable event logs, background responses, ownership and heartbeats for crash recovery.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("response_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("frame", sa.LargeBinary, nullable=False),
    )
    with op.batch_alter_table("responses") as batch:
        batch.add_column(sa.Column("background", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_index("ix_responses_owner_status", "responses", ["status", "owner"])


def downgrade() -> None:
    op.drop_index("ix_responses_owner_status", "responses")
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
        batch.drop_column("background")
    op.drop_table("events")
