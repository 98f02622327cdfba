"""Delivery attempts recorded on the shared PostgreSQL queue, many messages per transaction.

Split from `mailward.queue.postgres`, which owns the queue itself. Recording one attempt took a
transaction of its own: a pooled connection, BEGIN, the locking read, the recipient updates, the
delete or release, COMMIT, each a round trip. A node delivering over twenty connections finishes
messages faster than that, and the deliverer spent a third of its time there. The `Recorder`
does for attempts what the `Inserter` does for accepted mail: what arrives while a batch is under
way goes into the next one, and one set of statements and one COMMIT record all of it. Each
message keeps its own outcome: one that lost its lease or is corrupt is refused alone, before
anything is written.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection

from mailward.queue import (
    CorruptMessage,
    QueueError,
    RecipientResult,
    StoredMessage,
    after_attempt,
    attempt_target,
)
from mailward.queue.postgres_rows import read_messages

if TYPE_CHECKING:
    from mailward.queue.postgres import PostgresQueue

__all__ = ["Recorder"]

MAX_BATCH = 200  # attempts per transaction
MAX_IN_FLIGHT = 2  # transactions at once: one fills while the other commits

_UPDATE_RECIPIENT = (
    "UPDATE recipient SET status = %s, attempts = attempts + 1, next_attempt_at = %s, last_reply = %s,"
    " last_attempt_at = %s, tls = %s WHERE message_id = %s AND seq = %s")
_RELEASE = ("UPDATE message SET next_attempt_at = %s, lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = %s")

Outcome = StoredMessage | None | Exception


@dataclass(slots=True)
class _Attempt:
    id: str
    owner: str
    results: dict[str, RecipientResult]
    now: float
    future: asyncio.Future[StoredMessage | None]


class Recorder:
    """Records attempts for one `PostgresQueue`; see `Queue.record_attempt` for what one means."""

    def __init__(self, queue: PostgresQueue) -> None:
        self._queue = queue
        self._waiting: deque[_Attempt] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.transactions = 0  # that committed, for tests and benchmarks
        self.recorded = 0  # attempts they carried

    async def record(self, id: str, owner: str, results: Mapping[str, RecipientResult], now: float
                     ) -> StoredMessage | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StoredMessage | None] = loop.create_future()
        self._waiting.append(_Attempt(id, owner, dict(results), now, future))
        if len(self._tasks) < MAX_IN_FLIGHT:
            task = loop.create_task(self._record())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # A caller that stops waiting leaves its attempt to be recorded all the same (as with
        # SQLite's writer): it may be in a transaction under way already.
        return await future

    async def drain(self) -> None:
        """Wait until every attempt handed over so far is recorded or refused."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _record(self) -> None:
        while self._waiting:
            batch = self._take()
            try:
                outcomes = await self._store(batch)
            except QueueError as exc:
                if len(batch) == 1:
                    _settle(batch[0], exc)
                    continue
                # Which one broke the batch is unknown: each on its own, so the others still land.
                for attempt in batch:
                    try:
                        (outcome,) = await self._store([attempt])
                    except QueueError as single:
                        outcome = single
                    _settle(attempt, outcome)
                continue
            for attempt, outcome in zip(batch, outcomes, strict=True):
                _settle(attempt, outcome)

    def _take(self) -> list[_Attempt]:
        """The next batch: at most one attempt per message (a second waits for the next batch,
        so each is worked out from the row as the one before it left it)."""
        batch: list[_Attempt] = []
        ids: set[str] = set()
        skipped: list[_Attempt] = []
        while self._waiting and len(batch) < MAX_BATCH:
            attempt = self._waiting.popleft()
            if attempt.id in ids:
                skipped.append(attempt)
                continue
            ids.add(attempt.id)
            batch.append(attempt)
        self._waiting.extendleft(reversed(skipped))
        return batch

    async def _store(self, batch: list[_Attempt]) -> list[Outcome]:
        queue = self._queue

        async def apply(conn: AsyncConnection[Any]) -> list[Outcome]:
            async with conn.transaction(), conn.cursor() as cur:
                # The row locks, taken in id order so two nodes' batches never deadlock, order
                # this against another node's lease, retry or delete: what is read here stays
                # true until COMMIT, and each outcome is worked out from it.
                found = await read_messages(conn, "m.id = ANY(%s) ORDER BY m.id FOR UPDATE OF m",
                                            (sorted(a.id for a in batch),))
                by_id = {m.message_id if isinstance(m, CorruptMessage) else m.id: m for m in found}
                outcomes: list[Outcome] = []
                updates: list[tuple[Any, ...]] = []
                released: list[tuple[float | None, str]] = []
                finished: list[str] = []
                wake = False
                for a in batch:
                    stored = by_id.get(a.id)
                    try:
                        message, seq_of = attempt_target([] if stored is None else [stored], a.id, a.owner,
                                                         a.results)
                    except (QueueError, ValueError) as exc:
                        outcomes.append(exc)
                        continue
                    # This attempt's verdict replaces the last one even when None (no connection).
                    updates.extend((r.status, r.next_attempt_at, r.reply, a.now,
                                    None if r.tls is None else r.tls.to_json(), a.id, seq_of[address])
                                   for address, r in a.results.items())
                    updated = after_attempt(message, a.results, a.now)
                    if not updated.pending:
                        finished.append(a.id)
                        outcomes.append(None)
                        continue
                    due = min((r.next_attempt_at for r in updated.pending if r.next_attempt_at is not None),
                              default=None)
                    released.append((due, a.id))
                    # Released with work due now: another node may take it.
                    wake = wake or (due is not None and due <= a.now)
                    outcomes.append(updated)
                if updates:
                    await cur.executemany(_UPDATE_RECIPIENT, updates)
                if finished:
                    await queue._delete_many(cur, finished)
                if released:
                    await cur.executemany(_RELEASE, released)
                if wake:
                    await queue._notify(cur)
                return outcomes

        outcomes = await queue._run(apply, closing=True)
        self.transactions += 1
        self.recorded += len(batch)
        return outcomes


def _settle(attempt: _Attempt, outcome: Outcome) -> None:
    if attempt.future.done():
        return
    if isinstance(outcome, Exception):
        attempt.future.set_exception(outcome)
    else:
        attempt.future.set_result(outcome)
