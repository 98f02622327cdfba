"""Connecting to the PostgreSQL queue's database, and reading its rows into the queue's model.

Split from `mailward.queue.postgres`, which owns the queue's operations: here are the connection
settings every queue connection gets, the one-sentence errors an operator sees when the database
cannot be reached, and the decoding of a message row (recipients included, as JSON) into a
`StoredMessage`, with undecodable records reported as `CorruptMessage` rather than raised.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from mailward.queue import (
    FINAL_STATUSES,
    CorruptMessage,
    Envelope,
    QueueError,
    QueueFull,
    Recipient,
    RecipientState,
    StoredMessage,
    TlsVerdict,
)

__all__ = ["MESSAGE_COLUMNS", "SELECT_MESSAGES", "configure", "connect", "connect_error",
           "decode_rows", "describe_url", "read_messages", "storage_error"]

_STORED_STATUSES = frozenset({"queued", "deferred", "delivered", "failed"})

# A message row with its recipients (as JSON, in order) in one row, so one statement reads it whole.
MESSAGE_COLUMNS = """m.id, m.envelope, m.size, m.digest, m.created_at, m.lease_owner, m.lease_expires_at,
       m.held, m.hold_reason,
       (SELECT json_agg(json_build_array(r.address, r.notify, r.orcpt, r.status, r.attempts,
                                         r.next_attempt_at, r.last_reply, r.last_attempt_at, r.tls)
                        ORDER BY r.seq)
          FROM recipient r WHERE r.message_id = m.id)"""
SELECT_MESSAGES = f"SELECT {MESSAGE_COLUMNS} FROM message m"


# --- connecting and errors ------------------------------------------------------------------------


def describe_url(url: str) -> str:
    """Where a URL points, for messages: host (or socket directory), port and database, never the
    password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL server in queue.url"
    host = str(params.get("host") or "the default socket")
    port = params.get("port")
    where = f"{host}:{port}" if port else host
    return f"PostgreSQL at {where}, database {params.get('dbname') or params.get('user') or '(default)'}"


def connect_error(url: str, exc: BaseException) -> QueueError:
    """One sentence for the operator: what is wrong with reaching the database and how to fix it."""
    try:
        password = str(conninfo_to_dict(url).get("password") or "")
    except psycopg.Error:
        # The parser's message may quote the URL, password included.
        return QueueError("queue.url is not a valid PostgreSQL URL; write it as "
                          "postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with special characters in the "
                          "password percent-encoded.")
    where = describe_url(url)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if password:
        text = text.replace(password, "***")
    if "password authentication failed" in text or "no password supplied" in text:
        return QueueError(f"{where} refused the login ({text}); check the user and password in queue.url "
                          "(or in ~/.pgpass).")
    if "does not exist" in text and "database" in text:
        return QueueError(f"{where} has no such database ({text}); create it (createdb) or fix the "
                          "database name in queue.url.")
    return QueueError(f"cannot connect to {where} ({text}); check that PostgreSQL is running and that "
                      "queue.url names its host, port and database.")


def storage_error(exc: BaseException) -> QueueError:
    """The QueueError a database failure becomes; the server turns any of them into a 451."""
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, psycopg.errors.DiskFull | psycopg.errors.OutOfMemory):
        return QueueFull(f"queue storage is full: {exc}")
    return QueueError(f"queue storage failed: {exc}")


async def configure(conn: AsyncConnection[Any]) -> None:
    # Set here rather than trusted from the server: the 250 depends on it.
    await conn.execute("SET synchronous_commit = on")


async def connect(url: str, *, timeout: float = 10.0) -> AsyncConnection[Any]:
    """One autocommit connection with the queue's settings; QueueError in one sentence if the
    server cannot be reached or refuses the login."""
    try:
        conn = await AsyncConnection.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)),
                                             application_name="mailward")
    except psycopg.Error as exc:
        raise connect_error(url, exc) from None
    try:
        await configure(conn)
    except psycopg.Error as exc:
        await conn.close()
        raise connect_error(url, exc) from None
    return conn


# --- decoding -------------------------------------------------------------------------------------


def _decode(row: Sequence[Any]) -> StoredMessage:
    id, envelope, size, digest, created_at, lease_owner, lease_expires_at, held, hold_reason, rcpts = row
    if not rcpts:
        raise ValueError("no recipients")
    recipients = []
    for address, notify, orcpt, status, attempts, next_at, last_reply, last_at, tls in rcpts:
        if status not in _STORED_STATUSES:
            raise ValueError(f"unknown recipient status {status!r}")
        recipients.append(RecipientState(
            recipient=Recipient(address=address, dsn_notify=frozenset(n for n in notify.split(",") if n),
                                dsn_orcpt=orcpt),
            status="held" if held and status not in FINAL_STATUSES else status,
            attempts=int(attempts),
            next_attempt_at=None if next_at is None else float(next_at),
            last_reply=last_reply,
            last_attempt_at=None if last_at is None else float(last_at),
            tls=None if tls is None else TlsVerdict.from_json(tls),
        ))
    return StoredMessage(
        id=id, envelope=Envelope.from_json(envelope), recipients=tuple(recipients), size=int(size),
        digest=str(digest), created_at=float(created_at), lease_owner=lease_owner,
        lease_expires_at=lease_expires_at, held=bool(held), hold_reason=hold_reason)


async def read_messages(conn: AsyncConnection[Any], where: str, args: Sequence[Any]
                         ) -> builtins.list[StoredMessage | CorruptMessage]:
    # One statement: it sees one snapshot, so a message is never read half-updated by another node.
    cur = await conn.execute(f"{SELECT_MESSAGES} WHERE {where}", args)
    return decode_rows(await cur.fetchall())


def decode_rows(rows: Sequence[Sequence[Any]]) -> builtins.list[StoredMessage | CorruptMessage]:
    out: builtins.list[StoredMessage | CorruptMessage] = []
    for row in rows:
        try:
            out.append(_decode(row))
        except (ValueError, TypeError, KeyError) as exc:
            out.append(CorruptMessage(row[0], f"undecodable record: {exc}"))
    return out
