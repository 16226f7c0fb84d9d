"""Stored prompts, server secrets, and conversations by metadata.

- `prompts` and `prompt_versions`: the templates that POST /v1/responses's `prompt` names
  (docs/decisions/0041). A prompt row holds its latest version number; each version's content
  is one JSON document (instructions, input, variables, metadata), never changed once written.
  Prompts are listed by id, which starts with its creation time (docs/decisions/0005), so the
  primary key is the list's order.
- `secrets`: values every process and instance on this database must share, made on first start
  when the settings give none: today the key that signs compaction items (docs/decisions/0040).

- `conversation_metadata`: each conversation's metadata, one row per pair, indexed by (key,
  value, conversation): GET /v1/conversations filtered by metadata reads a range of that index
  instead of every conversation's JSON (docs/decisions/0042). Filled here from the
  conversations already stored. Listing without a filter needs no index of its own: it pages
  by id, and ids begin with their creation time, so the primary key is the creation order.

Revision ID: 0006
Revises: 0005
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


_conversations = sa.table("conversations", sa.column("id", sa.String), sa.column("metadata", sa.Text))
BATCH = 1000


def upgrade() -> None:
    metadata = op.create_table(
        "conversation_metadata",
        sa.Column("conversation_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(512), nullable=False),
    )
    op.create_index("ix_conversation_metadata_key_value", "conversation_metadata",
                    ["key", "value", "conversation_id"])
    conn = op.get_bind()
    rows = []
    for conv_id, text in conn.execute(sa.select(_conversations.c.id, _conversations.c.metadata)):
        rows += [{"conversation_id": conv_id, "key": k, "value": v} for k, v in (json.loads(text) or {}).items()]
        if len(rows) >= BATCH:
            conn.execute(metadata.insert(), rows)
            rows = []
    if rows:
        conn.execute(metadata.insert(), rows)
    op.create_table(
        "prompts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "prompt_versions",
        sa.Column("prompt_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("conversation_metadata")
    op.drop_table("secrets")
    op.drop_table("prompt_versions")
    op.drop_table("prompts")
