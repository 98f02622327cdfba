"""mailward beside Postfix delivering: messages per second to Postfix's smtp-sink, in one run.

For each row both queues are filled with the same N/2 messages first (smtp-source over plain SMTP),
without delivering any: mailward runs with `delivery.enabled = false`, Postfix puts everything its
`plain` listener accepts on hold. Then delivery is released and timed until the sink has received
all of them: for mailward, from the moment a restart with delivery enabled has its listeners up (the
deliverer starts then), for Postfix from `postsuper -H ALL` + `postqueue -f`. Both deliver every
example.test recipient to the same smtp-sink on 127.0.0.1 in plaintext (smtp-sink has no TLS):
mailward by a `[[delivery.route]]` with security = "none", Postfix by a transport map entry with
smtp_tls_security_level = none. Both keep their default connection limits (20 to one
destination) and reuse connections; both record each result durably (mailward: its SQLite queue,
Postfix: removing the queue file) and afterwards their queues must be empty. Each side runs twice
per row, in the order mailward, Postfix, Postfix, mailward, and its figure covers both runs.

    python bench/outbound.py [--quick] [--messages N] [--recipients R ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from postfix_instance import LOOPBACK, SBIN_PATH, PostfixInstance, free_port
from server import MailwardProcess, postfix_cpu, process_cpu, raise_nofile

from mailward.tls import make_demo_certificate

SIZE = 2048
RECIPIENTS = (1, 20)
SENDER = "sender@example.test"
RECIPIENT = "rcpt@example.test"  # smtp-source makes 1rcpt@, 2rcpt@, ... when there are several
LOAD_SESSIONS = 20
_COUNTERS = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)")


def _tool(name: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise RuntimeError(f"{name} not found: apt-get install postfix (it ships {name})")
    return path


class Sink:
    """One smtp-sink for the whole run; `-c` prints its counters after every message, which a thread
    follows so that the moment the last expected message arrived is known."""

    def __init__(self) -> None:
        self.port = free_port()
        # -u: it must drop root; 1024: listen backlog, ample for 2 x 20 connections.
        self.proc = subprocess.Popen([_tool("smtp-sink"), "-u", "postfix", "-c", f"{LOOPBACK}:{self.port}",
                                      "1024"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.messages = 0
        self.sessions = 0  # connections that have ended
        self.changed_at = 0.0  # when `messages` last grew: the last arrival, once all are in
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_listening()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while chunk := _read_some(fd):
            tail += chunk
            found = _COUNTERS.findall(tail)
            # Keep enough to complete a record split across two reads. A number cut short there
            # reads smaller than the last one seen, and the counters only grow: max() ignores it.
            tail = tail[-64:]
            if found:
                sessions, messages = int(found[-1][0]), int(found[-1][1])
                with self._changed:
                    self.sessions = max(self.sessions, sessions)
                    if messages > self.messages:
                        self.messages = messages
                        self.changed_at = time.time()
                        self._changed.notify_all()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((LOOPBACK, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"smtp-sink did not listen on {self.port}")

    def wait_for(self, count: int, timeout: float) -> float | None:
        """time.time() when the sink had `count` messages (to about 1 ms), or None. Wall clock,
        because mailward's release time is a file's mtime."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.messages < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self.changed_at

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def load(port: int, messages: int, recipients: int) -> None:
    """Submit the messages with smtp-source: plain SMTP, one message per connection."""
    cmd = [_tool("smtp-source"), "-s", str(LOAD_SESSIONS), "-m", str(messages), "-r", str(recipients),
           "-l", str(SIZE), "-f", SENDER, "-t", RECIPIENT, f"{LOOPBACK}:{port}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


@dataclass
class Delivery:
    received: int  # transactions the sink saw, counted once the queue was empty
    messages: int  # messages released
    seconds: float
    cpu: float  # server CPU seconds over the same time
    connections: int = 0  # SMTP sessions the sink saw end, once the server had stopped

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_msg(self) -> float:
        return self.cpu * 1e3 / self.messages if self.messages else 0.0

    def __add__(self, other: Delivery) -> Delivery:
        return Delivery(self.received + other.received, self.messages + other.messages,
                        self.seconds + other.seconds, self.cpu + other.cpu,
                        self.connections + other.connections)


@dataclass
class Row:
    recipients: int
    messages: int
    mailward: Delivery
    postfix: Delivery
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        plural = "s" if self.recipients > 1 else ""
        return f"to smtp-sink, {SIZE // 1024} KB, {self.recipients} rcpt{plural}/msg"

    @property
    def ratio(self) -> float:
        return self.mailward.msgs_per_s / self.postfix.msgs_per_s if self.postfix.msgs_per_s else 0.0


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


class Comparison:
    def __init__(self, tls_dir: Path, timeout: float = 300.0) -> None:
        pair = make_demo_certificate(tls_dir, "localhost")
        self.cert, self.key = pair.cert, pair.key
        self.timeout = timeout
        self.sink = Sink()

    def close(self) -> None:
        self.sink.stop()

    def run_mailward(self, messages: int, recipients: int, problems: list[str]) -> Delivery:
        mw = MailwardProcess(self.cert, self.key, parked_port=self.sink.port, delivery_enabled=False,
                             log_level="warning")
        try:
            mw.start()
            load(mw.ports["mx"], messages, recipients)
            mw.stop()
            queued, _ = mw.queued()
            if queued != messages:
                problems.append(f"mailward queued {queued} of {messages} messages")
            mw.delivery_enabled = True
            base, sessions = self.sink.messages, self.sink.sessions
            mw.start()
            cpu0 = process_cpu(mw.pid)
            # The pid file is written as the deliverer is started, before it runs: its mtime is the
            # release (start() only polls for it, and a few ms are many messages here).
            t0 = (mw.root / "state" / "mailward.pid").stat().st_mtime
            t1 = self.sink.wait_for(base + queued, self.timeout)
            cpu1 = process_cpu(mw.pid)
            if t1 is None:
                problems.append(f"mailward delivered {self.sink.messages - base} of {queued} in "
                                f"{self.timeout:.0f}s; log:\n{mw.log_tail(10)}")
                t1 = time.time()
            # Every result recorded: a message leaves mailward's queue once all its recipients are.
            if not _wait(lambda: mw.queued()[0] == 0, 60):
                problems.append(f"mailward's queue still holds {mw.queued()[0]} messages after delivery")
            code = mw.stop()
            if code != 0:
                problems.append(f"mailward exited with status {code}")
            return Delivery(self.sink.messages - base, queued, t1 - t0, cpu1 - cpu0,
                            self._sessions_since(sessions))
        finally:
            mw.cleanup()

    def _sessions_since(self, base: int) -> int:
        # The sink counts a session when it ends; closed connections reach it within moments.
        last = -1
        while self.sink.sessions != last:
            last = self.sink.sessions
            time.sleep(0.2)
        return last - base

    def run_postfix(self, messages: int, recipients: int, problems: list[str]) -> Delivery:
        with PostfixInstance(self.cert, self.key, relay_port=self.sink.port) as pf:
            load(pf.port("plain"), messages, recipients)
            held = pf.wait_held(messages)
            if held != messages:
                problems.append(f"Postfix held {held} of {messages} messages")
            base, sessions = self.sink.messages, self.sink.sessions
            t0, cpu0 = time.time(), postfix_cpu(pf)
            pf.release_held()
            t1 = self.sink.wait_for(base + held, self.timeout)
            cpu1 = postfix_cpu(pf)
            if t1 is None:
                problems.append(f"Postfix delivered {self.sink.messages - base} of {held} in "
                                f"{self.timeout:.0f}s; log:\n{pf.log_tail(10)}")
                t1 = time.time()
            if not pf.wait_empty(60):
                problems.append(f"Postfix's queue still holds {pf.queued()} messages after delivery")
            sent = pf.delivered(expect=held * recipients)
            if sent != held * recipients:
                problems.append(f"Postfix logged {sent} of {held * recipients} recipients sent")
            delivery = Delivery(self.sink.messages - base, held, t1 - t0, cpu1 - cpu0)
        # Postfix keeps idle connections cached for a moment; they end when the instance stops.
        delivery.connections = self._sessions_since(sessions)
        return delivery

    def row(self, messages: int, recipients: int) -> Row:
        # Halves in the order mailward, Postfix, Postfix, mailward, so that other load on the
        # machine that comes and goes during the row weighs on both sides alike.
        half = messages // 2
        problems: list[str] = []
        mw1 = self.run_mailward(half, recipients, problems)
        pf = self.run_postfix(half, recipients, problems) + self.run_postfix(half, recipients, problems)
        mw = mw1 + self.run_mailward(half, recipients, problems)
        for name, d in (("mailward", mw), ("Postfix", pf)):
            if d.received != 2 * half:
                problems.append(f"the sink received {d.received} transactions for {2 * half} messages "
                                f"from {name}")
        return Row(recipients, 2 * half, mw, pf, problems)


NOTES = """\
Outbound: both queues are filled first (delivery off / on hold), then released and timed until
smtp-sink has every message. Plaintext on both sides (smtp-sink has no TLS), one next hop
[127.0.0.1]:port, default limits (20 connections to one destination), connections reused; all
recipients of a message in one transaction. Each result is recorded durably before it counts as
done on both sides, but only arrival at the sink is timed."""


def format_table(rows: Sequence[Row]) -> str:
    headers = ("row", "msgs", "mailward msg/s", "postfix msg/s", "ratio", "mailward CPU ms/msg",
               "postfix CPU ms/msg", "mailward conns", "postfix conns")
    cells = [(r.label, str(r.messages), f"{r.mailward.msgs_per_s:,.0f}", f"{r.postfix.msgs_per_s:,.0f}",
              f"{r.ratio:.2f}", f"{r.mailward.cpu_ms_per_msg:.2f}", f"{r.postfix.cpu_ms_per_msg:.2f}",
              str(r.mailward.connections), str(r.postfix.connections))
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])


