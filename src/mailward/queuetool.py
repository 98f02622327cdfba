"""`mailward queue`: what the queue holds, and the operator's hands on it (Postfix's mailq, postsuper).

The tool opens the SQLite queue file itself, beside a running server: WAL lets readers and one
writer at a time share the file between processes. It does not go through `SqliteQueue.open()`,
which empties the spool directory of transactions being received and creates a missing database;
from a second process that could take a spool file from under the running server, or leave a
root-owned empty queue where the configuration pointed at the wrong file. Instead `list` and
`show` read through a read-only connection, and `retry`, `flush`, `hold`, `release` and `delete`
run the backend's own statements (`sqlite_store`) in one IMMEDIATE transaction with
synchronous=FULL, as its writer does. When run as root, SQLite gives any -wal/-shm file it creates
the database file's owner.

A queue on PostgreSQL (queue.url) has no file to open: there the same commands run through the
`Queue` protocol (`mailward.queue.postgres_tool.SharedQueue`), and every node hears of a change at
once by NOTIFY.

A running server notices such a change by itself within about a second (its queue writer watches
for commits by other connections, see `mailward.queue.sqlite`), so `queue flush` and `queue retry`
send no signal. They read the server's pid file only to say when nothing is running: the change
is then on disk and takes effect when the server starts.

`--json` prints a list of messages; the schema is stable (fields may be added, none removed)::

    [{"id": "0T48Y5GJ0JS2NB",          # queue id
      "size": 411,                     # body bytes as stored (our Received: header included)
      "created_at": 1795896476.8,      # epoch seconds, when the message was committed
      "sender": "x@example.org",       # envelope sender; "" is the null sender <>
      "held": false,
      "hold_reason": null,             # "operator", or what made the message corrupt
      "recipients": [{"address": "a@example.net",
                      "status": "deferred",  # queued | deferred | delivered | failed | held
                      "reason": "451 4.7.1 try later",  # the last reply or our diagnosis; null before
                      "attempts": 1,
                      "next_attempt_at": 1795897000.0,  # epoch seconds; null once final
                      "tls": {  # the TLS of the last attempt; null before one, or when it never
                              # reached a host (local delivery, DNS failure, connection refused)
                          "protocol": "TLSv1.3",  # null: the attempt ran in plaintext
                          "cipher": "TLS_AES_256_GCM_SHA384",
                          "verified": false,  # the peer was authenticated as the policy asks
                          "policy": "may",    # effective security level: none, may, encrypt, dane,
                                              # dane-only, verify, secure
                          "failure": null}}]}]  # why TLS was not used, or how it failed

`queue show --json` adds to its message "envelope" (client_ip, client_helo, listener, received_at,
auth_user, body_type, smtputf8, requiretls, dsn_ret, dsn_envid, and tls: the TLS of reception as
{"version", "cipher", "bits"} or null) and "headers" ([name, unfolded value] pairs).
`retry`, `flush`, `hold`, `release` print each message after the change, `delete` as it was
before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mailward.queue import CorruptMessage, RecipientState, StoredMessage, TlsRptTally, TlsVerdict
from mailward.queue import sqlite_store as store
from mailward.queue.postgres_tool import SharedQueue, ToolError
from mailward.queue.postgres_tool import add_parsers as add_shared_parsers

BUSY_TIMEOUT = 10.0  # seconds to wait for the server's writer to finish its batch
HEADER_LIMIT = 256 * 1024  # `show` reads at most this much of a body looking for the header end

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # a named message is not in the queue (or, for retry, is on hold)
EXIT_SETUP = 2  # no queue, unreadable queue, bad configuration: as `mailward` does for config errors

T = TypeVar("T")


class QueueToolError(Exception):
    """Something the operator must fix before the queue can be read; one sentence."""


class CorruptRecord(QueueToolError):
    """A message whose stored record cannot be decoded; the server holds it when it reads it."""


# --- reading and changing the queue file ---------------------------------------------------------


class QueueFile:
    """The SQLite queue of one node, opened from outside the server process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        if not self.path.is_file():
            raise QueueToolError(
                f"there is no queue at {self.path}; check queue.path in the configuration (--config), "
                "or start the server once to create it.")
        # A URI so SQLite never creates the file: mode=ro for reading, rw (not rwc) for changes.
        uri = f"{self.path.absolute().as_uri()}?mode={'rw' if write else 'ro'}"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            self._check_schema(conn)
            if write:
                conn.execute("PRAGMA synchronous = FULL")  # the change is on disk when we say so
            else:
                conn.execute("PRAGMA query_only = 1")
            yield conn
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        finally:
            conn.close()

    def _failure(self, exc: sqlite3.Error) -> QueueToolError:
        return QueueToolError(f"the queue at {self.path} cannot be used ({exc}); check that this user "
                              "may read (and for changes, write) it and its directory.")

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is None:
            raise QueueToolError(f"{self.path} is not a mailward queue; check queue.path in the "
                                 "configuration.")
        if str(row[0]).isdigit() and int(row[0]) < store.SCHEMA_VERSION:
            raise QueueToolError(f"{self.path} has queue schema {row[0]}, older than this mailward's "
                                 f"{store.SCHEMA_VERSION}; start the server once (mailward serve) to "
                                 "upgrade it.")
        if row[0] != str(store.SCHEMA_VERSION):
            raise QueueToolError(f"{self.path} has queue schema {row[0]}; this mailward reads schema "
                                 f"{store.SCHEMA_VERSION}, so use the mailward that wrote it.")

    def messages(self) -> tuple[list[StoredMessage], list[CorruptMessage]]:
        """Every message in id (arrival) order, read in one snapshot, and the undecodable ones."""
        with self._connect(write=False) as conn:
            found = store.read_messages(conn, "1 ORDER BY id", ())
        good = [m for m in found if isinstance(m, StoredMessage)]
        bad = [m for m in found if isinstance(m, CorruptMessage)]
        return good, bad

    def get(self, id: str) -> StoredMessage | None:
        with self._connect(write=False) as conn:
            found = store.read_messages(conn, "id = ?", (id,))
        if not found:
            return None
        message = found[0]
        if isinstance(message, CorruptMessage):
            raise CorruptRecord(f"{message}; the server holds it the next time it reads it.")
        return message

    def header_block(self, id: str) -> bytes:
        """The stored body up to the blank line that ends the header (at most HEADER_LIMIT bytes)."""
        data = b""
        seq = 0
        with self._connect(write=False) as conn:
            while len(data) < HEADER_LIMIT:
                chunk = store.body_chunk(conn, id, seq)
                if chunk is None:
                    break
                data += chunk
                seq += 1
                if data.startswith(b"\r\n"):
                    return b""
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    return data[: end + 2]
        return data[:HEADER_LIMIT]

    def tlsrpt(self, day: str, domain: str | None) -> tuple[list[TlsRptTally], dict[str, str]]:
        """The TLS report tallies of a UTC day and the reports already sent (`mailward tlsrpt show`)."""
        with self._connect(write=False) as conn:
            return store.load_tlsrpt_tallies(conn, day, domain), store.tlsrpt_sent(conn, day)

    def _change(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._connect(write=True) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        return result

    def retry(self, ids: Sequence[str] | None, now: float) -> list[str]:
        """Make the pending recipients of `ids` (None: every message) due at `now`; held messages
        are left alone. Returns the ids of the messages now due."""
        return self._change(lambda conn: store.retry(conn, ids=ids, now=now))

    def hold(self, id: str) -> bool:
        return self._change(lambda conn: store.hold(conn, id=id))

    def release(self, id: str) -> bool:
        return self._change(lambda conn: store.release(conn, id=id))

    def delete(self, id: str) -> bool:
        return self._change(lambda conn: store.delete(conn, id=id))


# --- JSON ---------------------------------------------------------------------------------------


def recipient_json(state: RecipientState) -> dict[str, Any]:
    return {
        "address": state.recipient.address,
        "status": state.status,
        "reason": state.last_reply,
        "attempts": state.attempts,
        "next_attempt_at": None if state.is_final else state.next_attempt_at,
        "tls": None if state.tls is None else state.tls.to_dict(),
    }


def message_json(message: StoredMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "size": message.size,
        "created_at": message.created_at,
        "sender": message.envelope.sender,
        "held": message.held,
        "hold_reason": message.hold_reason,
        "recipients": [recipient_json(r) for r in message.recipients],
    }


def detail_json(message: StoredMessage, headers: bytes) -> dict[str, Any]:
    env = message.envelope
    out = message_json(message)
    out["envelope"] = {
        "client_ip": env.client_ip,
        "client_helo": env.client_helo,
        "listener": env.listener,
        "received_at": env.received_at,
        "auth_user": env.auth_user,
        "body_type": env.body_type,
        "smtputf8": env.smtputf8,
        "requiretls": env.requiretls,
        "dsn_ret": env.dsn_ret,
        "dsn_envid": env.dsn_envid,
        "tls": None if env.tls is None
        else {"version": env.tls.version, "cipher": env.tls.cipher, "bits": env.tls.bits},
    }
    out["headers"] = [[name, value] for name, value in parse_headers(headers)]
    return out


def parse_headers(block: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs of a header block; undecodable bytes become U+FFFD."""
    fields: list[tuple[str, str]] = []
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)  # RFC 5322 §2.2.3: unfolding removes only the CRLF
            continue
        name, sep, value = line.partition(":")
        fields.append((name, value.lstrip(" \t")) if sep else ("", line))
    return fields


# --- human output -------------------------------------------------------------------------------

# Control characters, and the bidirectional overrides that reorder what a terminal shows: a remote
# reply or a Subject must not be able to rewrite the operator's screen or disguise itself.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                            text)


def format_age(seconds: float) -> str:
    """An age in its two largest units, as operators read them in Postfix tools: "3h 12m", "45s"."""
    s = max(0, int(seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _next_try(state: RecipientState, now: float) -> str:
    if state.is_final or state.status == "held" or state.next_attempt_at is None:
        return "-"
    if state.next_attempt_at <= now:
        return "now"
    return "in " + format_age(state.next_attempt_at - now + 0.999)  # round up: "in 0s" would mislead


def _tls(verdict: TlsVerdict | None) -> str:
    if verdict is None:
        return "-"
    text = verdict.summary()
    return printable(f"{text} at level {verdict.policy}" if verdict.policy else text)


def _sender(message: StoredMessage) -> str:
    return printable(message.envelope.sender) or "<>"


def _table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _active(message: StoredMessage, now: float) -> bool:
    return message.lease_expires_at is not None and message.lease_expires_at > now


def format_list(messages: Sequence[StoredMessage], now: float) -> str:
    """The `mailq` view: one row per recipient; "*" marks a message in delivery, "!" a held one."""
    if not messages:
        return "Mail queue is empty\n"
    rows: list[list[str]] = [["ID", "SIZE", "AGE", "SENDER", "RECIPIENT", "STATUS", "NEXT TRY", "LAST REPLY"]]
    for m in messages:
        mark = "!" if m.held else "*" if _active(m, now) else ""
        message_cells = [m.id + mark, str(m.size), format_age(now - m.created_at), _sender(m)]
        for i, r in enumerate(m.recipients):
            head = message_cells if i == 0 else [""] * len(message_cells)
            rows.append([*head, printable(r.recipient.address), r.status, _next_try(r, now),
                         printable(r.last_reply or "")])
    recipients = sum(len(m.recipients) for m in messages)
    oldest = min(m.created_at for m in messages)
    lines = _table(rows, right=frozenset({1}))
    lines.append(f"{_plural(len(messages), 'message')}, {_plural(recipients, 'recipient')}, "
                 f"oldest {format_age(now - oldest)}")
    return "\n".join(lines) + "\n"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _when(epoch: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))
    return f"{stamp} ({format_age(now - epoch)} ago)"


def format_show(message: StoredMessage, headers: bytes, now: float) -> str:
    env = message.envelope
    if message.held:
        state = f"on hold ({printable(message.hold_reason or 'operator')})"
    elif _active(message, now):
        state = f"in delivery by {printable(message.lease_owner or '?')}"
    else:
        state = "waiting"
    helo = printable(env.client_helo) or "-"
    origin = f"{printable(env.client_ip)} (EHLO {helo}) on listener {env.listener}"
    if env.auth_user:
        origin += f", logged in as {printable(env.auth_user)}"
    tls = "none" if env.tls is None else f"{env.tls.version}, {env.tls.cipher}, {env.tls.bits} bits"
    options = [f"BODY={env.body_type}"]
    if env.smtputf8:
        options.append("SMTPUTF8")
    if env.requiretls:
        options.append("REQUIRETLS")
    if env.dsn_ret:
        options.append(f"RET={env.dsn_ret}")
    if env.dsn_envid:
        options.append(f"ENVID={printable(env.dsn_envid)}")
    fields = [
        ("Queue ID", message.id),
        ("Size", f"{message.size} bytes"),
        ("Arrived", _when(message.created_at, now)),
        ("Sender", f"<{printable(env.sender)}>"),
        ("State", state),
        ("Received from", origin),
        ("TLS", tls),
        ("Options", " ".join(options)),
    ]
    lines = [f"{name + ':':<15}{value}" for name, value in fields]
    lines += ["", "Recipients:"]
    rows = [["ADDRESS", "STATUS", "ATTEMPTS", "NEXT TRY", "TLS", "REASON"]]
    for r in message.recipients:
        rows.append([printable(r.recipient.address), r.status, str(r.attempts), _next_try(r, now),
                     _tls(r.tls), printable(r.last_reply or "-")])
    lines += ["  " + line for line in _table(rows, right=frozenset({2}))]
    lines += ["", "Headers:"]
    text = headers.decode("utf-8", errors="replace")
    lines += ["  " + printable(line.replace("\t", "        ")) for line in text.split("\r\n") if line]
    return "\n".join(lines) + "\n"


# --- the commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Output:
    json: bool

    def emit(self, payload: list[dict[str, Any]], text: str) -> None:
        if self.json:
            sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
        elif text:
            sys.stdout.write(text)


def _warn(text: str) -> None:
    print(f"mailward: {text}", file=sys.stderr)


def _ids(raw: Sequence[str]) -> list[str]:
    # Queue ids are upper-case Crockford base32; accept them as typed in lower case too.
    return [i.strip().upper() for i in raw]


def cmd_list(queue: QueueFile | SharedQueue, out: _Output, now: float) -> int:
    messages, corrupt = queue.messages()
    for bad in corrupt:
        _warn(f"{bad}; the server holds it the next time it reads it.")
    out.emit([message_json(m) for m in messages], format_list(messages, now))
    return EXIT_OK


def cmd_show(queue: QueueFile | SharedQueue, out: _Output, now: float, ids: Sequence[str]) -> int:
    status = EXIT_OK
    payload: list[dict[str, Any]] = []
    texts = []
    for id in _ids(ids):
        try:
            message = queue.get(id)
        except CorruptRecord as exc:
            _warn(str(exc))
            status = EXIT_NOT_FOUND
            continue
        if message is None:
            _warn(f"message {id} is not in the queue (delivered, bounced or deleted).")
            status = EXIT_NOT_FOUND
            continue
        headers = queue.header_block(id)
        payload.append(detail_json(message, headers))
        texts.append(format_show(message, headers, now))
    out.emit(payload, "\n".join(texts))
    return status


def cmd_change(queue: QueueFile | SharedQueue, out: _Output, action: str, ids: Sequence[str]) -> int:
    op = {"hold": queue.hold, "release": queue.release, "delete": queue.delete}[action]
    done = {"hold": "held", "release": "released", "delete": "deleted"}[action]
    status = EXIT_OK
    payload: list[dict[str, Any]] = []
    lines = []
    for id in _ids(ids):
        # A corrupt record can still be held, released or deleted; it just has no JSON form.
        before = None
        with contextlib.suppress(CorruptRecord):
            before = queue.get(id) if action == "delete" else None
        if not op(id):
            _warn(f"message {id} is not in the queue (delivered, bounced or deleted).")
            status = EXIT_NOT_FOUND
            continue
        shown = None
        with contextlib.suppress(CorruptRecord):
            shown = before if action == "delete" else queue.get(id)
        if shown is not None:
            payload.append(message_json(shown))
        lines.append(f"{id}: {done}\n")
    out.emit(payload, "".join(lines))
    return status


@dataclass(frozen=True, slots=True)
class Server:
    """Where to find the server that uses the queue, to tell the operator when a change acts."""

    pid_file: Path
    delivery_enabled: bool = True


def running_pid(pid_file: Path) -> int | None:
    """The pid of the mailward that wrote `pid_file`, or None when it is not running."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, and another user's, as the server is when an unprivileged operator asks
    # After a crash the pid file stays behind and its number may be reused by another program.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None if Path("/proc/self").exists() else pid
    except OSError:
        return pid
    return pid if b"mailward" in cmdline else None


def _when_effective(server: Server | None) -> None:
    if server is None:
        return
    if running_pid(server.pid_file) is None:
        _warn(f"no running mailward found ({server.pid_file} is missing or stale); the change is "
              "stored and takes effect when it starts.")
    elif not server.delivery_enabled:
        _warn("delivery is disabled (delivery.enabled = false); the messages are sent once it is "
              "enabled.")
    # Otherwise the running server sees the change within about a second by itself.


def cmd_retry(queue: QueueFile | SharedQueue, out: _Output, now: float, ids: Sequence[str],
              server: Server | None) -> int:
    wanted = _ids(ids)
    due = set(queue.retry(wanted, now))
    status = EXIT_OK
    payload: list[dict[str, Any]] = []
    lines = []
    for id in dict.fromkeys(wanted):
        message = None
        with contextlib.suppress(CorruptRecord):
            message = queue.get(id)
        if id not in due:
            status = EXIT_NOT_FOUND
            if message is not None and message.held:
                _warn(f"message {id} is on hold; release it to deliver it (mailward queue release {id}).")
            else:
                _warn(f"message {id} is not in the queue (delivered, bounced or deleted).")
            continue
        if message is not None:
            payload.append(message_json(message))
        lines.append(f"{id}: due now\n")
    out.emit(payload, "".join(lines))
    if due:
        _when_effective(server)
    return status


def cmd_flush(queue: QueueFile | SharedQueue, out: _Output, now: float, server: Server | None) -> int:
    due = set(queue.retry(None, now))
    messages, _ = queue.messages()
    held = sum(1 for m in messages if m.held)
    text = f"{_plural(len(due), 'message')} due now"
    if held:
        text += f"; {_plural(held, 'held message')} left on hold"
    out.emit([message_json(m) for m in messages if m.id in due], text + "\n")
    if due:
        _when_effective(server)
    return EXIT_OK


def run(args: argparse.Namespace, queue_path: Path, now: float | None = None,
        server: Server | None = None, url: str | None = None) -> int:
    """Run one `mailward queue` subcommand against the queue file at `queue_path`, or the PostgreSQL
    queue at `url`; `server` says where the server's pid file is, so retry and flush can tell
    whether it is running (not asked for a shared queue: other nodes act on changes too)."""
    out = _Output(json=bool(getattr(args, "json", False)))
    clock = time.time() if now is None else now
    action: str = args.queue_command
    queue: QueueFile | SharedQueue
    try:
        if url is None:
            queue = QueueFile(queue_path)
        else:
            queue, server = SharedQueue(url), None
    except (QueueToolError, ToolError) as exc:
        _warn(str(exc))
        return EXIT_SETUP
    try:
        if action == "list":
            return cmd_list(queue, out, clock)
        if action == "show":
            return cmd_show(queue, out, clock, args.ids)
        if action in ("hold", "release", "delete"):
            return cmd_change(queue, out, action, args.ids)
        if action == "retry":
            return cmd_retry(queue, out, clock, args.ids, server)
        return cmd_flush(queue, out, clock, server)
    except QueueToolError as exc:
        _warn(str(exc))
        return EXIT_SETUP
    finally:
        if isinstance(queue, SharedQueue):
            queue.close()


def add_parser(sub: Any, common: argparse.ArgumentParser,
               func: Callable[[argparse.Namespace], int]) -> None:
    """Register `queue list|show|flush|retry|hold|release|delete` on the `mailward` parser."""
    json_opt = argparse.ArgumentParser(add_help=False)
    json_opt.add_argument("--json", action="store_true",
                          help="print a JSON list of messages (schema: pydoc mailward.queuetool)")
    queue = sub.add_parser(
        "queue", help="list and manage queued mail (like mailq and postsuper)",
        description="In `queue list` an id marked * is being delivered, ! is on hold.")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    parents = [common, json_opt]
    p = queue_sub.add_parser("list", parents=parents, help="every message, one row per recipient")
    p.set_defaults(func=func)
    for name, helptext in (
        ("show", "envelope, recipients, TLS of reception and headers of messages"),
        ("retry", "try the deferred recipients of messages now, not at their next try time"),
        ("hold", "stop delivering messages until released"),
        ("release", "resume delivering held messages"),
        ("delete", "remove messages without a bounce"),
    ):
        p = queue_sub.add_parser(name, parents=parents, help=helptext)
        p.add_argument("ids", nargs="+", metavar="ID", help="queue id")
        p.set_defaults(func=func)
    p = queue_sub.add_parser("flush", parents=parents,
                             help="try every deferred recipient of every message not on hold now")
    p.set_defaults(func=func)
    add_shared_parsers(queue_sub, parents, func)
