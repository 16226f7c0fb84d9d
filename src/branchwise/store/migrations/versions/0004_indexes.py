"""Indexes for what the queries do.

- Drop two no query uses. Every stored response wrote a leaf page of each (their keys were
  random ids, so a different page each time): about a fifth of the pages a response's commit
  wrote to the WAL. Children are never looked up by `parent` (paths are walked upwards by
  `node`), and responses are never listed by conversation (the tree is).
- Finding an item in a tree (`tree = ? AND item_id = ? ORDER BY seq DESC`: head moves, forks
  and deletes at an item) used `(tree, seq)` and read the whole tree, so it slowed as the
  conversation grew (SQLite chose it to save the sort). `(item_id, tree, seq)` answers it
  exactly, and `item_id IN (...)` lookups by its prefix.

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
    op.create_index("ix_items_item_tree_seq", "items", ["item_id", "tree", "seq"])
    op.drop_index("ix_items_item_id", table_name="items")


def downgrade() -> None:
    op.create_index("ix_items_item_id", "items", ["item_id"])
    op.drop_index("ix_items_item_tree_seq", table_name="items")
    op.create_index("ix_responses_conversation", "responses", ["conversation_id"])
    op.create_index("ix_items_parent", "items", ["parent"])
