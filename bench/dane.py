"""DANE must not slow delivery: messages per second to one destination at level dane and at may.

The destination is selfsigned.dane.test of the DNSSEC lab (tests/integration/dnssec.py and
dane_lab.py: NSD serving zones signed at set-up, Unbound validating them, all on loopback). Its MX
host ee-self.dane.test has a DNSSEC-secure DANE-EE 3 1 1 record naming a self-signed certificate;
one receiving mailward runs on that host's address with that certificate and delivery disabled, so
whatever it accepts stays in its queue durably: it is the sink, and its queue says when everything
arrived (the newest message's created_at is the moment of the last arrival, to within the peer's
group commit).

For each half the sending mailward's queue is filled first with delivery disabled (smtp-source,
2 KB, one recipient per message), then a restart with delivery enabled is timed from its release
(the pid file's mtime, as in bench/outbound.py) until the sink holds all of them. At level dane
(the default) every delivery line must say `Verified ... (dane 3 1 1)`, so that the row really
measures DANE; at may (a `[[delivery.policy]]` row for the destination) the same peer is reached
with STARTTLS and the line says Untrusted. Halves run in the order dane, may, may, dane, so that
other load that comes and goes weighs on both alike. DNS is warm: Unbound has every answer cached
before each timed run; mailward's own cache starts empty with each process, as after any restart.

    python bench/dane.py [--quick] [--messages N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# The DNSSEC lab and its peers, shared with the integration tests (appended: bench/ wins on names).
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from dane_lab import EE_SELF, SIGNED
from dnssec import DnsLab, start_dnssec
from mailward_server import MailwardServer
from outbound import SIZE, Delivery
from postfix_instance import LOOPBACK, SBIN_PATH, free_port
from server import NOISY_CORES, RUN_AS, MailwardProcess, process_cpu, raise_nofile, system_busy

from mailward.tls import make_demo_certificate

DOMAIN = f"selfsigned.{SIGNED}"
MX_HOST = f"ee-self.{SIGNED}"
SENDER = "sender@example.test"
RECIPIENT = f"rcpt@{DOMAIN}"
LOAD_SESSIONS = 20
TARGET = 0.90  # dane msgs/s over may msgs/s
# Both levels, all four halves together. At about 1,200 msgs/s a half of 1,500 lasts a second and
# its figure wanders by a fifth on a shared machine; 5,000 per half keep the ratio within a few %.
MESSAGES, QUICK_MESSAGES = 20_000, 600
# What each level's delivery lines must say about TLS: proof that the level did what it is named for.
EXPECTED_TLS = {"dane": re.compile(r"Verified TLSv1\.[23]/\S+ \(dane 3 1 1\)"),
                "may": re.compile(r"Untrusted TLSv1\.[23]/\S+")}
DELIVERY_LINE = re.compile(r": to=<(?P<rcpt>[^>]*)>, relay=\S+, delay=[0-9.]+, tls=(?P<tls>[^,]+), "
                           r"dsn=[0-9.]+, status=(?P<status>\w+) ")


@dataclass
class Sender(MailwardProcess):
    """The sending mailward: MX delivery through the lab's resolver, at `level` for DOMAIN."""

    dns_toml: str = ""
    smtp_port: int = 25
    level: str = "dane"

    def config_text(self) -> str:
        # No policy row leaves the default level, dane; a row makes the same destination opportunistic.
        policy = ("" if self.level == "dane" else
                  f'\n[[delivery.policy]]\ndestination = "{DOMAIN}"\nlevel = "{self.level}"\n')
        return f"""\
hostname = "mx.example.test"
state_dir = "state"
{RUN_AS}relay_domains = ["{DOMAIN}"]

[[listener]]
kind = "mx"
address = "{LOOPBACK}"
port = {self.ports["mx"]}
max_connections = {self.max_connections}
max_connections_per_ip = {self.max_connections}

[[tls.certificates]]
cert = "{self.cert}"
key = "{self.key}"

[delivery]
enabled = {"true" if self.delivery_enabled else "false"}
port = {self.smtp_port}
{policy}
{self.dns_toml}
[log]
level = "{self.log_level}"
"""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


