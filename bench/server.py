"""mailward beside Postfix: messages per second over real TLS on loopback, measured in one run.

For every row a fresh `mailward serve` process (its own config, state and queue in a temporary
directory) and one throwaway Postfix instance (bench/postfix_instance.py) take the same load from
the same generator (bench/loadgen.py, its own process), back to back. Both sides are fully durable:
mailward answers 250 after its group commit's fsync, Postfix after fsyncing the queue file.
Postfix then hands each message to the discard transport. mailward's recipients are routed to a
loopback port where nothing listens, so its deliverer defers them and they stay queued: afterwards
its queue must hold exactly the messages it acknowledged.

Each row runs mailward, Postfix, Postfix, mailward with half the messages each, so that other
load on the machine weighs on both alike. Fairness notes (NOTES, printed with the table): both
sides require AUTH PLAIN on 465 and 587 and check that the sender belongs to the login; the
"25 STARTTLS" rows compare the listeners without AUTH. Every connection does a full TLS handshake
(ECDSA P-256, TLS 1.3), no resumption. The generator shares the two cores with the server.

    python bench/server.py [--quick] [--messages-small N] [--messages-large N] [--only ROW ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import loadgen
from loadgen import LoadResult, LoadSpec, Mode
from postfix_instance import LOOPBACK, PostfixInstance, free_port, sasl_available

from mailward.tls import demo_ca_path, make_demo_certificate

BENCH = Path(__file__).resolve().parent
USER = "bench@example.test"
PASSWORD = "bench password for loopback only"
RECIPIENT = "rcpt@example.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KINDS = ("submissions", "submission", "mx")
# Started as root, mailward refuses to run without `user`; the benchmark runs it as its caller.
RUN_AS = 'user = "root"\n' if os.geteuid() == 0 else ""
NOISY_CORES = 0.25  # other load above this makes a row's figures suspect


@dataclass(frozen=True)
class Case:
    """One way of sending, as each server is asked to take it."""

    key: str
    label: str
    mode: Mode
    per_connection: int
    mailward_listener: str
    postfix_listener: str
    auth: bool  # AUTH PLAIN once per connection, on both sides (Postfix: when SASL is available)


CASES = (
    Case("465", "465 TLS, 1 msg/conn", "implicit-tls", 1, "submissions", "submissions", True),
    Case("465x100", "465 TLS, 100 msgs/conn", "implicit-tls", 100, "submissions", "submissions", True),
    Case("587", "587 STARTTLS, 1 msg/conn", "starttls", 1, "submission", "submission", True),
    Case("25", "25 STARTTLS, 1 msg/conn", "starttls", 1, "mx", "mx", False),
)
PLAIN_CASES = (
    Case("25plain", "25 plain, 1 msg/conn", "plain", 1, "mx", "plain", False),
    Case("25plainx100", "25 plain, 100 msgs/conn", "plain", 100, "mx", "plain", False),
)
SIZES = (2048, 100 * 1024)
CONCURRENCY = (10, 50)


# --- measuring CPU ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # the command name may contain spaces


def process_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds of a process (all its threads); with `children`, also of its reaped children."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])  # utime, stime
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def postfix_cpu(pf: PostfixInstance) -> float:
    """CPU seconds of every process of the instance: the live ones (Postfix daemons work in the
    queue directory) plus the master's reaped children."""
    master = pf.master_pid()
    total = 0.0
    queue = str(pf.queue_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") != queue:
                continue
            total += process_cpu(int(entry.name), children=int(entry.name) == master)
        except (OSError, ValueError):
            continue
    return total


def system_busy() -> float:
    """CPU seconds, all cores, since boot, spent running anything or stolen by the hypervisor."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# --- mailward -----------------------------------------------------------------------------------------


@dataclass
class MailwardProcess:
    """A real `mailward serve --config FILE` with its own state in a temporary directory."""

    cert: Path
    key: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mailward-bench-")))
    ports: dict[str, int] = field(default_factory=lambda: {k: free_port() for k in KINDS})
    log_level: str = "info"
    max_connections: int = 20_000
    extra_toml: str = ""
    # The bench's recipients are routed here. Nothing listens, so mailward's deliverer finds the
    # next hop refusing and leaves every message deferred in the queue, where it can be counted.
    parked_port: int = field(default_factory=free_port)
    # False queues mail without delivering it; a restart with True then delivers all of it at once.
    delivery_enabled: bool = True
    # How `mailward` is run; a profiler or an instrumented wrapper can stand in front of it.
    launcher: tuple[str, ...] = (sys.executable, "-m", "mailward.cli")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "mailward.toml"

    @property
    def queue_path(self) -> Path:
        return self.root / "state" / "queue" / "queue.db"

    @property
    def log_path(self) -> Path:
        return self.root / "mailward.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def config_text(self) -> str:
        listeners = "".join(f"""
[[listener]]
kind = "{kind}"
address = "{LOOPBACK}"
port = {port}
max_connections = {self.max_connections}
max_connections_per_ip = {self.max_connections}
""" for kind, port in self.ports.items())
        return f"""\
hostname = "mx.example.test"
state_dir = "state"
{RUN_AS}relay_domains = ["example.test"]
{self.extra_toml}
{listeners}
[[tls.certificates]]
cert = "{self.cert}"
key = "{self.key}"

[delivery]
enabled = {"true" if self.delivery_enabled else "false"}

[[delivery.route]]
domain = "example.test"
next_hop = "[{LOOPBACK}]:{self.parked_port}"
security = "none"

[log]
level = "{self.log_level}"
"""

    def _cli(self, *args: str, stdin: str | None = None) -> None:
        subprocess.run([sys.executable, "-m", "mailward.cli", *args, "--config", str(self.config_path)],
                       input=stdin, text=True, capture_output=True, check=True, timeout=60, cwd=self.root)

    def start(self, timeout: float = 30.0, preexec: Callable[[], None] | None = None) -> None:
        first = not (self.root / "state").exists()
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        if first:  # a restart keeps its state, the user included
            self._cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root, preexec_fn=preexec,
                env=dict(os.environ, PYTHONPATH=str(BENCH.parent / "src")))
        pid_file = self.root / "state" / "mailward.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the pid file appears once every listener is bound
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailward exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if int(pid_file.read_text()) == self.proc.pid:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"mailward did not start in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def queued(self) -> tuple[int, int]:
        """Messages in the queue and their total size, read straight from the database."""
        with sqlite3.connect(f"file:{self.queue_path}?mode=ro", uri=True) as db:
            count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM message").fetchone()
        return int(count), int(size)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def mailward_running(cert: Path, key: Path) -> Iterator[MailwardProcess]:
    mw = MailwardProcess(cert, key)
    try:
        mw.start()
        yield mw
    finally:
        mw.cleanup()


# --- one measurement ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    result: LoadResult
    server_cpu: float  # seconds
    busy_cpu: float  # every process on the machine, seconds
    elapsed: float  # seconds over which the CPU figures were taken

    @property
    def msgs_per_s(self) -> float:
        return self.result.msgs_per_s

    @property
    def other_cores(self) -> float:
        """Cores busy with neither the server nor the generator (other work, hypervisor steal)."""
        other = self.busy_cpu - self.server_cpu - self.result.cpu_seconds
        return max(0.0, other / self.elapsed) if self.elapsed > 0 else 0.0

    @property
    def cpu_ms_per_msg(self) -> float:
        return self.server_cpu * 1e3 / self.result.ok if self.result.ok else 0.0

    def __add__(self, other: Measurement) -> Measurement:
        """Two runs of the same spec as one: counts, times and CPU add up."""
        a, b = self.result, other.result
        both = LoadResult(a.spec, ok=a.ok + b.ok, failed=a.failed + b.failed, errors=a.errors + b.errors,
                          seconds=a.seconds + b.seconds, connections=a.connections + b.connections,
                          resumed=a.resumed + b.resumed, cpu_seconds=a.cpu_seconds + b.cpu_seconds,
                          latencies=a.latencies + b.latencies, warmup_ok=a.warmup_ok + b.warmup_ok)
        return Measurement(both, self.server_cpu + other.server_cpu, self.busy_cpu + other.busy_cpu,
                           self.elapsed + other.elapsed)


def measure(spec: LoadSpec, server_cpu: Callable[[], float],
            settle: Callable[[], object] | None = None) -> Measurement:
    run = loadgen.LoadRun(spec)
    try:
        run.start()  # interpreter started and warm-up done: only the measured part is timed
        cpu0, busy0, t0 = server_cpu(), system_busy(), time.monotonic()
        result = run.go()
        if settle is not None:
            settle()  # Postfix: let the queue drain, its discard deliveries are part of its cost
        cpu1, busy1, t1 = server_cpu(), system_busy(), time.monotonic()
    finally:
        run.stop()
    return Measurement(result, cpu1 - cpu0, busy1 - busy0, t1 - t0)


@dataclass
class Row:
    case: Case
    size: int
    concurrency: int
    messages: int
    mailward: Measurement
    postfix: Measurement
    problems: list[str] = field(default_factory=list)  # the figures are wrong
    warnings: list[str] = field(default_factory=list)  # the figures are noisy

    @property
    def label(self) -> str:
        size = f"{self.size // 1024} KB"
        return f"{self.case.label}, {size}, {self.concurrency} clients"

    @property
    def ratio(self) -> float:
        return self.mailward.msgs_per_s / self.postfix.msgs_per_s if self.postfix.msgs_per_s else 0.0


class Comparison:
    """One Postfix instance for the whole run; a fresh mailward for every row."""

    def __init__(self, tls_dir: Path, *, warmup: bool = True, timeout: float = 120.0) -> None:
        pair = make_demo_certificate(tls_dir, "localhost")
        self.cert, self.key = pair.cert, pair.key
        self.ca = str(demo_ca_path(tls_dir))
        self.warmup = warmup
        self.timeout = timeout
        # Postfix gets the same login as mailward, unless Cyrus SASL's tools are missing.
        self.postfix_auth = sasl_available()
        self.postfix = PostfixInstance(self.cert, self.key,
                                       sasl_user=(USER, PASSWORD) if self.postfix_auth else None)

    def __enter__(self) -> Comparison:
        self.postfix.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.postfix.cleanup()

    def spec(self, case: Case, port: int, size: int, concurrency: int, messages: int,
             auth: bool, warmup: bool) -> LoadSpec:
        return LoadSpec(host=LOOPBACK, port=port, mode=case.mode, messages=messages, size=size,
                        concurrency=concurrency, per_connection=case.per_connection, cafile=self.ca,
                        auth=(USER, PASSWORD) if auth else None, sender=USER, recipient=RECIPIENT,
                        timeout=self.timeout, warmup=concurrency if warmup and self.warmup else 0)

    def measure_mailward(self, mw: MailwardProcess, case: Case, size: int, concurrency: int,
                         messages: int, warmup: bool) -> Measurement:
        spec = self.spec(case, mw.ports[case.mailward_listener], size, concurrency, messages, case.auth,
                         warmup)
        return measure(spec, lambda: process_cpu(mw.pid))

    def check_mailward(self, mw: MailwardProcess, m: Measurement, size: int, problems: list[str]) -> None:
        """After the row: every acknowledged message, whole, in the queue of a cleanly stopped server."""
        code = mw.stop()
        acknowledged = m.result.ok + m.result.warmup_ok
        stored, octets = mw.queued()
        if code != 0:
            problems.append(f"mailward exited with status {code}")
        if stored != acknowledged:
            problems.append(f"mailward acknowledged {acknowledged} messages but its queue holds {stored}")
        elif stored and octets < stored * size:
            problems.append(f"mailward's queue holds {octets} octets, less than {stored} x {size}")
        if m.result.failed:
            problems.append(f"mailward errors: {dict(m.result.errors)}; log:\n{mw.log_tail(10)}")

    def measure_postfix(self, case: Case, size: int, concurrency: int, messages: int, warmup: bool,
                        problems: list[str]) -> Measurement:
        pf = self.postfix
        if not pf.wait_empty():
            problems.append("Postfix's queue did not drain before the run")
        sent_before = pf.delivered()
        spec = self.spec(case, pf.port(case.postfix_listener), size, concurrency, messages,
                         case.auth and self.postfix_auth, warmup)
        m = measure(spec, lambda: postfix_cpu(pf), settle=pf.wait_empty)
        acknowledged = m.result.ok + m.result.warmup_ok
        discarded = pf.delivered(expect=sent_before + acknowledged) - sent_before
        if discarded != acknowledged:
            problems.append(f"Postfix acknowledged {acknowledged} messages but logged {discarded} discarded")
        if m.result.failed:
            problems.append(f"Postfix errors: {dict(m.result.errors)}; log:\n{pf.log_tail(10)}")
        return m

    def row(self, case: Case, size: int, concurrency: int, messages: int) -> Row:
        # Two halves per side, run mailward, Postfix, Postfix, mailward: load from elsewhere on the
        # machine that comes and goes during a row then weighs on both sides alike. Every client
        # must be able to fill its connections with per_connection messages in each half.
        half = max(messages // 2, concurrency * case.per_connection)
        problems: list[str] = []
        with mailward_running(self.cert, self.key) as server:
            mw1 = self.measure_mailward(server, case, size, concurrency, half, warmup=True)
            pf1 = self.measure_postfix(case, size, concurrency, half, True, problems)
            pf2 = self.measure_postfix(case, size, concurrency, half, False, problems)
            mw2 = self.measure_mailward(server, case, size, concurrency, half, warmup=False)
            mw = mw1 + mw2
            self.check_mailward(server, mw, size, problems)
        pf = pf1 + pf2
        warnings = [f"other processes kept {m.other_cores:.2f} cores busy during the {name} run"
                    for name, m in (("mailward", mw), ("Postfix", pf)) if m.other_cores > NOISY_CORES]
        return Row(case, size, concurrency, 2 * half, mw, pf, problems, warnings)


# --- output -------------------------------------------------------------------------------------------


NOTES = """\
Both sides fsync every message before 250 (mailward: group commit into its SQLite WAL; Postfix: the
queue file). Postfix then discards each message, mailward defers it (its next hop refuses); that
work counts in the CPU columns. CPU is server CPU per acknowledged message.
465 and 587: AUTH PLAIN once per connection on both sides, and the sender must belong to the login
(Postfix: Cyrus SASL, sasldb, reject_sender_login_mismatch). Cyrus's sasldb holds the password
itself and compares it; mailward verifies its argon2id hash once and then, for 5 minutes, an HMAC
of the verified password (as saslauthd -c does).
25: mailward's mx listener against a Postfix STARTTLS smtpd, neither with AUTH.
Every connection is a full TLS 1.3 handshake (ECDSA P-256, no resumption); the load generator runs
on the same two cores (its CPU is not in the server columns). Each side runs twice per row, in the
order mailward, Postfix, Postfix, mailward; its figure covers both runs."""

NOTES_NO_SASL = """\
Postfix ran WITHOUT AUTH (saslpasswd2 or Cyrus's sasldb plugin missing: apt-get install sasl2-bin
libsasl2-modules-db), so its 465 and 587 rows are not like for like."""


def notes() -> str:
    return NOTES if sasl_available() else NOTES + "\n" + NOTES_NO_SASL


def format_table(rows: Sequence[Row]) -> str:
    headers = ("row", "msgs", "mailward msg/s", "postfix msg/s", "ratio",
               "mailward CPU ms/msg", "postfix CPU ms/msg")
    cells = [(r.label, str(r.messages), f"{r.mailward.msgs_per_s:,.0f}", f"{r.postfix.msgs_per_s:,.0f}",
              f"{r.ratio:.2f}", f"{r.mailward.cpu_ms_per_msg:.2f}", f"{r.postfix.cpu_ms_per_msg:.2f}")
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])


MESSAGES_SMALL, MESSAGES_LARGE = 4000, 1500  # per row, both halves together
QUICK_SMALL, QUICK_LARGE = 300, 100


def compare(*, messages_small: int = MESSAGES_SMALL, messages_large: int = MESSAGES_LARGE,
            cases: Sequence[Case] = CASES, sizes: Sequence[int] = SIZES,
            concurrency: Sequence[int] = CONCURRENCY, warmup: bool = True,
            verbose: bool = True) -> list[Row]:
    """Run every row (mailward, Postfix, Postfix, mailward), printing each as it completes."""
    raise_nofile()
    rows: list[Row] = []
    tls_dir = Path(tempfile.mkdtemp(prefix="mailward-bench-tls-"))
    try:
        with Comparison(tls_dir, warmup=warmup) as cmp:
            for case in cases:
                for size in sizes:
                    for c in concurrency:
                        n = messages_small if size <= 16 * 1024 else messages_large
                        row = cmp.row(case, size, c, n)
                        rows.append(row)
                        if verbose:
                            print(f"{row.label}: mailward {row.mailward.result.summary()}\n"
                                  f"{' ' * len(row.label)}  postfix  {row.postfix.result.summary()}",
                                  flush=True)
                            for p in row.problems:
                                print(f"  PROBLEM: {p}", flush=True)
                            for w in row.warnings:
                                print(f"  warning: {w}", flush=True)
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)
    return rows


def raise_nofile(wanted: int = 65_536) -> None:
    """Raise this process's descriptor limit; children (servers, generator) inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _select(keys: Sequence[str] | None) -> list[Case]:
    everything = {c.key: c for c in (*CASES, *PLAIN_CASES)}
    return [everything[k] for k in keys] if keys else list(CASES)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer messages per row ({QUICK_SMALL} / {QUICK_LARGE})")
    parser.add_argument("--messages-small", type=int,
                        help=f"messages per 2 KB row (default {MESSAGES_SMALL})")
    parser.add_argument("--messages-large", type=int,
                        help=f"messages per 100 KB row (default {MESSAGES_LARGE})")
    parser.add_argument("--only", nargs="+", metavar="ROW",
                        choices=[c.key for c in (*CASES, *PLAIN_CASES)],
                        help="rows to run: " + ", ".join(c.key for c in (*CASES, *PLAIN_CASES)))
    parser.add_argument("--plain", action="store_true", help="add the plaintext rows")
    parser.add_argument("--size", type=int, nargs="+", help="message sizes in octets")
    parser.add_argument("--concurrency", type=int, nargs="+", help="client counts")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    small = args.messages_small or (QUICK_SMALL if args.quick else MESSAGES_SMALL)
    large = args.messages_large or (QUICK_LARGE if args.quick else MESSAGES_LARGE)
    cases = _select(args.only) + (list(PLAIN_CASES) if args.plain else [])
    started = time.monotonic()
    rows = compare(messages_small=small, messages_large=large, cases=cases,
                   sizes=args.size or SIZES, concurrency=args.concurrency or CONCURRENCY,
                   warmup=not args.no_warmup)
    print()
    print(format_table(rows))
    print()
    print(notes())
    print(f"({time.monotonic() - started:.0f}s)")
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
