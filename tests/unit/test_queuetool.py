"""`mailward queue` against a real SQLite queue: listing, showing, hold/release/delete, JSON schema."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailward import queuetool
from mailward.cli import build_parser
from mailward.queue import Envelope, Recipient, RecipientResult, StoredMessage, TlsFacts, TlsVerdict
from mailward.queue.sqlite import SqliteQueue
from mailward.queue.sqlite_store import SCHEMA_VERSION
from mailward.queuetool import format_age, printable

T = TypeVar("T")
AGE = 3 * 3600 + 12 * 60  # the oldest message is "3h 12m" old when the tool looks
RETRY_IN = 20_000.0  # seconds from fill time to a deferred recipient's next attempt
MESSAGE_KEYS = {"id", "size", "created_at", "sender", "held", "hold_reason", "recipients"}
RECIPIENT_KEYS = {"address", "status", "reason", "attempts", "next_attempt_at", "tls"}
STATUSES = {"queued", "deferred", "delivered", "failed", "held"}
TLS_KEYS = {"protocol", "cipher", "verified", "policy", "failure", "trust", "dane"}
PLAINTEXT = TlsVerdict(policy="may", failure="STARTTLS not offered")
VERIFIED = TlsVerdict(protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=True, policy="verify")


def run_async(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(test())


def envelope(sender: str = "alice@example.org", tls: TlsFacts | None = None) -> Envelope:
    return Envelope(sender=sender, client_ip="192.0.2.10", client_helo="client.example.org",
                    listener="submissions", received_at=time.time(), auth_user="alice", tls=tls)


async def store(queue: SqliteQueue, recipients: tuple[str, ...], *, sender: str = "alice@example.org",
                headers: bytes = b"Subject: hello\r\n", tls: TlsFacts | None = None) -> str:
    async with await queue.begin(envelope(sender, tls)) as txn:
        for address in recipients:
            await txn.add_rcpt(Recipient(address))
        await txn.write_body(b"Received: from client.example.org\r\n" + headers + b"\r\nbody\r\n")
        return await txn.commit()


@dataclass
class Filled:
    path: Path
    deferred: str
    partial: str
    active: str
    failed: str
    queued: str
    held: str
    next_at: float  # next attempt of the deferred recipients
    oldest: float  # created_at of the first message

    @property
    def now(self) -> float:
        return self.oldest + AGE + 0.5


async def fill(path: Path) -> Filled:
    """One message in each state a listing must tell apart; the order matters for lease()."""
    tls = TlsFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)
    async with await SqliteQueue.open(path) as q:
        t0 = time.time()
        next_at = t0 + RETRY_IN
        deferred = await store(q, ("bob@example.net",), tls=tls,
                               headers=b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-Evil: \x1b[31mred\r\n")
        [m] = await q.lease("worker", time.time(), 10, 60)
        await q.record_attempt(deferred, "worker", {
            "bob@example.net": RecipientResult("deferred", "451 4.7.1 \x1b[2Jtry later", next_at, PLAINTEXT),
        }, time.time())
        partial = await store(q, ("carol@example.com", "dave@example.com"))
        [m] = await q.lease("worker", time.time(), 10, 60)
        await q.record_attempt(partial, "worker", {
            "carol@example.com": RecipientResult("delivered", "250 2.0.0 ok", tls=VERIFIED),
            "dave@example.com": RecipientResult("deferred", "421 4.4.2 timeout", next_at)}, time.time())
        active = await store(q, ("erin@example.com",))
        [m] = await q.lease("worker", time.time(), 10, 2 * AGE)  # still "in delivery" when the tool looks
        failed = await store(q, ("frank@example.com", "grace@example.com"))
        [m] = await q.lease("worker", time.time(), 10, 60)
        await q.record_attempt(failed, "worker", {
            "frank@example.com": RecipientResult("failed", "550 5.1.1 no such user")}, time.time())
        queued = await store(q, ("heidi@example.com",), sender="")
        held = await store(q, ("ivan@example.com",))
        assert await q.hold(held)
        first = await q.get(deferred)
        assert first is not None and m is not None
        return Filled(path, deferred, partial, active, failed, queued, held, next_at, first.created_at)


@pytest.fixture
def filled(tmp_path: Path) -> Filled:
    return run_async(lambda: fill(tmp_path / "queue" / "queue.db"))


def tool(path: Path, *argv: str, now: float | None = None) -> int:
    args = build_parser().parse_args(["queue", *argv])
    return queuetool.run(args, path, now=now)


def tool_json(capsys: pytest.CaptureFixture[str], path: Path, *argv: str,
              now: float | None = None) -> tuple[int, list[dict[str, Any]]]:
    status = tool(path, *argv, "--json", now=now)
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list)
    return status, data


def stored(path: Path, id: str) -> StoredMessage | None:
    async def get() -> StoredMessage | None:
        async with await SqliteQueue.open(path) as q:
            return await q.get(id)
    return run_async(get)


# --- ages and escaping ---------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.9, "0s"), (45.9, "45s"), (59, "59s"), (60, "1m"), (61, "1m 1s"), (3599, "59m 59s"),
    (3600, "1h"), (AGE, "3h 12m"), (AGE + 59, "3h 12m"), (86400, "1d"), (86400 + 3600 * 5 + 60, "1d 5h"),
    (9 * 86400, "9d"), (-5, "0s"),
])
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_printable_neutralises_terminal_controls() -> None:
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("x\u202eevil\u2069") == "x\\u202eevil\\u2069"
    assert printable("\x85\x7f") == "\\x85\\x7f"
    assert printable("café ✓") == "café ✓"


# --- list ----------------------------------------------------------------------------------------


def test_list_json_schema(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, data = tool_json(capsys, filled.path, "list", now=filled.now)
    assert status == 0
    assert [m["id"] for m in data] == [filled.deferred, filled.partial, filled.active, filled.failed,
                                       filled.queued, filled.held]
    for m in data:
        assert set(m) == MESSAGE_KEYS
        assert isinstance(m["size"], int) and m["size"] > 0
        assert isinstance(m["created_at"], float)
        assert isinstance(m["held"], bool)
        for r in m["recipients"]:
            assert set(r) == RECIPIENT_KEYS
            assert r["status"] in STATUSES
            assert isinstance(r["attempts"], int)
            assert r["tls"] is None or set(r["tls"]) == TLS_KEYS
    by_id = {m["id"]: m for m in data}
    [bob] = by_id[filled.deferred]["recipients"]
    assert bob == {"address": "bob@example.net", "status": "deferred", "reason": "451 4.7.1 \x1b[2Jtry later",
                   "attempts": 1, "next_attempt_at": filled.next_at,
                   "tls": {"protocol": None, "cipher": None, "verified": False, "policy": "may",
                           "failure": "STARTTLS not offered", "trust": None, "dane": None}}
    carol, dave = by_id[filled.partial]["recipients"]
    assert (carol["status"], carol["next_attempt_at"], dave["status"]) == ("delivered", None, "deferred")
    assert carol["tls"] == {"protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "verified": True,
                            "policy": "verify", "failure": None, "trust": "Verified", "dane": None}
    assert dave["tls"] is None  # its attempt reached no host
    frank, grace = by_id[filled.failed]["recipients"]
    assert (frank["status"], frank["reason"], frank["attempts"]) == ("failed", "550 5.1.1 no such user", 1)
    assert (grace["status"], grace["reason"], grace["attempts"], grace["tls"]) == ("queued", None, 0, None)
    assert by_id[filled.queued]["sender"] == ""
    held = by_id[filled.held]
    assert (held["held"], held["hold_reason"], held["recipients"][0]["status"]) == (True, "operator", "held")
    assert by_id[filled.deferred]["sender"] == "alice@example.org"


def test_list_human(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(filled.path, "list", now=filled.now) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == ["ID", "SIZE", "AGE", "SENDER", "RECIPIENT", "STATUS", "NEXT", "TRY", "LAST",
                              "REPLY"]
    # Aligned columns: every recipient address starts under RECIPIENT, every status under STATUS.
    column = header.index("RECIPIENT")
    status_column = header.index("STATUS")
    rows = lines[1:-1]
    assert len(rows) == 8  # one per recipient
    for row in rows:
        assert row[column - 2:column] == "  " and row[column] != " ", row
        assert row[status_column - 1] == " " and row[status_column] != " ", row
    first = rows[0]
    size = stored(filled.path, filled.deferred).size  # type: ignore[union-attr]
    assert first.split()[:5] == [filled.deferred, str(size), "3h", "12m", "alice@example.org"]
    expected_retry = "in " + format_age(filled.next_at - filled.now + 0.999)
    assert re.search(rf"deferred +{expected_retry}  ", first), first
    assert "451 4.7.1 \\x1b[2Jtry later" in first and "\x1b" not in out  # no raw escape reaches the terminal
    assert any(row.startswith(filled.active + "*") for row in rows)  # in delivery, as mailq marks it
    assert any(row.startswith(filled.held + "!") for row in rows)  # on hold
    queued_row = next(row for row in rows if row.startswith(filled.queued))
    assert " <> " in queued_row and "heidi@example.com" in queued_row and "now" in queued_row
    assert lines[-1] == "6 messages, 8 recipients, oldest 3h 12m"


def test_list_empty_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "queue.db"

    async def create() -> None:
        async with await SqliteQueue.open(path):
            pass
    run_async(create)
    assert tool(path, "list") == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"
    assert tool_json(capsys, path, "list") == (0, [])


def test_missing_queue_is_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere" / "queue.db"
    assert tool(path, "list") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mailward: there is no queue at {path};") and err.count("\n") == 1
    assert not path.parent.exists()


def test_not_a_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    for path in (other, text):
        assert tool(path, "list") == 2
        assert "is not a mailward queue" in capsys.readouterr().err


def test_an_older_schema_asks_for_the_server_to_upgrade_it(filled: Filled,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(filled.path) as conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.close()
    assert tool(filled.path, "list") == 2
    assert capsys.readouterr().err == (
        f"mailward: {filled.path} has queue schema 1, older than this mailward's {SCHEMA_VERSION}; start the "
        "server once (mailward serve) to upgrade it.\n")


# --- show ----------------------------------------------------------------------------------------


def test_show_human(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(filled.path, "show", filled.deferred, now=filled.now) == 0
    out = capsys.readouterr().out
    assert f"Queue ID:      {filled.deferred}\n" in out
    assert "Sender:        <alice@example.org>\n" in out
    assert "Arrived:" in out and "(3h 12m ago)" in out
    assert ("Received from: 192.0.2.10 (EHLO client.example.org) on listener submissions, logged in as "
            "alice\n") in out
    assert "TLS:           TLSv1.3, TLS_AES_128_GCM_SHA256, 128 bits\n" in out
    assert "State:         waiting\n" in out
    recipients = out.split("Recipients:\n")[1].split("\n\n")[0].splitlines()
    assert recipients[0].split() == ["ADDRESS", "STATUS", "ATTEMPTS", "NEXT", "TRY", "TLS", "REASON"]
    assert recipients[1].split()[:3] == ["bob@example.net", "deferred", "1"]
    assert " plaintext at level may  451 4.7.1 " in recipients[1]
    headers = out.split("Headers:\n")[1]
    assert "  Subject: =?utf-8?q?caf=C3=A9?=\n" in headers
    assert "  X-Evil: \\x1b[31mred\n" in headers and "\x1b" not in out


def test_show_states(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(filled.path, "show", filled.held, filled.active, filled.queued, now=filled.now) == 0
    out = capsys.readouterr().out
    assert "State:         on hold (operator)" in out
    assert "State:         in delivery by worker" in out
    assert "Sender:        <>" in out
    assert "TLS:           none" in out


def test_show_json(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, data = tool_json(capsys, filled.path, "show", filled.deferred.lower())  # ids in any case
    assert status == 0
    [m] = data
    assert set(m) == MESSAGE_KEYS | {"envelope", "headers"}
    assert m["envelope"] == {
        "client_ip": "192.0.2.10", "client_helo": "client.example.org", "listener": "submissions",
        "received_at": m["envelope"]["received_at"], "auth_user": "alice", "body_type": "7BIT",
        "smtputf8": False, "requiretls": False, "dsn_ret": None, "dsn_envid": None,
        "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "bits": 128},
    }
    assert m["headers"] == [["Received", "from client.example.org"], ["Subject", "=?utf-8?q?caf=C3=A9?="],
                            ["X-Evil", "\x1b[31mred"]]


def test_show_unknown_id(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(filled.path, "show", "0000000000000Z", filled.queued) == 1
    captured = capsys.readouterr()
    assert captured.err == ("mailward: message 0000000000000Z is not in the queue (delivered, bounced or "
                            "deleted).\n")
    assert filled.queued in captured.out  # the other id is still shown


def test_show_folded_and_huge_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "queue.db"
    big = b"X-Big: " + b"a" * 300_000 + b"\r\n"

    async def create() -> tuple[str, str]:
        async with await SqliteQueue.open(path, chunk_size=4096) as q:
            folded = await store(q, ("a@example.com",), headers=b"To: a@example.com,\r\n\tb@example.com\r\n")
            huge = await store(q, ("a@example.com",), headers=big)
            return folded, huge
    folded, huge = run_async(create)
    _, [m] = tool_json(capsys, path, "show", folded)
    assert ["To", "a@example.com,\tb@example.com"] in m["headers"]
    _, [m] = tool_json(capsys, path, "show", huge)
    assert len(m["headers"][1][1]) < queuetool.HEADER_LIMIT  # bounded, not the whole body


# --- hold, release, delete -----------------------------------------------------------------------


def test_hold_release_delete(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, [m] = tool_json(capsys, filled.path, "hold", filled.deferred)
    assert status == 0 and m["held"] and m["recipients"][0]["status"] == "held"
    message = stored(filled.path, filled.deferred)
    assert message is not None and message.held and message.hold_reason == "operator"

    assert tool(filled.path, "release", filled.deferred, filled.held) == 0
    assert capsys.readouterr().out == f"{filled.deferred}: released\n{filled.held}: released\n"
    message = stored(filled.path, filled.held)
    assert message is not None and not message.held and message.recipients[0].status == "queued"

    status, [m] = tool_json(capsys, filled.path, "delete", filled.failed)
    assert status == 0 and m["id"] == filled.failed  # as it was before it went
    assert stored(filled.path, filled.failed) is None
    assert tool(filled.path, "delete", filled.failed) == 1
    assert "is not in the queue" in capsys.readouterr().err


def test_hold_keeps_the_stored_status_for_release(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    tool(filled.path, "hold", filled.partial)
    assert capsys.readouterr().out == f"{filled.partial}: held\n"
    _, [m] = tool_json(capsys, filled.path, "show", filled.partial)
    assert [r["status"] for r in m["recipients"]] == ["delivered", "held"]
    tool(filled.path, "release", filled.partial)
    capsys.readouterr()
    _, [m] = tool_json(capsys, filled.path, "show", filled.partial)
    assert [r["status"] for r in m["recipients"]] == ["delivered", "deferred"]


def test_show_tls_of_the_last_attempt(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(filled.path, "show", filled.partial, now=filled.now) == 0
    out = capsys.readouterr().out
    carol, dave = out.split("Recipients:\n")[1].split("\n\n")[0].splitlines()[1:]
    assert "  Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (pkix) at level verify  250 2.0.0 ok" in carol
    assert re.search(r"deferred +1 +in [0-9hms ]+ +- +421 4.4.2 timeout", dave), dave


# --- retry and flush -----------------------------------------------------------------------------


def test_retry_makes_deferred_recipients_due_now(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    now = filled.now
    assert tool(filled.path, "retry", filled.deferred.lower(), now=now) == 0
    assert capsys.readouterr().out == f"{filled.deferred}: due now\n"
    message = stored(filled.path, filled.deferred)
    assert message is not None
    [bob] = message.recipients
    assert (bob.status, bob.attempts, bob.next_attempt_at, bob.tls) == ("deferred", 1, now, PLAINTEXT)

    status, [m] = tool_json(capsys, filled.path, "retry", filled.partial, now=now)
    assert status == 0 and m["id"] == filled.partial
    assert [(r["status"], r["next_attempt_at"]) for r in m["recipients"]] == [("delivered", None),
                                                                             ("deferred", now)]
    held = stored(filled.path, filled.held)
    assert held is not None and held.recipients[0].next_attempt_at is not None


def test_retry_refuses_held_and_unknown_messages(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    before = [m.recipients for m in run_async(lambda: _all(filled.path))]
    assert tool(filled.path, "retry", filled.held, "0000000000000Z", now=filled.now) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"mailward: message {filled.held} is on hold; release it to deliver it (mailward queue release "
        f"{filled.held}).\nmailward: message 0000000000000Z is not in the queue (delivered, bounced or "
        "deleted).\n")
    assert [m.recipients for m in run_async(lambda: _all(filled.path))] == before


def test_flush_makes_everything_not_held_due(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    now = filled.now
    held_before = stored(filled.path, filled.held)
    assert tool(filled.path, "flush", now=now) == 0
    assert capsys.readouterr().out == "5 messages due now; 1 held message left on hold\n"
    for message in run_async(lambda: _all(filled.path)):
        if message.held:
            assert message == held_before
            continue
        for r in message.pending:
            assert r.next_attempt_at is not None and r.next_attempt_at <= now, (message.id, r)
    active = stored(filled.path, filled.active)
    assert active is not None and active.lease_expires_at is not None  # its worker keeps it

    status, data = tool_json(capsys, filled.path, "flush", now=now)
    assert status == 0
    assert [m["id"] for m in data] == [filled.deferred, filled.partial, filled.active, filled.failed,
                                       filled.queued]


def test_retry_and_flush_say_when_no_server_will_act(filled: Filled, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pid_file = tmp_path / "mailward.pid"
    server = queuetool.Server(pid_file)

    def flush(server: queuetool.Server) -> str:
        args = build_parser().parse_args(["queue", "flush"])
        assert queuetool.run(args, filled.path, server=server) == 0
        return capsys.readouterr().err

    stale = ("mailward: no running mailward found "
             f"({pid_file} is missing or stale); the change is stored and takes effect when it starts.\n")
    assert flush(server) == stale
    # A live process that is not mailward: the number was reused after a crash.
    with subprocess.Popen(["sleep", "30"]) as other:
        pid_file.write_text(f"{other.pid}\n")
        try:
            assert flush(server) == stale
        finally:
            other.kill()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "mailward", "serve"]) as srv:
        pid_file.write_text(f"{srv.pid}\n")
        try:
            assert flush(server) == ""  # it sees the change by itself
            assert flush(queuetool.Server(pid_file, delivery_enabled=False)) == (
                "mailward: delivery is disabled (delivery.enabled = false); the messages are sent once it "
                "is enabled.\n")
        finally:
            srv.kill()
    pid_file.write_text("garbage\n")
    assert flush(server) == stale


async def _all(path: Path) -> list[StoredMessage]:
    async with await SqliteQueue.open(path) as q:
        return await q.list(limit=1000)


def test_beside_an_open_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tool changes what the running server sees and never touches its spool directory."""
    path = tmp_path / "queue.db"

    async def scenario() -> None:
        async with await SqliteQueue.open(path) as q:
            spool = q.tmp_dir / "in-progress"
            spool.write_bytes(b"a body being received")
            id = await store(q, ("a@example.com",))
            assert tool(path, "hold", id) == 0
            assert await q.lease("server", time.time() + 1, 10, 60) == []  # held: not handed out
            message = await q.get(id)
            assert message is not None and message.held
            assert tool(path, "list") == 0
            assert tool(path, "release", id) == 0
            assert [m.id for m in await q.lease("server", time.time() + 1, 10, 60)] == [id]
            assert tool(path, "delete", id) == 0
            assert await q.get(id) is None
            assert spool.read_bytes() == b"a body being received"
    run_async(scenario)
    capsys.readouterr()


def test_corrupt_record_is_reported_and_can_be_deleted(filled: Filled,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(filled.path) as conn:
        conn.execute("UPDATE message SET envelope = '{' WHERE id = ?", (filled.queued,))
    conn.close()
    status, data = tool_json(capsys, filled.path, "list")
    assert status == 0 and filled.queued not in [m["id"] for m in data]
    assert tool(filled.path, "list") == 0
    err = capsys.readouterr().err
    assert f"mailward: message {filled.queued} is corrupt" in err
    assert tool(filled.path, "show", filled.queued) == 1
    assert "is corrupt" in capsys.readouterr().err
    assert tool(filled.path, "delete", filled.queued) == 0
    assert capsys.readouterr().out == f"{filled.queued}: deleted\n"
    with sqlite3.connect(filled.path) as conn:
        assert conn.execute("SELECT count(*) FROM message WHERE id = ?", (filled.queued,)).fetchone()[0] == 0
    conn.close()


def test_queue_subcommands_need_ids() -> None:
    parser = build_parser()
    for action in ("show", "retry", "hold", "release", "delete"):
        with pytest.raises(SystemExit):
            parser.parse_args(["queue", action])
    assert parser.parse_args(["queue", "hold", "A", "B"]).ids == ["A", "B"]
