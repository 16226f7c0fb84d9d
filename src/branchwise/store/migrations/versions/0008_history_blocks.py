"""History blocks: a long path's messages, 64 items to a row, so that a history not in memory is
read in a few hundred steps instead of one step per item (docs/decisions/0058).

- `history_blocks`: for a node at depth 64k+63 (k >= 2), the comma-joined Chat Completions
  messages of its 64-item block (depths 64k .. 64k+63) and the node above the block. Nodes never
  change, so neither does a block. Filled here for the paths already stored.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BLOCK = 64
FIRST_END = 3 * BLOCK - 1  # (as `store.statements.BLOCK` / `FIRST_BLOCK_END` when this was written)
_AGG = {
    "sqlite": "(SELECT CAST(group_concat(chat, ',') AS BLOB) FROM (SELECT chat FROM up WHERE chat IS NOT NULL"
              " ORDER BY depth))",
    "postgresql": "(SELECT string_agg(chat, '\\x2c'::bytea ORDER BY depth) FROM up WHERE chat IS NOT NULL)",
}


def upgrade() -> None:
    op.create_table(
        "history_blocks",
        sa.Column("node", sa.String(32), primary_key=True),
        sa.Column("below", sa.String(32), nullable=True),
        sa.Column("chat", sa.LargeBinary, nullable=True),
        sqlite_with_rowid=False,
    )
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        # A block is ~10-20 kB: TOASTed, compressed. lz4 reads back in about half pglz's time (a
        # 10,000-item history decompresses ~2 MB); a server built without lz4 keeps pglz.
        try:
            with conn.begin_nested():
                conn.execute(sa.text("ALTER TABLE history_blocks ALTER COLUMN chat SET COMPRESSION lz4"))
        except sa.exc.DBAPIError:
            pass
    fill = sa.text(
        "WITH RECURSIVE up(node, parent, depth, chat) AS ("
        " SELECT node, parent, depth, chat FROM items WHERE node = :node"
        " UNION ALL"
        " SELECT i.node, i.parent, i.depth, i.chat FROM items i JOIN up ON i.node = up.parent WHERE up.depth > :lo"
        ") INSERT INTO history_blocks (node, below, chat)"
        f" SELECT :node, (SELECT parent FROM up WHERE depth = :lo), {_AGG[conn.dialect.name]}")
    ends = conn.execute(sa.text(f"SELECT node, depth FROM items WHERE depth >= {FIRST_END}"
                                f" AND (depth + 1) % {BLOCK} = 0")).all()
    for node, depth in ends:
        conn.execute(fill, {"node": node, "lo": depth - BLOCK + 1})


def downgrade() -> None:
    op.drop_table("history_blocks")
