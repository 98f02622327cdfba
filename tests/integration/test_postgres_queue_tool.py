"""`mailward queue migrate|export|import` and the operator's queue commands on a PostgreSQL queue.

A site moves from the embedded queue to PostgreSQL: mail is accepted into SQLite, exported, the
configuration switched to queue.url, the schema migrated, the export imported (ids kept), and the
same `queue list|show|hold|release|retry|delete|flush` commands then work on the shared queue.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
from dataclasses import replace
from pathlib import Path

from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import verifying_context

from conftest import MakeServer
from mailward.queue import StsPolicyRecord, TlsRptTally
from mailward.queue.postgres import PostgresQueue
from mailward.queue.sqlite import SqliteQueue
from postgres_server import PgServer, pg_server  # noqa: F401 - the fixture

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


POLICY = StsPolicyRecord("example.org", "20261128T000000", "version: STSv1\r\nmode: enforce\r\n"
                         "mx: mx.example.org\r\nmax_age: 86400\r\n", 1_800_000_000.0, 1_800_086_400.0)
TALLY = TlsRptTally(day="2026-11-28", domain="example.org", policy_type="sts",
                    policy_strings=("version: STSv1", "mode: enforce"), mx_hosts=("mx.example.org",), count=5)


async def add_shared_state(path: Path) -> None:
    queue = await SqliteQueue.open(path)
    try:
        await queue.save_sts_policy(POLICY)
        await queue.add_tlsrpt_tallies([TALLY, replace(TALLY, result_type="starttls-not-supported",
                                                       count=2)])
        await queue.mark_tlsrpt_sent("2026-11-28", "example.org", "r-1", 1_800_000_000.0)
    finally:
        await queue.close()


async def shared_state(url: str) -> tuple[StsPolicyRecord | None, list[TlsRptTally], dict[str, str]]:
    queue = await PostgresQueue.open(url, pool_size=1)
    try:
        tallies = sorted(await queue.load_tlsrpt_tallies("2026-11-28"), key=lambda t: t.result_type)
        return await queue.load_sts_policy("example.org"), tallies, await queue.tlsrpt_sent("2026-11-28")
    finally:
        await queue.close()


def submit(server: MailwardServer, subjects: list[str]) -> None:
    with smtplib.SMTP_SSL("localhost", server.submissions, context=verifying_context(server.ca),
                          timeout=20) as smtp:
        smtp.login(USER, PASSWORD)
        for subject in subjects:
            smtp.sendmail(USER, ["bob@example.org", "carol@example.org"],
                          f"From: {USER}\r\nSubject: {subject}\r\n\r\n{subject} body\r\n".encode())


def listed(server: MailwardServer) -> list[dict[str, object]]:
    out = server.cli("queue", "list", "--json")
    data = json.loads(out.stdout)
    assert isinstance(data, list)
    return data


def one_line(text: str) -> str:
    """The one error sentence of a failed command (log lines of `serve` aside)."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, text
    assert lines[0].startswith("mailward: ") and lines[0].endswith("."), lines[0]
    return lines[0]


def test_a_sqlite_queue_moves_to_postgresql_and_the_queue_commands_work_there(
        make_server: MakeServer, pg_server: PgServer, tmp_path: Path) -> None:  # noqa: F811
    old = make_server()
    submit(old, ["one", "two", "three"])
    before = listed(old)
    assert len(before) == 3
    # Export reads the queue as the server does, so it wants the server stopped first.
    refused = old.cli("queue", "export", check=False)
    assert refused.returncode == 2 and "stop it" in one_line(refused.stderr)
    old.stop()
    asyncio.run(add_shared_state(old.queue_path))
    export = tmp_path / "queue.jsonl"
    done = old.cli("queue", "export", "-o", str(export))
    assert "3 message(s) exported" in done.stderr
    # A header, a line per message, the MTA-STS policy, two tallies and a sent mark.
    assert len(export.read_text().splitlines()) == 8

    url = pg_server.database(migrated=False)
    new = make_server(start=False, extra_toml=f'[queue]\nurl = "{url}"\n')
    # Nothing works before the schema exists, and each refusal says what to run.
    p = new.cli("queue", "list", check=False)
    assert p.returncode == 2 and "run `mailward queue migrate`" in one_line(p.stderr)
    p = new.cli("queue", "import", str(export), check=False)
    assert p.returncode == 2 and "run `mailward queue migrate`" in one_line(p.stderr)
    serve = new.cli("serve", check=False)
    assert serve.returncode != 0 and "run `mailward queue migrate`" in one_line(serve.stderr)

    assert "queue schema 1 created" in new.cli("queue", "migrate").stdout
    assert "is current; nothing to do" in new.cli("queue", "migrate").stdout
    assert "3 message(s) imported" in new.cli("queue", "import", str(export)).stdout
    again = new.cli("queue", "import", str(export)).stdout
    assert "0 message(s) imported, 3 already in the queue" in again  # and no tally counted twice
    after = listed(new)
    assert after == before  # ids, times, senders, recipients and their states all kept
    # The MTA-STS cache and the TLS report figures came along, counted once.
    failed = replace(TALLY, result_type="starttls-not-supported", count=2)
    assert asyncio.run(shared_state(url)) == (POLICY, [TALLY, failed], {"example.org": "r-1"})

    first = str(after[0]["id"])
    show = new.cli("queue", "show", first)
    assert "Subject: one" in show.stdout and "<alice@example.test>" in show.stdout
    assert new.cli("queue", "hold", first).stdout == f"{first}: held\n"
    assert [m["held"] for m in listed(new)] == [True, False, False]
    p = new.cli("queue", "retry", first, check=False)
    assert p.returncode == 1 and "on hold" in p.stderr
    assert new.cli("queue", "release", first).stdout == f"{first}: released\n"
    assert new.cli("queue", "retry", first).stdout == f"{first}: due now\n"
    assert new.cli("queue", "flush").stdout == "3 messages due now\n"
    assert new.cli("queue", "delete", first).stdout == f"{first}: deleted\n"
    p = new.cli("queue", "show", first, check=False)
    assert p.returncode == 1 and "not in the queue" in p.stderr

    # The server runs on the migrated queue and accepts into it.
    new.start()
    submit(new, ["four"])
    assert len(listed(new)) == 3


def test_migrate_and_the_queue_commands_say_when_postgresql_cannot_be_reached(
        make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(start=False, extra_toml=f'[queue]\nurl = "postgresql://mail@/mail?host={tmp_path}"\n')
    for command in (("queue", "migrate"), ("queue", "list"), ("queue", "flush"), ("serve",)):
        p = server.cli(*command, check=False)
        assert p.returncode != 0
        line = one_line(p.stderr)
        assert "cannot connect to PostgreSQL at" in line and "check that PostgreSQL is running" in line, line
