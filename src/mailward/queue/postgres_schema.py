"""The PostgreSQL queue's tables, and `mailward queue migrate`, the only thing that changes them.

A server never creates or upgrades the schema by itself: with several nodes sharing one database,
the node that happens to start first must not decide when the tables change under the others.
The operator runs `mailward queue migrate` once per upgrade; a node refuses to start against an
older schema and says so (see `PostgresQueue.open`).

Migrations run in one transaction under an advisory lock, so two `migrate` commands at once
serialise and a crash leaves either schema, never a mix (PostgreSQL's DDL is transactional).
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

__all__ = ["MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "migrate", "schema_version"]

SCHEMA_VERSION = 1

# Statements that bring schema N to N + 1; the first schema is SCHEMA.
MIGRATIONS: dict[int, tuple[str, ...]] = {}

_LOCK_KEY = 0x6D61696C77617264  # "mailward": an advisory lock no other application is likely to use

SCHEMA = (
    """CREATE TABLE meta (
        key text PRIMARY KEY,
        value text NOT NULL)""",
    # Times are epoch seconds (double precision) passed in by the callers, as in the SQLite queue.
    """CREATE TABLE message (
        id text PRIMARY KEY,
        envelope text NOT NULL,             -- Envelope.to_json()
        size bigint NOT NULL,               -- body bytes
        digest text NOT NULL,               -- sha256 hex of the body
        chunks integer NOT NULL,            -- body chunks
        created_at double precision NOT NULL,
        -- When lease() may next return the message: the earliest pending recipient's next attempt,
        -- or the lease expiry while a node holds it, so one index answers "what is due" everywhere.
        next_attempt_at double precision,
        lease_owner text,
        lease_expires_at double precision,
        held boolean NOT NULL DEFAULT false,
        hold_reason text)""",
    "CREATE INDEX message_due ON message (next_attempt_at, id) WHERE NOT held",
    "CREATE INDEX message_created ON message (created_at)",
    """CREATE TABLE recipient (
        message_id text NOT NULL REFERENCES message (id),
        seq integer NOT NULL,
        address text NOT NULL,
        notify text NOT NULL,               -- comma-separated NOTIFY keywords, '' for the default
        orcpt text,
        status text NOT NULL,               -- queued | deferred | delivered | failed
        attempts integer NOT NULL,
        next_attempt_at double precision,
        last_reply text,
        last_attempt_at double precision,
        tls text,                           -- TlsVerdict.to_json() of the last attempt, or NULL
        PRIMARY KEY (message_id, seq))""",
    """CREATE TABLE message_body (
        message_id text NOT NULL REFERENCES message (id),
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (message_id, seq))""",
    # Out of line and uncompressed: mail is mostly compressed or encoded already, and compressing it
    # would cost CPU on every commit for little space.
    "ALTER TABLE message_body ALTER COLUMN data SET STORAGE EXTERNAL",
    # The MTA-STS policy cache (RFC 8461 §10.2), shared so every node enforces what one fetched.
    """CREATE TABLE sts_policy (
        domain text PRIMARY KEY,
        id text NOT NULL,
        policy text NOT NULL,
        fetched_at double precision NOT NULL,
        expires_at double precision NOT NULL)""",
    # TLS reporting (RFC 8460): every node's sessions add up in the same rows.
    """CREATE TABLE tlsrpt_tally (
        day text NOT NULL,
        domain text NOT NULL,
        policy_type text NOT NULL,
        policy_strings text[] NOT NULL,
        mx_hosts text[] NOT NULL,
        result_type text NOT NULL,
        sending_ip text NOT NULL,
        receiving_mx text NOT NULL,
        receiving_ip text NOT NULL,
        reason_code text NOT NULL,
        information text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (day, domain, policy_type, policy_strings, mx_hosts, result_type, sending_ip,
                     receiving_mx, receiving_ip, reason_code, information))""",
    """CREATE TABLE tlsrpt_sent (
        day text NOT NULL,
        domain text NOT NULL,
        report_id text NOT NULL,
        sent_at double precision NOT NULL,
        PRIMARY KEY (day, domain))""",
    # Connections in flight per destination across nodes: one row per slot taken, renewed by its
    # holder while the connection lasts; a row past expires_at is free for anyone to take.
    """CREATE TABLE destination_slot (
        destination text NOT NULL,
        slot integer NOT NULL,
        holder text NOT NULL,
        expires_at double precision NOT NULL,
        PRIMARY KEY (destination, slot))""",
)


async def schema_version(conn: AsyncConnection[Any]) -> int | None:
    """The schema version recorded in the database; None when there is no queue (no meta table)."""
    cur = await conn.execute("SELECT to_regclass('meta') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    cur = await conn.execute("SELECT value FROM meta WHERE key = 'schema'")
    row = await cur.fetchone()
    if row is None or not str(row[0]).isdigit():
        return -1
    return int(row[0])


async def migrate(conn: AsyncConnection[Any]) -> tuple[int | None, int]:
    """Create or upgrade the queue's tables on an autocommit connection; returns (version before,
    version after). Raises ValueError for a schema newer than this mailward's."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        before = await schema_version(conn)
        if before is None:
            for statement in SCHEMA:
                await conn.execute(statement)  # constants, never user text
            await conn.execute("INSERT INTO meta (key, value) VALUES ('schema', %s)", (str(SCHEMA_VERSION),))
            return None, SCHEMA_VERSION
        if before > SCHEMA_VERSION or (before < SCHEMA_VERSION and before not in MIGRATIONS):
            raise ValueError(f"the database has queue schema {before}, which this mailward (schema "
                             f"{SCHEMA_VERSION}) cannot migrate; use the mailward that wrote it.")
        for step in range(before, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        await conn.execute("UPDATE meta SET value = %s WHERE key = 'schema'", (str(SCHEMA_VERSION),))
    return before, SCHEMA_VERSION

