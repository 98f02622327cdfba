"""The SQLite queue's tables and the statements each queue operation runs.

This module owns what is on disk: the schema and, for every operation of `SqliteQueue`, the SQL
that carries it out against a connection it is given. It does no scheduling and no asyncio; the
queue in `mailward.queue.sqlite` decides which thread runs each function and inside which
transaction (the writer's group-commit batch, or a reader's snapshot).

Contract with the writer: an operation that raises before writing anything needs no undo; one that
raises after writing makes the writer roll back its batch and run the others again without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mailward.queue import (
    FINAL_STATUSES,
    CorruptMessage,
    Envelope,
    LeaseLost,
    QueueError,
    Recipient,
    RecipientResult,
    RecipientState,
    StoredMessage,
    StsPolicyRecord,
    TlsRptTally,
    TlsVerdict,
    after_attempt,
    attempt_target,
)

log = logging.getLogger("mailward.queue")

SCHEMA_VERSION = 4

# Statements that bring a database of schema N up to N + 1, run at open inside the transaction
# that records the new version, so a crash leaves either schema, never a mix.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE recipient ADD COLUMN tls TEXT",),
    2: (),  # the sts_policy table is new and created with the schema
    3: (),  # so are the tlsrpt_tally and tlsrpt_sent tables
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS message (
    id TEXT PRIMARY KEY,
    envelope TEXT NOT NULL,          -- Envelope.to_json()
    size INTEGER NOT NULL,           -- body bytes
    digest TEXT NOT NULL,            -- sha256 hex of the body
    chunks INTEGER NOT NULL,         -- message_body rows
    created_at REAL NOT NULL,
    -- When lease() may next return the message: the earliest pending recipient's next attempt,
    -- or the lease expiry while a worker holds it, so one index answers "what is due".
    next_attempt_at REAL,
    lease_owner TEXT,
    lease_expires_at REAL,
    held INTEGER NOT NULL DEFAULT 0,
    hold_reason TEXT
);
CREATE INDEX IF NOT EXISTS message_due ON message (next_attempt_at) WHERE held = 0;
CREATE INDEX IF NOT EXISTS message_created ON message (created_at);

CREATE TABLE IF NOT EXISTS recipient (
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    address TEXT NOT NULL,
    notify TEXT NOT NULL,            -- comma-separated NOTIFY keywords, "" for the default
    orcpt TEXT,
    status TEXT NOT NULL,            -- queued | deferred | delivered | failed
    attempts INTEGER NOT NULL,
    next_attempt_at REAL,
    last_reply TEXT,
    last_attempt_at REAL,
    tls TEXT,                        -- TlsVerdict.to_json() of the last attempt, or NULL
    PRIMARY KEY (message_id, seq)
) WITHOUT ROWID;

-- The MTA-STS policy cache (RFC 8461 §10.2: persistent, so a restart is no window for a downgrade).
CREATE TABLE IF NOT EXISTS sts_policy (
    domain TEXT PRIMARY KEY,
    id TEXT NOT NULL,                -- the _mta-sts TXT id the policy was fetched under
    policy TEXT NOT NULL,            -- as served
    fetched_at REAL NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;

-- TLS reporting (RFC 8460): session counts per UTC day and policy, and the reports already sent.
-- policy_strings and mx_hosts are JSON arrays; result_type '' counts successful sessions.
CREATE TABLE IF NOT EXISTS tlsrpt_tally (
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy_strings TEXT NOT NULL,
    mx_hosts TEXT NOT NULL,
    result_type TEXT NOT NULL,
    sending_ip TEXT NOT NULL,
    receiving_mx TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    information TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy_type, policy_strings, mx_hosts, result_type, sending_ip,
                 receiving_mx, receiving_ip, reason_code, information)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS tlsrpt_sent (
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    report_id TEXT NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (day, domain)
) WITHOUT ROWID;

-- Large blobs belong in a rowid table (WITHOUT ROWID suits small rows only).
CREATE TABLE IF NOT EXISTS message_body (
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (message_id, seq)
);
"""

