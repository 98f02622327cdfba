"""The embedded queue backend: one SQLite file in WAL mode, written through group commit.

This module owns how the queue of a single mailward node reaches its disk: the writer thread that
serialises every change, the readers, receiving transactions, and the verified body stream that
keeps a damaged record from being delivered. The tables and statements are in `sqlite_store`.
It is hand-written because the queue is the heart of the product and its two promises are easy
to get subtly wrong with a generic store:

* "250 means on disk" (DESIGN principle 5). Bodies live in the database next to the envelope, so
  the single WAL fsync of a commit covers envelope, recipients and body together; there is no
  second file whose fsync (and directory fsync) could be forgotten or reordered. `commit()` hands
  the message to the writer thread and resolves only after that fsync.
* Durability must not cap throughput. The writer takes every operation that is waiting, runs them
  in one SQLite transaction and fsyncs once (group commit), so fifty sessions finishing together
  cost one fsync, not fifty. One failing message does not fail its batch: the writer rolls the
  batch back and runs the others again without it.

Other processes may change the file too: `mailward queue` retries, releases and deletes through
its own connection. The writer notices within `watch_interval` seconds (PRAGMA data_version of
its connection changes only when another connection commits) and wakes `wait_for_work`, so the
running deliverer acts on an operator's `queue flush` at once rather than after its backoff. The
tool needs no signal, pid file or permission over the server process for this.

The asyncio loop never touches the disk for anything slower than a page-cache write: changes go
through the writer thread, reads through a small pool of read-only connections. Copying the WAL
back into the database (the checkpoint) happens in a thread of its own, so a commit never waits
behind one, as it did when SQLite's automatic checkpoint ran inside every thousandth page's commit.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import functools
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Generic, NoReturn, Self, TypeVar

from mailward.queue import (
    CorruptMessage,
    Envelope,
    MessageNotFound,
    QueueError,
    QueueFull,
    RecipientResult,
    StoredMessage,
    StsPolicyRecord,
    TlsRptTally,
)
from mailward.queue import sqlite_store as store
from mailward.queue.body import ReceivingTransaction, VerifiedBodyReader

if TYPE_CHECKING:
    from mailward.queue import Queue, Transaction

__all__ = ["SqliteBodyReader", "SqliteQueue", "SqliteQueueStats", "SqliteTransaction"]

log = logging.getLogger("mailward.queue")

T = TypeVar("T")

_SQLITE_FULL = 13  # primary result code; extended codes keep it in the low byte
_KIB = 1024
CHECKPOINT_INTERVAL = 0.1  # seconds between the checkpointer's looks at a WAL the writer has grown
# The writer checkpoints by itself only if the checkpointer falls this far behind (pages).
WRITER_AUTOCHECKPOINT = 16_384


# --- errors ---------------------------------------------------------------------------------------


def _storage_error(exc: BaseException) -> QueueError:
    """The QueueError a storage failure becomes; the server turns any of them into a 451."""
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
            return QueueFull(f"queue storage is full: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return QueueFull(f"queue storage is full: {exc}")
    return QueueError(f"queue storage failed: {exc}")


def _op_error(exc: Exception) -> Exception:
    # Storage trouble is reported as QueueError; a caller's mistake (ValueError, LeaseLost) as is.
    if isinstance(exc, sqlite3.Error | OSError):
        return _storage_error(exc)
    return exc


# --- the writer -----------------------------------------------------------------------------------


@dataclass(slots=True)
class SqliteQueueStats:
    """Counters for tests, benchmarks and metrics; written by the writer thread only."""

    batches: int = 0  # SQLite transactions the writer committed
    synced_batches: int = 0  # of which committed with synchronous=FULL: one WAL fsync each
    ops: int = 0  # operations carried by those transactions
    commits: int = 0  # messages stored
    largest_batch: int = 0
    spooled: int = 0  # transactions whose body outgrew memory and went to a spool file
    checkpoints: int = 0  # passive checkpoints the checkpointer thread ran (written by that thread)


class _Op(Generic[T]):
    """One change waiting for the writer, with the future its caller awaits."""

    __slots__ = ("cleanup", "durable", "error", "fn", "future", "is_commit", "result", "wakes", "weight")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        future: asyncio.Future[T],
        *,
        durable: bool,
        weight: int,
        cleanup: Callable[[], None] | None,
        is_commit: bool,
        wakes: bool,
    ) -> None:
        self.fn = fn
        self.future = future
        self.durable = durable  # needs the fsync; leases do not (losing one only repeats work)
        self.weight = weight  # body bytes, to keep one batch from growing without bound
        self.cleanup = cleanup  # runs in the writer once the batch is settled either way
        self.is_commit = is_commit
        self.wakes = wakes  # success may have created work for the deliverer
        self.result: T | None = None
        self.error: Exception | None = None


# --- the queue ------------------------------------------------------------------------------------


class SqliteQueue:
    """The embedded queue. Create with ``await SqliteQueue.open(path)``; use from one event loop.

    Beside the database file it keeps a ``<name>-tmp`` directory for spool files (bodies larger
    than `spool_threshold` while they are being received); the directory is cleared at open.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        spool_threshold: int = 256 * _KIB,
        chunk_size: int = 256 * _KIB,
        max_batch: int = 512,
        max_batch_bytes: int = 64 * _KIB * _KIB,
        read_threads: int = 2,
        busy_timeout: float = 10.0,
        watch_interval: float = 1.0,
    ) -> None:
        if chunk_size <= 0 or spool_threshold < 0 or max_batch <= 0 or read_threads <= 0:
            raise ValueError("chunk_size, max_batch and read_threads must be positive")
        if watch_interval <= 0:
            raise ValueError("watch_interval must be positive")
        self.path = Path(path)
        # Named after the database, not a bare "tmp", because it is emptied at open: a generic
        # name beside a user-chosen path could belong to someone else.
        self.tmp_dir = self.path.with_name(self.path.name + "-tmp")
        self.spool_threshold = spool_threshold
        self.chunk_size = chunk_size
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.stats = SqliteQueueStats()
        self._read_threads = read_threads
        self._busy_timeout = busy_timeout
        self.watch_interval = watch_interval  # how often the idle writer looks for others' commits
        self._data_version: int | None = None
        self._watched_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work: asyncio.Event | None = None
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self._writer_conn: sqlite3.Connection | None = None
        self._writer_synced = True
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[_Op[Any]] = deque()
        self._stopping = False
        self._closed = False
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: builtins.list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._live: set[SqliteTransaction] = set()

    # --- lifecycle ---

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        spool_threshold: int = 256 * _KIB,
        chunk_size: int = 256 * _KIB,
        max_batch: int = 512,
        max_batch_bytes: int = 64 * _KIB * _KIB,
        read_threads: int = 2,
        busy_timeout: float = 10.0,
        watch_interval: float = 1.0,
    ) -> SqliteQueue:
        """Open the queue at `path`, creating the database and its directory if needed."""
        queue = cls(
            Path(path),
            spool_threshold=spool_threshold,
            chunk_size=chunk_size,
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            read_threads=read_threads,
            busy_timeout=busy_timeout,
            watch_interval=watch_interval,
        )
        await queue._start()
        return queue

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(None, self._open_storage)
        self._loop = loop
        self._work = asyncio.Event()
        self._writer_conn = conn
        self._readers = ThreadPoolExecutor(self._read_threads, thread_name_prefix="mailward-queue-read")
        # A daemon thread so a process that forgets close() still exits; SQLite keeps the file
        # consistent whatever moment the thread stops at.
        self._writer = threading.Thread(target=self._writer_main, name="mailward-queue-writer", daemon=True)
        self._writer.start()
        self._checkpointer = threading.Thread(target=self._checkpointer_main,
                                              name="mailward-queue-checkpoint", daemon=True)
        self._checkpointer.start()

    def _open_storage(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
            for entry in self.tmp_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            # Mail is private. SQLite gives its -wal and -shm files the database file's mode, so
            # creating the file 0600 first covers all three.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise _storage_error(exc) from exc
        try:
            self._configure(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise QueueError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA journal_size_limit = {64 * _KIB * _KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT}")
            store.create_schema(conn, self.path)
            _fsync_directory(self.path.parent)  # the new database (and WAL) names are durable too
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise _storage_error(exc) from exc
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")

    async def close(self) -> None:
        """Finish every change already handed to the writer, then release all resources."""
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        for txn in builtins.list(self._live):
            txn._shutdown()
        if self._work is not None:
            self._work.set()  # an idle deliverer wakes, and its next call learns the queue closed
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        await self._loop.run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        if self._writer is not None:
            self._writer.join()
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            self._checkpointer.join()
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._loop is None:
            raise QueueError("the queue is closed")
        return self._loop

    # --- writer thread ---

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = True,
        weight: int = 0,
        cleanup: Callable[[], None] | None = None,
        is_commit: bool = False,
        wakes: bool = False,
    ) -> asyncio.Future[T]:
        loop = self._check_open()
        future: asyncio.Future[T] = loop.create_future()
        op = _Op(
            fn, future, durable=durable, weight=weight, cleanup=cleanup, is_commit=is_commit, wakes=wakes
        )
        with self._cond:
            self._pending.append(op)
            self._cond.notify()
        return future

    def _take_batch(self) -> builtins.list[_Op[Any]] | None:
        """The next batch; [] when it is time to look for other processes' commits; None to stop."""
        with self._cond:
            while not self._pending and not self._stopping:
                wait = self._watched_at + self.watch_interval - time.monotonic()
                if wait <= 0:
                    return []
                self._cond.wait(wait)
            if not self._pending:
                return None
            batch: builtins.list[_Op[Any]] = []
            weight = 0
            while self._pending and len(batch) < self.max_batch:
                if batch and weight + self._pending[0].weight > self.max_batch_bytes:
                    break
                op = self._pending.popleft()
                weight += op.weight
                batch.append(op)
            return batch

    def _writer_main(self) -> None:
        conn = self._writer_conn
        assert conn is not None
        try:
            while (batch := self._take_batch()) is not None:
                if time.monotonic() >= self._watched_at + self.watch_interval:
                    self._watch(conn)
                if not batch:
                    continue
                try:
                    self._run_batch(conn, batch)
                except BaseException as exc:  # a bug here must not strand every waiting session
                    log.exception("queue writer failed a batch of %d", len(batch))
                    self._fail_batch(conn, batch, exc)
                finally:
                    for op in batch:
                        if op.cleanup is not None:
                            try:
                                op.cleanup()
                            except Exception:
                                log.exception("queue writer cleanup failed")
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                    self._loop.call_soon_threadsafe(self._settle, batch)
        finally:
            conn.close()

    def _checkpointer_main(self) -> None:
        """Copy committed WAL frames into the database while the writer goes on committing.

        A PASSIVE checkpoint from another connection takes no write lock, so commits continue
        meanwhile; once it has copied everything, the writer's next transaction starts the WAL
        over. The writer's own automatic checkpoint stays as a backstop at WRITER_AUTOCHECKPOINT.
        """
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._configure(conn)
        except sqlite3.Error as exc:
            log.warning("queue checkpointer cannot open %s; the writer checkpoints instead: %s",
                        self.path, exc)
            return
        seen = -1
        try:
            # Its own event: waiting on the writer's condition could take the writer's wake-ups.
            while not self._checkpoint_stop.wait(CHECKPOINT_INTERVAL):
                batches = self.stats.batches
                if batches == seen:
                    continue
                seen = batches
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer's backstop checkpoint still runs
                    log.warning("queue checkpoint failed: %s", exc)
                    continue
                self.stats.checkpoints += 1
        finally:
            conn.close()

    def _watch(self, conn: sqlite3.Connection) -> None:
        self._watched_at = time.monotonic()
        try:
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            log.warning("queue writer cannot check for changes by other processes: %s", exc)
            return
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        if changed:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._work is not None:
            self._work.set()

    def _run_batch(self, conn: sqlite3.Connection, batch: builtins.list[_Op[Any]]) -> None:
        durable = any(op.durable for op in batch)
        todo = batch
        try:
            # WAL with synchronous=NORMAL skips the commit fsync; only batches of leases and
            # renewals use it, and a later FULL commit syncs their frames too.
            if durable != self._writer_synced:
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._writer_synced = durable
            while True:
                conn.execute("BEGIN IMMEDIATE")
                failed = self._run_ops(conn, todo)
                if failed is None:
                    break
                # An operation failed after writing: undo the whole transaction and run the
                # others again without it, so one bad message never costs the rest of its batch.
                conn.execute("ROLLBACK")
                todo = [op for op in todo if op is not failed]
                if not todo:
                    return
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._fail_batch(conn, todo, exc)
            return
        stats = self.stats
        stats.batches += 1
        stats.synced_batches += durable
        stats.ops += len(todo)
        stats.commits += sum(1 for op in todo if op.is_commit and op.error is None)
        stats.largest_batch = max(stats.largest_batch, len(todo))

    @staticmethod
    def _run_ops(conn: sqlite3.Connection, ops: builtins.list[_Op[Any]]) -> _Op[Any] | None:
        """Run `ops` in the open transaction; return the one that failed after writing, if any.

        Comparing `total_changes` instead of wrapping each operation in a savepoint saves two
        statements per message on the hot path: a failure that wrote nothing needs no undo.
        """
        for op in ops:
            changes = conn.total_changes
            op.error = None
            try:
                op.result = op.fn(conn)
            except Exception as exc:
                op.result = None
                op.error = _op_error(exc)
                # After some errors (disk full, I/O) SQLite has already rolled back the whole
                # transaction; then nothing in this batch is stored.
                if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                    raise
                if conn.total_changes != changes:
                    return op
        return None

    def _fail_batch(
        self, conn: sqlite3.Connection, batch: builtins.list[_Op[Any]], exc: BaseException
    ) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        log.error("queue write failed, %d operation(s) not stored: %s", len(batch), exc)
        for op in batch:
            op.result = None
            # A fresh exception per waiter for storage errors: each task adds its own traceback.
            op.error = _storage_error(exc)

    def _settle(self, batch: builtins.list[_Op[Any]]) -> None:
        woke = False
        for op in batch:
            if op.error is None:
                woke = woke or op.wakes
            if op.future.done():  # the caller was cancelled; the outcome stands regardless
                continue
            if op.error is not None:
                op.future.set_exception(op.error)
            else:
                op.future.set_result(op.result)
        if woke and self._work is not None:
            self._work.set()

    # --- reader threads ---

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._configure(conn)
            conn.execute("PRAGMA query_only = 1")
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._reader_conn())
        except (sqlite3.Error, OSError) as exc:
            raise _storage_error(exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = self._check_open()
        return await loop.run_in_executor(self._readers, self._run_read, fn)

    # --- receiving ---

    async def begin(self, envelope: Envelope) -> SqliteTransaction:
        self._check_open()
        txn = SqliteTransaction(self, envelope)
        self._live.add(txn)
        return txn

    async def _store(self, record: store.NewMessage) -> None:
        try:
            future = self._submit(
                functools.partial(store.insert_message, record=record, chunk_size=self.chunk_size),
                weight=record.size,
                cleanup=record.discard,
                is_commit=True,
                wakes=True,
            )
        except BaseException:
            record.discard()
            raise
        await future

    # --- delivery ---

    async def lease(
        self, owner: str, now: float, limit: int, lease_seconds: float
    ) -> builtins.list[StoredMessage]:
        if limit <= 0:
            return []
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        fn = functools.partial(store.lease, owner=owner, now=now, limit=limit, expires=now + lease_seconds)
        return await self._submit(fn, durable=False)

    async def renew(self, id: str, owner: str, lease_seconds: float, now: float) -> float:
        expires = now + lease_seconds
        await self._submit(functools.partial(store.renew, id=id, owner=owner, expires=expires), durable=False)
        return expires

    async def open_body(self, id: str) -> SqliteBodyReader:
        info = await self._read(functools.partial(store.body_info, id=id))
        if info is None:
            raise MessageNotFound(id)
        size, digest, chunks, stored_chunks, stored_bytes = info
        if stored_chunks != chunks or stored_bytes != size:
            await self._corrupt(
                id, f"body has {stored_chunks} of {chunks} chunks, {stored_bytes} of {size} bytes"
            )
        return SqliteBodyReader(self, id, size, digest, chunks)

    async def record_attempt(
        self, id: str, owner: str, results: Mapping[str, RecipientResult], now: float
    ) -> StoredMessage | None:
        fn = functools.partial(store.record_attempt, id=id, owner=owner, results=dict(results), now=now)
        try:
            return await self._submit(fn)
        except CorruptMessage as exc:
            await self._corrupt(id, exc.detail)

    async def _corrupt(self, id: str, detail: str) -> NoReturn:
        try:
            await self._submit(functools.partial(store.flag_corrupt, id=id, detail=detail))
        except QueueError as exc:
            log.error("message %s is corrupt (%s) and could not be held: %s", id, detail, exc)
        raise CorruptMessage(id, detail)

    # --- operator ---

    async def hold(self, id: str) -> bool:
        return await self._submit(functools.partial(store.hold, id=id))

    async def release(self, id: str) -> bool:
        return await self._submit(functools.partial(store.release, id=id), wakes=True)

    async def retry(self, ids: Sequence[str] | None, now: float) -> int:
        chosen = None if ids is None else tuple(ids)
        return len(await self._submit(functools.partial(store.retry, ids=chosen, now=now), wakes=True))

    async def delete(self, id: str) -> bool:
        return await self._submit(functools.partial(store.delete, id=id))

    async def get(self, id: str) -> StoredMessage | None:
        row = await self._read(functools.partial(store.read_messages, where="id = ?", args=(id,)))
        if not row:
            return None
        message = row[0]
        if isinstance(message, CorruptMessage):
            await self._corrupt(message.message_id, message.detail)
        return message

    async def list(self, limit: int = 100, after: str | None = None) -> builtins.list[StoredMessage]:
        fn = functools.partial(
            store.read_messages, where="id > ? ORDER BY id LIMIT ?", args=(after or "", max(0, limit))
        )
        listed: builtins.list[StoredMessage] = []
        for message in await self._read(fn):
            if isinstance(message, CorruptMessage):
                # Listed or not, a record that cannot be decoded must be held and reported.
                with contextlib.suppress(CorruptMessage):
                    await self._corrupt(message.message_id, message.detail)
            else:
                listed.append(message)
        return listed

    async def count(self) -> int:
        return await self._read(store.count)

    async def oldest_age(self, now: float) -> float:
        oldest = await self._read(store.oldest_created_at)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    # --- MTA-STS policy cache ---

    async def load_sts_policy(self, domain: str) -> StsPolicyRecord | None:
        return await self._read(functools.partial(store.load_sts_policy, domain=domain))

    async def save_sts_policy(self, policy: StsPolicyRecord) -> None:
        # No fsync of its own: a lost cache write costs one more fetch, not a message.
        await self._submit(functools.partial(store.save_sts_policy, record=policy), durable=False)

    # --- TLS reporting (RFC 8460) ---

    async def add_tlsrpt_tallies(self, tallies: Sequence[TlsRptTally]) -> None:
        """Add session counts to the day's tallies (rows with the same key add up)."""
        if not tallies:
            return
        # No fsync of its own, as for the MTA-STS cache: a lost tally is a count, not a message.
        await self._submit(functools.partial(store.add_tlsrpt_tallies, tallies=list(tallies)), durable=False)

    async def load_tlsrpt_tallies(self, day: str, domain: str | None = None) -> builtins.list[TlsRptTally]:
        return await self._read(functools.partial(store.load_tlsrpt_tallies, day=day, domain=domain))

    async def mark_tlsrpt_sent(self, day: str, domain: str, report_id: str, now: float) -> bool:
        """Record that the report for (day, domain) went out; False if it was recorded before."""
        fn = functools.partial(store.mark_tlsrpt_sent, day=day, domain=domain, report_id=report_id, now=now)
        return bool(await self._submit(fn, durable=True))

    async def tlsrpt_sent(self, day: str) -> dict[str, str]:
        """The domains whose report for `day` went out, with the report ids."""
        return await self._read(functools.partial(store.tlsrpt_sent, day=day))

    async def prune_tlsrpt(self, before: str) -> None:
        """Forget tallies and sent marks of days before `before` (YYYY-MM-DD)."""
        await self._submit(functools.partial(store.prune_tlsrpt, before=before), durable=False)

    async def next_due(self) -> float | None:
        return await self._read(store.next_due)

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


# --- receiving ------------------------------------------------------------------------------------


class SqliteTransaction(ReceivingTransaction):
    """One message being received into a `SqliteQueue`; see `mailward.queue.Transaction`."""

    def __init__(self, queue: SqliteQueue, envelope: Envelope) -> None:
        super().__init__(envelope, queue.spool_threshold)
        self._queue = queue

    def _new_spool(self) -> IO[bytes]:
        # Unnamed (O_TMPFILE) where possible, so a crash leaves nothing to clean up; beside the
        # database rather than in /tmp, which may be RAM.
        spool = tempfile.TemporaryFile(dir=self._queue.tmp_dir)  # noqa: SIM115 - owned by the txn
        self._queue.stats.spooled += 1
        return spool

    def _spool_error(self, exc: OSError) -> QueueError:
        return _storage_error(exc)

    def _forget(self) -> None:
        self._queue._live.discard(self)

    async def commit(self) -> str:
        self._require_open()
        if not self._recipients:
            raise ValueError("a message needs at least one recipient")
        if self._spool is not None:
            try:
                self._spool.flush()
            except OSError as exc:
                self._fail()
                raise _storage_error(exc) from exc
        record = store.NewMessage(
            id=self._id,
            envelope=self._envelope,
            recipients=tuple(self._recipients),
            size=self._size,
            digest=self._hash.hexdigest(),
            created_at=time.time(),
            buffer=self._buffer,
            spool=self._spool,
        )
        # From here the writer owns the body and frees it whatever happens.
        self._buffer = bytearray()
        self._spool = None
        self._state = "committing"
        try:
            await self._queue._store(record)
        except asyncio.CancelledError:
            # The writer may still store it; abort() then removes it, since no 250 was sent.
            raise
        except BaseException:
            self._state = "failed"
            self._queue._live.discard(self)
            raise
        self._state = "committed"
        self._queue._live.discard(self)
        return self._id

    async def abort(self) -> None:
        state = self._state
        if state == "open":
            self._fail("aborted")
        elif state == "committing":
            self._state = "aborted"
            self._queue._live.discard(self)
            try:
                await self._queue.delete(self._id)
            except QueueError as exc:
                log.warning("message %s: commit interrupted and not removed: %s", self._id, exc)


# --- reading bodies -------------------------------------------------------------------------------


class SqliteBodyReader(VerifiedBodyReader):
    """A stored body, chunk by chunk from the reader threads, verified (see VerifiedBodyReader)."""

    def __init__(self, queue: SqliteQueue, id: str, size: int, digest: str, chunks: int) -> None:
        super().__init__(id, size, digest, chunks)
        self._queue = queue

    async def _load(self, seq: int) -> bytes | None:
        return await self._queue._read(functools.partial(self._fetch_blocking, seq=seq))

    async def _exists(self) -> bool:
        return await self._queue._read(functools.partial(store.message_exists, id=self.id))

    async def _corrupt(self, detail: str) -> NoReturn:
        await self._queue._corrupt(self.id, detail)

    def _fetch_blocking(self, conn: sqlite3.Connection, seq: int) -> bytes | None:
        data = store.body_chunk(conn, self.id, seq)
        if data is not None:
            self._count(data)  # here, so a large body's sha256 stays off the event loop
        return data


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if TYPE_CHECKING:

    def _conforms(queue: SqliteQueue, txn: SqliteTransaction) -> tuple[Queue, Transaction]:
        return queue, txn
