"""The PostgreSQL queue backend against a real PostgreSQL server (tests/postgres_server.py).

The first part runs the protocol tests of the SQLite backend (test_queue_sqlite.py) against
PostgreSQL unchanged: those tests open their queue with ``SqliteQueue.open(path)`` and look at
its tables with ``rows``/``sql``; here those three names are pointed at PostgreSQL, one database
per queue path, so the same assertions hold both backends to one contract. Tests of what only
SQLite has (its file, its writer's batches, its schema upgrades) are not in the list.

The rest covers what only the shared queue has: several nodes, the schema check at open, the
cross-node destination slots, the shared MTA-STS cache and TLS-RPT tallies, and import.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import test_queue_sqlite as sqlite_suite
from test_queue_sqlite import DELIVERED, NOW, make_envelope, read_body, run, store

from mailward.queue import (
    CorruptMessage,
    DestinationSlots,
    LeaseLost,
    QueueError,
    Recipient,
    RecipientResult,
    StsPolicyRecord,
    TlsRptTally,
    TlsVerdict,
)
from mailward.queue.postgres import PostgresQueue, connect, describe_url
from mailward.queue.postgres_schema import SCHEMA_VERSION
from postgres_server import PASSWORD, PASSWORD_USER, PgServer, pg_server  # noqa: F401 - the fixture

PROTOCOL_TESTS = [
    "test_commit_stores_envelope_recipients_and_body",
    "test_empty_body_and_no_recipients",
    "test_a_failed_commit_fails_alone_and_abort_after_it_is_safe",
    "test_a_spool_file_changed_on_disk_fails_only_its_own_message",
    "test_abort_after_a_cancelled_commit_removes_the_message",
    "test_two_owners_never_lease_the_same_message",
    "test_an_expired_lease_can_be_taken_over",
    "test_record_attempt_moves_each_recipient_and_removes_finished_messages",
    "test_record_attempt_returns_the_message_exactly_as_stored",
    "test_hold_and_release",
    "test_commits_wake_the_deliverer",
    "test_close_wakes_an_idle_deliverer",
    "test_retry_makes_pending_recipients_due_without_counting_an_attempt",
    "test_listing_count_and_age",
    "test_a_closed_queue_refuses_work_and_drops_open_transactions",
    "test_a_missing_body_chunk_is_detected_before_anything_is_read",
    "test_a_truncated_chunk_is_detected",
    "test_a_changed_byte_stops_the_stream_before_its_end",
    "test_an_undecodable_envelope_is_held_not_delivered",
]


class PostgresByPath:
    """Stands where the SQLite suite names `SqliteQueue`: each queue path gets its own migrated
    database, and opening the same path again reopens that database (as reopening a file would)."""

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self.urls: dict[Path, str] = {}

    def url(self, path: Path | str) -> str:
        key = Path(path)
        if key not in self.urls:
            self.urls[key] = self.server.database()
        return self.urls[key]

    async def open(self, path: Path | str, *, chunk_size: int = 256 * 1024, **_sqlite_only: Any
                   ) -> PostgresQueue:
        return await PostgresQueue.open(self.url(path), chunk_size=chunk_size, pool_size=4)

    def rows(self, path: Path, table: str) -> int:
        with psycopg.connect(self.url(path)) as conn:
            row = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
        assert row is not None
        return int(row[0])

    def sql(self, path: Path, statement: str, *args: Any) -> None:
        with psycopg.connect(self.url(path), autocommit=True) as conn:
            conn.execute(statement.replace("?", "%s").encode(), args)


@pytest.fixture
def by_path(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> PostgresByPath:  # noqa: F811
    backend = PostgresByPath(pg_server)
    monkeypatch.setattr(sqlite_suite, "SqliteQueue", backend)
    monkeypatch.setattr(sqlite_suite, "rows", backend.rows)
    monkeypatch.setattr(sqlite_suite, "sql", backend.sql)
    return backend


@pytest.mark.parametrize("name", PROTOCOL_TESTS)
def test_the_sqlite_protocol_tests_hold_for_postgres(name: str, by_path: PostgresByPath, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    test: Callable[..., None] = getattr(sqlite_suite, name)
    wanted = test.__code__.co_varnames[:test.__code__.co_argcount]
    test(**{arg: tmp_path if arg == "tmp_path" else request.getfixturevalue(arg) for arg in wanted})
    assert by_path.urls, "the test never opened a queue"


# --- what only the shared queue has ---------------------------------------------------------------


@pytest.fixture
def url(pg_server: PgServer) -> str:  # noqa: F811
    return pg_server.database()


def test_commits_wait_for_a_synchronous_commit(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url) as queue, queue._pool.connection() as conn:
            cur = await conn.execute("SHOW synchronous_commit")
            assert await cur.fetchone() == ("on",)

    run(test)


def test_open_refuses_an_unmigrated_or_older_schema(pg_server: PgServer) -> None:  # noqa: F811
    empty = pg_server.database(migrated=False)
    with pytest.raises(QueueError, match=r"has no mailward queue yet; run `mailward queue migrate`"):
        run(lambda: PostgresQueue.open(empty))
    older = pg_server.database()
    with psycopg.connect(older, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema'")
    with pytest.raises(QueueError, match=rf"schema 0, older than this mailward's {SCHEMA_VERSION}; run "
                                          "`mailward queue migrate`"):
        run(lambda: PostgresQueue.open(older))


def test_connection_failures_are_one_sentence_without_the_password(pg_server: PgServer,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    wrong = pg_server.url("postgres", user=PASSWORD_USER, password="not-" + PASSWORD)
    with pytest.raises(QueueError) as refused:
        run(lambda: PostgresQueue.open(wrong))
    assert "refused the login" in str(refused.value) and "check the user and password" in str(refused.value)
    assert PASSWORD not in str(refused.value)
    nowhere = f"postgresql://postgres@/postgres?host={tmp_path}"
    with pytest.raises(QueueError,
                       match=r"cannot connect to PostgreSQL at .*check that PostgreSQL is running"):
        run(lambda: PostgresQueue.open(nowhere))
    with pytest.raises(QueueError, match=r"queue\.url is not a valid PostgreSQL URL") as malformed:
        run(lambda: PostgresQueue.open("postgresql://u:pass word@/db?host=/nowhere"))
    assert "pass word" not in str(malformed.value)
    # The password may come from a passfile named in the URL, as the README advises.
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{PASSWORD_USER}:{PASSWORD}\n")
    passfile.chmod(0o600)

    async def login() -> None:
        conn = await connect(pg_server.url("postgres", user=PASSWORD_USER) + f"&passfile={passfile}")
        await conn.close()

    run(login)
    assert describe_url(pg_server.url("mail")) == f"PostgreSQL at {pg_server.socket_dir}, database mail"


def test_two_nodes_lease_disjoint_sets_and_see_each_others_commits(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url) as a, await PostgresQueue.open(url) as b:
            await b.wait_for_work(0)
            waiter = asyncio.create_task(b.wait_for_work(5.0))
            await asyncio.sleep(0.05)
            ids = {await store(a, b"%d" % i) for i in range(60)}
            assert await waiter  # a's commit woke b through NOTIFY
            now = time.time()
            got = await asyncio.gather(*(node.lease(f"w{i}", now, 7, 60.0)
                                         for i in range(8) for node in (a, b)))
            leased = [m.id for batch in got for m in batch]
            assert len(leased) == len(set(leased)) == 60 and set(leased) == ids
            # The owner is visible to every node, and only the owner may report.
            first = got[0][0]
            seen = await b.get(first.id)
            assert seen is not None and seen.lease_owner == "w0"
            with pytest.raises(LeaseLost):
                await b.record_attempt(first.id, "w1", {"bob@example.net": DELIVERED}, now)
            assert await b.record_attempt(first.id, "w0", {"bob@example.net": DELIVERED}, now) is None
            assert await a.count() == 59

    run(test)


def test_a_release_or_retry_on_one_node_wakes_another(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url) as a, await PostgresQueue.open(url) as b:
            message_id = await store(a)
            assert await a.hold(message_id)
            await asyncio.sleep(0.1)
            await a.wait_for_work(0)
            await b.wait_for_work(0)
            assert not await a.wait_for_work(0.2)  # a hold makes no work
            waiter = asyncio.create_task(a.wait_for_work(5.0))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            assert await b.release(message_id)
            assert await waiter and time.monotonic() - started < 1.0
            waiter = asyncio.create_task(a.wait_for_work(5.0))
            await asyncio.sleep(0.05)
            assert await b.retry(None, time.time()) == 1
            assert await waiter

    run(test)


def test_destination_slots_hold_across_nodes_and_expire_with_their_node(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url, slot_seconds=30) as a, \
                await PostgresQueue.open(url, slot_seconds=30) as b:
            assert isinstance(a, DestinationSlots)
            now = time.time()
            taken = await asyncio.gather(*(node.acquire_destination_slot("example.net", 3, now)
                                           for node in (a, b, a, b, a, b)))
            slots = [s for s in taken if s is not None]
            assert sorted(slots) == [0, 1, 2]  # three of six asked, whichever node asked
            assert await a.acquire_destination_slot("other.example", 1, now) == 0  # per destination
            nodes = (a, b, a, b, a, b)
            mine = [s for s, node in zip(taken, nodes, strict=True) if s is not None and node is a]
            if mine:
                await a.release_destination_slot("example.net", mine[0])
                assert await b.acquire_destination_slot("example.net", 3, now) == mine[0]
            # A node that stops renewing (it died) loses its slots once they expire.
            assert await b.acquire_destination_slot("example.net", 3, now) is None
            assert await b.acquire_destination_slot("example.net", 3, now + 31) is not None

    run(test)


def test_mta_sts_cache_and_tls_report_tallies_are_shared(url: str) -> None:
    record = StsPolicyRecord("example.org", "20261128", "version: STSv1\r\nmode: enforce\r\n", NOW,
                             NOW + 86400)
    ok = TlsRptTally(day="2026-11-28", domain="example.org", policy_type="sts",
                     policy_strings=("version: STSv1", "mode: enforce"), mx_hosts=("mx.example.org",))
    bad = TlsRptTally(day="2026-11-28", domain="example.org", policy_type="sts",
                      result_type="certificate-expired",
                      receiving_mx="mx.example.org", receiving_ip="192.0.2.1", information="expired", count=3)

    async def test() -> None:
        async with await PostgresQueue.open(url) as a, await PostgresQueue.open(url) as b:
            assert await b.load_sts_policy("example.org") is None
            await a.save_sts_policy(StsPolicyRecord("example.org", "old", "x", NOW, NOW))
            await a.save_sts_policy(record)
            assert await b.load_sts_policy("example.org") == record
            await a.add_tlsrpt_tallies([ok, bad])
            await b.add_tlsrpt_tallies([ok, TlsRptTally(day="2026-11-27", domain="example.net",
                                                        policy_type="tlsa")])
            tallies = await a.load_tlsrpt_tallies("2026-11-28")
            # Both nodes' counts of the same session kind add up in one row.
            assert sorted(tallies, key=lambda t: t.result_type) == [replace(ok, count=2), bad]
            assert await a.load_tlsrpt_tallies("2026-11-28", "example.net") == []
            assert await a.mark_tlsrpt_sent("2026-11-28", "example.org", "r1", NOW)
            assert not await b.mark_tlsrpt_sent("2026-11-28", "example.org", "r2", NOW)  # the first one sends
            assert await b.tlsrpt_sent("2026-11-28") == {"example.org": "r1"}
            await b.prune_tlsrpt("2026-11-28")
            assert [t.day for t in await a.load_tlsrpt_tallies("2026-11-27")] == []
            assert len(await a.load_tlsrpt_tallies("2026-11-28")) == 2

    run(test)


def test_import_keeps_ids_states_and_bodies(url: str) -> None:
    verdict = TlsVerdict(protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=True, policy="dane")

    async def test() -> None:
        async with await PostgresQueue.open(url, chunk_size=1024) as source:
            body = bytes(range(256)) * 10
            message_id = await store(source, body, ["a@example.net", "b@example.net"])
            assert [m.id for m in await source.lease("w", time.time(), 1, 60.0)] == [message_id]
            message = await source.record_attempt(message_id, "w", {
                "a@example.net": RecipientResult("delivered", "250 ok", tls=verdict),
                "b@example.net": RecipientResult("deferred", "451 later", NOW + 600)}, time.time())
            assert message is not None
            assert await source.hold(message_id)
            held = await source.get(message_id)
            assert held is not None
            assert await source.delete(message_id)
            assert await source.import_message(held, body)
            assert not await source.import_message(held, body)  # run again: already there
            again = await source.get(message_id)
            assert again == held
            assert await source.release(message_id)
            released = await source.get(message_id)
            assert released is not None
            assert [(r.status, r.attempts, r.tls) for r in released.recipients] == [
                ("delivered", 1, verdict), ("deferred", 1, None)]
            assert await read_body(source, message_id) == body
            with pytest.raises(CorruptMessage):
                await source.import_message(held, body + b"x")
            assert hashlib.sha256(body).hexdigest() == held.digest

    run(test)


def test_abort_waits_for_a_cancelled_commit_still_running_in_the_server(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url) as queue, \
                await psycopg.AsyncConnection.connect(url) as other:
            txn = await queue.begin(make_envelope())
            await txn.add_rcpt(Recipient("bob@example.net"))
            await txn.write_body(b"hello\r\n")
            # Another session holds the table, so the INSERT waits inside the server.
            await other.execute("LOCK TABLE message IN EXCLUSIVE MODE")
            task = asyncio.create_task(txn.commit())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            aborting = asyncio.create_task(txn.abort())
            await asyncio.sleep(0.3)
            assert not aborting.done()  # it waits for the statement in flight, not just the client
            await other.commit()  # the INSERT goes through now and commits ...
            await aborting
            assert await queue.count() == 0  # ... and abort() removed it: no 250 was sent

    run(test)


def test_concurrent_commits_share_statements_and_one_bad_message_fails_alone(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url) as queue:
            taken = await store(queue)
            inserter = queue._inserter
            before, stored = inserter.statements, inserter.stored
            ids = await asyncio.gather(*(store(queue, b"m%d\r\n" % i) for i in range(50)))
            assert len(set(ids)) == 50 and await queue.count() == 51
            assert inserter.stored - stored == 50
            assert inserter.statements - before < 50  # group commit: fewer COMMITs than messages
            txns = []
            for i in range(20):
                txn = await queue.begin(make_envelope())
                await txn.add_rcpt(Recipient(f"r{i}@example.net"))
                await txn.write_body(b"body %d\r\n" % i)
                txns.append(txn)
            txns[7]._id = taken  # a colliding id fails its statement; the others are stored again
            outcomes = await asyncio.gather(*(t.commit() for t in txns), return_exceptions=True)
            assert isinstance(outcomes[7], QueueError)
            assert all(isinstance(o, str) for i, o in enumerate(outcomes) if i != 7)
            assert await queue.count() == 70

    run(test)


def test_the_queue_recovers_when_postgresql_drops_its_connections(url: str) -> None:
    async def test() -> None:
        async with await PostgresQueue.open(url, pool_size=3) as a, await PostgresQueue.open(url) as b:
            await store(a)
            await a.wait_for_work(0)
            # As a server restart or a failover does it: every session of the queue is cut.
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE application_name = 'mailward' AND datname = current_database()")
            # The listener reconnects, and wakes the deliverer: it may have missed notifications.
            assert await a.wait_for_work(10.0)
            # A pooled connection that was cut fails its one operation (a 451 for a session);
            # the pool replaces it, and the queue works again.
            failures = 0
            for _ in range(6):
                try:
                    assert await a.count() == 1
                except QueueError:
                    failures += 1
            assert failures <= 3
            assert await a.count() == 1
            # Notifications flow again between the nodes.
            await asyncio.sleep(0.2)
            await a.wait_for_work(0)
            waiter = asyncio.create_task(a.wait_for_work(5.0))
            await asyncio.sleep(0.05)
            for _ in range(4):
                with contextlib.suppress(QueueError):
                    await store(b)
                    break
            assert await waiter

    run(test)


def test_a_deliverer_waits_for_the_database_before_taking_a_shared_slot(
        url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mailward.config import config_from_dict
    from mailward.delivery import Deliverer

    config = config_from_dict({"listener": [], "hostname": "out.example.net", "state_dir": str(tmp_path),
                               "delivery": {"per_destination": 2}}, "test", base_dir=tmp_path)

    async def test() -> None:
        async with await PostgresQueue.open(url, pool_size=2) as queue:
            deliverer = Deliverer(config, queue, None, None, owner="t:1")
            # Every pooled connection is cut, as by a database restart: the first tries fail.
            async with queue._pool.connection() as c1, queue._pool.connection() as c2:
                pids = [c1.info.backend_pid, c2.info.backend_pid]
            with psycopg.connect(url, autocommit=True) as admin:
                for pid in pids:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            first = await asyncio.wait_for(deliverer._shared_slot("example.org"), 10)
            second = await deliverer._shared_slot("example.org")
            assert {first, second} == {0, 1}
            # Both of the destination's slots are taken: a third waits until one is released.
            third = asyncio.create_task(deliverer._shared_slot("example.org"))
            await asyncio.sleep(0.5)
            assert not third.done()
            await deliverer._release_shared_slot("example.org", first)
            assert await asyncio.wait_for(third, 5) == first

    run(test)
    assert any("cannot take a shared connection slot, waiting" in r.getMessage() for r in caplog.records)


def test_the_queue_tool_lists_and_reports_damaged_records_without_changing_them(url: str) -> None:
    from mailward.queue.postgres_tool import SharedQueue

    async def setup() -> tuple[str, str]:
        async with await PostgresQueue.open(url) as queue:
            return await store(queue), await store(queue)

    bad, good = run(setup)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE message SET envelope = 'garbage' WHERE id = %s", (bad,))
    tool = SharedQueue(url)
    try:
        listed, damaged = tool.messages()
    finally:
        tool.close()
    assert [m.id for m in listed] == [good]
    assert [c.message_id for c in damaged] == [bad]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT held FROM message WHERE id = %s", (bad,)).fetchone() == (False,)


def test_concurrent_attempts_share_transactions_and_a_refused_one_fails_alone(url: str) -> None:
    """Attempts finished together are recorded together, as commits are; one whose lease is gone
    or whose message was removed is refused on its own, and the rest are recorded exactly as one
    at a time would record them."""
    async def test() -> None:
        async with await PostgresQueue.open(url) as queue:
            ids = await asyncio.gather(*(store(queue, b"m%d\r\n" % i, [f"r{i}@example.net", "x@example.net"])
                                         for i in range(60)))
            now = time.time()
            leased = await queue.lease("w", now, 100, 60.0)
            assert sorted(m.id for m in leased) == sorted(ids)
            gone, stolen = ids[10], ids[20]
            assert await queue.delete(gone)
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("UPDATE message SET lease_owner = 'other' WHERE id = %s", (stolen,))
            recorder = queue._recorder
            before, recorded = recorder.transactions, recorder.recorded

            def results(i: int) -> dict[str, RecipientResult]:
                # Even messages are finished; odd ones keep a recipient deferred.
                later = RecipientResult("deferred", "451 4.4.1 later", now + 600)
                return {f"r{i}@example.net": DELIVERED, "x@example.net": DELIVERED if i % 2 == 0 else later}

            outcomes = await asyncio.gather(*(queue.record_attempt(mid, "w", results(i), now)
                                              for i, mid in enumerate(ids)), return_exceptions=True)
            assert isinstance(outcomes[10], LeaseLost) and isinstance(outcomes[20], LeaseLost)
            assert recorder.transactions - before < 20  # shared: far fewer than 58 transactions
            assert recorder.recorded - recorded >= 58
            for i, (mid, outcome) in enumerate(zip(ids, outcomes, strict=True)):
                if i in (10, 20):
                    continue
                stored = await queue.get(mid)
                if i % 2 == 0:
                    assert outcome is None and stored is None
                    continue
                assert outcome is not None and not isinstance(outcome, BaseException)
                assert outcome == stored
                statuses = [(r.status, r.attempts) for r in outcome.recipients]
                assert statuses == [("delivered", 1), ("deferred", 1)]
                assert outcome.lease_owner is None
            # The stolen message is untouched: still leased by the other owner, nothing recorded.
            untouched = await queue.get(stolen)
            assert untouched is not None and untouched.lease_owner == "other"
            assert all(r.attempts == 0 for r in untouched.recipients)
            assert await queue.count() == 30 + 1  # the 30 odd ones and the stolen one

    run(test)
