"""SQLAlchemy Core tables. The schema itself is created by the Alembic migrations in
`store/migrations/versions`; these definitions are what the queries use.

The tree lives in `items`: one row per *node*. A node is an immutable item placed under a
parent node. Public item ids (`msg_...`) name the content; the same content can stand at two
places in a tree only when a conversation deleted an item above it and the path below was
re-hung (see `tree.paths`), so `item_id` is not unique but `node` is.

Ordering never depends on wall-clock time: `seq` is an autoincrementing integer, `depth` is
the position on the path from the root.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# BigInteger on PostgreSQL, INTEGER PRIMARY KEY (rowid) on SQLite.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

items = Table(
    "items",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("node", String(32), nullable=False, unique=True),
    Column("parent", String(32), nullable=True),
    Column("depth", Integer, nullable=False),
    Column("tree", String(64), nullable=False),
    Column("item_id", String(64), nullable=False),
    Column("type", String(32), nullable=False),
    Column("role", String(16), nullable=True),
    Column("status", String(16), nullable=True),
    Column("response_id", String(64), nullable=True),
    Column("created_at", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),  # the item as it goes on the wire (JSON)
    Column("chat", LargeBinary, nullable=True),  # the item as a Chat Completions message (JSON), or NULL
    Column("project", String(64), nullable=False, server_default="default"),
    Index("ix_items_item_tree_seq", "item_id", "tree", "seq"),
    Index("ix_items_tree_seq", "tree", "seq"),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tree", String(64), nullable=False),
    Column("head", String(32), nullable=True),  # node, or NULL when empty
    Column("created_at", Integer, nullable=False),
    Column("metadata", Text, nullable=False),  # JSON object
    Column("forked_from_conversation", String(64), nullable=True),
    Column("forked_from_item", String(64), nullable=True),
    Column("project", String(64), nullable=False, server_default="default"),
)

# A conversation's metadata, one row per pair, kept with `conversations.metadata` (the object as
# the API shows it): what GET /v1/conversations filters on, by index.
conversation_metadata = Table(
    "conversation_metadata",
    metadata,
    Column("conversation_id", String(64), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(512), nullable=False),
    Index("ix_conversation_metadata_key_value", "key", "value", "conversation_id"),
)

responses = Table(
    "responses",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("conversation_id", String(64), nullable=True),
    Column("previous_response_id", String(64), nullable=True),
    Column("tree", String(64), nullable=False),
    Column("base_node", String(32), nullable=True),  # where the input hangs
    Column("input_node", String(32), nullable=True),  # last input node
    Column("input_count", Integer, nullable=False),
    Column("last_node", String(32), nullable=True),  # last node of input + output: what a follow-up chains from
    Column("body", LargeBinary, nullable=False),  # the Response object as it goes on the wire (JSON)
    Column("background", Boolean, nullable=False, default=False),
    # While a response runs (status queued / in_progress): the process running it and when it last
    # said so. A response whose owner stopped renewing is failed by any process's reaper.
    Column("owner", String(64), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("project", String(64), nullable=False, server_default="default"),
    Index("ix_responses_owner_status", "status", "owner"),
)

# Every SSE event of a stored streaming or background response, so that a stream can be
# resumed from any point, by any process, after the response finished or while it runs.
# With n > 1 each alternative's events are kept under its own response id.
events = Table(
    "events",
    metadata,
    Column("response_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),  # the event's sequence_number (in the whole stream)
    Column("frame", LargeBinary, nullable=False),  # the SSE frame as sent
    Column("alternative", Integer, nullable=False, server_default="0"),  # its index among the n
)

# A lease is a place in a conversation's line: the lowest live `seq` runs, the others wait.
# Leases expire unless renewed, so a crashed process never blocks a conversation for long.
leases = Table(
    "leases",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("conversation_id", String(64), nullable=False),
    Column("holder", String(64), nullable=False),  # the response id (or an items append) holding it
    Column("expires_at", Float, nullable=False),  # unix time
    Index("ix_leases_conversation_seq", "conversation_id", "seq"),
)

# Teams (docs/security.md): API keys, each of one project; only the secret's SHA-256 is kept.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(64), nullable=False),
    Column("name", String(128), nullable=True),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("hint", String(16), nullable=False),  # the secret's last characters, to tell keys apart
    Column("rpm", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("created_at", Integer, nullable=False),
    Column("last_used_at", Integer, nullable=True),
    Column("revoked_at", Integer, nullable=True),
)

# The concurrent responses of keys with `max_concurrent`: leases, renewed while held, that
# expire when their process dies.
key_slots = Table(
    "key_slots",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("key_id", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_key_slots_key_expires", "key_id", "expires_at"),
)

# Requests per key per minute (`rpm`): one counter per key and minute, counted up atomically.
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("window_start", Integer, primary_key=True),  # unix time of the minute's start
    Column("used", Integer, nullable=False),
)

# One record per (project, Idempotency-Key): the request's fingerprint, who runs it while it
# runs, and its reply once it is done (or the id of the response whose event log replays it).
idempotency = Table(
    "idempotency",
    metadata,
    Column("project", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # running | done
    Column("owner", String(64), nullable=True),
    Column("locked_until", Float, nullable=True),
    Column("resource_id", String(64), nullable=True),
    Column("status", Integer, nullable=True),
    Column("body", LargeBinary, nullable=True),
    Column("stream", Boolean, nullable=False, server_default="0"),
    Column("expires_at", Float, nullable=False),
    Index("ix_idempotency_expires", "expires_at"),
)

# Stored prompts (POST /v1/responses's `prompt`): a prompt holds its latest version's number;
# each version's content is one JSON document, never changed once written.
prompts = Table(
    "prompts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("project", String(64), nullable=False, server_default="default"),
)

prompt_versions = Table(
    "prompt_versions",
    metadata,
    Column("prompt_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("created_at", Integer, nullable=False),
    Column("data", Text, nullable=False),  # JSON: instructions, input, variables, metadata
)

# Values every process on this database shares, made on first start unless settings give them
# (the compaction key).
secrets = Table(
    "secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Integer, nullable=False),
)
