"""The tree: items (nodes), conversations (heads), responses.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("node", sa.String(32), nullable=False, unique=True),
        sa.Column("parent", sa.String(32), nullable=True),
        sa.Column("depth", sa.Integer, nullable=False),
        sa.Column("tree", sa.String(64), nullable=False),
        sa.Column("item_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("role", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("response_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("chat", sa.LargeBinary, nullable=True),
    )
    op.create_index("ix_items_item_id", "items", ["item_id"])
    op.create_index("ix_items_tree_seq", "items", ["tree", "seq"])
    op.create_index("ix_items_parent", "items", ["parent"])
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tree", sa.String(64), nullable=False),
        sa.Column("head", sa.String(32), nullable=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("forked_from_conversation", sa.String(64), nullable=True),
        sa.Column("forked_from_item", sa.String(64), nullable=True),
    )
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("conversation_id", sa.String(64), nullable=True),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("tree", sa.String(64), nullable=False),
        sa.Column("base_node", sa.String(32), nullable=True),
        sa.Column("input_node", sa.String(32), nullable=True),
        sa.Column("input_count", sa.Integer, nullable=False),
        sa.Column("last_node", sa.String(32), nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_responses_conversation", "responses", ["conversation_id"])


def downgrade() -> None:
    op.drop_table("responses")
    op.drop_table("conversations")
    op.drop_table("items")
