"""Soak: mailward under steady mixed load for a long time, watched for growth.

One `mailward serve` (bench/server.py's MailwardProcess, its own state in a temporary directory)
takes submissions at a steady rate, mixed as real traffic is: implicit TLS with AUTH on 465,
STARTTLS with AUTH on 587, STARTTLS without AUTH on 25, several messages per connection, one in
twenty messages 100 KB, the rest 2 KB. It delivers all of them at once to Postfix's smtp-sink
(bench/outbound.py's Sink) over its route, so the queue is written and emptied all along.

Every `--interval` seconds a sample: the server's resident memory (VmRSS), its open file
descriptors (/proc/PID/fd), the queue depth, messages accepted and delivered, submission latency
(MAIL to the final 250, p50 and p99) in that interval. Printed as a table over time, then a
verdict: a least-squares line through the second half's samples of RSS and of fds (the first half
is warm-up: caches, pools, the allocator's arenas) must not climb more than a threshold over that
half, the queue must not grow (delivery keeps up), and no message may fail.

    python bench/soak.py [--minutes 15] [--rate 40] [--interval 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import uvloop
from loadgen import LoadSpec, Mode, SmtpConnection, SmtpError, client_context, make_message, open_connection
from outbound import Sink
from postfix_instance import LOOPBACK
from server import PASSWORD, RECIPIENT, USER, MailwardProcess

from mailward.tls import demo_ca_path, make_demo_certificate

MINUTES = 15.0
QUICK_MINUTES = 2.0  # make bench BENCH_ARGS=--quick
RATE = 40.0  # messages per second: steady, well below what the server can take
# (listener, client mode, AUTH) and the share of connections each gets.
MIX: tuple[tuple[str, Mode, bool, float], ...] = (
    ("submissions", "implicit-tls", True, 0.4),
    ("submission", "starttls", True, 0.3),
    ("mx", "starttls", False, 0.3),
)
PER_CONNECTION = (1, 10)  # messages per connection, uniformly in this range
SIZES = ((2048, 19), (100 * 1024, 1))  # octets and weight
CLIENTS = 20  # at most this many connections at once; the rate, not the clients, sets the pace
# Growth allowed over the second half, from its fitted line: memory may wobble by a few MiB as
# the allocator's arenas settle, a file descriptor count should not move at all.
RSS_GROWTH_KIB = 8 * 1024
RSS_GROWTH_SHARE = 0.05  # or 5% of the mean, whichever is larger
FD_GROWTH = 5.0
QUEUE_GROWTH = 50.0  # messages; more means delivery falls behind the steady rate


@dataclass
class Sample:
    at: float  # seconds since the start
    rss_kib: int
    fds: int
    queued: int
    accepted: int  # in this interval
    failed: int
    delivered: int  # total, as smtp-sink counts
    p50_ms: float
    p99_ms: float


@dataclass
class Load:
    """What the clients did since the last sample."""

    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    total_accepted: int = 0
    total_failed: int = 0

    def take(self) -> tuple[list[float], int, int]:
        out = (self.latencies, self.accepted, self.failed)
        self.latencies, self.accepted, self.failed = [], 0, 0
        return out


@dataclass
class Verdict:
    rss_growth_kib: float
    rss_limit_kib: float
    fd_growth: float
    queue_growth: float
    failed: int

    @property
    def ok(self) -> bool:
        return (self.rss_growth_kib <= self.rss_limit_kib and self.fd_growth <= FD_GROWTH
                and self.queue_growth <= QUEUE_GROWTH and self.failed == 0)

    def text(self) -> str:
        lines = [
            f"RSS over the second half: {self.rss_growth_kib / 1024:+.1f} MiB by its fitted line "
            f"(limit {self.rss_limit_kib / 1024:.1f} MiB)",
            f"open fds over the second half: {self.fd_growth:+.1f} (limit {FD_GROWTH:.0f})",
            f"queue depth over the second half: {self.queue_growth:+.1f} messages (limit {QUEUE_GROWTH:.0f})",
            f"failed submissions: {self.failed}",
            "verdict: " + ("no growth trend" if self.ok else "GROWTH OR FAILURES (see above)"),
        ]
        return "\n".join(lines)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def verdict(samples: list[Sample], failed: int) -> Verdict:
    half = samples[len(samples) // 2:]
    xs = [s.at for s in half]
    span = (xs[-1] - xs[0]) if len(xs) > 1 else 0.0

    def growth(ys: list[float]) -> float:
        return slope(xs, ys) * span

    mean_rss = statistics.fmean(s.rss_kib for s in half) if half else 0.0
    return Verdict(
        rss_growth_kib=growth([float(s.rss_kib) for s in half]),
        rss_limit_kib=max(RSS_GROWTH_KIB, RSS_GROWTH_SHARE * mean_rss),
        fd_growth=growth([float(s.fds) for s in half]),
        queue_growth=growth([float(s.queued) for s in half]),
        failed=failed,
    )


def format_table(samples: list[Sample]) -> str:
    headers = ("time", "RSS MiB", "fds", "queued", "accepted/s", "failed", "delivered", "p50 ms", "p99 ms")
    rows = []
    last_at, last_delivered = 0.0, 0
    for s in samples:
        secs = max(s.at - last_at, 1e-9)
        rows.append((f"{s.at / 60:5.1f} min", f"{s.rss_kib / 1024:.2f}", str(s.fds), str(s.queued),
                     f"{s.accepted / secs:.1f}", str(s.failed), f"{s.delivered - last_delivered}",
                     f"{s.p50_ms:.1f}", f"{s.p99_ms:.1f}"))
        last_at, last_delivered = s.at, s.delivered
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


# --- the load ------------------------------------------------------------------------------------------


class Pacer:
    """Hands out send times at a steady rate; a client that is late sends at once."""

    def __init__(self, rate: float, until: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()
        self.until = until

    async def wait(self) -> bool:
        """False once the run is over."""
        due = self.next
        if due >= self.until:
            return False
        self.next = max(due + self.interval, time.monotonic() - 1.0)  # no burst after a stall
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return True


async def client(mw: MailwardProcess, ca: str, pacer: Pacer, load: Load, rng: random.Random,
                 payloads: dict[int, bytes]) -> None:
    ctx = client_context(ca)
    listeners, modes, auths, weights = zip(*MIX, strict=True)
    sizes, size_weights = zip(*SIZES, strict=True)
    auth_line = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n"
    envelope = f"MAIL FROM:<{USER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
    while True:
        i = rng.choices(range(len(MIX)), weights)[0]
        spec = LoadSpec(host=LOOPBACK, port=mw.ports[listeners[i]], mode=modes[i], messages=0, size=0,
                        concurrency=1, cafile=ca)
        conn: SmtpConnection | None = None
        try:
            if not await pacer.wait():
                return
            async with asyncio.timeout(60):
                conn, _ = await open_connection(spec, ctx, None)
                if auths[i]:
                    conn.write(auth_line)
                    await conn.expect(235, "AUTH")
            for n in range(rng.randint(*PER_CONNECTION)):
                if n and not await pacer.wait():
                    break
                payload = payloads[rng.choices(sizes, size_weights)[0]]
                started = time.perf_counter()
                async with asyncio.timeout(60):
                    conn.write(envelope)
                    await conn.expect(250, "MAIL")
                    await conn.expect(250, "RCPT")
                    await conn.expect(354, "DATA")
                    conn.write(payload)
                    await conn.expect(250, "end of data")
                load.latencies.append(time.perf_counter() - started)
                load.accepted += 1
                load.total_accepted += 1
            async with asyncio.timeout(60):
                conn.write(b"QUIT\r\n")
                await conn.expect(221, "QUIT")
        except (SmtpError, ConnectionError, OSError, TimeoutError) as exc:
            kind = exc.kind if isinstance(exc, SmtpError) else type(exc).__name__
            load.errors[f"{listeners[i]}: {kind}"] += 1
            load.failed += 1
            load.total_failed += 1
        finally:
            if conn is not None:
                conn.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], p: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


async def run_load(mw: MailwardProcess, sink: Sink, ca: str, seconds: float, rate: float,
                   interval: float, seed: int) -> tuple[list[Sample], Load]:
    rng = random.Random(seed)
    payloads = {size: make_message(size, USER, RECIPIENT) + b".\r\n" for size, _ in SIZES}
    started = time.monotonic()
    pacer = Pacer(rate, started + seconds)
    load = Load()
    clients = [asyncio.create_task(client(mw, ca, pacer, load, random.Random(rng.random()), payloads))
               for _ in range(CLIENTS)]
    samples: list[Sample] = []
    # Samples at every interval while the load runs; none at the very end, where clients stop.
    for k in range(1, max(2, round(seconds / interval))):
        await asyncio.sleep(max(0.0, started + k * interval - time.monotonic()))
        latencies, accepted, failed = load.take()
        queued, _ = mw.queued()
        s = Sample(time.monotonic() - started, rss_kib(mw.pid), open_fds(mw.pid), queued, accepted, failed,
                   sink.messages, percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3)
        samples.append(s)
        table = format_table(samples)  # the header with the first sample, then one line each
        print(table if len(samples) == 1 else table.splitlines()[-1], flush=True)
    await asyncio.gather(*clients)
    return samples, load


@dataclass
class SoakResult:
    samples: list[Sample]
    verdict: Verdict
    accepted: int
    delivered: int
    errors: Counter[str]
    problems: list[str]


def soak(minutes: float, rate: float, interval: float, seed: int | None = None) -> SoakResult:
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
    root = Path(tempfile.mkdtemp(prefix="mailward-soak-"))
    pair = make_demo_certificate(root / "tls", "localhost")
    ca = str(demo_ca_path(root / "tls"))
    sink = Sink()
    mw = MailwardProcess(pair.cert, pair.key, root=root / "mailward", parked_port=sink.port,
                         log_level="warning")
    problems: list[str] = []
    try:
        mw.start()
        print(f"soak: {minutes:g} min at {rate:g} msg/s, a sample every {interval:g}s (seed {seed}); "
              f"mailward pid {mw.pid}", flush=True)
        samples, load = uvloop.run(run_load(mw, sink, ca, minutes * 60, rate, interval, seed))
        # Whatever was accepted must leave the queue and reach the sink.
        deadline = time.monotonic() + 120
        while mw.queued()[0] and time.monotonic() < deadline:
            time.sleep(0.5)
        if mw.queued()[0]:
            problems.append(f"{mw.queued()[0]} messages still queued two minutes after the load stopped")
        if sink.wait_for(load.total_accepted, 30) is None:
            problems.append(f"smtp-sink received {sink.messages} of {load.total_accepted} messages")
        code = mw.stop()
        if code != 0:
            problems.append(f"mailward exited with status {code}; log:\n{mw.log_tail(10)}")
        if load.total_failed:
            problems.append(f"{load.total_failed} submissions failed: {dict(load.errors)}")
        return SoakResult(samples, verdict(samples, load.total_failed), load.total_accepted, sink.messages,
                          load.errors, problems)
    finally:
        mw.cleanup()
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)


def default_interval(minutes: float) -> float:
    """30 s, or less for a short run, so that it still has 20 samples."""
    return min(30.0, minutes * 60 / 20)


def report(r: SoakResult) -> str:
    lines = [format_table(r.samples), "",
             f"{r.accepted} messages accepted, {r.delivered} delivered to smtp-sink", r.verdict.text()]
    lines += [f"PROBLEM: {p}" for p in r.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=MINUTES, help="length of the run (default 15)")
    parser.add_argument("--rate", type=float, default=RATE, help="messages submitted per second (default 40)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between samples (default 30; shorter runs: 20 samples)")
    parser.add_argument("--seed", type=int, default=None)
    a = parser.parse_args(argv)
    result = soak(a.minutes, a.rate, a.interval or default_interval(a.minutes), a.seed)
    print()
    print(report(result))
    return 0 if result.verdict.ok and not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