_STORED_STATUSES = frozenset({"queued", "deferred", "delivered", "failed"})
_MESSAGE_COLUMNS = "id, envelope, size, digest, created_at, lease_owner, lease_expires_at, held, hold_reason"
_RECIPIENT_COLUMNS = (
    "address, notify, orcpt, status, attempts, next_attempt_at, last_reply, last_attempt_at, tls")
_IN_CHUNK = 500  # ids per IN (...) list, well under SQLite's limit on bound parameters


def create_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables if missing, upgrade an older schema, refuse a newer one."""
    conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        else:
            version = int(row[0]) if str(row[0]).isdigit() else -1
            if version != SCHEMA_VERSION and version not in MIGRATIONS:
                raise QueueError(f"{path} has queue schema {row[0]}; this mailward reads schema "
                                 f"{SCHEMA_VERSION}")
            if version < SCHEMA_VERSION:
                for step in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step]:
                        conn.execute(statement)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
                log.info("%s: queue schema upgraded from %d to %d", path, version, SCHEMA_VERSION)
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


# --- writes (run by the writer thread, inside its batch transaction) ------------------------------


@dataclass(slots=True)
class NewMessage:
    """A message on its way from a transaction to the writer; the writer frees its body."""

    id: str
    envelope: Envelope
    recipients: tuple[Recipient, ...]
    size: int
    digest: str
    created_at: float
    buffer: bytearray
    spool: IO[bytes] | None

    def discard(self) -> None:
        self.buffer = bytearray()
        if self.spool is not None:
            self.spool.close()  # an unnamed file: closing it frees the space
            self.spool = None


def insert_message(conn: sqlite3.Connection, record: NewMessage, chunk_size: int) -> None:
    chunks = -(-record.size // chunk_size)
    conn.execute(
        "INSERT INTO message (id, envelope, size, digest, chunks, created_at, next_attempt_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record.id,
            record.envelope.to_json(),
            record.size,
            record.digest,
            chunks,
            record.created_at,
            record.created_at,
        ),
    )
    conn.executemany(
        f"INSERT INTO recipient (message_id, seq, {_RECIPIENT_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                record.id,
                seq,
                r.address,
                ",".join(sorted(r.dsn_notify)),
                r.dsn_orcpt,
                "queued",
                0,
                record.created_at,
                None,
                None,
                None,
            )
            for seq, r in enumerate(record.recipients)
        ],
    )
    insert = "INSERT INTO message_body (message_id, seq, data) VALUES (?, ?, ?)"
    if record.spool is None:
        with memoryview(record.buffer) as view:
            for seq in range(chunks):
                conn.execute(insert, (record.id, seq, view[seq * chunk_size : (seq + 1) * chunk_size]))
        return
    # Re-hash while copying: a spool file that changed under us must not be stored as if intact.
    spool = record.spool
    spool.seek(0)
    digest = hashlib.sha256()
    copied = 0
    for seq in range(chunks):
        data = spool.read(chunk_size)
        digest.update(data)
        copied += len(data)
        conn.execute(insert, (record.id, seq, data))
    if copied != record.size or spool.read(1) or digest.hexdigest() != record.digest:
        raise QueueError(f"message {record.id}: the spooled body changed before it was stored")


def lease(
    conn: sqlite3.Connection, owner: str, now: float, limit: int, expires: float
) -> list[StoredMessage]:
    # One statement, run by the only writer: two workers can never claim the same message. While
    # leased, next_attempt_at is the lease expiry, so an abandoned message comes due by itself.
    ids = [
        row[0]
        for row in conn.execute(
            "UPDATE message SET lease_owner = ?, lease_expires_at = ?, next_attempt_at = ?"
            " WHERE id IN (SELECT id FROM message WHERE held = 0 AND next_attempt_at <= ?"
            "  AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
            "  ORDER BY next_attempt_at, id LIMIT ?)"
            " RETURNING id",
            (owner, expires, expires, now, now, limit),
        ).fetchall()
    ]
    leased: list[StoredMessage] = []
    if not ids:
        return leased
    for message in read_messages(conn, f"id IN ({','.join('?' * len(ids))}) ORDER BY id", tuple(ids)):
        if isinstance(message, CorruptMessage):
            flag_corrupt(conn, message.message_id, message.detail)  # one bad record must not block all
        else:
            leased.append(message)
    leased.sort(key=lambda m: (m.next_attempt_at or 0.0, m.id))
    return leased


def renew(conn: sqlite3.Connection, id: str, owner: str, expires: float) -> None:
    cursor = conn.execute(
        "UPDATE message SET lease_expires_at = ?, next_attempt_at = ? WHERE id = ? AND lease_owner = ?",
        (expires, expires, id, owner),
    )
    if cursor.rowcount == 0:
        raise LeaseLost(id, owner)


def record_attempt(
    conn: sqlite3.Connection, id: str, owner: str, results: dict[str, RecipientResult], now: float
) -> StoredMessage | None:
    message, seq_of = attempt_target(read_messages(conn, "id = ?", (id,)), id, owner, results)
    for address, result in results.items():
        # The verdict of this attempt replaces the last one even when it is None: a listing
        # must not pair a new reply with the TLS of an older connection.
        conn.execute(
            "UPDATE recipient SET status = ?, attempts = attempts + 1, next_attempt_at = ?,"
            " last_reply = ?, last_attempt_at = ?, tls = ? WHERE message_id = ? AND seq = ?",
            (
                result.status,
                result.next_attempt_at,
                result.reply,
                now,
                None if result.tls is None else result.tls.to_json(),
                id,
                seq_of[address],
            ),
        )
    updated = after_attempt(message, results, now)
    if not updated.pending:
        delete(conn, id)
        return None
    conn.execute(
        "UPDATE message SET next_attempt_at = ?, lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
        (updated.next_attempt_at, id),
    )
    return updated


def retry(conn: sqlite3.Connection, ids: Sequence[str] | None, now: float) -> list[str]:
    """Make the pending recipients of unheld messages `ids` (None: all) due at `now`; returns
    the ids of the messages that are now due (or in delivery), in id order."""
    if ids is None:
        chunks: list[tuple[str, tuple[Any, ...]]] = [("held = 0", ())]
    else:
        unique = sorted(set(ids))
        chunks = [
            (f"held = 0 AND id IN ({','.join('?' * len(part))})", tuple(part))
            for part in (unique[i : i + _IN_CHUNK] for i in range(0, len(unique), _IN_CHUNK))
        ]
    due: list[str] = []
    for where, args in chunks:
        due += [row[0] for row in conn.execute(f"SELECT id FROM message WHERE {where} ORDER BY id", args)]
        conn.execute(
            "UPDATE recipient SET next_attempt_at = ? WHERE status IN ('queued', 'deferred')"
            " AND (next_attempt_at IS NULL OR next_attempt_at > ?)"
            f" AND message_id IN (SELECT id FROM message WHERE {where})",
            (now, now, *args),
        )
        # A leased message keeps its lease expiry as next_attempt_at: the worker that holds it
        # records its attempt, and record_attempt then finds the other recipients due.
        conn.execute(
            f"UPDATE message SET next_attempt_at = ? WHERE {where}"
            " AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
            " AND (next_attempt_at IS NULL OR next_attempt_at > ?)",
            (now, *args, now, now),
        )
    due.sort()
    return due


def flag_corrupt(conn: sqlite3.Connection, id: str, detail: str) -> None:
    log.error("message %s is corrupt, holding it for the operator: %s", id, detail)
    conn.execute("UPDATE message SET held = 1, hold_reason = ? WHERE id = ?", (f"corrupt: {detail}", id))


def hold(conn: sqlite3.Connection, id: str) -> bool:
    # Keep a corruption reason: the operator must still see why the message is unusable.
    cursor = conn.execute(
        "UPDATE message SET held = 1, hold_reason = CASE WHEN held = 1 THEN hold_reason ELSE 'operator' END"
        " WHERE id = ?",
        (id,),
    )
    return cursor.rowcount > 0


def release(conn: sqlite3.Connection, id: str) -> bool:
    cursor = conn.execute("UPDATE message SET held = 0, hold_reason = NULL WHERE id = ?", (id,))
    return cursor.rowcount > 0


def delete(conn: sqlite3.Connection, id: str) -> bool:
    conn.execute("DELETE FROM message_body WHERE message_id = ?", (id,))
    conn.execute("DELETE FROM recipient WHERE message_id = ?", (id,))
    return conn.execute("DELETE FROM message WHERE id = ?", (id,)).rowcount > 0


# --- reads (reader threads, and the writer inside its own transaction) ----------------------------


def read_messages(
    conn: sqlite3.Connection, where: str, args: tuple[Any, ...]
) -> list[StoredMessage | CorruptMessage]:
    """Messages matching `where`, read in one snapshot; undecodable ones as CorruptMessage."""
    own_txn = not conn.in_transaction
    if own_txn:
        conn.execute("BEGIN")
    try:
        rows = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE {where}", args).fetchall()
        out: list[StoredMessage | CorruptMessage] = []
        for row in rows:
            recipients = conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipient WHERE message_id = ? ORDER BY seq", (row[0],)
            ).fetchall()
            try:
                out.append(_decode_message(row, recipients))
            except (ValueError, TypeError) as exc:
                out.append(CorruptMessage(row[0], f"undecodable record: {exc}"))
        return out
    finally:
        if own_txn:
            conn.execute("COMMIT")


def _decode_message(row: tuple[Any, ...], recipient_rows: list[tuple[Any, ...]]) -> StoredMessage:
    id, envelope, size, digest, created_at, lease_owner, lease_expires_at, held, hold_reason = row
    if not recipient_rows:
        raise ValueError("no recipients")
    recipients = []
    for recipient_row in recipient_rows:
        address, notify, orcpt, status, attempts, next_attempt_at, last_reply, last_attempt_at, tls = (
            recipient_row)
        if status not in _STORED_STATUSES:
            raise ValueError(f"unknown recipient status {status!r}")
        recipients.append(
            RecipientState(
                recipient=Recipient(
                    address=address,
                    dsn_notify=frozenset(n for n in notify.split(",") if n),
                    dsn_orcpt=orcpt,
                ),
                status="held" if held and status not in FINAL_STATUSES else status,
                attempts=int(attempts),
                next_attempt_at=next_attempt_at,
                last_reply=last_reply,
                last_attempt_at=last_attempt_at,
                tls=None if tls is None else TlsVerdict.from_json(tls),
            )
        )
    return StoredMessage(
        id=id,
        envelope=Envelope.from_json(envelope),
        recipients=tuple(recipients),
        size=int(size),
        digest=str(digest),
        created_at=float(created_at),
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
        held=bool(held),
        hold_reason=hold_reason,
    )


def body_info(conn: sqlite3.Connection, id: str) -> tuple[int, str, int, int, int] | None:
    """(size, digest, chunks) as recorded, then (chunks, bytes) as actually stored."""
    # length() of a blob comes from the record header, so this check does not read the body.
    row = conn.execute(
        "SELECT size, digest, chunks,"
        " (SELECT count(*) FROM message_body WHERE message_id = message.id),"
        " (SELECT coalesce(sum(length(data)), 0) FROM message_body WHERE message_id = message.id)"
        " FROM message WHERE id = ?",
        (id,),
    ).fetchone()
    if row is None:
        return None
    return int(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4])


def body_chunk(conn: sqlite3.Connection, id: str, seq: int) -> bytes | None:
    row = conn.execute("SELECT data FROM message_body WHERE message_id = ? AND seq = ?", (id, seq)).fetchone()
    return None if row is None else bytes(row[0])


def message_exists(conn: sqlite3.Connection, id: str) -> bool:
    return conn.execute("SELECT 1 FROM message WHERE id = ?", (id,)).fetchone() is not None


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM message").fetchone()[0])


def oldest_created_at(conn: sqlite3.Connection) -> float | None:
    value = conn.execute("SELECT min(created_at) FROM message").fetchone()[0]
    return None if value is None else float(value)


def save_sts_policy(conn: sqlite3.Connection, record: StsPolicyRecord) -> None:
    conn.execute(
        "INSERT INTO sts_policy (domain, id, policy, fetched_at, expires_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (domain) DO UPDATE SET id = excluded.id, policy = excluded.policy,"
        " fetched_at = excluded.fetched_at, expires_at = excluded.expires_at",
        (record.domain, record.id, record.text, record.fetched_at, record.expires_at),
    )


def load_sts_policy(conn: sqlite3.Connection, domain: str) -> StsPolicyRecord | None:
    row = conn.execute("SELECT id, policy, fetched_at, expires_at FROM sts_policy WHERE domain = ?",
                       (domain,)).fetchone()
    if row is None:
        return None
    return StsPolicyRecord(domain, str(row[0]), str(row[1]), float(row[2]), float(row[3]))


_TALLY_KEY = ("day, domain, policy_type, policy_strings, mx_hosts, result_type, sending_ip, receiving_mx, "
              "receiving_ip, reason_code, information")


def add_tlsrpt_tallies(conn: sqlite3.Connection, tallies: Sequence[TlsRptTally]) -> None:
    conn.executemany(
        f"INSERT INTO tlsrpt_tally ({_TALLY_KEY}, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        f" ON CONFLICT ({_TALLY_KEY}) DO UPDATE SET count = count + excluded.count",
        [(t.day, t.domain, t.policy_type, json.dumps(list(t.policy_strings)), json.dumps(list(t.mx_hosts)),
          t.result_type, t.sending_ip, t.receiving_mx, t.receiving_ip, t.reason_code, t.information, t.count)
         for t in tallies],
    )


def load_tlsrpt_tallies(conn: sqlite3.Connection, day: str, domain: str | None) -> list[TlsRptTally]:
    query = f"SELECT {_TALLY_KEY}, count FROM tlsrpt_tally WHERE day = ?"
    args: tuple[str, ...] = (day,)
    if domain is not None:
        query += " AND domain = ?"
        args += (domain,)
    tallies: list[TlsRptTally] = []
    for row in conn.execute(query + " ORDER BY domain", args):
        try:
            strings, hosts = json.loads(row[3]), json.loads(row[4])
            if not (isinstance(strings, list) and isinstance(hosts, list)):
                raise ValueError("not a list")
        except ValueError:
            log.warning("TLS report tally for %s on %s is damaged; skipped", row[1], row[0])
            continue
        tallies.append(TlsRptTally(
            day=str(row[0]), domain=str(row[1]), policy_type=str(row[2]),
            policy_strings=tuple(map(str, strings)), mx_hosts=tuple(map(str, hosts)),
            result_type=str(row[5]), sending_ip=str(row[6]),
            receiving_mx=str(row[7]), receiving_ip=str(row[8]), reason_code=str(row[9]),
            information=str(row[10]), count=int(row[11])))
    return tallies


def mark_tlsrpt_sent(conn: sqlite3.Connection, day: str, domain: str, report_id: str, now: float) -> bool:
    cursor = conn.execute("INSERT INTO tlsrpt_sent (day, domain, report_id, sent_at) VALUES (?, ?, ?, ?)"
                          " ON CONFLICT (day, domain) DO NOTHING", (day, domain, report_id, now))
    return cursor.rowcount == 1


def tlsrpt_sent(conn: sqlite3.Connection, day: str) -> dict[str, str]:
    return {str(d): str(r) for d, r in conn.execute(
        "SELECT domain, report_id FROM tlsrpt_sent WHERE day = ?", (day,))}


def prune_tlsrpt(conn: sqlite3.Connection, before: str) -> None:
    conn.execute("DELETE FROM tlsrpt_tally WHERE day < ?", (before,))
    conn.execute("DELETE FROM tlsrpt_sent WHERE day < ?", (before,))


def next_due(conn: sqlite3.Connection) -> float | None:
    value = conn.execute("SELECT min(next_attempt_at) FROM message WHERE held = 0").fetchone()[0]
    return None if value is None else float(value)
