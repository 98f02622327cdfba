"""The queue tool's side for the shared queue: `mailward queue migrate`, `export`, `import`, and the
operator's `list|show|retry|...` reaching PostgreSQL through the `Queue` protocol.

`queuetool` reads an SQLite queue file directly (beside a running server, without `SqliteQueue`'s
start-up work); a PostgreSQL queue has no such file, and every node already shares the database,
so here the tool is one more client of `PostgresQueue`. `SharedQueue` gives it the methods
`queuetool` calls on its `QueueFile`, run on a private event loop.

Export and import move a queue between backends (SQLite to PostgreSQL when a site grows to several
nodes) as JSON lines: a header line, then one line per message with its envelope, recipient states,
hold, and its body in base64, then the MTA-STS policy cache and the TLS report tallies and sent
marks. Ids are kept, so logs and bounces still match. Leases are not: an
imported message is free for any node to deliver. Export reads through the queue's own verified
reader, so a damaged body is reported and left out rather than carried over.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import sqlite3
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from mailward.config import Config
from mailward.queue import (
    CorruptMessage,
    Envelope,
    QueueError,
    Recipient,
    RecipientState,
    StoredMessage,
    StsPolicyRecord,
    TlsRptTally,
    TlsVerdict,
)

__all__ = ["SharedQueue", "add_parsers", "run"]

T = TypeVar("T")
EXPORT_FORMAT = 1
PAGE = 500  # messages per list() call while exporting or listing


class ToolError(Exception):
    """One sentence for the operator (the queue tool prints it and exits 2)."""


def _driver_missing() -> ToolError:
    return ToolError("queue.url names a PostgreSQL queue, but its driver (psycopg) is not installed; install "
                     "it with pip install 'mailward[postgres]'.")


class SharedQueue:
    """A PostgreSQL queue as `queuetool`'s commands use it (the methods of its `QueueFile`)."""

    def __init__(self, url: str) -> None:
        try:
            from mailward.queue.postgres import PostgresQueue
        except ImportError:
            raise _driver_missing() from None
        self._runner = asyncio.Runner()
        try:
            self.queue = self._run(PostgresQueue.open(url, pool_size=2))
        except BaseException:
            self._runner.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        from mailward.queuetool import QueueToolError

        try:
            return self._runner.run(coro)
        except CorruptMessage:
            raise
        except QueueError as exc:
            raise QueueToolError(str(exc)) from None

    def close(self) -> None:
        try:
            self._run(self.queue.close())
        finally:
            self._runner.close()

    def messages(self) -> tuple[list[StoredMessage], list[CorruptMessage]]:
        """Every message in id order, and the undecodable ones, as `QueueFile.messages` gives them."""
        async def scan() -> tuple[list[StoredMessage], list[CorruptMessage]]:
            good: list[StoredMessage] = []
            bad: list[CorruptMessage] = []
            after: str | None = None
            while page := await self.queue.scan(limit=PAGE, after=after):
                good += [m for m in page if isinstance(m, StoredMessage)]
                bad += [m for m in page if isinstance(m, CorruptMessage)]
                last = page[-1]
                after = last.id if isinstance(last, StoredMessage) else last.message_id
            return good, bad

        return self._run(scan())

    def get(self, id: str) -> StoredMessage | None:
        from mailward.queuetool import CorruptRecord

        try:
            return self._run(self.queue.get(id))
        except CorruptMessage as exc:
            raise CorruptRecord(f"{exc}; it is held for the operator.") from None

    def header_block(self, id: str) -> bytes:
        from mailward.queuetool import HEADER_LIMIT

        async def read() -> bytes:
            data = b""
            try:
                async for chunk in await self.queue.open_body(id):
                    data += chunk
                    if data.startswith(b"\r\n"):
                        return b""
                    end = data.find(b"\r\n\r\n")
                    if end >= 0:
                        return data[: end + 2]
                    if len(data) >= HEADER_LIMIT:
                        break
            except (CorruptMessage, QueueError):
                pass  # `show` still shows the envelope; the queue has held and logged the damage
            return data[:HEADER_LIMIT]

        return self._run(read())

    def tlsrpt(self, day: str, domain: str | None) -> tuple[list[TlsRptTally], dict[str, str]]:
        tallies = self._run(self.queue.load_tlsrpt_tallies(day, domain))
        return tallies, self._run(self.queue.tlsrpt_sent(day))

    def retry(self, ids: list[str] | None, now: float) -> list[str]:
        return self._run(self.queue.retry_ids(ids, now))

    def hold(self, id: str) -> bool:
        return self._run(self.queue.hold(id))

    def release(self, id: str) -> bool:
        return self._run(self.queue.release(id))

    def delete(self, id: str) -> bool:
        return self._run(self.queue.delete(id))


