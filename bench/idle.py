"""Memory per idle TLS session: 10,000 clients connected to mailward's 465 listener, doing nothing.

Each client completes the TLS handshake and reads the 220 greeting, then stays connected. mailward's
resident memory (VmRSS of its one process) is read before the first connection and once all of
them are up; the difference divided by the sessions is the cost of one idle session. The target
(DESIGN.md, performance notes) is under 1 GiB for 10,000.

Postfix runs one smtpd process per connection, so it is measured up to its process limit (100 by
default here) and extrapolated: the smtpd processes' summed RSS counts the shared library pages
once per process, their summed PSS shares them out; both are shown per session.

The clients live in a separate process, spread over source addresses 127.0.0.2-127.0.0.250 so
that neither the per-address connection limit nor the ephemeral ports run out; both processes get
a raised RLIMIT_NOFILE.

    python bench/idle.py [--sessions N] [--no-postfix]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import uvloop
from loadgen import SmtpConnection, client_context
from postfix_instance import LOOPBACK, PostfixInstance
from server import MailwardProcess, raise_nofile

from mailward.tls import demo_ca_path, make_demo_certificate

SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 251))
TARGET_MIB = 1024.0
SESSIONS = 10_000
NOTES = """\
Idle: mailward's one process (VmRSS) holding the sessions, each a finished TLS 1.3 handshake and
the 220 greeting. Postfix runs an smtpd process per session: measured at its process limit (100
sessions), shown per session as PSS (shared pages divided among the processes) and extrapolated."""
OPENING = 200  # handshakes in flight at once while the sessions are being set up


# --- the client process ----------------------------------------------------------------------------


async def _open_one(port: int, ctx: ssl.SSLContext, source: str, timeout: float) -> SmtpConnection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(SmtpConnection, LOOPBACK, port, local_addr=(source, 0))
        try:
            await conn.start_tls(ctx, "localhost")
            await conn.expect(220, "greeting")
        except BaseException:
            conn.close()
            raise
    return conn


async def _hold(port: int, sessions: int, cafile: str, timeout: float) -> None:
    """Open the sessions, report how many are up, hold them until told to let go (stdin)."""
    ctx = client_context(cafile)
    gate = asyncio.Semaphore(OPENING)
    errors: dict[str, int] = {}

    async def one(i: int) -> SmtpConnection | None:
        async with gate:
            try:
                return await _open_one(port, ctx, SOURCES[i % len(SOURCES)], timeout)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return None

    started = time.monotonic()
    conns = [c for c in await asyncio.gather(*(one(i) for i in range(sessions))) if c is not None]
    seconds = time.monotonic() - started
    print(json.dumps({"open": len(conns), "errors": errors, "seconds": seconds}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for c in conns:
        c.close()
    await asyncio.sleep(0.5)


@dataclass(frozen=True)
class Held:
    open: int
    errors: dict[str, int]
    seconds: float


class IdleClients:
    """The client process: `with IdleClients(port, n, ca) as held:` keeps `held.open` sessions."""

    def __init__(self, port: int, sessions: int, cafile: str, timeout: float = 120.0) -> None:
        self.args = [str(port), str(sessions), cafile, str(timeout)]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Held:
        self.proc = subprocess.Popen([sys.executable, __file__, "--hold", *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"idle client process failed (exit {self.proc.wait()})")
        raw = json.loads(line)
        return Held(raw["open"], raw["errors"], raw["seconds"])

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


# --- measuring ---------------------------------------------------------------------------------------


def status_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise LookupError(f"{key} not in /proc/{pid}/status")


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise LookupError(f"Pss not in /proc/{pid}/smaps_rollup")


def settle_rss(pid: int, seconds: float = 2.0) -> int:
    """VmRSS once it stops moving (the last handshakes' buffers are freed asynchronously)."""
    last = status_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = status_kib(pid)
        if now == last:
            break
        last = now
    return last


@dataclass(frozen=True)
class MailwardIdle:
    sessions: int
    requested: int
    rss_before_kib: int
    rss_after_kib: int
    open_seconds: float
    errors: dict[str, int]

    @property
    def total_mib(self) -> float:
        return self.rss_after_kib / 1024

    @property
    def kib_per_session(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.sessions if self.sessions else 0.0


@dataclass(frozen=True)
class PostfixIdle:
    sessions: int
    smtpd_processes: int
    rss_kib: int
    pss_kib: int

    @property
    def rss_kib_per_session(self) -> float:
        return self.rss_kib / self.smtpd_processes if self.smtpd_processes else 0.0

    @property
    def pss_kib_per_session(self) -> float:
        return self.pss_kib / self.smtpd_processes if self.smtpd_processes else 0.0


def measure_mailward(tls_dir: Path, sessions: int) -> MailwardIdle:
    pair = make_demo_certificate(tls_dir, "localhost")
    mw = MailwardProcess(pair.cert, pair.key, max_connections=sessions + 1000, log_level="warning")
    try:
        mw.start()
        time.sleep(0.5)
        before = settle_rss(mw.pid)
        with IdleClients(mw.ports["submissions"], sessions, str(demo_ca_path(tls_dir))) as held:
            after = settle_rss(mw.pid)
        return MailwardIdle(held.open, sessions, before, after, held.seconds, held.errors)
    finally:
        mw.cleanup()


def _smtpd_pids(pf: PostfixInstance) -> list[int]:
    queue = str(pf.queue_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "smtpd" and os.readlink(entry / "cwd") == queue:
                pids.append(int(entry.name))
    return pids


def measure_postfix(tls_dir: Path) -> PostfixIdle:
    pair = make_demo_certificate(tls_dir, "localhost")
    with PostfixInstance(pair.cert, pair.key) as pf:
        limit = pf.process_limit
        with IdleClients(pf.port("submissions"), limit, str(demo_ca_path(tls_dir))) as held:
            time.sleep(0.5)
            pids = _smtpd_pids(pf)
            rss = pss = 0
            for pid in pids:
                with contextlib.suppress(OSError, LookupError):
                    rss += status_kib(pid)
                    pss += pss_kib(pid)
        return PostfixIdle(held.open, len(pids), rss, pss)


def report(mw: MailwardIdle, pf: PostfixIdle | None) -> str:
    verdict = "ok" if mw.total_mib < TARGET_MIB and mw.sessions == mw.requested else "MISSED"
    lines = [
        f"mailward: {mw.sessions:,} of {mw.requested:,} idle TLS sessions open "
        f"(set up in {mw.open_seconds:.1f}s{', errors ' + str(mw.errors) if mw.errors else ''})",
        f"  RSS {mw.rss_before_kib / 1024:.1f} MiB before, {mw.total_mib:.1f} MiB with the sessions: "
        f"{mw.kib_per_session:.1f} KiB per session; target < {TARGET_MIB:.0f} MiB for "
        f"{mw.requested:,}: {verdict}",
    ]
    if pf is not None:
        gib = mw.requested / 1024**2
        lines += [
            f"Postfix: {pf.sessions} idle TLS sessions on {pf.smtpd_processes} smtpd processes "
            "(one process per connection, capped at the process limit)",
            f"  per session: RSS {pf.rss_kib_per_session:,.0f} KiB, PSS {pf.pss_kib_per_session:,.0f} KiB; "
            f"extrapolated to {mw.requested:,}: RSS {pf.rss_kib_per_session * gib:.1f} GiB, "
            f"PSS {pf.pss_kib_per_session * gib:.1f} GiB (and as many smtpd processes)",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class IdleFigures:
    mailward: MailwardIdle
    postfix: PostfixIdle | None


def measure(sessions: int = SESSIONS, postfix: bool = True) -> IdleFigures:
    raise_nofile(max(65_536, sessions * 2 + 1000))
    tls_dir = Path(tempfile.mkdtemp(prefix="mailward-bench-tls-"))
    try:
        mw = measure_mailward(tls_dir, sessions)
        pf = measure_postfix(tls_dir) if postfix else None
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)
    return IdleFigures(mw, pf)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    parser.add_argument("--no-postfix", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args.sessions, postfix=not args.no_postfix)
    print(report(figures.mailward, figures.postfix))
    mw = figures.mailward
    return 0 if mw.sessions == mw.requested and mw.total_mib < TARGET_MIB else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hold"]:
        port, n, cafile, timeout = sys.argv[2:6]
        uvloop.run(_hold(int(port), int(n), cafile, float(timeout)))
    else:
        sys.exit(main())
