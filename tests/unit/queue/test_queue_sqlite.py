"""The SQLite queue backend: durability plumbing, group commit, leases, verification."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import stat
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailward.queue import (
    CorruptMessage,
    Envelope,
    LeaseLost,
    MessageNotFound,
    QueueError,
    QueueFull,
    Recipient,
    RecipientResult,
    StsPolicyRecord,
    TlsFacts,
    TlsRptTally,
    TlsVerdict,
)
from mailward.queue import sqlite as sqlite_module
from mailward.queue.sqlite import SqliteQueue
from mailward.queue.sqlite_store import SCHEMA_VERSION

T = TypeVar("T")
KIB = 1024
NOW = 1_800_000_000.0
DELIVERED = RecipientResult("delivered", "250 2.0.0 ok")


def run(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(test())


def make_envelope(sender: str = "alice@example.org") -> Envelope:
    return Envelope(
        sender=sender,
        client_ip="192.0.2.10",
        client_helo="client.example.org",
        listener="submissions",
        received_at=time.time(),
        auth_user="alice",
        tls=TlsFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128),
    )


async def store(
    queue: SqliteQueue,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    recipients: Iterable[str] = ("bob@example.net",),
) -> str:
    async with await queue.begin(make_envelope()) as txn:
        for address in recipients:
            await txn.add_rcpt(Recipient(address))
        await txn.write_body(body)
        return await txn.commit()


async def read_body(queue: SqliteQueue, message_id: str) -> bytes:
    reader = await queue.open_body(message_id)
    return await reader.read()


def rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    conn.close()
    return int(count)


def sql(db: Path, statement: str, *args: Any) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement, args)
    finally:
        conn.close()


# --- opening --------------------------------------------------------------------------------------


def test_first_open_creates_a_private_wal_database(tmp_path: Path) -> None:
    db = tmp_path / "spool" / "queue.db"

    async def test() -> None:
        async with await SqliteQueue.open(db) as queue:
            assert await queue.count() == 0
            assert await queue.oldest_age(NOW) == 0.0
            assert await queue.next_due() is None
            # The commit path runs with synchronous=FULL: the fsync is what makes 250 true.
            assert await queue._submit(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2

    run(test)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert schema == str(SCHEMA_VERSION)
    conn.close()
    assert {"meta", "message", "recipient", "message_body"} <= tables
    assert (tmp_path / "spool" / "queue.db-tmp").is_dir()


def test_reopen_keeps_messages_and_clears_the_spool_directory(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    body = b"x" * 700 * KIB

    async def first() -> tuple[str, Any]:
        async with await SqliteQueue.open(db) as queue:
            message_id = await store(queue, body, ["bob@example.net", "carol@example.net"])
            return message_id, await queue.get(message_id)

    message_id, before = run(first)
    leftover = tmp_path / "queue.db-tmp" / "leftover"
    leftover.write_bytes(b"from a crashed run")

    async def second() -> None:
        async with await SqliteQueue.open(db) as queue:
            assert await queue.get(message_id) == before
            assert await read_body(queue, message_id) == body

    run(second)
    assert not leftover.exists()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    run(lambda: _open_and_close(db))
    sql(db, "UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(QueueError, match="schema 99"):
        run(lambda: _open_and_close(db))


async def _open_and_close(db: Path) -> None:
    queue = await SqliteQueue.open(db)
    await queue.close()


def test_a_schema_1_queue_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"

    async def fill() -> str:
        async with await SqliteQueue.open(db) as queue:
            return await store(queue)

    message_id = run(fill)
    # What schema 1 looked like: no TLS verdict per recipient.
    sql(db, "ALTER TABLE recipient DROP COLUMN tls")
    sql(db, "UPDATE meta SET value = '1' WHERE key = 'schema'")

    async def reopen() -> None:
        async with await SqliteQueue.open(db) as queue:
            message = await queue.get(message_id)
            assert message is not None and message.recipients[0].tls is None
            assert len(await queue.lease("w", time.time(), 10, 60.0)) == 1
            verdict = TlsVerdict(protocol="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", policy="may")
            await queue.record_attempt(message_id, "w", {
                "bob@example.net": RecipientResult("deferred", "451 later", time.time() + 60, verdict)},
                time.time())
            stored = await queue.get(message_id)
            assert stored is not None and stored.recipients[0].tls == verdict

    run(reopen)
    with sqlite3.connect(db) as conn:
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    conn.close()
    assert schema == str(SCHEMA_VERSION)
    sql(db, "UPDATE meta SET value = 'x' WHERE key = 'schema'")
    with pytest.raises(QueueError, match="schema x"):
        run(lambda: _open_and_close(db))


def test_a_schema_2_queue_gains_the_sts_policy_cache(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    run(lambda: _open_and_close(db))
    # What schema 2 looked like: no MTA-STS policy cache.
    sql(db, "DROP TABLE sts_policy")
    sql(db, "UPDATE meta SET value = '2' WHERE key = 'schema'")
    record = StsPolicyRecord("example.org", "20240101", "version: STSv1\nmode: none\nmax_age: 60\n",
                             NOW, NOW + 60)

    async def save() -> None:
        async with await SqliteQueue.open(db) as queue:
            assert await queue.load_sts_policy("example.org") is None
            await queue.save_sts_policy(replace(record, id="old"))
            await queue.save_sts_policy(record)  # the newer fetch replaces the row

    async def load() -> None:
        async with await SqliteQueue.open(db) as queue:
            assert await queue.load_sts_policy("example.org") == record

    run(save)
    run(load)
    with sqlite3.connect(db) as conn:
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    conn.close()
    assert schema == str(SCHEMA_VERSION) == "4"


def test_a_schema_3_queue_gains_the_tls_report_tables(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    run(lambda: _open_and_close(db))
    # What schema 3 looked like: no TLS-RPT tally.
    sql(db, "DROP TABLE tlsrpt_tally")
    sql(db, "DROP TABLE tlsrpt_sent")
    sql(db, "UPDATE meta SET value = '3' WHERE key = 'schema'")
    ok = TlsRptTally("2026-11-28", "example.org", "sts", ("version: STSv1", "mode: enforce"),
                     ("mx.example.org",))
    bad = replace(ok, result_type="certificate-expired", receiving_mx="mx.example.org",
                  receiving_ip="192.0.2.1", reason_code="certificate has expired")

    async def use() -> None:
        async with await SqliteQueue.open(db) as queue:
            await queue.add_tlsrpt_tallies([ok, replace(ok, count=2), bad])
            await queue.add_tlsrpt_tallies([bad, replace(ok, day="2026-11-27", domain="example.net")])
            assert sorted(await queue.load_tlsrpt_tallies("2026-11-28"), key=lambda t: t.result_type) == [
                replace(ok, count=3), replace(bad, count=2)]
            assert await queue.load_tlsrpt_tallies("2026-11-28", "example.net") == []
            assert await queue.tlsrpt_sent("2026-11-28") == {}
            assert await queue.mark_tlsrpt_sent("2026-11-28", "example.org", "r1@mx", NOW)
            assert not await queue.mark_tlsrpt_sent("2026-11-28", "example.org", "r2@mx", NOW)  # once only
            assert await queue.tlsrpt_sent("2026-11-28") == {"example.org": "r1@mx"}
            await queue.prune_tlsrpt("2026-11-28")
            assert await queue.load_tlsrpt_tallies("2026-11-27") == []
            assert len(await queue.load_tlsrpt_tallies("2026-11-28")) == 2

    run(use)
    with sqlite3.connect(db) as conn:
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    conn.close()
    assert schema == str(SCHEMA_VERSION)


def test_an_envelope_marks_tls_reports() -> None:
    plain = make_envelope()
    assert "tlsrpt" not in json.loads(plain.to_json())  # older readers see what they know
    marked = replace(plain, tlsrpt=True)
    assert Envelope.from_json(marked.to_json()) == marked
    assert Envelope.from_json(plain.to_json()).tlsrpt is False


# --- receiving ------------------------------------------------------------------------------------


def test_commit_stores_envelope_recipients_and_body(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            env = make_envelope()
            txn = await queue.begin(env)
            await txn.add_rcpt(Recipient("bob@example.net", frozenset({"SUCCESS"}), "rfc822;bob@example.net"))
            await txn.add_rcpt(Recipient("carol@example.net"))
            await txn.add_rcpt(Recipient("bob@example.net"))  # duplicate RCPT: delivered once
            for part in (b"Subject: t\r\n", b"\r\n", b"body\r\n"):
                await txn.write_body(part)
            assert txn.size == 20
            message_id = await txn.commit()
            assert message_id == txn.id
            with pytest.raises(RuntimeError):
                await txn.write_body(b"more")
            await txn.abort()  # after a commit: no effect

            message = await queue.get(message_id)
            assert message is not None
            assert message.envelope == env
            assert [(r.recipient, r.status, r.attempts) for r in message.recipients] == [
                (Recipient("bob@example.net", frozenset({"SUCCESS"}), "rfc822;bob@example.net"), "queued", 0),
                (Recipient("carol@example.net"), "queued", 0),
            ]
            assert message.size == 20
            assert message.digest == hashlib.sha256(b"Subject: t\r\n\r\nbody\r\n").hexdigest()
            assert not message.held and message.lease_owner is None
            assert await read_body(queue, message_id) == b"Subject: t\r\n\r\nbody\r\n"
            assert await queue.get("0000000000000") is None

    run(test)


def test_empty_body_and_no_recipients(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            message_id = await store(queue, b"")
            assert await read_body(queue, message_id) == b""
            async with await queue.begin(make_envelope()) as txn:
                with pytest.raises(ValueError, match="recipient"):
                    await txn.commit()
            assert await queue.count() == 1

    run(test)


def test_abort_leaves_nothing_behind(tmp_path: Path) -> None:
    db = tmp_path / "q.db"

    async def test() -> None:
        async with await SqliteQueue.open(db) as queue:
            txn = await queue.begin(make_envelope())
            await txn.add_rcpt(Recipient("bob@example.net"))
            await txn.write_body(b"y" * 600 * KIB)  # past the threshold: spooled to a file
            assert queue.stats.spooled == 1
            await txn.abort()
            await txn.abort()  # idempotent
            with pytest.raises(RuntimeError):
                await txn.commit()

            # The context manager aborts unless committed, also when the body raises.
            with pytest.raises(KeyError):
                async with await queue.begin(make_envelope()) as txn2:
                    await txn2.add_rcpt(Recipient("bob@example.net"))
                    await txn2.write_body(b"z" * 300 * KIB)
                    raise KeyError("session dropped")
            async with await queue.begin(make_envelope()) as txn3:
                await txn3.add_rcpt(Recipient("bob@example.net"))
            assert await queue.count() == 0

    run(test)
    for table in ("message", "recipient", "message_body"):
        assert rows(db, table) == 0
    assert list((tmp_path / "q.db-tmp").iterdir()) == []


def test_a_failed_commit_fails_alone_and_abort_after_it_is_safe(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            taken = await store(queue)
            txns = []
            for i in range(10):
                txn = await queue.begin(make_envelope())
                await txn.add_rcpt(Recipient(f"r{i}@example.net"))
                await txn.write_body(b"body %d\r\n" % i)
                txns.append(txn)
            txns[4]._id = taken  # a colliding id: its insert fails inside the shared batch
            outcomes = await asyncio.gather(*(t.commit() for t in txns), return_exceptions=True)
            assert isinstance(outcomes[4], QueueError)
            assert all(isinstance(o, str) for i, o in enumerate(outcomes) if i != 4)
            await txns[4].abort()
            assert await queue.count() == 10
            for i, message_id in enumerate(outcomes):
                if i != 4:
                    assert await read_body(queue, str(message_id)) == b"body %d\r\n" % i

    run(test)


def test_a_spool_file_changed_on_disk_fails_only_its_own_message(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            txns = []
            for i in range(6):
                txn = await queue.begin(make_envelope())
                await txn.add_rcpt(Recipient(f"r{i}@example.net"))
                await txn.write_body(bytes([65 + i]) * 300 * KIB)  # each one spooled
                txns.append(txn)
            # Rows for this message are written before the mismatch shows, so the writer has to
            # roll the batch back and store the others again.
            spool = txns[2]._spool
            assert spool is not None
            spool.seek(1000)
            spool.write(b"tampered")
            outcomes = await asyncio.gather(*(t.commit() for t in txns), return_exceptions=True)
            assert isinstance(outcomes[2], QueueError) and "changed" in str(outcomes[2])
            stored = [o for i, o in enumerate(outcomes) if i != 2]
            assert all(isinstance(o, str) for o in stored)
            assert await queue.count() == 5
            for i, message_id in enumerate(outcomes):
                if i != 2:
                    assert await read_body(queue, str(message_id)) == bytes([65 + i]) * 300 * KIB

    run(test)


def test_abort_after_a_cancelled_commit_removes_the_message(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            txn = await queue.begin(make_envelope())
            await txn.add_rcpt(Recipient("bob@example.net"))
            await txn.write_body(b"hello\r\n")
            task = asyncio.create_task(txn.commit())
            await asyncio.sleep(0)  # the commit is with the writer now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # No 250 was sent, so the client still owns the message; keeping it would duplicate it.
            await txn.abort()
            assert await queue.count() == 0

    run(test)


def test_disk_full_is_queue_full_and_the_queue_keeps_working(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            await store(queue)
            pages = await queue._submit(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await queue._submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 8}"))
            txn = await queue.begin(make_envelope())
            await txn.add_rcpt(Recipient("bob@example.net"))
            await txn.write_body(os.urandom(900 * KIB))
            with pytest.raises(QueueFull):
                await txn.commit()
            await txn.abort()
            assert await queue.count() == 1
            await store(queue, b"small enough\r\n")
            assert await queue.count() == 2

    run(test)


def test_streaming_a_large_body_keeps_memory_bounded(tmp_path: Path) -> None:
    piece = os.urandom(64 * KIB)
    count = 320  # 20 MiB

    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            expected = hashlib.sha256()
            tracemalloc.start()
            try:
                async with await queue.begin(make_envelope()) as txn:
                    await txn.add_rcpt(Recipient("bob@example.net"))
                    for i in range(count):
                        chunk = i.to_bytes(4, "big") + piece[4:]
                        expected.update(chunk)
                        await txn.write_body(chunk)
                    message_id = await txn.commit()
                _, write_peak = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                got = hashlib.sha256()
                size = 0
                async for chunk in await queue.open_body(message_id):
                    got.update(chunk)
                    size += len(chunk)
                _, read_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert queue.stats.spooled == 1
            assert size == count * 64 * KIB
            assert got.hexdigest() == expected.hexdigest()
            # Threshold (256 KiB) plus a few chunks in flight: nowhere near the 20 MiB body.
            assert write_peak < 4 * KIB * KIB, write_peak
            assert read_peak < 4 * KIB * KIB, read_peak

    run(test)


# --- group commit ---------------------------------------------------------------------------------


def test_concurrent_commits_share_fsyncs(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            before = queue.stats.synced_batches
            ids = await asyncio.gather(*(store(queue, b"m%d\r\n" % i) for i in range(50)))
            assert len(set(ids)) == 50
            assert queue.stats.commits == 50
            assert queue.stats.synced_batches - before < 50
            assert queue.stats.largest_batch > 1

    run(test)


def test_group_commit_throughput(tmp_path: Path) -> None:
    """Prints commits/s for 1 and 50 concurrent committers with 2 KB bodies (run with -s)."""
    body = os.urandom(2048)

    async def measure(queue: SqliteQueue, committers: int, total: int) -> tuple[float, int]:
        async def committer() -> None:
            for _ in range(total // committers):
                await store(queue, body)

        batches = queue.stats.synced_batches
        started = time.perf_counter()
        await asyncio.gather(*(committer() for _ in range(committers)))
        elapsed = time.perf_counter() - started
        return total / elapsed, queue.stats.synced_batches - batches

    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            await measure(queue, 10, 200)  # warm up
            single, single_batches = await measure(queue, 1, 400)
            many, many_batches = await measure(queue, 50, 3000)
        print(
            f"\ngroup commit, 2 KB bodies: 1 committer {single:,.0f} commits/s ({single_batches} fsyncs"
            f" for 400); 50 committers {many:,.0f} commits/s ({many_batches} fsyncs for 3000)"
        )
        assert single_batches == 400
        assert many_batches < 3000

    run(test)


# --- delivery side --------------------------------------------------------------------------------


def test_two_owners_never_lease_the_same_message(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            ids = {await store(queue, b"%d" % i) for i in range(20)}
            now = time.time()
            first, second = await asyncio.gather(
                queue.lease("worker-a", now, 15, 60.0), queue.lease("worker-b", now, 15, 60.0)
            )
            a, b = {m.id for m in first}, {m.id for m in second}
            assert not a & b
            assert a | b == ids
            assert {m.lease_owner for m in first} <= {"worker-a"}
            assert {m.lease_owner for m in second} <= {"worker-b"}
            assert all(m.lease_expires_at == now + 60.0 for m in first + second)
            assert await queue.lease("worker-c", now + 30, 100, 60.0) == []
            assert await queue.lease("worker-c", now, 0, 60.0) == []

    run(test)


def test_an_expired_lease_can_be_taken_over(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            message_id = await store(queue)
            now = time.time()
            assert [m.id for m in await queue.lease("a", now, 10, 30.0)] == [message_id]
            assert await queue.renew(message_id, "a", 30.0, now + 20) == now + 50
            assert await queue.lease("b", now + 40, 10, 30.0) == []  # renewed: still a's
            assert await queue.next_due() == now + 50
            assert [m.id for m in await queue.lease("b", now + 51, 10, 30.0)] == [message_id]
            # a went quiet for too long: it may neither extend nor report.
            with pytest.raises(LeaseLost):
                await queue.renew(message_id, "a", 30.0, now + 52)
            with pytest.raises(LeaseLost):
                await queue.record_attempt(
                    message_id, "a", {"bob@example.net": RecipientResult("delivered", "250 ok")}, now + 52
                )
            result = await queue.record_attempt(
                message_id, "b", {"bob@example.net": RecipientResult("delivered", "250 ok")}, now + 53
            )
            assert result is None
            assert await queue.count() == 0

    run(test)


def test_record_attempt_returns_the_message_exactly_as_stored(tmp_path: Path) -> None:
    """The message record_attempt returns is worked out from the row it read, not read back: it
    must equal what a later read gives, held recipients included."""
    verdict = TlsVerdict(protocol="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", verified=False, policy="may")

    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            message_id = await store(queue, b"x\r\n", ["a@example.net", "b@example.net", "c@example.net"])
            now = time.time()
            assert [m.id for m in await queue.lease("w", now, 1, 60.0)] == [message_id]
            returned = await queue.record_attempt(message_id, "w", {
                "a@example.net": RecipientResult("deferred", "451 4.7.0 later", now + 60, verdict),
                "b@example.net": RecipientResult("failed", "550 5.1.1 unknown")}, now)
            assert returned is not None and returned == await queue.get(message_id)
            # Held by the operator while a node delivers it: what is still pending reads as held.
            assert [m.id for m in await queue.lease("w", now + 100, 1, 60.0)] == [message_id]
            assert await queue.hold(message_id)
            returned = await queue.record_attempt(message_id, "w", {
                "c@example.net": RecipientResult("deferred", "451 4.4.1 no answer", now + 700)}, now + 100)
            assert returned is not None and returned == await queue.get(message_id)
            assert [r.status for r in returned.recipients] == ["held", "failed", "held"]

    run(test)


def test_record_attempt_moves_each_recipient_and_removes_finished_messages(tmp_path: Path) -> None:
    db = tmp_path / "q.db"

    async def test() -> None:
        async with await SqliteQueue.open(db) as queue:
            recipients = ["d@example.net", "e@example.net", "f@example.net", "g@example.net"]
            message_id = await store(queue, b"body\r\n", recipients)
            now = time.time()
            (leased,) = await queue.lease("w", now, 10, 60.0)
            assert leased.id == message_id
            with pytest.raises(ValueError, match="not a recipient"):
                await queue.record_attempt(message_id, "w", {"x@example.net": DELIVERED}, now)
            message = await queue.record_attempt(
                message_id,
                "w",
                {
                    "d@example.net": RecipientResult("delivered", "250 2.0.0 ok"),
                    "e@example.net": RecipientResult("deferred", "451 4.7.5 TLSA lookup failed", now + 600),
                    "f@example.net": RecipientResult("failed", "550 5.1.1 no such user"),
                },
                now,
            )
            assert message is not None
            assert message.lease_owner is None
            states = {r.recipient.address: r for r in message.recipients}
            assert [states[a].status for a in recipients] == ["delivered", "deferred", "failed", "queued"]
            assert states["e@example.net"].attempts == 1
            assert states["e@example.net"].last_reply == "451 4.7.5 TLSA lookup failed"
            assert states["e@example.net"].last_attempt_at == now
            assert states["g@example.net"].attempts == 0

            # g was never attempted, so the message is due again at once.
            assert [m.id for m in await queue.lease("w", now + 1, 10, 60.0)] == [message_id]
            with pytest.raises(ValueError, match="already delivered"):
                await queue.record_attempt(message_id, "w", {"d@example.net": DELIVERED}, now)
            after = await queue.record_attempt(
                message_id, "w", {"g@example.net": RecipientResult("delivered", "250 ok")}, now + 2
            )
            assert after is not None and after.next_attempt_at == now + 600
            assert await queue.lease("w", now + 599, 10, 60.0) == []
            assert await queue.next_due() == now + 600

            (due,) = await queue.lease("w", now + 600, 10, 60.0)
            assert [r.recipient.address for r in due.pending] == ["e@example.net"]
            done = await queue.record_attempt(
                message_id, "w", {"e@example.net": RecipientResult("delivered", "250 ok")}, now + 601
            )
            assert done is None
            assert await queue.get(message_id) is None
            with pytest.raises(MessageNotFound):
                await queue.open_body(message_id)

    run(test)
    for table in ("message", "recipient", "message_body"):
        assert rows(db, table) == 0


def test_hold_and_release(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            message_id = await store(queue)
            assert await queue.hold(message_id)
            now = time.time()
            assert await queue.lease("w", now, 10, 60.0) == []
            assert await queue.next_due() is None
            held = await queue.get(message_id)
            assert held is not None and held.held and held.hold_reason == "operator"
            assert [r.status for r in held.recipients] == ["held"]

            await queue.wait_for_work(0)  # consume the wake-up from the commit
            assert not await queue.wait_for_work(0)
            assert await queue.release(message_id)
            assert await queue.wait_for_work(1.0)  # a release may give the deliverer work
            released = await queue.get(message_id)
            assert released is not None and not released.held and released.hold_reason is None
            assert [r.status for r in released.recipients] == ["queued"]
            assert [m.id for m in await queue.lease("w", now, 10, 60.0)] == [message_id]

            assert not await queue.hold("0000000000000")
            assert not await queue.release("0000000000000")
            assert await queue.delete(message_id)
            assert not await queue.delete(message_id)
            assert await queue.count() == 0

    run(test)


def test_commits_wake_the_deliverer(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            assert not await queue.wait_for_work(0.01)
            waiter = asyncio.create_task(queue.wait_for_work(5.0))
            await asyncio.sleep(0)
            await store(queue)
            assert await waiter
            assert not await queue.wait_for_work(0)  # consumed

    run(test)


def test_close_wakes_an_idle_deliverer(tmp_path: Path) -> None:
    async def test() -> None:
        queue = await SqliteQueue.open(tmp_path / "q.db")
        waiter = asyncio.create_task(queue.wait_for_work(30.0))
        await asyncio.sleep(0)
        await queue.close()
        assert await asyncio.wait_for(waiter, 1.0)
        with pytest.raises(QueueError):
            await queue.lease("w", time.time(), 10, 60.0)

    run(test)


def test_the_tls_verdict_of_the_last_attempt_is_kept_per_recipient(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    verified = TlsVerdict(protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=True, policy="verify")
    plaintext = TlsVerdict(policy="may", failure="STARTTLS not offered")

    async def attempt(queue: SqliteQueue, message_id: str, results: dict[str, RecipientResult]) -> None:
        (leased,) = await queue.lease("w", time.time() + 3600, 10, 60.0)
        assert leased.id == message_id
        await queue.record_attempt(message_id, "w", results, time.time())

    async def test() -> str:
        async with await SqliteQueue.open(db) as queue:
            message_id = await store(queue, b"x\r\n", ["a@example.net", "b@example.net", "c@example.net"])
            later = time.time() + 600
            await attempt(queue, message_id, {
                "a@example.net": RecipientResult("delivered", "250 ok", tls=verified),
                "b@example.net": RecipientResult("deferred", "451 4.3.0 later", later, plaintext)})
            message = await queue.get(message_id)
            assert message is not None
            assert [r.tls for r in message.recipients] == [verified, plaintext, None]
            # The next attempt never reached a host: its verdict (none) replaces the older one.
            await attempt(queue, message_id, {
                "b@example.net": RecipientResult("deferred", "451 4.4.3 DNS failed", later)})
            message = await queue.get(message_id)
            assert message is not None and [r.tls for r in message.recipients] == [verified, None, None]
            return message_id

    message_id = run(test)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT tls FROM recipient WHERE message_id = ? AND seq = 0",
                              (message_id,)).fetchone()[0]
    conn.close()
    assert json.loads(stored) == {"protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                                  "verified": True, "policy": "verify", "failure": None, "trust": "Verified",
                                  "dane": None}


def test_retry_makes_pending_recipients_due_without_counting_an_attempt(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            deferred = await store(queue, b"1", ["a@example.net", "b@example.net"])
            held = await store(queue, b"2", ["c@example.net"])
            now = time.time()
            later = now + 3600
            assert [m.id for m in await queue.lease("w", now, 10, 60.0)] == [deferred, held]
            await queue.record_attempt(deferred, "w", {
                "a@example.net": DELIVERED,
                "b@example.net": RecipientResult("deferred", "451 4.7.1 later", later)}, now)
            await queue.record_attempt(held, "w", {
                "c@example.net": RecipientResult("deferred", "451 4.7.1 later", later)}, now)
            assert await queue.hold(held)
            fresh = await store(queue, b"3", ["d@example.net"])
            assert [m.id for m in await queue.lease("w", now + 10, 10, 60.0)] == [fresh]  # due alone
            await queue.wait_for_work(0)

            assert await queue.retry([deferred], now + 20) == 1
            assert await queue.wait_for_work(0)  # the deliverer looks again at once
            message = await queue.get(deferred)
            assert message is not None
            a, b = message.recipients
            assert (a.status, a.next_attempt_at) == ("delivered", None)  # final ones stay final
            assert (b.status, b.attempts, b.next_attempt_at, b.last_reply) == ("deferred", 1, now + 20,
                                                                               "451 4.7.1 later")
            assert await queue.next_due() == now + 20
            assert [m.id for m in await queue.lease("w2", now + 20, 10, 60.0)] == [deferred]

            # A flush skips held messages and counts those in delivery, whose lease stands.
            assert await queue.retry(None, now + 30) == 2
            message = await queue.get(held)
            assert message is not None and message.recipients[0].next_attempt_at == later
            for leased_id in (deferred, fresh):
                message = await queue.get(leased_id)
                assert message is not None and message.lease_expires_at is not None
            assert await queue.lease("w3", now + 30, 10, 60.0) == []
            assert await queue.retry(["0000000000000", held], now + 40) == 0
            assert await queue.retry([], now + 40) == 0

    run(test)


def test_changes_by_another_process_wake_the_deliverer(tmp_path: Path) -> None:
    db = tmp_path / "q.db"

    async def test() -> None:
        async with await SqliteQueue.open(db, watch_interval=0.05) as queue:
            message_id = await store(queue)
            await queue.wait_for_work(0)
            assert await queue.hold(message_id)
            assert not await queue.wait_for_work(0.3)  # its own writes are no news to the queue
            waiter = asyncio.create_task(queue.wait_for_work(5.0))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            # As `mailward queue release` does it: its own connection, its own transaction.
            await asyncio.to_thread(sql, db, "UPDATE message SET held = 0 WHERE id = ?", message_id)
            assert await waiter
            assert time.monotonic() - started < 1.0
            assert not await queue.wait_for_work(0.3)

    run(test)


def test_listing_count_and_age(tmp_path: Path) -> None:
    async def test() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            ids = [await store(queue, b"%d" % i) for i in range(5)]
            assert await queue.count() == 5
            assert [m.id for m in await queue.list()] == ids
            page = await queue.list(limit=2)
            assert [m.id for m in page] == ids[:2]
            assert [m.id for m in await queue.list(limit=10, after=page[-1].id)] == ids[2:]
            first = await queue.get(ids[0])
            assert first is not None
            assert await queue.oldest_age(first.created_at + 90) == 90.0

    run(test)


def test_a_closed_queue_refuses_work_and_drops_open_transactions(tmp_path: Path) -> None:
    async def test() -> None:
        queue = await SqliteQueue.open(tmp_path / "q.db")
        txn = await queue.begin(make_envelope())
        await txn.add_rcpt(Recipient("bob@example.net"))
        await txn.write_body(b"q" * 400 * KIB)  # holds a spool file, which close() must free
        await queue.close()
        await queue.close()
        with pytest.raises(RuntimeError):
            await txn.commit()
        with pytest.raises(QueueError):
            await queue.begin(make_envelope())
        with pytest.raises(QueueError):
            await queue.count()

    run(test)


# --- verification ---------------------------------------------------------------------------------


def _corruption_setup(db: Path) -> tuple[str, bytes]:
    body = bytes(range(256)) * 12  # 3072 bytes: three 1 KiB chunks

    async def setup() -> str:
        async with await SqliteQueue.open(db, chunk_size=KIB) as queue:
            return await store(queue, body)

    return run(setup), body


def _assert_held_as_corrupt(db: Path, message_id: str, caplog: pytest.LogCaptureFixture) -> None:
    async def check() -> None:
        async with await SqliteQueue.open(db, chunk_size=KIB) as queue:
            message = await queue.get(message_id)
            assert message is not None and message.held
            assert message.hold_reason is not None and message.hold_reason.startswith("corrupt")
            assert await queue.lease("w", time.time() + 3600, 10, 60.0) == []

    run(check)
    assert any(
        r.name == "mailward.queue" and r.levelno == logging.ERROR and message_id in r.getMessage()
        for r in caplog.records
    )


def test_a_missing_body_chunk_is_detected_before_anything_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"
    message_id, _ = _corruption_setup(db)
    sql(db, "DELETE FROM message_body WHERE message_id = ? AND seq = 1", message_id)

    async def test() -> None:
        async with await SqliteQueue.open(db, chunk_size=KIB) as queue:
            with pytest.raises(CorruptMessage) as caught:
                await queue.open_body(message_id)
            assert caught.value.message_id == message_id

    run(test)
    _assert_held_as_corrupt(db, message_id, caplog)


def test_a_truncated_chunk_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "q.db"
    message_id, _ = _corruption_setup(db)
    sql(db, "UPDATE message_body SET data = substr(data, 1, 99) WHERE message_id = ? AND seq = 2", message_id)

    async def test() -> None:
        async with await SqliteQueue.open(db, chunk_size=KIB) as queue:
            with pytest.raises(CorruptMessage):
                await queue.open_body(message_id)

    run(test)
    _assert_held_as_corrupt(db, message_id, caplog)


def test_a_changed_byte_stops_the_stream_before_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"
    message_id, body = _corruption_setup(db)
    damaged = bytearray(body[KIB : 2 * KIB])
    damaged[10] ^= 0x01
    sql(db, "UPDATE message_body SET data = ? WHERE message_id = ? AND seq = 1", bytes(damaged), message_id)

    async def test() -> None:
        async with await SqliteQueue.open(db, chunk_size=KIB) as queue:
            received = []
            with pytest.raises(CorruptMessage):
                async for chunk in await queue.open_body(message_id):
                    received.append(chunk)
            # The consumer never holds the complete (damaged) message, so it cannot finish DATA.
            assert sum(map(len, received)) < len(body)

    run(test)
    _assert_held_as_corrupt(db, message_id, caplog)


def test_an_undecodable_envelope_is_held_not_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"

    async def setup() -> tuple[str, str]:
        async with await SqliteQueue.open(db) as queue:
            return await store(queue), await store(queue)

    bad, good = run(setup)
    sql(db, "UPDATE message SET envelope = '{\"v\": 1, \"sender\": 7' WHERE id = ?", bad)

    async def test() -> None:
        async with await SqliteQueue.open(db) as queue:
            leased = await queue.lease("w", time.time(), 10, 60.0)
            assert [m.id for m in leased] == [good]  # the bad record did not poison the lease
            assert [m.id for m in await queue.list()] == [good]
            with pytest.raises(CorruptMessage):
                await queue.get(bad)
            assert await queue.count() == 2  # kept for the operator
        # Damage found while a worker holds the lease: its report is refused, the message held.
        sql(db, "UPDATE message SET envelope = 'garbage' WHERE id = ?", good)
        async with await SqliteQueue.open(db) as queue:
            with pytest.raises(CorruptMessage):
                await queue.record_attempt(good, "w", {"bob@example.net": DELIVERED}, time.time())
            assert await queue.lease("w", time.time() + 3600, 10, 60.0) == []
            assert await queue.count() == 2

    run(test)
    assert any(r.name == "mailward.queue" and bad in r.getMessage() for r in caplog.records)
    assert any(r.name == "mailward.queue" and good in r.getMessage() for r in caplog.records)


def test_the_wal_is_checkpointed_beside_the_writer(tmp_path: Path) -> None:
    """Commits never wait behind a checkpoint: a thread of its own copies the WAL back into the
    database, so the WAL starts over long before the writer's own backstop would checkpoint."""
    db = tmp_path / "q.db"
    body = b"Subject: big\r\n\r\n" + b"x" * 76 * 1300 + b"\r\n"  # about 100 KB: 25 pages each

    async def test() -> None:
        async with await SqliteQueue.open(db) as queue:
            ids = []
            for _ in range(3):  # about 1,500 pages of WAL per round
                ids += [await store(queue, body) for _ in range(60)]
                await asyncio.sleep(4 * sqlite_module.CHECKPOINT_INTERVAL)
            assert queue.stats.checkpoints > 0
            with sqlite3.connect(db) as conn:
                busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # Without the checkpointer the WAL would hold all three rounds (about 4,500 pages).
            assert busy == 0 and 0 < frames < 3000 < sqlite_module.WRITER_AUTOCHECKPOINT
            assert await read_body(queue, ids[0]) == body

    run(test)
