"""Message bodies of the PostgreSQL queue: how they are stored, received (with group commit) and
read back verified.

Split from `mailward.queue.postgres`, which owns the queue itself. `BodyStore` is the seam where a
shared object store can later replace the bytea rows of `DatabaseBodies`. With `DatabaseBodies`
the queue takes shortcuts that only a body in the same database allows: a message, recipients and
body inserted by one statement (`Inserter`), the first chunk read with the record, a message
removed by one statement. Another store goes through the `BodyStore` methods instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NoReturn, Protocol

from psycopg import AsyncConnection, AsyncCursor

from mailward.queue import Envelope, QueueError, QueueFull
from mailward.queue.body import ReceivingTransaction, VerifiedBodyReader

if TYPE_CHECKING:
    from mailward.queue.postgres import PostgresQueue

CHANNEL = "mailward_work"  # LISTEN/NOTIFY channel: "a commit, release or retry may have made work"

__all__ = ["CHANNEL", "BodyStore", "DatabaseBodies", "Inserter", "NewMessage", "PostgresBodyReader",
           "PostgresTransaction"]

log = logging.getLogger("mailward.queue")


# --- bodies ---------------------------------------------------------------------------------------


class BodyStore(Protocol):
    """Where message bodies live. `store` and `remove` run inside the message's own database
    transaction; a store outside the database must make the body durable before `store` returns,
    so the COMMIT that follows acknowledges nothing that could be missing after a crash."""

    async def store(self, cur: AsyncCursor[Any], id: str, chunks: Iterator[bytes]) -> int:
        """Store the chunks in order; returns how many there were."""
        ...

    async def stat(self, conn: AsyncConnection[Any], id: str) -> tuple[int, int]:
        """(chunks, bytes) actually stored for `id`, without reading the body."""
        ...

    async def chunk(self, conn: AsyncConnection[Any], id: str, seq: int) -> bytes | None: ...

    async def remove(self, cur: AsyncCursor[Any], id: str) -> None: ...


class DatabaseBodies:
    """Bodies as bytea rows of `message_body`, one per chunk, in the queue's own database."""

    async def store(self, cur: AsyncCursor[Any], id: str, chunks: Iterator[bytes]) -> int:
        count = 0
        # COPY streams the chunks without a statement per chunk or a parameter-size limit.
        async with cur.copy("COPY message_body (message_id, seq, data) FROM STDIN") as copy:
            for data in chunks:
                await copy.write_row((id, count, data))
                count += 1
        return count

    async def stat(self, conn: AsyncConnection[Any], id: str) -> tuple[int, int]:
        # octet_length of an out-of-line value reads its TOAST pointer, not the value.
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM message_body WHERE message_id = %s",
            (id,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def chunk(self, conn: AsyncConnection[Any], id: str, seq: int) -> bytes | None:
        cur = await conn.execute("SELECT data FROM message_body WHERE message_id = %s AND seq = %s",
                                 (id, seq))
        row = await cur.fetchone()
        return None if row is None else bytes(row[0])

    async def remove(self, cur: AsyncCursor[Any], id: str) -> None:
        await cur.execute("DELETE FROM message_body WHERE message_id = %s", (id,))



# --- group commit ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message on its way into the database, body held in memory."""

    id: str
    envelope: str  # Envelope.to_json()
    size: int
    digest: str
    chunks: int
    created_at: float
    recipients: tuple[tuple[str, str, str | None], ...]  # address, NOTIFY keywords, ORCPT
    data: list[bytes]


# Any number of messages in one statement: its own transaction, so they commit (and notify the
# other nodes) together or not at all, in one round trip. Arrays are flattened, each row naming
# its message.
_INSERT_MANY = """
WITH message_rows AS (
    INSERT INTO message (id, envelope, size, digest, chunks, created_at, next_attempt_at)
    SELECT id, envelope, size, digest, chunks, created_at, created_at
      FROM unnest(%(ids)s::text[], %(envelopes)s::text[], %(sizes)s::bigint[], %(digests)s::text[],
                  %(chunks)s::integer[], %(times)s::double precision[])
           AS m(id, envelope, size, digest, chunks, created_at)),
recipient_rows AS (
    INSERT INTO recipient (message_id, seq, address, notify, orcpt, status, attempts, next_attempt_at)
    SELECT message_id, seq, address, notify, orcpt, 'queued', 0, created_at
      FROM unnest(%(r_ids)s::text[], %(r_seqs)s::integer[], %(r_addresses)s::text[], %(r_notify)s::text[],
                  %(r_orcpt)s::text[], %(r_times)s::double precision[])
           AS r(message_id, seq, address, notify, orcpt, created_at)),
body_rows AS (
    INSERT INTO message_body (message_id, seq, data)
    SELECT * FROM unnest(%(b_ids)s::text[], %(b_seqs)s::integer[], %(b_data)s::bytea[]))
SELECT pg_notify(%(channel)s, %(node)s)"""

MAX_BATCH = 256  # messages per statement
MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_IN_FLIGHT = 4  # statements at once: enough to overlap round trips and WAL flushes


def _batch_params(batch: list[tuple[NewMessage, asyncio.Future[None]]], channel: str, node: str
                  ) -> dict[str, Any]:
    messages = [m for m, _ in batch]
    rcpts = [(m, seq, r) for m in messages for seq, r in enumerate(m.recipients)]
    chunks = [(m.id, seq, data) for m in messages for seq, data in enumerate(m.data)]
    return {
        "ids": [m.id for m in messages], "envelopes": [m.envelope for m in messages],
        "sizes": [m.size for m in messages], "digests": [m.digest for m in messages],
        "chunks": [m.chunks for m in messages], "times": [m.created_at for m in messages],
        "r_ids": [m.id for m, _, _ in rcpts], "r_seqs": [seq for _, seq, _ in rcpts],
        "r_addresses": [r[0] for _, _, r in rcpts], "r_notify": [r[1] for _, _, r in rcpts],
        "r_orcpt": [r[2] for _, _, r in rcpts], "r_times": [m.created_at for m, _, _ in rcpts],
        "b_ids": [c[0] for c in chunks], "b_seqs": [c[1] for c in chunks], "b_data": [c[2] for c in chunks],
        "channel": CHANNEL, "node": node,
    }


class Inserter:
    """Stores in-memory messages as SQLite's writer does: what arrives while up to MAX_IN_FLIGHT
    inserts are under way waits and goes into the next one, so under load one COMMIT (one WAL
    flush, one round trip) acknowledges many messages. One failing message does not fail the
    others: a failed batch is tried again one message at a time."""

    def __init__(self, queue: PostgresQueue) -> None:
        self._queue = queue
        self._waiting: deque[tuple[NewMessage, asyncio.Future[None]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.statements = 0  # insert statements that committed, for tests and benchmarks
        self.stored = 0  # messages they carried

    async def add(self, message: NewMessage) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, future))
        if len(self._tasks) < MAX_IN_FLIGHT:
            task = asyncio.get_running_loop().create_task(self._insert())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await future

    async def drain(self) -> None:
        """Wait for every message handed over so far to be stored or refused."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _insert(self) -> None:
        while self._waiting:
            batch: list[tuple[NewMessage, asyncio.Future[None]]] = []
            weight = 0
            while self._waiting and len(batch) < MAX_BATCH:
                if batch and weight + self._waiting[0][0].size > MAX_BATCH_BYTES:
                    break
                batch.append(self._waiting.popleft())
                weight += batch[-1][0].size
            try:
                await self._store(batch)
            except QueueError as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                for item in batch:
                    try:
                        await self._store([item])
                    except QueueError as single:
                        _settle(item[1], single)
                    else:
                        _settle(item[1], None)
                continue
            for _, future in batch:
                _settle(future, None)

    async def _store(self, batch: list[tuple[NewMessage, asyncio.Future[None]]]) -> None:
        params = _batch_params(batch, CHANNEL, self._queue.node)

        async def run(conn: AsyncConnection[Any]) -> None:
            await conn.execute(_INSERT_MANY, params)

        await self._queue._run(run, closing=True)
        self.statements += 1
        self.stored += len(batch)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the session is gone; the outcome stands regardless (abort() looks later)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# --- receiving ------------------------------------------------------------------------------------


class PostgresTransaction(ReceivingTransaction):
    """One message being received into a `PostgresQueue`; see `mailward.queue.Transaction`.

    The body collects in memory, or in an unnamed spool file once larger than `spool_threshold`,
    and goes to the database in the commit's one transaction: no database transaction stays open
    for as long as a client takes to send its DATA.
    """

    def __init__(self, queue: PostgresQueue, envelope: Envelope) -> None:
        super().__init__(envelope, queue.spool_threshold)
        self._queue = queue
        self._storing: asyncio.Future[None] | None = None

    def _new_spool(self) -> IO[bytes]:
        return tempfile.TemporaryFile()

    def _spool_error(self, exc: OSError) -> QueueError:
        return QueueFull(f"cannot spool the message body: {exc}")

    def _forget(self) -> None:
        self._queue._live.discard(self)

    def _chunks(self) -> Iterator[bytes]:
        size = self._queue.chunk_size
        if self._spool is None:
            view = memoryview(self._buffer)
            for start in range(0, len(view), size):
                yield bytes(view[start:start + size])
            return
        # Re-hash while copying: a spool file that changed under us must not be stored as if intact.
        spool = self._spool
        spool.seek(0)
        digest = hashlib.sha256()
        copied = 0
        while data := spool.read(size):
            digest.update(data)
            copied += len(data)
            yield data
        if copied != self._size or digest.hexdigest() != self._hash.hexdigest():
            raise QueueError(f"message {self._id}: the spooled body changed before it was stored")

    async def commit(self) -> str:
        self._require_open()
        if not self._recipients:
            raise ValueError("a message needs at least one recipient")
        self._state = "committing"
        # Shielded: a session that goes away mid-commit must not leave the statement running on
        # the server unseen, where it could commit after abort() looked for the message.
        store = asyncio.ensure_future(self._queue._store(
            self, tuple(self._recipients), self._size, self._hash.hexdigest(), self._chunks, time.time(),
            in_memory=self._spool is None))
        store.add_done_callback(self._stored)
        self._storing = store
        try:
            await asyncio.shield(store)
        except asyncio.CancelledError:
            # The COMMIT may still happen; abort() waits for it, then removes the message, since
            # no 250 was sent.
            raise
        except BaseException:
            self._fail()
            raise
        self._state = "committed"
        self._queue._live.discard(self)
        return self._id

    def _stored(self, store: asyncio.Future[None]) -> None:
        self._release_body()  # only now: the store reads the buffer or spool file until it ends
        if not store.cancelled():
            store.exception()  # retrieved here, so an abandoned commit's failure is not reported twice

    async def abort(self) -> None:
        state = self._state
        if state == "open":
            self._fail("aborted")
        elif state == "committing":
            self._state = "aborted"
            self._queue._live.discard(self)
            if self._storing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._storing)
            try:
                await self._queue.delete(self._id)
            except QueueError as exc:
                log.warning("message %s: commit interrupted and not removed: %s", self._id, exc)


class PostgresBodyReader(VerifiedBodyReader):
    """A stored body, chunk by chunk, verified (see VerifiedBodyReader)."""

    def __init__(self, queue: PostgresQueue, id: str, size: int, digest: str, chunks: int,
                 first: bytes | None = None) -> None:
        super().__init__(id, size, digest, chunks)
        self._queue = queue
        self._first = first  # chunk 0, when it came with the message's record

    async def _load(self, seq: int) -> bytes | None:
        if seq == 0 and self._first is not None:
            data: bytes | None = self._first
            self._first = None
        else:
            data = await self._queue._chunk(self.id, seq)
        if data is not None:
            self._count(data)
        return data

    async def _exists(self) -> bool:
        return await self._queue.get(self.id) is not None

    async def _corrupt(self, detail: str) -> NoReturn:
        await self._queue._corrupt(self.id, detail)