MESSAGES, QUICK_MESSAGES = 6000, 600  # per row, both halves together


def compare(messages: int = MESSAGES, recipients: Sequence[int] = RECIPIENTS,
            verbose: bool = True) -> list[Row]:
    raise_nofile()
    rows: list[Row] = []
    tls_dir = Path(tempfile.mkdtemp(prefix="mailward-bench-tls-"))
    cmp = Comparison(tls_dir)
    try:
        for r in recipients:
            row = cmp.row(messages, r)
            rows.append(row)
            if verbose:
                mw, pf = row.mailward, row.postfix
                print(f"{row.label}: mailward {mw.messages} in {mw.seconds:.2f}s = "
                      f"{mw.msgs_per_s:,.0f} msgs/s, {mw.cpu_ms_per_msg:.2f} ms CPU/msg, "
                      f"{mw.connections} connections; postfix "
                      f"{pf.messages} in {pf.seconds:.2f}s = {pf.msgs_per_s:,.0f} msgs/s, "
                      f"{pf.cpu_ms_per_msg:.2f} ms CPU/msg, {pf.connections} connections", flush=True)
                for p in row.problems:
                    print(f"  PROBLEM: {p}", flush=True)
    finally:
        cmp.close()
        shutil.rmtree(tls_dir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MESSAGES} messages per row")
    parser.add_argument("--messages", type=int, help=f"messages per row (default {MESSAGES})")
    parser.add_argument("--recipients", type=int, nargs="+", default=list(RECIPIENTS))
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = compare(args.messages or (QUICK_MESSAGES if args.quick else MESSAGES), args.recipients)
    print()
    print(format_table(rows))
    print()
    print(NOTES)
    print(f"({time.monotonic() - started:.0f}s)")
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
