"""The Deliverer's own arithmetic and bookkeeping, with a real SQLite queue and an injected clock."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import mailward.delivery as delivery_module
from mailward.config import ConfigError, config_from_dict
from mailward.delivery import (
    DeadHosts,
    Deliverer,
    SlowStart,
    _Outcome,
    backoff,
    due_recipients,
    group_by_destination,
    read_smarthost_credentials,
    settle,
    tls_required_no,
)
from mailward.delivery.attempt import RecipientOutcome, TlsOutcome
from mailward.queue import Envelope, QueueError, Recipient, RecipientState, StoredMessage, TlsVerdict
from mailward.queue.sqlite import SqliteQueue

DAY = 86400.0


def make_config(tmp_path: Path, **delivery: Any) -> Any:
    return config_from_dict({
        "listener": [], "hostname": "out.example.net", "state_dir": str(tmp_path),
        "local_domains": ["example.net"],
        "delivery": {"route": [{"domain": "routed.example", "next_hop": "[192.0.2.25]:2526"}], **delivery},
    }, "test", base_dir=tmp_path)


# --- backoff, slow start, dead hosts ------------------------------------------------------------------

@pytest.mark.parametrize(("attempts", "expected"), [
    (1, 300), (2, 600), (3, 1200), (4, 2400), (5, 4800), (6, 9600), (7, 14400), (8, 14400), (500, 14400),
])
def test_backoff_doubles_up_to_the_maximum(attempts: int, expected: float) -> None:
    assert backoff(attempts, 300, 14400) == expected


def test_backoff_jitter_only_shortens_by_up_to_a_tenth() -> None:
    assert backoff(1, 300, 14400, jitter=0.999) == pytest.approx(270.03)
    assert backoff(9, 300, 14400, jitter=0.5) == pytest.approx(14400 * 0.95)
    assert backoff(0, 300, 14400) == 300  # no attempt yet counts as the first


def test_slow_start_grows_by_one_and_halves() -> None:
    s = SlowStart(2, 5)
    assert (s.limit, s.available) == (2, True)
    s.active = 2
    assert not s.available
    for expected in (3, 4, 5, 5):
        s.success()
        assert s.limit == expected
    s.failure()
    assert s.limit == 2
    s.failure()
    s.failure()
    assert s.limit == 1  # never below one connection
    assert SlowStart(10, 4).limit == 4


def test_dead_hosts_expire() -> None:
    dead = DeadHosts(300)
    dead.mark("192.0.2.1", 25, now=1000)
    assert dead.is_dead("192.0.2.1", 25, now=1299.9)
    assert not dead.is_dead("192.0.2.1", 2525, now=1100)  # the port is part of the key
    assert not dead.is_dead("192.0.2.2", 25, now=1100)
    assert not dead.is_dead("192.0.2.1", 25, now=1300)
    assert len(dead) == 0  # forgotten once expired
    off = DeadHosts(0)
    off.mark("192.0.2.1", 25, now=1000)
    assert not off.is_dead("192.0.2.1", 25, now=1000)


# --- grouping ------------------------------------------------------------------------------------------

def state(address: str, **kw: Any) -> RecipientState:
    return RecipientState(Recipient(address, kw.pop("notify", frozenset())), kw.pop("status", "queued"), **kw)


def stored(*states: RecipientState, created_at: float = 1000.0,
           sender: str = "alice@example.net") -> StoredMessage:
    env = Envelope(sender=sender, client_ip="192.0.2.9", client_helo="c", listener="submission",
                   received_at=created_at)
    return StoredMessage(id="M1", envelope=env, recipients=states, size=10, digest="0" * 64,
                         created_at=created_at)


def test_grouping_by_destination(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    msg = stored(state("bob@example.net"), state("carol@other.example"), state("dave@routed.example"),
                 state("erin@other.example"), state("postmaster"), state("frank@Other.Example"))
    groups = group_by_destination(msg.pending, cfg)
    assert [(d.key, [r.address for r in rs]) for d, rs in groups.items()] == [
        ("local", ["bob@example.net", "postmaster"]),
        ("mx:other.example", ["carol@other.example", "erin@other.example", "frank@Other.Example"]),
        ("route:[192.0.2.25]:2526", ["dave@routed.example"]),
    ]


def test_only_due_pending_recipients_are_tried() -> None:
    msg = stored(state("a@x.example"), state("b@x.example", status="deferred", next_attempt_at=2000.0),
                 state("c@x.example", status="delivered"), state("d@x.example", status="deferred",
                                                                 next_attempt_at=1500.0))
    assert [r.recipient.address for r in due_recipients(msg, now=1500.0)] == ["a@x.example", "d@x.example"]


# --- settling one outcome -------------------------------------------------------------------------------

DEFER = RecipientOutcome("deferred", "451 4.3.0 try later", "4.3.0")


def test_deferral_backs_off_from_the_attempt_count(tmp_path: Path) -> None:
    dc = make_config(tmp_path).delivery
    s = settle(state("a@x.example", attempts=2), DEFER, arrived_at=1000.0, now=5000.0, dc=dc)
    assert s.result.status == "deferred" and s.result.next_attempt_at == 5000.0 + 1200
    assert s.report is None and s.status_word == "deferred"


def test_last_retry_is_at_expiry_and_expiry_fails_with_4_4_7(tmp_path: Path) -> None:
    dc = make_config(tmp_path).delivery
    created = 1000.0
    near_end = created + 5 * DAY - 100
    s = settle(state("a@x.example", attempts=30, last_attempt_at=near_end - 10), DEFER,
               arrived_at=created, now=near_end, dc=dc)
    assert s.result.next_attempt_at == created + 5 * DAY  # not later than the lifetime
    s = settle(state("a@x.example", attempts=31), DEFER, arrived_at=created, now=created + 5 * DAY, dc=dc)
    assert (s.result.status, s.status_word, s.enhanced) == ("failed", "expired", "4.4.7")
    assert s.result.reply == "4.4.7 delivery time expired; last error: 451 4.3.0 try later"
    assert s.report is not None and (s.report.action, s.report.status) == ("failed", "4.4.7")


def test_delay_warning_once_when_first_found_late(tmp_path: Path) -> None:
    dc = make_config(tmp_path).delivery  # delay_warning 4 h
    created = 1000.0
    before = settle(state("a@x.example", attempts=3, last_attempt_at=created + 3600), DEFER,
                    arrived_at=created, now=created + 3 * 3600, dc=dc)
    assert before.report is None
    crossing = settle(state("a@x.example", attempts=4, last_attempt_at=created + 3 * 3600), DEFER,
                      arrived_at=created, now=created + 4 * 3600 + 5, dc=dc)
    assert crossing.report is not None
    assert (crossing.report.action, crossing.report.status) == ("delayed", "4.3.0")
    assert crossing.report.will_retry_until == created + 5 * DAY
    after = settle(state("a@x.example", attempts=5, last_attempt_at=created + 4 * 3600 + 5), DEFER,
                   arrived_at=created, now=created + 6 * 3600, dc=dc)
    assert after.report is None
    first_try_late = settle(state("a@x.example"), DEFER, arrived_at=created, now=created + 5 * 3600, dc=dc)
    assert first_try_late.report is not None
    never = make_config(tmp_path, delay_warning=0).delivery
    assert settle(state("a@x.example"), DEFER, arrived_at=created, now=created + DAY, dc=never).report is None


def test_deferral_with_a_permanent_reason_reports_a_temporary_status(tmp_path: Path) -> None:
    dc = make_config(tmp_path).delivery
    outcome = RecipientOutcome("deferred", "5.7.30 REQUIRETLS support required", "5.7.30")
    s = settle(state("a@x.example"), outcome, arrived_at=0.0, now=5 * 3600, dc=dc)
    assert s.result.status == "deferred" and s.report is not None and s.report.status == "4.7.30"


@pytest.mark.parametrize(("notify", "remote_mta", "remote_dsn", "action"), [
    (frozenset(), "mx.example", False, None),
    (frozenset({"SUCCESS"}), "mx.example", True, None),  # the receiver reports itself
    (frozenset({"SUCCESS"}), "mx.example", False, "relayed"),
    (frozenset({"SUCCESS"}), None, False, "delivered"),  # local delivery
])
def test_success_reports(tmp_path: Path, notify: frozenset[str], remote_mta: str | None, remote_dsn: bool,
                         action: str | None) -> None:
    dc = make_config(tmp_path).delivery
    outcome = RecipientOutcome("delivered", "250 2.0.0 Ok", "2.0.0", remote_dsn=remote_dsn)
    s = settle(state("a@x.example", notify=notify), outcome, arrived_at=0.0, now=1.0, dc=dc,
               remote_mta=remote_mta)
    assert s.result.status == "delivered" and s.status_word == "sent"
    assert (s.report.action if s.report else None) == action


def test_failure_is_final_with_a_report(tmp_path: Path) -> None:
    dc = make_config(tmp_path).delivery
    outcome = RecipientOutcome("failed", "550 5.1.1 no such user", "5.1.1")
    s = settle(state("a@x.example"), outcome, arrived_at=0.0, now=1.0, dc=dc, remote_mta="mx.example")
    assert (s.result.status, s.status_word) == ("failed", "bounced")
    assert s.report is not None and (s.report.action, s.report.status, s.report.remote_mta) == (
        "failed", "5.1.1", "mx.example")


# --- smarthost credentials -----------------------------------------------------------------------------

def test_smarthost_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret pass\nignored\n")
    cfg = make_config(tmp_path, smarthost={"host": "smtp.example.org", "username": "relay",
                                           "password_file": str(pw)})
    cred = read_smarthost_credentials(cfg)
    assert cred is not None and (cred.username, cred.password) == ("relay", "s3cret pass")
    assert "s3cret" not in repr(cred)
    missing = make_config(tmp_path, smarthost={"host": "smtp.example.org", "username": "relay",
                                               "password_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"^delivery.smarthost.password_file: .*nope cannot be read"):
        read_smarthost_credentials(missing)
    assert read_smarthost_credentials(make_config(tmp_path)) is None


def test_the_tls_verdict_kept_in_the_queue() -> None:
    sent = RecipientOutcome("delivered", "250 2.0.0 ok", "2.0.0")
    over_tls = TlsOutcome(protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=False)
    assert _Outcome(sent, "mx[192.0.2.7]:25", over_tls, "mx", "encrypt").verdict() == TlsVerdict(
        protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=False, policy="encrypt")
    plain = TlsOutcome(failure="STARTTLS not offered")
    assert _Outcome(sent, "mx[192.0.2.7]:25", plain, "mx", "may").verdict() == TlsVerdict(
        policy="may", failure="STARTTLS not offered")
    # No host reached but the handshake failed: that failure is the verdict.
    failed = TlsOutcome(failure="certificate verify failed")
    assert _Outcome(DEFER, "none", failed, policy="verify").verdict() == TlsVerdict(
        policy="verify", failure="certificate verify failed")
    # Nothing to say: local delivery, or no connection at all (DNS, refused, policy refusal).
    assert _Outcome(sent, "local", TlsOutcome()).verdict() is None
    assert _Outcome(sent, "lmtp[/run/lmtp.sock]", TlsOutcome()).verdict() is None
    assert _Outcome(DEFER, "none", TlsOutcome(), policy="may").verdict() is None


@pytest.mark.parametrize(("content", "relaxed"), [
    (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
    (b"Subject: x\r\ntls-required:no\r\n\r\n", True),
    (b"TLS-Required:\r\n  No \r\nSubject: folded\r\n\r\n", True),
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body, not the header
    (b"TLS-Required: Yes\r\n\r\n", False),
    (b"TLS-Required: No thanks\r\n\r\n", False),
    (b"TLS-Required: No\r\nTLS-Required: No\r\n\r\n", False),  # twice: not a clear request
    (b"X-TLS-Required: No\r\n\r\n", False),
    (b"Subject: no body at all\r\nTLS-Required: NO\r\n", True),
])
def test_tls_required_no_is_read_strictly(content: bytes, relaxed: bool) -> None:
    assert tls_required_no(content) is relaxed


# --- the loop, against a real queue ----------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def submit(queue: SqliteQueue, *rcpts: str, sender: str = "alice@example.net",
                 requiretls: bool = False, received_at: float | None = None) -> str:
    env = Envelope(sender=sender, client_ip="192.0.2.9", client_helo="c", listener="submission",
                   received_at=time.time() if received_at is None else received_at, requiretls=requiretls)
    async with await queue.begin(env) as txn:
        for r in rcpts:
            await txn.add_rcpt(Recipient(r))
        await txn.write_body(b"From: alice@example.net\r\nMessage-ID: <m1@example.net>\r\nSubject: hi\r\n\r\n"
                             b"hello\r\n")
        return await txn.commit()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


Body = Callable[[SqliteQueue, Deliverer], Awaitable[None]]


async def with_deliverer(tmp_path: Path, clock: Clock, body: Body, **delivery: Any) -> None:
    queue = await SqliteQueue.open(tmp_path / "q.db")
    deliverer = Deliverer(make_config(tmp_path, **delivery), queue, None, None, clock,
                          rng=random.Random(7), owner="test:1")
    task = asyncio.create_task(deliverer.run())
    try:
        await body(queue, deliverer)
    finally:
        await deliverer.stop(grace=1)
        await asyncio.wait_for(task, 2)
        await queue.close()


def recipient(message: StoredMessage | None, address: str) -> RecipientState:
    assert message is not None
    return next(r for r in message.recipients if r.recipient.address == address)


def test_deferral_is_recorded_with_backoff_from_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    clock.offset = 1000.0

    async def body(queue: SqliteQueue, _: Deliverer) -> None:
        mid = await submit(queue, "bob@nowhere.example")

        async def deferred() -> bool:
            m = await queue.get(mid)
            return m is not None and m.recipients[0].status == "deferred"

        await until(deferred)
        r = recipient(await queue.get(mid), "bob@nowhere.example")
        assert r.attempts == 1 and r.last_reply == "4.4.3 no DNS resolver configured"
        assert r.tls is None  # no host was reached
        assert r.last_attempt_at is not None and r.next_attempt_at is not None
        assert 270 <= r.next_attempt_at - r.last_attempt_at <= 300
        assert await queue.count() == 1  # nothing else queued: no bounce, no warning

    asyncio.run(with_deliverer(tmp_path, clock, body))


def test_expired_recipient_bounces_to_the_sender(tmp_path: Path) -> None:
    clock = Clock()
    clock.offset = 5 * DAY + 60

    async def body(queue: SqliteQueue, _: Deliverer) -> None:
        mid = await submit(queue, "bob@nowhere.example", "carol@nowhere.example")

        async def bounced() -> bool:
            return await queue.get(mid) is None and await queue.count() == 1

        await until(bounced)
        (bounce,) = await queue.list()
        assert bounce.envelope.sender == "" and bounce.envelope.listener == "bounce"
        assert [r.recipient.address for r in bounce.recipients] == ["alice@example.net"]
        data = b"".join([c async for c in await queue.open_body(bounce.id)])
        assert b"Action: failed" in data and b"Status: 4.4.7" in data
        assert b"Final-Recipient: rfc822; bob@nowhere.example" in data
        assert b"Final-Recipient: rfc822; carol@nowhere.example" in data
        assert b"In-Reply-To: <m1@example.net>" in data

    asyncio.run(with_deliverer(tmp_path, clock, body))


def test_delay_warning_is_sent_once(tmp_path: Path) -> None:
    clock = Clock()
    clock.offset = 4 * 3600 + 10

    async def body(queue: SqliteQueue, deliverer: Deliverer) -> None:
        mid = await submit(queue, "bob@nowhere.example")

        async def warned() -> bool:
            return await queue.count() == 2 and (await queue.get(mid)) is not None and \
                recipient(await queue.get(mid), "bob@nowhere.example").attempts == 1

        await until(warned)
        notes = [m for m in await queue.list() if m.id != mid]
        data = b"".join([c async for c in await queue.open_body(notes[0].id)])
        assert b"Action: delayed" in data and b"Will-Retry-Until:" in data
        clock.offset += 400  # the next try is due: deferred again, no second warning
        deliverer.wake()

        async def second() -> bool:
            return recipient(await queue.get(mid), "bob@nowhere.example").attempts == 2

        await until(second)
        assert [m.id for m in await queue.list() if m.envelope.sender == ""] == [notes[0].id]

    asyncio.run(with_deliverer(tmp_path, clock, body))


def test_null_sender_failures_make_no_bounce_and_local_needs_an_agent(tmp_path: Path) -> None:
    clock = Clock()
    clock.offset = 5 * DAY + 60

    async def body(queue: SqliteQueue, _: Deliverer) -> None:
        expired = await submit(queue, "bob@nowhere.example", sender="")
        local = await submit(queue, "carol@example.net", received_at=clock())

        async def settled() -> bool:
            m = await queue.get(local)
            return await queue.get(expired) is None and m is not None and m.recipients[0].attempts == 1

        await until(settled)
        r = recipient(await queue.get(local), "carol@example.net")
        assert r.status == "deferred" and r.last_reply == "4.3.0 local delivery is not available"
        assert await queue.count() == 1

    asyncio.run(with_deliverer(tmp_path, clock, body))


def test_a_destination_that_cannot_take_mail_costs_no_read_of_the_content(tmp_path: Path) -> None:
    """Deferring to a destination without DNS answers, or whose only host refuses connections,
    needs nothing from the message: its content is read only when a connection carries it or
    its header could change the plan (TLS-Required: No against DANE or MTA-STS)."""
    clock = Clock()
    reads: list[str] = []

    async def body(queue: SqliteQueue, _: Deliverer) -> None:
        open_body = queue.open_body

        async def counting_open_body(message_id: str) -> Any:
            reads.append(message_id)
            return await open_body(message_id)

        queue.open_body = counting_open_body  # type: ignore[method-assign]
        ids = [await submit(queue, "bob@nowhere.example"), await submit(queue, "carol@dead.example")]

        async def deferred() -> bool:
            messages = [await queue.get(mid) for mid in ids]
            return all(m is not None and m.recipients[0].status == "deferred" for m in messages)

        await until(deferred)
        assert recipient(await queue.get(ids[1]), "carol@dead.example").attempts == 1
        assert reads == []

    asyncio.run(with_deliverer(tmp_path, clock, body,
                               route=[{"domain": "dead.example", "next_hop": "[127.0.0.1]:9"}]))


def test_results_that_cannot_be_recorded_yet_are_recorded_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk that clears: the attempt's results are written once it does, rather than left
    for the lease to expire (which would send delivered mail a second time)."""
    monkeypatch.setattr(delivery_module, "RECORD_RETRY_FIRST", 0.01)
    clock = Clock()
    failures = [QueueError("queue storage is full"), QueueError("queue storage is full")]

    async def body(queue: SqliteQueue, _: Deliverer) -> None:
        record_attempt = queue.record_attempt

        async def failing_at_first(*args: Any) -> Any:
            if failures:
                raise failures.pop(0)
            return await record_attempt(*args)

        queue.record_attempt = failing_at_first  # type: ignore[method-assign]
        mid = await submit(queue, "bob@nowhere.example")

        async def recorded() -> bool:
            m = await queue.get(mid)
            return m is not None and m.recipients[0].attempts == 1

        await until(recorded)
        assert failures == []
        m = await queue.get(mid)
        assert m is not None and m.lease_owner is None  # released, not left to expire

    asyncio.run(with_deliverer(tmp_path, clock, body))
