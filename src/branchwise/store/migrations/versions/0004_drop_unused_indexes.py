"""Drop two indexes no query uses. Every stored response wrote a leaf page of each (their keys
are random ids, so a different page each time): about a fifth of the pages a response's commit
wrote to the WAL. Children are never looked up by `parent` (paths are walked upwards by
`node`), and responses are never listed by conversation (the tree is).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_items_parent", table_name="items")
    op.drop_index("ix_responses_conversation", table_name="responses")


def downgrade() -> None:
    op.create_index("ix_responses_conversation", "responses", ["conversation_id"])
    op.create_index("ix_items_parent", "items", ["parent"])