async def _all_messages(queue: Any) -> list[StoredMessage]:
    out: list[StoredMessage] = []
    after: str | None = None
    # Until an empty page: list() leaves out (and holds) undecodable records, so a short page does
    # not mean the end.
    while page := await queue.list(limit=PAGE, after=after):
        out += page
        after = page[-1].id
    return out


# --- migrate --------------------------------------------------------------------------------------


async def _migrate(url: str) -> str:
    try:
        from mailward.queue.postgres import connect, describe_url
        from mailward.queue.postgres_schema import migrate
    except ImportError:
        raise _driver_missing() from None
    try:
        conn = await connect(url)
    except QueueError as exc:
        raise ToolError(str(exc)) from None
    try:
        before, after = await migrate(conn)
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    finally:
        await conn.close()
    where = describe_url(url)
    if before is None:
        return f"{where}: queue schema {after} created"
    if before == after:
        return f"{where}: queue schema {after} is current; nothing to do"
    return f"{where}: queue schema upgraded from {before} to {after}"


# --- export and import ----------------------------------------------------------------------------


def message_record(message: StoredMessage, body: bytes) -> dict[str, Any]:
    """One exported message: everything `import_message` needs to recreate it."""
    return {
        "id": message.id,
        "created_at": message.created_at,
        "size": message.size,
        "digest": message.digest,
        "held": message.held,
        "hold_reason": message.hold_reason,
        "envelope": json.loads(message.envelope.to_json()),
        "recipients": [{
            "address": r.recipient.address,
            "notify": sorted(r.recipient.dsn_notify),
            "orcpt": r.recipient.dsn_orcpt,
            "status": r.status,
            "attempts": r.attempts,
            "next_attempt_at": r.next_attempt_at,
            "last_reply": r.last_reply,
            "last_attempt_at": r.last_attempt_at,
            "tls": None if r.tls is None else r.tls.to_dict(),
        } for r in message.recipients],
        "body": base64.b64encode(body).decode("ascii"),
    }


