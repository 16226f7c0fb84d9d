"""Event logs per alternative: each event row names its alternative (`alternative`, 0 with n = 1).

A response with `n` > 1 kept one log under alternative 0's id, every alternative's events
interleaved, so a replay of one alternative had to pick its events out of all of them. Each
alternative's events now live under its own response id, with their sequence numbers in the
whole stream. A log written before this revision for n > 1 is split here the same way, so that
every log obeys one rule: the events of alternative k (k > 0) move under alternative k's id
(each event names it: `response_id` and `alternative`). Such logs are found by their first
event, which names its alternative only when n > 1; this reads every log's first row once.

Downgrading drops the column and leaves split logs split: the older code reads a log by its
response id, so every alternative's own log replays as that alternative's events.

Revision ID: 0005
Revises: 0004
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_events = sa.table(
    "events",
    sa.column("response_id", sa.String),
    sa.column("seq", sa.Integer),
    sa.column("frame", sa.LargeBinary),
    sa.column("alternative", sa.Integer),
)


def _event(frame: bytes) -> dict:
    """The JSON of an SSE frame `event: <type>\\ndata: <json>\\n\\n`."""
    return json.loads(bytes(frame).split(b"\ndata: ", 1)[1])


def upgrade() -> None:
    op.add_column("events", sa.Column("alternative", sa.Integer, nullable=False, server_default="0"))
    conn = op.get_bind()
    firsts = conn.execute(sa.select(_events.c.response_id, _events.c.frame).where(_events.c.seq == 0)).all()
    for key, first in firsts:
        if "alternative" not in _event(first):
            continue
        rows = conn.execute(sa.select(_events.c.seq, _events.c.frame).where(_events.c.response_id == key)).all()
        for seq, frame in rows:
            ev = _event(frame)
            if ev.get("alternative"):
                conn.execute(
                    sa.update(_events)
                    .where(_events.c.response_id == key, _events.c.seq == seq)
                    .values(response_id=ev["response_id"], alternative=ev["alternative"])
                )


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("alternative")
