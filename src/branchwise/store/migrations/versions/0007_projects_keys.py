"""Teams: API keys per project, the project of every stored object, idempotency records, rate
limits.

- `project` on conversations, responses, items and prompts: the project of the key that made them.
  Everything stored before belongs to `default`, the project of `BRANCHWISE_API_KEY` and of a
  server without keys, so a single-user server sees all of it as before.
- `api_keys`: one row per key made with `branchwise keys create`; only the secret's SHA-256 is
  kept.
- `key_slots`: the concurrent responses each limited key holds, as leases that expire.
- `rate_windows`: requests per key per minute, one counter row per key and minute.
- `idempotency`: one record per (project, Idempotency-Key).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_OWNED = ("conversations", "responses", "items", "prompts")


def upgrade() -> None:
    for table in _OWNED:
        op.add_column(table, sa.Column("project", sa.String(64), nullable=False, server_default="default"))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hint", sa.String(16), nullable=False),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("last_used_at", sa.Integer, nullable=True),
        sa.Column("revoked_at", sa.Integer, nullable=True),
    )
    op.create_table(
        "key_slots",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_key_slots_key_expires", "key_slots", ["key_id", "expires_at"])
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("window_start", sa.Integer, primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
    )
    op.create_table(
        "idempotency",
        sa.Column("project", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("locked_until", sa.Float, nullable=True),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=True),
        sa.Column("stream", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_expires", "idempotency", ["expires_at"])


def downgrade() -> None:
    op.drop_table("idempotency")
    op.drop_table("rate_windows")
    op.drop_table("key_slots")
    op.drop_table("api_keys")
    for table in _OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