def parse_record(data: dict[str, Any]) -> tuple[StoredMessage, bytes]:
    """The message and body of one exported line; ValueError if it is not one."""
    try:
        recipients = tuple(RecipientState(
            recipient=Recipient(str(r["address"]), frozenset(r["notify"]), r["orcpt"]),
            status=r["status"], attempts=int(r["attempts"]), next_attempt_at=r["next_attempt_at"],
            last_reply=r["last_reply"], last_attempt_at=r["last_attempt_at"],
            tls=None if r["tls"] is None else TlsVerdict.from_json(json.dumps(r["tls"])))
            for r in data["recipients"])
        message = StoredMessage(
            id=str(data["id"]), envelope=Envelope.from_json(json.dumps(data["envelope"])),
            recipients=recipients, size=int(data["size"]), digest=str(data["digest"]),
            created_at=float(data["created_at"]), held=bool(data["held"]), hold_reason=data["hold_reason"])
        return message, base64.b64decode(data["body"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an exported message ({exc})") from None


async def _export(config: Config, out: IO[str]) -> tuple[int, list[str]]:
    from mailward.queuetool import running_pid

    url = config.queue.postgres_url
    if url is None:
        from mailward.queue.sqlite import SqliteQueue

        if not config.queue.path.is_file():
            raise ToolError(f"there is no queue at {config.queue.path}; check queue.path in the "
                            "configuration.")
        # Opening the file as the server does would clear the spool files of messages it is receiving.
        if running_pid(config.state_dir / "mailward.pid") is not None:
            raise ToolError("mailward is running on this queue; stop it (and let it drain) before exporting, "
                            "so that every message is in the export.")
        queue: Any = await SqliteQueue.open(config.queue.path)
    else:
        try:
            from mailward.queue.postgres import PostgresQueue
        except ImportError:
            raise _driver_missing() from None
        queue = await PostgresQueue.open(url, pool_size=2)
    skipped: list[str] = []
    count = 0
    try:
        out.write(json.dumps({"mailward_queue_export": EXPORT_FORMAT}) + "\n")
        for message in await _all_messages(queue):
            try:
                body = await (await queue.open_body(message.id)).read()
            except CorruptMessage as exc:
                skipped.append(f"{exc}; it stays held in the old queue")
                continue
            out.write(json.dumps(message_record(message, body), ensure_ascii=False, separators=(",", ":")))
            out.write("\n")
            count += 1
        # What the nodes share beside the mail: the MTA-STS cache (so no policy is forgotten on the
        # way, RFC 8461 §10.2) and the TLS report tallies and sent marks.
        domains, days = await (_sqlite_keys(config.queue.path) if url is None else _postgres_keys(url))
        for domain in domains:
            policy = await queue.load_sts_policy(domain)
            if policy is not None:
                out.write(json.dumps({"type": "sts_policy", **dataclasses.asdict(policy)}) + "\n")
        for day in days:
            for tally in await queue.load_tlsrpt_tallies(day):
                out.write(json.dumps({"type": "tlsrpt_tally", **dataclasses.asdict(tally)}) + "\n")
            for domain, report_id in (await queue.tlsrpt_sent(day)).items():
                out.write(json.dumps({"type": "tlsrpt_sent", "day": day, "domain": domain,
                                      "report_id": report_id}) + "\n")
    finally:
        await queue.close()
    return count, skipped


_KEYS = ("SELECT domain FROM sts_policy ORDER BY domain",
         "SELECT day FROM tlsrpt_tally UNION SELECT day FROM tlsrpt_sent ORDER BY 1")


async def _sqlite_keys(path: Path) -> tuple[list[str], list[str]]:
    uri = f"{path.absolute().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return ([str(r[0]) for r in conn.execute(_KEYS[0])], [str(r[0]) for r in conn.execute(_KEYS[1])])


async def _postgres_keys(url: str) -> tuple[list[str], list[str]]:
    from mailward.queue.postgres import connect

    conn = await connect(url)
    try:
        domains = [str(r[0]) for r in await (await conn.execute(_KEYS[0])).fetchall()]
        return domains, [str(r[0]) for r in await (await conn.execute(_KEYS[1])).fetchall()]
    finally:
        await conn.close()


def _lines(source: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise ToolError(f"line {number} of the export is not JSON; is this a mailward queue "
                            "export?") from None
        if not isinstance(data, dict):
            raise ToolError(f"line {number} of the export is not a JSON object.")
        yield number, data


async def _import(config: Config, source: IO[str]) -> tuple[int, int]:
    url = config.queue.postgres_url
    if url is None:
        raise ToolError("import writes into a PostgreSQL queue; set queue.url = \"postgresql://...\" in the "
                        "configuration and run `mailward queue migrate` first.")
    try:
        from mailward.queue.postgres import PostgresQueue
    except ImportError:
        raise _driver_missing() from None
    lines = _lines(source)
    first = next(lines, None)
    if first is None or first[1].get("mailward_queue_export") != EXPORT_FORMAT:
        raise ToolError(f"the input is not a mailward queue export (format {EXPORT_FORMAT}); make it with "
                        "`mailward queue export`.")
    queue = await PostgresQueue.open(url, pool_size=2)
    added = present = 0
    fresh_days: dict[str, bool] = {}
    try:
        for number, data in lines:
            kind = data.pop("type", "message")
            try:
                if kind == "message":
                    message, body = parse_record(data)
                    if await queue.import_message(message, body):
                        added += 1
                    else:
                        present += 1
                elif kind == "sts_policy":
                    policy = StsPolicyRecord(**data)
                    held = await queue.load_sts_policy(policy.domain)
                    if held is None or held.fetched_at < policy.fetched_at:
                        await queue.save_sts_policy(policy)
                elif kind == "tlsrpt_tally":
                    tally = TlsRptTally(**{**data, "policy_strings": tuple(data["policy_strings"]),
                                           "mx_hosts": tuple(data["mx_hosts"])})
                    # Counts add up, so a day is imported only into a queue that has none of it yet:
                    # running the import again must not count the sessions twice.
                    if tally.day not in fresh_days:
                        fresh_days[tally.day] = not await queue.load_tlsrpt_tallies(tally.day)
                    if fresh_days[tally.day]:
                        await queue.add_tlsrpt_tallies([tally])
                elif kind == "tlsrpt_sent":
                    await queue.mark_tlsrpt_sent(str(data["day"]), str(data["domain"]),
                                                 str(data["report_id"]), time.time())
                else:
                    raise ValueError(f"unknown record type {kind!r}")
            except (ValueError, TypeError, KeyError, CorruptMessage) as exc:
                raise ToolError(f"line {number} of the export: {exc}; nothing after it was "
                                "imported.") from None
    finally:
        await queue.close()
    return added, present


# --- the commands ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, config: Config) -> int:
    """`queue migrate|export|import`; 0 on success, 2 (with one sentence) on an error to fix."""
    action: str = args.queue_command
    try:
        if action == "migrate":
            url = config.queue.postgres_url
            if url is None:
                print("the embedded SQLite queue upgrades itself when mailward starts; migrate is for a "
                      "PostgreSQL queue (queue.url).")
                return 0
            print(asyncio.run(_migrate(url)))
            return 0
        if action == "export":
            if args.output is None or args.output == "-":
                count, skipped = asyncio.run(_export(config, sys.stdout))
            else:
                with Path(args.output).open("x", encoding="utf-8") as out:
                    count, skipped = asyncio.run(_export(config, out))
            for problem in skipped:
                print(f"mailward: {problem}", file=sys.stderr)
            print(f"{count} message(s) exported" + (f", {len(skipped)} damaged left out" if skipped else ""),
                  file=sys.stderr)
            return 1 if skipped else 0
        if args.input is None or args.input == "-":
            added, present = asyncio.run(_import(config, sys.stdin))
        else:
            with Path(args.input).open(encoding="utf-8") as source:
                added, present = asyncio.run(_import(config, source))
        print(f"{added} message(s) imported" + (f", {present} already in the queue" if present else ""))
        return 0
    except (ToolError, QueueError) as exc:
        print(f"mailward: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"mailward: {exc.filename} exists already; choose another --output file.", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mailward: cannot use {exc.filename or 'the file'} ({exc.strerror}).", file=sys.stderr)
        return 2


def add_parsers(queue_sub: Any, parents: list[argparse.ArgumentParser], func: Any) -> None:
    """Register `queue migrate|export|import` beside queuetool's commands."""
    p = queue_sub.add_parser("migrate", parents=parents[:1],
                             help="create or upgrade the tables of a PostgreSQL queue (queue.url)")
    p.set_defaults(func=func)
    p = queue_sub.add_parser("export", parents=parents[:1],
                             help="write every message (bodies included) as JSON lines, e.g. to move "
                                  "to PostgreSQL")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write here (a new file) instead of standard output")
    p.set_defaults(func=func)
    p = queue_sub.add_parser("import", parents=parents[:1],
                             help="add the messages of an export to the PostgreSQL queue, keeping their ids")
    p.add_argument("input", nargs="?", metavar="FILE", help="the export (default: standard input)")
    p.set_defaults(func=func)
