"""The shared queue backend: several mailward nodes accept into, and deliver from, one PostgreSQL.

This module owns how a queue that outlives any one node is kept: the tables (created and upgraded
only by `mailward queue migrate`, never by a starting server), receiving transactions, leases,
wake-ups between nodes, and the cross-node limit on connections per destination. It presents the
same `Queue` surface as the embedded SQLite backend, so `inbound`, `delivery`, `reports` and the
queue tool do not know which one they talk to. PostgreSQL features are used where each promise of
the queue needs one, and nothing is built that the server already does well:

* "250 means on disk" (DESIGN principle 5): a message, its recipients and its body are written in
  one PostgreSQL transaction, and `commit()` returns only after COMMIT did, on connections that set
  ``synchronous_commit = on`` themselves (a server default of ``off`` must not weaken the promise).
  Messages that finish while an earlier insert is in flight go into the next one together, one
  statement and one COMMIT for many (`postgres_body.Inserter`), and the server itself shares WAL
  flushes between concurrent commits of all nodes: durability does not cap throughput.
* Any node may deliver any message. `lease()` claims due rows with ``FOR UPDATE SKIP LOCKED``, so
  nodes leasing at the same moment skip each other's rows instead of queueing on their locks, and
  writes a visible owner and expiry: a node that dies leaves leases that simply expire, and the
  message becomes due to the others. `renew()` and `record_attempt()` check the owner.
* Idle deliverers sleep in `wait_for_work()` and are woken by ``LISTEN/NOTIFY``: every commit,
  release and retry sends a notification in its own transaction, which PostgreSQL delivers only
  if and when that transaction commits. The payload names the sending queue instance, so a node is
  not woken twice for its own changes.
* Per-destination limits hold across nodes through `destination_slot` rows with a short expiry
  (see `acquire_destination_slot`): a row per connection in flight, renewed while held, so the
  slots of a dead node free themselves.
* Bodies are bytea chunks behind `BodyStore`, stored uncompressed (a mail body is usually
  compressed or encoded already, and TOAST compression would cost CPU on every commit); their
  length and SHA-256 are checked on every read, as the SQLite backend does. A shared object store
  can take their place later by implementing `BodyStore`.

Times are epoch seconds from the callers, as in SQLite, so lease expiry compares clocks of
different nodes: keep them synchronised (NTP), as any cluster must.

Beside this module: `postgres_schema` (the tables and `queue migrate`), `postgres_rows`
(connecting, and rows into the model), `postgres_body` (bodies, receiving, group commit) and
`postgres_tool` (the `mailward queue` commands for a shared queue).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self, TypeVar

import psycopg
import psycopg.errors
from psycopg import AsyncConnection, AsyncCursor
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mailward.queue import (
    FINAL_STATUSES,
    CorruptMessage,
    Envelope,
    LeaseLost,
    MessageNotFound,
    QueueError,
    Recipient,
    RecipientResult,
    StoredMessage,
    StsPolicyRecord,
    TlsRptTally,
)
from mailward.queue.postgres_body import (
    CHANNEL,
    BodyStore,
    DatabaseBodies,
    Inserter,
    NewMessage,
    PostgresBodyReader,
    PostgresTransaction,
)
from mailward.queue.postgres_record import Recorder
from mailward.queue.postgres_rows import (
    MESSAGE_COLUMNS,
    configure,
    connect,
    connect_error,
    decode_rows,
    describe_url,
    read_messages,
    storage_error,
)
from mailward.queue.postgres_schema import SCHEMA_VERSION, schema_version

if TYPE_CHECKING:
    from mailward.queue import DestinationSlots, Queue, Transaction

__all__ = ["PostgresQueue", "connect", "describe_url"]

log = logging.getLogger("mailward.queue")

T = TypeVar("T")
_KIB = 1024
SLOT_SECONDS = 30.0  # a destination slot not renewed for this long belongs to a dead node
_RETRIES = 3  # attempts of a transaction PostgreSQL aborted for a deadlock or serialization failure
# --- the queue ------------------------------------------------------------------------------------


class PostgresQueue:
    """The shared queue. Create with ``await PostgresQueue.open(url)``; use from one event loop.

    Every node opens its own; they share everything through the database. `open` refuses a
    database whose schema `mailward queue migrate` has not brought to this version.
    """

    def __init__(self, url: str, *, pool_size: int = 10, chunk_size: int = 256 * _KIB,
                 spool_threshold: int = 256 * _KIB, bodies: BodyStore | None = None,
                 node: str | None = None, slot_seconds: float = SLOT_SECONDS) -> None:
        if chunk_size <= 0 or spool_threshold < 0 or pool_size <= 0 or slot_seconds <= 0:
            raise ValueError("chunk_size, pool_size and slot_seconds must be positive")
        self.url = url
        self.chunk_size = chunk_size
        self.spool_threshold = spool_threshold
        self.bodies: BodyStore = bodies or DatabaseBodies()
        # Names this queue instance in NOTIFY payloads and destination slots.
        self.node = node or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.slot_seconds = slot_seconds
        self._pool = AsyncConnectionPool(url, min_size=min(2, pool_size), max_size=pool_size, open=False,
                                         configure=configure, name="mailward-queue", timeout=30.0,
                                         kwargs={"autocommit": True, "application_name": "mailward"})
        self._work: asyncio.Event | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_conn: AsyncConnection[Any] | None = None
        self._slot_keeper: asyncio.Task[None] | None = None
        self._slots: dict[tuple[str, int], None] = {}
        self._closed = False
        self._opened = False
        self._live: set[PostgresTransaction] = set()
        self._inserter = Inserter(self)
        self._recorder = Recorder(self)

    # --- lifecycle ---

    @classmethod
    async def open(cls, url: str, **options: Any) -> PostgresQueue:
        """Connect and check the schema; QueueError (one sentence) if unreachable or not migrated."""
        queue = cls(url, **options)
        await queue._start()
        return queue

    async def _start(self) -> None:
        conn = await connect(self.url)
        try:
            version = await schema_version(conn)
        except psycopg.Error as exc:
            raise connect_error(self.url, exc) from None
        finally:
            await conn.close()
        where = describe_url(self.url)
        if version is None:
            raise QueueError(f"{where} has no mailward queue yet; run `mailward queue migrate` to create it.")
        if version < SCHEMA_VERSION:
            raise QueueError(f"{where} has queue schema {version}, older than this mailward's "
                             f"{SCHEMA_VERSION}; run `mailward queue migrate` to upgrade it.")
        if version > SCHEMA_VERSION:
            raise QueueError(f"{where} has queue schema {version}, newer than this mailward's "
                             f"{SCHEMA_VERSION}; run the mailward that migrated it.")
        try:
            await self._pool.open(wait=True, timeout=15.0)
        except (PoolTimeout, psycopg.Error) as exc:
            await self._pool.close()
            raise connect_error(self.url, exc) from None
        try:
            listening = await self._listen_connection()
        except psycopg.Error as exc:
            await self._pool.close()
            raise connect_error(self.url, exc) from None
        self._opened = True
        self._work = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen(listening))
        self._slot_keeper = loop.create_task(self._keep_slots())

    async def close(self) -> None:
        """Release this node's destination slots, stop listening, close every connection."""
        if self._closed:
            return
        self._closed = True
        for txn in builtins.list(self._live):
            txn._shutdown()
        await self._inserter.drain()  # commits already handed over finish, as they would in SQLite
        await self._recorder.drain()
        if self._work is not None:
            self._work.set()  # an idle deliverer wakes, and its next call learns the queue closed
        for task in (self._listener, self._slot_keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._listen_conn is not None:
            await self._listen_conn.close()
        if self._opened and self._slots:
            with contextlib.suppress(psycopg.Error, PoolTimeout):
                async with self._pool.connection(timeout=5.0) as conn:
                    await conn.execute("DELETE FROM destination_slot WHERE holder = %s", (self.node,))
        self._slots.clear()
        await self._pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed or not self._opened:
            raise QueueError("the queue is closed")

    async def _run(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]], *, closing: bool = False) -> T:
        """Run `fn` on a pooled connection; storage failures become QueueError. `fn` opens its own
        transaction when it needs one; one that PostgreSQL aborted to break a deadlock or a
        serialization conflict changed nothing, so it is run again. `closing`: also while close()
        waits for it."""
        if not closing:
            self._check_open()
        for attempt in range(_RETRIES):
            try:
                async with self._pool.connection() as conn:
                    return await fn(conn)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise QueueError("queue storage stayed busy with conflicting changes") from None
                await asyncio.sleep(0.01 * (attempt + 1))
            except (psycopg.Error, PoolTimeout) as exc:
                raise storage_error(exc) from exc
        raise AssertionError("unreachable")

    async def _notify(self, cur: AsyncCursor[Any]) -> None:
        # Delivered to listeners only if and when the surrounding transaction commits.
        await cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.node))

    def _wake(self) -> None:
        if self._work is not None:
            self._work.set()

    async def _listen_connection(self) -> AsyncConnection[Any]:
        conn = await AsyncConnection.connect(self.url, autocommit=True, application_name="mailward")
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        self._listen_conn = conn
        return conn

    async def _listen(self, conn: AsyncConnection[Any]) -> None:
        """Wake `wait_for_work` on other nodes' commits, releases and retries. If the connection
        drops, reconnect, and wake then too, since notifications may have been missed."""
        delay = 0.5
        while True:
            try:
                async with conn:
                    async for notice in conn.notifies():
                        if notice.payload != self.node:
                            self._wake()
            except psycopg.Error as exc:
                log.warning("queue notifications interrupted (%s); reconnecting", exc)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                try:
                    conn = await self._listen_connection()
                except psycopg.Error as exc:
                    log.warning("queue notifications unavailable (%s); retrying in %.0fs", exc, delay)
                    continue
                delay = 0.5
                self._wake()
                break

    # --- receiving ---

    async def begin(self, envelope: Envelope) -> PostgresTransaction:
        self._check_open()
        txn = PostgresTransaction(self, envelope)
        self._live.add(txn)
        return txn

    async def _store(self, txn: PostgresTransaction, recipients: Sequence[Recipient], size: int, digest: str,
                     chunks: Callable[[], Iterator[bytes]], created_at: float, *, in_memory: bool) -> None:
        n_chunks = -(-size // self.chunk_size)
        if in_memory and isinstance(self.bodies, DatabaseBodies):
            # The common case, a body held in memory: one statement (one round trip) that commits
            # and notifies as a whole, shared with the messages that finish at the same time.
            await self._inserter.add(NewMessage(
                txn.id, txn.envelope.to_json(), size, digest, n_chunks, created_at,
                tuple((r.address, ",".join(sorted(r.dsn_notify)), r.dsn_orcpt) for r in recipients),
                builtins.list(chunks())))
            self._wake()
            return

        async def store(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    "INSERT INTO message (id, envelope, size, digest, chunks, created_at, next_attempt_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (txn.id, txn.envelope.to_json(), size, digest, n_chunks, created_at, created_at))
                await cur.executemany(
                    "INSERT INTO recipient (message_id, seq, address, notify, orcpt, status, attempts,"
                    " next_attempt_at) VALUES (%s, %s, %s, %s, %s, 'queued', 0, %s)",
                    [(txn.id, seq, r.address, ",".join(sorted(r.dsn_notify)), r.dsn_orcpt, created_at)
                     for seq, r in enumerate(recipients)])
                stored = await self.bodies.store(cur, txn.id, chunks())
                if stored != n_chunks:
                    raise QueueError(f"message {txn.id}: {stored} body chunks stored, {n_chunks} expected")
                await self._notify(cur)

        await self._run(store)
        self._wake()

    async def import_message(self, message: StoredMessage, body: bytes) -> bool:
        """Store a message exported from another queue with its id, times, recipient states and hold;
        False if a message with that id is already here (so an import can be run again)."""
        if len(body) != message.size or hashlib.sha256(body).hexdigest() != message.digest:
            raise CorruptMessage(message.id, "the body does not match its recorded length and digest")
        n_chunks = -(-len(body) // self.chunk_size)
        pending = [r.next_attempt_at for r in message.recipients
                   if not r.is_final and r.next_attempt_at is not None]
        if not message.pending:
            return False  # nothing left to deliver

        async def insert(conn: AsyncConnection[Any]) -> bool:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    "INSERT INTO message (id, envelope, size, digest, chunks, created_at, next_attempt_at,"
                    " held, hold_reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (message.id, message.envelope.to_json(), message.size, message.digest, n_chunks,
                     message.created_at, min(pending) if pending else message.created_at, message.held,
                     message.hold_reason))
                if cur.rowcount == 0:
                    return False
                rows = []
                for seq, r in enumerate(message.recipients):
                    # A held message lists its pending recipients as "held"; they were waiting.
                    status = r.status if r.status != "held" else "deferred" if r.attempts else "queued"
                    next_at = None if status in FINAL_STATUSES else r.next_attempt_at or message.created_at
                    rows.append((message.id, seq, r.recipient.address,
                                 ",".join(sorted(r.recipient.dsn_notify)), r.recipient.dsn_orcpt, status,
                                 r.attempts, next_at, r.last_reply, r.last_attempt_at,
                                 None if r.tls is None else r.tls.to_json()))
                await cur.executemany(
                    "INSERT INTO recipient (message_id, seq, address, notify, orcpt, status, attempts,"
                    " next_attempt_at, last_reply, last_attempt_at, tls)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
                await self.bodies.store(cur, message.id, (body[i:i + self.chunk_size]
                                                          for i in range(0, len(body), self.chunk_size)))
                await self._notify(cur)
                return True

        return await self._run(insert)

    # --- delivery ---

    async def lease(self, owner: str, now: float, limit: int, lease_seconds: float
                    ) -> builtins.list[StoredMessage]:
        if limit <= 0:
            return []
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        expires = now + lease_seconds

        async def claim(conn: AsyncConnection[Any]) -> builtins.list[StoredMessage | CorruptMessage]:
            # One statement (its own transaction, one round trip) claims and returns the messages.
            # SKIP LOCKED: rows another node is claiming right now are its own; take the next.
            # While leased, next_attempt_at is the lease expiry, so an abandoned message comes
            # due by itself on every node.
            cur = await conn.execute(
                "WITH due AS (SELECT id FROM message WHERE NOT held AND next_attempt_at <= %(now)s"
                "  AND (lease_expires_at IS NULL OR lease_expires_at <= %(now)s)"
                "  ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE message m SET lease_owner = %(owner)s, lease_expires_at = %(expires)s,"
                "  next_attempt_at = %(expires)s FROM due WHERE m.id = due.id"
                f" RETURNING {MESSAGE_COLUMNS}",
                {"now": now, "limit": limit, "owner": owner, "expires": expires})
            return decode_rows(await cur.fetchall())

        leased: builtins.list[StoredMessage] = []
        for message in await self._run(claim):
            if isinstance(message, CorruptMessage):
                with contextlib.suppress(CorruptMessage):  # one bad record must not block the rest
                    await self._corrupt(message.message_id, message.detail)
            else:
                leased.append(message)
        leased.sort(key=lambda m: (m.next_attempt_at or 0.0, m.id))
        return leased

    async def renew(self, id: str, owner: str, lease_seconds: float, now: float) -> float:
        expires = now + lease_seconds

        async def extend(conn: AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "UPDATE message SET lease_expires_at = %s, next_attempt_at = %s"
                " WHERE id = %s AND lease_owner = %s",
                (expires, expires, id, owner))
            return cur.rowcount

        if await self._run(extend) == 0:
            raise LeaseLost(id, owner)
        return expires

    async def open_body(self, id: str) -> PostgresBodyReader:
        async def info(conn: AsyncConnection[Any]) -> tuple[int, str, int, int, int, bytes | None] | None:
            if isinstance(self.bodies, DatabaseBodies):
                # One round trip: the record, what is stored, and the first chunk, which for most
                # mail is the whole body.
                cur = await conn.execute(
                    "SELECT m.size, m.digest, m.chunks, count(b.seq), coalesce(sum(octet_length(b.data)), 0),"
                    " (SELECT data FROM message_body WHERE message_id = m.id AND seq = 0)"
                    " FROM message m LEFT JOIN message_body b ON b.message_id = m.id"
                    " WHERE m.id = %s GROUP BY m.id", (id,))
                row = await cur.fetchone()
                if row is None:
                    return None
                first = None if row[5] is None else bytes(row[5])
                return int(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]), first
            cur = await conn.execute("SELECT size, digest, chunks FROM message WHERE id = %s", (id,))
            row = await cur.fetchone()
            if row is None:
                return None
            stored_chunks, stored_bytes = await self.bodies.stat(conn, id)
            return int(row[0]), str(row[1]), int(row[2]), stored_chunks, stored_bytes, None

        found = await self._run(info)
        if found is None:
            raise MessageNotFound(id)
        size, digest, chunks, stored_chunks, stored_bytes, first = found
        if stored_chunks != chunks or stored_bytes != size:
            await self._corrupt(
                id, f"body has {stored_chunks} of {chunks} chunks, {stored_bytes} of {size} bytes")
        return PostgresBodyReader(self, id, size, digest, chunks, first)

    async def _chunk(self, id: str, seq: int) -> bytes | None:
        return await self._run(lambda conn: self.bodies.chunk(conn, id, seq))

    async def record_attempt(self, id: str, owner: str, results: Mapping[str, RecipientResult], now: float
                             ) -> StoredMessage | None:
        self._check_open()
        try:
            return await self._recorder.record(id, owner, results, now)
        except CorruptMessage as exc:
            await self._corrupt(id, exc.detail)

    async def _corrupt(self, id: str, detail: str) -> NoReturn:
        log.error("message %s is corrupt, holding it for the operator: %s", id, detail)
        try:
            await self._run(lambda conn: conn.execute(
                "UPDATE message SET held = true, hold_reason = %s WHERE id = %s", (f"corrupt: {detail}", id)))
        except QueueError as exc:
            log.error("message %s is corrupt (%s) and could not be held: %s", id, detail, exc)
        raise CorruptMessage(id, detail)

    # --- operator ---

    async def hold(self, id: str) -> bool:
        # Keep a corruption reason: the operator must still see why the message is unusable.
        async def hold(conn: AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "UPDATE message SET held = true,"
                " hold_reason = CASE WHEN held THEN hold_reason ELSE 'operator' END WHERE id = %s", (id,))
            return cur.rowcount > 0

        return await self._run(hold)

    async def release(self, id: str) -> bool:
        async def release(conn: AsyncConnection[Any]) -> bool:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute("UPDATE message SET held = false, hold_reason = NULL WHERE id = %s", (id,))
                if cur.rowcount == 0:
                    return False
                await self._notify(cur)
                return True

        released = await self._run(release)
        if released:
            self._wake()
        return released

    async def retry(self, ids: Sequence[str] | None, now: float) -> int:
        return len(await self.retry_ids(ids, now))

    async def retry_ids(self, ids: Sequence[str] | None, now: float) -> builtins.list[str]:
        """`retry`, returning the ids of the messages now due (or in delivery), in id order."""
        chosen = None if ids is None else sorted(set(ids))
        if chosen == []:
            return []
        where = "NOT held" if chosen is None else "NOT held AND id = ANY(%(ids)s)"
        args = {"now": now, "ids": chosen}

        async def retry(conn: AsyncConnection[Any]) -> builtins.list[str]:
            async with conn.transaction(), conn.cursor() as cur:
                # Message rows first, in id order, as every other change locks them: no deadlocks.
                await cur.execute(f"SELECT id FROM message WHERE {where} ORDER BY id FOR UPDATE", args)
                due: builtins.list[str] = [row[0] for row in await cur.fetchall()]
                if not due:
                    return due
                await cur.execute(
                    "UPDATE recipient SET next_attempt_at = %(now)s WHERE status IN ('queued', 'deferred')"
                    " AND (next_attempt_at IS NULL OR next_attempt_at > %(now)s)"
                    " AND message_id = ANY(%(due)s)",
                    {"now": now, "due": due})
                # A leased message keeps its lease expiry as next_attempt_at: the node holding it
                # records its attempt, and record_attempt then finds the other recipients due.
                await cur.execute(
                    "UPDATE message SET next_attempt_at = %(now)s WHERE id = ANY(%(due)s)"
                    " AND (lease_expires_at IS NULL OR lease_expires_at <= %(now)s)"
                    " AND (next_attempt_at IS NULL OR next_attempt_at > %(now)s)", {"now": now, "due": due})
                await self._notify(cur)
                return due

        due = await self._run(retry)
        if due:
            self._wake()
        return due

    async def delete(self, id: str) -> bool:
        async def delete(conn: AsyncConnection[Any]) -> bool:
            async with conn.transaction(), conn.cursor() as cur:
                return await self._delete(cur, id)

        return await self._run(delete)

    async def _delete_many(self, cur: AsyncCursor[Any], ids: Sequence[str]) -> None:
        """Remove messages whose rows this transaction has locked."""
        if isinstance(self.bodies, DatabaseBodies):
            await cur.execute(
                "WITH body AS (DELETE FROM message_body WHERE message_id = ANY(%(ids)s)),"
                " recipients AS (DELETE FROM recipient WHERE message_id = ANY(%(ids)s))"
                " DELETE FROM message WHERE id = ANY(%(ids)s)", {"ids": list(ids)})
            return
        for id in ids:
            await self._delete(cur, id)

    async def _delete(self, cur: AsyncCursor[Any], id: str) -> bool:
        if isinstance(self.bodies, DatabaseBodies):
            # One statement; the foreign keys are checked at its end, when all three are gone.
            await cur.execute(
                "WITH body AS (DELETE FROM message_body WHERE message_id = %(id)s),"
                " recipients AS (DELETE FROM recipient WHERE message_id = %(id)s)"
                " DELETE FROM message WHERE id = %(id)s", {"id": id})
            return cur.rowcount > 0
        await cur.execute("SELECT 1 FROM message WHERE id = %s FOR UPDATE", (id,))
        if await cur.fetchone() is None:
            return False
        await self.bodies.remove(cur, id)
        await cur.execute("DELETE FROM recipient WHERE message_id = %s", (id,))
        await cur.execute("DELETE FROM message WHERE id = %s", (id,))
        return True

    # --- reading ---

    async def get(self, id: str) -> StoredMessage | None:
        found = await self._run(lambda conn: read_messages(conn, "m.id = %s", (id,)))
        if not found:
            return None
        message = found[0]
        if isinstance(message, CorruptMessage):
            await self._corrupt(message.message_id, message.detail)
        return message

    async def list(self, limit: int = 100, after: str | None = None) -> builtins.list[StoredMessage]:
        found = await self._run(lambda conn: read_messages(
            conn, "m.id > %s ORDER BY m.id LIMIT %s", (after or "", max(0, limit))))
        listed: builtins.list[StoredMessage] = []
        for message in found:
            if isinstance(message, CorruptMessage):
                # Listed or not, a record that cannot be decoded must be held and reported.
                with contextlib.suppress(CorruptMessage):
                    await self._corrupt(message.message_id, message.detail)
            else:
                listed.append(message)
        return listed

    async def scan(self, limit: int = 100, after: str | None = None
                   ) -> builtins.list[StoredMessage | CorruptMessage]:
        """`list` for the operator's tools: undecodable records come back as CorruptMessage (to be
        reported) instead of being held, so looking changes nothing."""
        return await self._run(lambda conn: read_messages(
            conn, "m.id > %s ORDER BY m.id LIMIT %s", (after or "", max(0, limit))))

    async def _scalar(self, query: str, args: Sequence[Any] = ()) -> Any:
        async def read(conn: AsyncConnection[Any]) -> Any:
            cur = await conn.execute(query, args)
            row = await cur.fetchone()
            return None if row is None else row[0]

        return await self._run(read)

    async def count(self) -> int:
        return int(await self._scalar("SELECT count(*) FROM message"))

    async def oldest_age(self, now: float) -> float:
        oldest = await self._scalar("SELECT min(created_at) FROM message")
        return 0.0 if oldest is None else max(0.0, now - float(oldest))

    async def next_due(self) -> float | None:
        value = await self._scalar("SELECT min(next_attempt_at) FROM message WHERE NOT held")
        return None if value is None else float(value)

    async def wait_for_work(self, timeout: float | None) -> bool:
        self._check_open()
        assert self._work is not None
        try:
            async with asyncio.timeout(timeout):
                await self._work.wait()
        except TimeoutError:
            return False
        self._work.clear()
        return True

    # --- MTA-STS policy cache, shared by every node ---

    async def load_sts_policy(self, domain: str) -> StsPolicyRecord | None:
        async def load(conn: AsyncConnection[Any]) -> StsPolicyRecord | None:
            cur = await conn.execute(
                "SELECT id, policy, fetched_at, expires_at FROM sts_policy WHERE domain = %s", (domain,))
            row = await cur.fetchone()
            return None if row is None else StsPolicyRecord(domain, str(row[0]), str(row[1]), float(row[2]),
                                                             float(row[3]))

        return await self._run(load)

    async def save_sts_policy(self, policy: StsPolicyRecord) -> None:
        async def save(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                # A lost cache write costs one more fetch, not a message: no need to wait for the flush.
                await conn.execute("SET LOCAL synchronous_commit = off")
                await conn.execute(
                    "INSERT INTO sts_policy (domain, id, policy, fetched_at, expires_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (domain) DO UPDATE SET id = excluded.id,"
                    " policy = excluded.policy, fetched_at = excluded.fetched_at,"
                    " expires_at = excluded.expires_at",
                    (policy.domain, policy.id, policy.text, policy.fetched_at, policy.expires_at))

        await self._run(save)

    # --- TLS reporting (RFC 8460): every node's sessions add up in the same rows ---

    async def add_tlsrpt_tallies(self, tallies: Sequence[TlsRptTally]) -> None:
        """Add session counts to the day's tallies (rows with the same key add up)."""
        if not tallies:
            return

        async def add(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute("SET LOCAL synchronous_commit = off")  # a count, not a message
                await cur.executemany(
                    f"INSERT INTO tlsrpt_tally ({_TALLY_KEY}, count) VALUES"
                    " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    f" ON CONFLICT ({_TALLY_KEY}) DO UPDATE SET count = tlsrpt_tally.count + excluded.count",
                    [(t.day, t.domain, t.policy_type, builtins.list(t.policy_strings),
                      builtins.list(t.mx_hosts), t.result_type, t.sending_ip, t.receiving_mx,
                      t.receiving_ip, t.reason_code, t.information, t.count) for t in tallies])

        await self._run(add)

    async def load_tlsrpt_tallies(self, day: str, domain: str | None = None) -> builtins.list[TlsRptTally]:
        query = f"SELECT {_TALLY_KEY}, count FROM tlsrpt_tally WHERE day = %s"
        args: tuple[str, ...] = (day,)
        if domain is not None:
            query += " AND domain = %s"
            args += (domain,)

        async def load(conn: AsyncConnection[Any]) -> builtins.list[Any]:
            cur = await conn.execute(query + " ORDER BY domain", args)
            return await cur.fetchall()

        return [TlsRptTally(day=str(r[0]), domain=str(r[1]), policy_type=str(r[2]),
                            policy_strings=tuple(map(str, r[3])), mx_hosts=tuple(map(str, r[4])),
                            result_type=str(r[5]), sending_ip=str(r[6]), receiving_mx=str(r[7]),
                            receiving_ip=str(r[8]), reason_code=str(r[9]), information=str(r[10]),
                            count=int(r[11]))
                for r in await self._run(load)]

    async def mark_tlsrpt_sent(self, day: str, domain: str, report_id: str, now: float) -> bool:
        """Record that the report for (day, domain) went out; False if it was recorded before (by
        any node: the first to mark it sends it)."""
        async def mark(conn: AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "INSERT INTO tlsrpt_sent (day, domain, report_id, sent_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (day, domain) DO NOTHING", (day, domain, report_id, now))
            return cur.rowcount == 1

        return await self._run(mark)

    async def tlsrpt_sent(self, day: str) -> dict[str, str]:
        """The domains whose report for `day` went out, with the report ids."""
        async def sent(conn: AsyncConnection[Any]) -> dict[str, str]:
            cur = await conn.execute("SELECT domain, report_id FROM tlsrpt_sent WHERE day = %s", (day,))
            return {str(d): str(r) for d, r in await cur.fetchall()}

        return await self._run(sent)

    async def prune_tlsrpt(self, before: str) -> None:
        """Forget tallies and sent marks of days before `before` (YYYY-MM-DD)."""
        async def prune(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM tlsrpt_tally WHERE day < %s", (before,))
                await conn.execute("DELETE FROM tlsrpt_sent WHERE day < %s", (before,))

        await self._run(prune)

    # --- connections per destination, across nodes ---

    async def acquire_destination_slot(self, destination: str, limit: int, now: float) -> int | None:
        """Claim one of `limit` connection slots of `destination` shared by every node; the slot
        number, or None when all are taken. Held slots are renewed in the background until
        released, so a node that dies frees its slots after `slot_seconds`."""
        if limit <= 0:
            return None
        expires = now + self.slot_seconds

        async def claim(conn: AsyncConnection[Any]) -> int | None:
            # Two nodes may pick the same free number; the loser's INSERT waits on the winner's
            # row, then finds it live and updates nothing, and tries the next number.
            for _ in range(3):
                cur = await conn.execute(
                    "WITH free AS (SELECT s FROM generate_series(0, %(limit)s - 1) s WHERE NOT EXISTS"
                    "  (SELECT 1 FROM destination_slot d WHERE d.destination = %(dest)s AND d.slot = s"
                    "   AND d.expires_at > %(now)s) ORDER BY random() LIMIT 1)"
                    " INSERT INTO destination_slot (destination, slot, holder, expires_at)"
                    " SELECT %(dest)s, s, %(node)s, %(expires)s FROM free"
                    " ON CONFLICT (destination, slot) DO UPDATE SET holder = excluded.holder,"
                    "  expires_at = excluded.expires_at WHERE destination_slot.expires_at <= %(now)s"
                    " RETURNING slot",
                    {"limit": limit, "dest": destination, "now": now, "node": self.node, "expires": expires})
                row = await cur.fetchone()
                if row is not None:
                    return int(row[0])
                if cur.rowcount == 0 and not await _any_free(conn, destination, limit, now):
                    return None
            return None

        slot = await self._run(claim)
        if slot is not None:
            self._slots[(destination, slot)] = None
        return slot

    async def release_destination_slot(self, destination: str, slot: int) -> None:
        self._slots.pop((destination, slot), None)
        await self._run(lambda conn: conn.execute(
            "DELETE FROM destination_slot WHERE destination = %s AND slot = %s AND holder = %s",
            (destination, slot, self.node)))

    async def _keep_slots(self) -> None:
        while True:
            await asyncio.sleep(self.slot_seconds / 3)
            if not self._slots:
                continue
            held = builtins.list(self._slots)
            args = (time.time() + self.slot_seconds, self.node, [d for d, _ in held], [s for _, s in held])
            try:
                await self._run(functools.partial(_execute, query=
                    "UPDATE destination_slot SET expires_at = %s WHERE holder = %s"
                    " AND (destination, slot) IN (SELECT * FROM unnest(%s::text[], %s::int[]))", args=args))
            except QueueError as exc:
                log.warning("cannot renew destination slots: %s", exc)


async def _execute(conn: AsyncConnection[Any], query: str, args: Sequence[Any] | Mapping[str, Any]) -> None:
    await conn.execute(query, args)


async def _any_free(conn: AsyncConnection[Any], destination: str, limit: int, now: float) -> bool:
    cur = await conn.execute("SELECT count(*) FROM destination_slot WHERE destination = %s AND slot < %s"
                             " AND expires_at > %s", (destination, limit, now))
    row = await cur.fetchone()
    return row is not None and int(row[0]) < limit


_TALLY_KEY = ("day, domain, policy_type, policy_strings, mx_hosts, result_type, sending_ip, receiving_mx, "
              "receiving_ip, reason_code, information")


if TYPE_CHECKING:

    def _conforms(queue: PostgresQueue, txn: PostgresTransaction) -> tuple[Queue, Transaction,
                                                                             DestinationSlots]:
        return queue, txn, queue