def load(port: int, messages: int) -> None:
    """Submit the messages with smtp-source: plain SMTP, one message per connection."""
    tool = shutil.which("smtp-source", path=SBIN_PATH)
    if tool is None:
        raise RuntimeError("smtp-source not found: apt-get install postfix (it ships smtp-source)")
    cmd = [tool, "-s", str(LOAD_SESSIONS), "-m", str(messages), "-l", str(SIZE), "-f", SENDER,
           "-t", RECIPIENT, f"{LOOPBACK}:{port}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _own_cpu() -> float:
    """This process's CPU seconds: polling the peer's queue is not other work."""
    return process_cpu(os.getpid())


@dataclass
class Half:
    delivery: Delivery
    other_cores: float  # cores busy with none of the mailwards, the lab's DNS servers or this process
    tls: str  # what the delivery lines said, e.g. "Verified TLSv1.3/... (dane 3 1 1)"


@dataclass
class Row:
    messages: int
    dane: Delivery
    may: Delivery
    other_cores: float  # the largest of the four halves
    tls: dict[str, str]  # level: its delivery lines' tls= field
    halves: list[tuple[str, Delivery]]  # in the order run, to see how much the figures wander
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{DOMAIN}: DANE-EE 3 1 1 vs may, cached DNS, {SIZE // 1024} KB, 1 rcpt/msg"

    @property
    def ratio(self) -> float:
        return self.dane.msgs_per_s / self.may.msgs_per_s if self.may.msgs_per_s else 0.0

    @property
    def noise(self) -> list[str]:
        if self.other_cores <= NOISY_CORES:
            return []
        return [f"other work kept {self.other_cores:.2f} cores busy during a half (above "
                f"{NOISY_CORES:.2f}): these figures are noisy"]


class Bench:
    """The lab, the sink peer and a TLS pair for the sender, started once for all halves."""

    def __init__(self, root: Path, timeout: float = 300.0) -> None:
        self.root = root
        self.timeout = timeout
        self.lab: DnsLab = start_dnssec(root / "dns")
        try:
            certs = self.lab.dane
            assert certs is not None
            pair = make_demo_certificate(root / "tls", "localhost")
            self.cert, self.key = pair.cert, pair.key
            # The sender opens up to 20 connections from one address: far from the peer's limits.
            self.peer = MailwardServer(
                root / "peer", mx=self.lab.smtp_port, address=EE_SELF, log_level="warning",
                extra_toml=f'relay_domains = ["{DOMAIN}"]\n',
                listener_toml={"mx": "max_connections = 10000\nmax_connections_per_ip = 10000"},
                certificates=((certs.selfsigned.cert, certs.selfsigned.key),))
            self.peer.write_config()
            self.peer.start()
        except BaseException:
            self.lab.stop()
            raise

    def close(self) -> None:
        self.peer.stop()
        self.lab.stop()

    def received(self) -> tuple[int, float]:
        """Messages the sink peer holds, and the newest one's arrival (time.time())."""
        with sqlite3.connect(f"file:{self.peer.queue_path}?mode=ro", uri=True) as db:
            count, newest = db.execute(
                "SELECT count(*), coalesce(max(created_at), 0) FROM message").fetchone()
        return int(count), float(newest)

    def dns_cpu(self) -> float:
        return sum(process_cpu(p.pid) for p in self.lab.procs)

    def warm_dns(self) -> None:
        """Every question delivery asks, answered once by Unbound so that it is cached."""
        port = self.lab.smtp_port
        for name, rdtype in ((DOMAIN, "MX"), (MX_HOST, "A"), (MX_HOST, "AAAA"),
                             (f"_{port}._tcp.{MX_HOST}", "TLSA")):
            self.lab.query(name, rdtype)

    def run(self, level: str, messages: int, problems: list[str]) -> Half:
        mw = Sender(self.cert, self.key, ports={"mx": free_port()}, delivery_enabled=False,
                    log_level="info", dns_toml=self.lab.dns_toml, smtp_port=self.lab.smtp_port, level=level)
        try:
            mw.start()
            load(mw.ports["mx"], messages)
            mw.stop()
            queued, _ = mw.queued()
            if queued != messages:
                problems.append(f"{level}: the sender queued {queued} of {messages} messages")
            self.warm_dns()
            base, _ = self.received()
            offset = mw.log_size()
            mw.delivery_enabled = True
            mw.start()
            # Sampled together, so that the sender's start-up does not count as other work.
            started, busy0, dns0, own0 = time.monotonic(), system_busy(), self.dns_cpu(), _own_cpu()
            cpu0, peer0 = process_cpu(mw.pid), process_cpu(self.peer.pid)
            # The pid file is written as the deliverer is started: its mtime is the release.
            t0 = (mw.root / "state" / "mailward.pid").stat().st_mtime
            # The end is the newest created_at, exact however seldom this polls: seldom keeps the
            # count(*) scans off the CPUs the two mailwards need.
            arrived = _wait(lambda: self.received()[0] >= base + queued, self.timeout, interval=0.1)
            count, t1 = self.received()
            cpu1, peer1, busy1 = process_cpu(mw.pid), process_cpu(self.peer.pid), system_busy()
            dns1, own1 = self.dns_cpu(), _own_cpu()
            elapsed = time.monotonic() - started
            if not arrived:
                problems.append(f"{level}: the peer received {count - base} of {queued} in "
                                f"{self.timeout:.0f}s; log:\n{mw.log_tail(10)}")
                t1 = time.time()
            if not _wait(lambda: mw.queued()[0] == 0, 60):
                problems.append(f"{level}: the sender's queue still holds {mw.queued()[0]} messages")
            code = mw.stop()
            if code != 0:
                problems.append(f"{level}: the sender exited with status {code}")
            tls = self._check_log(level, mw.log_since(offset), queued, problems)
            other = busy1 - busy0 - (cpu1 - cpu0) - (peer1 - peer0) - (dns1 - dns0) - (own1 - own0)
            return Half(Delivery(count - base, queued, t1 - t0, cpu1 - cpu0),
                        max(0.0, other) / elapsed if elapsed > 0 else 0.0, tls)
        finally:
            mw.cleanup()

    @staticmethod
    def _check_log(level: str, log: str, expected: int, problems: list[str]) -> str:
        """Checks every delivery line of one half; returns the first line's tls= field."""
        lines = [m for m in DELIVERY_LINE.finditer(log) if m["rcpt"] == RECIPIENT]
        sent = [m for m in lines if m["status"] == "sent"]
        if len(sent) != expected or len(lines) != expected:
            problems.append(f"{level}: {len(sent)} of {expected} delivery lines say sent "
                            f"({len(lines)} lines in all)")
        wrong = [m["tls"] for m in sent if not EXPECTED_TLS[level].fullmatch(m["tls"])]
        if wrong:
            problems.append(f"{level}: {len(wrong)} deliveries not as the level demands, e.g. tls={wrong[0]}")
        if "Traceback" in log:
            problems.append(f"{level}: the sender logged a traceback")
        return sent[0]["tls"] if sent else "-"

    def row(self, messages: int) -> Row:
        half = messages // 2 // 2
        problems: list[str] = []
        runs = [(level, self.run(level, half, problems)) for level in ("dane", "may", "may", "dane")]
        dane = runs[0][1].delivery + runs[3][1].delivery
        may = runs[1][1].delivery + runs[2][1].delivery
        for name, d in (("dane", dane), ("may", may)):
            if d.received != 2 * half:
                problems.append(f"the peer received {d.received} messages for {2 * half} at {name}")
        if "Traceback" in self.peer.log():
            problems.append("the receiving peer logged a traceback")
        return Row(4 * half, dane, may, max(h.other_cores for _, h in runs),
                   {level: h.tls for level, h in runs}, [(level, h.delivery) for level, h in runs], problems)


NOTES = f"""\
DANE: mailward alone, one destination ({DOMAIN}; MX {MX_HOST}, DNSSEC-signed,
DANE-EE 3 1 1 naming a self-signed certificate) reached by MX through a validating Unbound over
NSD on loopback: at level dane (every delivery line must say Verified ... (dane 3 1 1)) and, by a
delivery.policy row, at may (STARTTLS, Untrusted), same peer, same certificate. The peer is a
mailward that queues everything durably; arrival in its queue is timed. Unbound's cache is warm
before each timed run. Target: dane at least {TARGET:.0%} of may's msgs/s."""


def format_row(row: Row) -> str:
    d, m = row.dane, row.may
    return (f"{row.label}: dane {d.messages} in {d.seconds:.2f}s = {d.msgs_per_s:,.0f} msgs/s, "
            f"{d.cpu_ms_per_msg:.2f} ms CPU/msg; may {m.messages} in {m.seconds:.2f}s = "
            f"{m.msgs_per_s:,.0f} msgs/s, {m.cpu_ms_per_msg:.2f} ms CPU/msg; ratio dane/may "
            f"{row.ratio:.3f} (target >= {TARGET:.2f}: {'ok' if row.ratio >= TARGET else 'BELOW'})\n"
            f"  halves: {', '.join(f'{level} {d.msgs_per_s:,.0f}' for level, d in row.halves)} msgs/s\n"
            f"  tls= at dane: {row.tls['dane']}; at may: {row.tls['may']}")


def compare(messages: int = MESSAGES) -> Row:
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="mailward-bench-dane-"))
    bench = Bench(root)
    try:
        return bench.row(messages)
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MESSAGES} messages")
    parser.add_argument("--messages", type=int, help=f"messages, both levels together (default {MESSAGES})")
    args = parser.parse_args(argv)
    started = time.monotonic()
    row = compare(args.messages or (QUICK_MESSAGES if args.quick else MESSAGES))
    print(format_row(row))
    for p in row.problems:
        print(f"  PROBLEM: {p}")
    for n in row.noise:
        print(f"  noise: {n}")
    print()
    print(NOTES)
    print(f"({time.monotonic() - started:.0f}s)")
    return 1 if row.problems else 0


if __name__ == "__main__":
    sys.exit(main())
