"""SMTP load generator: M messages of S octets from C concurrent clients, in its own process(es).

Each client is a lean asyncio Protocol driving an `ssl.SSLObject` over memory BIOs (uvloop loop),
so one process can keep a server on the same machine busy. A message counts as accepted only when
its final reply after end of data is 250; anything else (another code, a lost connection, a TLS
failure, a timeout) is an error, counted by kind. MAIL, RCPT and DATA go in one write when the
server offers PIPELINING (RFC 2920); AUTH PLAIN, when asked for, is a round trip of its own.

TLS: the client verifies the server certificate against the given CA file and name. By default
every connection does a fresh full handshake (the worst case, and what the Postfix figures in
DESIGN.md assume); `--resume` hands each client's previous session to its next connection, as a
mail client reconnecting to its own server would.

Modes: `implicit-tls` (TLS from the first byte, port 465), `starttls` (EHLO, STARTTLS, EHLO again,
port 587 or 25), `plain`. `--per-connection K` sends K messages per connection (default 1).

    python bench/loadgen.py --port 465 --mode implicit-tls --cafile ca.pem --auth USER PASS \\
        --messages 2000 --size 2048 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

import uvloop

Mode = Literal["implicit-tls", "starttls", "plain"]
MODES: tuple[Mode, ...] = ("implicit-tls", "starttls", "plain")
READ_CHUNK = 64 * 1024


class SmtpError(Exception):
    """An unexpected reply; `kind` names the step and code, e.g. "MAIL 451"."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    mode: Mode
    messages: int
    size: int  # message octets as sent, headers included, before dot-stuffing
    concurrency: int
    per_connection: int = 1
    cafile: str | None = None
    server_name: str = "localhost"
    auth: tuple[str, str] | None = None
    sender: str = "sender@example.test"
    recipient: str = "rcpt@example.test"
    resume: bool = False
    timeout: float = 60.0  # without progress on one connection
    source_addresses: tuple[str, ...] = ()  # spread connections over these local addresses
    workers: int = 1  # processes; the clients and messages are split between them
    warmup: int = 0  # messages sent (one per connection, not counted) before the measured run


@dataclass
class LoadResult:
    spec: LoadSpec
    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    connections: int = 0
    resumed: int = 0
    cpu_seconds: float = 0.0  # load generator CPU, all workers
    latencies: list[float] = field(default_factory=list, repr=False)
    started: float = 0.0  # time.monotonic(), comparable across processes on Linux
    finished: float = 0.0
    warmup_ok: int = 0  # warm-up messages the server acknowledged

    @property
    def msgs_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else 0.0
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(p) - 1]

    def summary(self) -> str:
        errs = ", ".join(f"{k} x{v}" for k, v in self.errors.most_common(5)) or "none"
        return (f"{self.ok} ok, {self.failed} failed in {self.seconds:.2f}s = {self.msgs_per_s:,.0f} msgs/s; "
                f"latency p50 {self.percentile(50) * 1e3:.1f} ms p99 {self.percentile(99) * 1e3:.1f} ms; "
                f"{self.connections} connections ({self.resumed} resumed); client CPU "
                f"{self.cpu_seconds:.1f}s; errors: {errs}")


def make_message(size: int, sender: str, recipient: str) -> bytes:
    """A plain text message of exactly `size` octets ending in CRLF; no line starts with a dot."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n\r\n").encode()
    if size < len(head) + 2:
        raise ValueError(f"message size must be at least {len(head) + 2} octets")
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    lines, n = [head], len(head)
    while size - n > 2 * len(line):
        lines.append(line)
        n += len(line)
    lines.append(b"z" * (size - n - 2) + b"\r\n")
    return b"".join(lines)


# --- one connection ---------------------------------------------------------------------------------


class SmtpConnection(asyncio.Protocol):
    """Reply reader and writer over TCP with TLS that can start at any point (implicit or STARTTLS)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ssl: ssl.SSLObject | None = None
        self._buf = bytearray()
        self._scan = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._handshaking: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.ssl is None:
            self._buf += data
            self._wake()
            return
        self._in.write(data)
        if self._handshaking is not None:
            self._handshake_step()
            if self._handshaking is not None:
                return
        self._decrypt()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if self._handshaking is not None and not self._handshaking.done():
            self._handshaking.set_exception(ConnectionError("connection lost during TLS handshake"))
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _decrypt(self) -> None:
        assert self.ssl is not None
        try:
            while True:
                chunk = self.ssl.read(READ_CHUNK)
                if not chunk:
                    self._eof = True
                    break
                self._buf += chunk
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLError):
            self._eof = True
        self._flush()
        self._wake()

    def _flush(self) -> None:
        if self._out.pending and self.transport is not None:
            self.transport.write(self._out.read())

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.ssl is None:
            self.transport.write(data)
        else:
            self.ssl.write(data)
            self._flush()

    async def start_tls(self, ctx: ssl.SSLContext, server_name: str,
                        session: ssl.SSLSession | None = None) -> None:
        self._buf.clear()  # nothing sent in plaintext before the handshake may count after it
        self._scan = 0
        self.ssl = ctx.wrap_bio(self._in, self._out, server_hostname=server_name, session=session)
        self._handshaking = asyncio.get_running_loop().create_future()
        fut = self._handshaking
        self._handshake_step()
        await fut

    def _handshake_step(self) -> None:
        assert self.ssl is not None and self._handshaking is not None
        fut = self._handshaking
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._handshaking = None
            if not fut.done():
                fut.set_exception(exc)
            return
        self._flush()
        self._handshaking = None
        if not fut.done():
            fut.set_result(None)
        if self._in.pending:
            self._decrypt()

    async def reply(self) -> tuple[int, bytes]:
        """The next complete reply: its code and all its lines."""
        buf = self._buf
        while True:
            pos = self._scan  # start of the first line not yet looked at
            while (end := buf.find(b"\r\n", pos)) >= 0:
                if end - pos < 4 or buf[pos + 3] != 0x2D:  # not "NNN-": the last line
                    text = bytes(buf[:end + 2])
                    del buf[:end + 2]
                    self._scan = 0
                    try:
                        return int(text[pos:pos + 3]), text
                    except ValueError:
                        raise SmtpError("malformed reply") from None
                pos = end + 2
            self._scan = pos
            if self._eof:
                raise ConnectionError("connection closed by server")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def expect(self, code: int, step: str) -> bytes:
        got, text = await self.reply()
        if got != code:
            raise SmtpError(f"{step} {got}")
        return text

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_connection(spec: LoadSpec, ctx: ssl.SSLContext | None, local_addr: str | None,
                          session: ssl.SSLSession | None = None) -> tuple[SmtpConnection, set[str]]:
    """Connect, do TLS as the mode says, read the greeting and EHLO; returns the extensions."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        SmtpConnection, spec.host, spec.port,
        local_addr=(local_addr, 0) if local_addr else None)
    if spec.mode == "implicit-tls":
        assert ctx is not None
        await conn.start_tls(ctx, spec.server_name, session)
    await conn.expect(220, "greeting")
    conn.write(b"EHLO client.bench.test\r\n")
    caps = _extensions(await conn.expect(250, "EHLO"))
    if spec.mode == "starttls":
        assert ctx is not None
        if "STARTTLS" not in caps:
            raise SmtpError("no STARTTLS")
        conn.write(b"STARTTLS\r\n")
        await conn.expect(220, "STARTTLS")
        await conn.start_tls(ctx, spec.server_name, session)
        conn.write(b"EHLO client.bench.test\r\n")
        caps = _extensions(await conn.expect(250, "EHLO"))
    return conn, caps


def _extensions(text: bytes) -> set[str]:
    lines = text.decode("ascii", "replace").split("\r\n")[1:]
    return {line[4:].split(" ", 1)[0].upper() for line in lines if len(line) > 4}


# --- the clients -------------------------------------------------------------------------------------


@dataclass
class _Shared:
    remaining: int
    result: LoadResult


async def _client(spec: LoadSpec, shared: _Shared, ctx: ssl.SSLContext | None, index: int,
                  payload: bytes) -> None:
    loop = asyncio.get_running_loop()
    result = shared.result
    envelope = f"MAIL FROM:<{spec.sender}>\r\nRCPT TO:<{spec.recipient}>\r\nDATA\r\n".encode()
    auth = None
    if spec.auth is not None:
        token = base64.b64encode(f"\0{spec.auth[0]}\0{spec.auth[1]}".encode()).decode()
        auth = f"AUTH PLAIN {token}\r\n".encode()
    sources = spec.source_addresses
    session: ssl.SSLSession | None = None
    connection_no = 0
    while shared.remaining > 0:
        n = min(spec.per_connection, shared.remaining)
        shared.remaining -= n
        local = sources[(index + connection_no * spec.concurrency) % len(sources)] if sources else None
        connection_no += 1
        done = 0
        conn: SmtpConnection | None = None
        try:
            async with asyncio.timeout(spec.timeout) as deadline:
                started = time.perf_counter()
                conn, caps = await open_connection(spec, ctx, local, session if spec.resume else None)
                result.connections += 1
                if conn.ssl is not None and conn.ssl.session_reused:
                    result.resumed += 1
                if auth is not None:
                    conn.write(auth)
                    await conn.expect(235, "AUTH")
                pipelining = "PIPELINING" in caps
                for _ in range(n):
                    deadline.reschedule(loop.time() + spec.timeout)
                    if pipelining:
                        conn.write(envelope)
                        await conn.expect(250, "MAIL")
                        await conn.expect(250, "RCPT")
                        await conn.expect(354, "DATA")
                    else:
                        for cmd, code, step in _split_envelope(envelope):
                            conn.write(cmd)
                            await conn.expect(code, step)
                    conn.write(payload)
                    await conn.expect(250, "end of data")
                    done += 1
                    result.ok += 1
                    now = time.perf_counter()
                    result.latencies.append(now - started)
                    started = now
                conn.write(b"QUIT\r\n")
                await conn.expect(221, "QUIT")
                if spec.resume and conn.ssl is not None:
                    session = conn.ssl.session
        except (SmtpError, ConnectionError, OSError, ssl.SSLError, TimeoutError) as exc:
            kind = exc.kind if isinstance(exc, SmtpError) else type(exc).__name__
            if done < n:
                result.failed += n - done
                result.errors[kind] += n - done
            else:
                result.errors[f"after last message: {kind}"] += 1
        finally:
            if conn is not None:
                conn.close()


def _split_envelope(envelope: bytes) -> list[tuple[bytes, int, str]]:
    mail, rcpt, data, _ = envelope.split(b"\r\n")
    return [(mail + b"\r\n", 250, "MAIL"), (rcpt + b"\r\n", 250, "RCPT"), (data + b"\r\n", 354, "DATA")]


def client_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def generate(spec: LoadSpec) -> LoadResult:
    """Run the load in this process (the caller has set up the loop)."""
    ctx = client_context(spec.cafile) if spec.mode != "plain" else None
    payload = make_message(spec.size, spec.sender, spec.recipient) + b".\r\n"
    shared = _Shared(spec.messages, LoadResult(spec))
    cpu0 = _cpu()
    shared.result.started = time.monotonic()
    await asyncio.gather(*(_client(spec, shared, ctx, i, payload) for i in range(spec.concurrency)))
    result = shared.result
    result.finished = time.monotonic()
    result.seconds = result.finished - result.started
    result.cpu_seconds = _cpu() - cpu0
    return result


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- processes ---------------------------------------------------------------------------------------


def _spec_from_json(raw: dict[str, Any]) -> LoadSpec:
    raw["auth"] = tuple(raw["auth"]) if raw["auth"] else None
    raw["source_addresses"] = tuple(raw["source_addresses"])
    return LoadSpec(**raw)


def _result_to_json(r: LoadResult) -> dict[str, Any]:
    return {"ok": r.ok, "failed": r.failed, "errors": dict(r.errors), "seconds": r.seconds,
            "connections": r.connections, "resumed": r.resumed, "cpu_seconds": r.cpu_seconds,
            "latencies": r.latencies, "started": r.started, "finished": r.finished,
            "warmup_ok": r.warmup_ok}


def _worker() -> int:
    """The child's side of LoadRun: spec on stdin, "ready", wait for "go", result as JSON."""
    spec = _spec_from_json(json.loads(sys.stdin.readline()))
    warmup_ok = 0
    if spec.warmup:
        # Lets the server start the processes, threads and caches it keeps between connections.
        warm = replace(spec, messages=spec.warmup, per_connection=1)
        warmup_ok = uvloop.run(generate(warm)).ok
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    result = uvloop.run(generate(spec))
    result.warmup_ok = warmup_ok
    print(json.dumps(_result_to_json(result)), flush=True)
    return 0


def _split(spec: LoadSpec) -> list[LoadSpec]:
    w = max(1, min(spec.workers, spec.concurrency))
    specs = []
    for i in range(w):
        def share(total: int, i: int = i) -> int:
            return total // w + (1 if i < total % w else 0)
        specs.append(replace(spec, messages=share(spec.messages), concurrency=share(spec.concurrency),
                             warmup=share(spec.warmup), workers=1))
    return specs


class LoadRun:
    """The load generator's processes: start() them (imports done, nothing sent), then go().

    Plain subprocesses rather than multiprocessing: a fresh interpreter that does not re-import
    the caller's main module, whatever script that is.
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self._procs: list[subprocess.Popen[str]] = []

    def start(self) -> None:
        for part in _split(self.spec):
            proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            self._procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(asdict(part)) + "\n")
            proc.stdin.flush()
        for proc in self._procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"load generator failed to start (exit {proc.wait()})")

    def go(self) -> LoadResult:
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        parts = []
        for proc in self._procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator process died (exit {proc.wait()})")
            raw = json.loads(line)
            raw["errors"] = Counter(raw["errors"])
            parts.append(LoadResult(self.spec, **raw))
            proc.wait()
        return _merge(self.spec, parts)

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()


def _merge(spec: LoadSpec, parts: list[LoadResult]) -> LoadResult:
    out = LoadResult(spec)
    for p in parts:
        out.ok += p.ok
        out.failed += p.failed
        out.errors.update(p.errors)
        out.connections += p.connections
        out.resumed += p.resumed
        out.cpu_seconds += p.cpu_seconds
        out.latencies += p.latencies
        out.warmup_ok += p.warmup_ok
    out.started = min(p.started for p in parts)
    out.finished = max(p.finished for p in parts)
    out.seconds = out.finished - out.started
    return out


def run(spec: LoadSpec) -> LoadResult:
    """Generate the load from separate process(es) and wait for the result."""
    lr = LoadRun(spec)
    try:
        lr.start()
        return lr.go()
    finally:
        lr.stop()


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="implicit-tls")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--cafile")
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--auth", nargs=2, metavar=("USER", "PASSWORD"))
    parser.add_argument("--sender", default="sender@example.test")
    parser.add_argument("--recipient", default="rcpt@example.test")
    parser.add_argument("--resume", action="store_true", help="resume each client's previous TLS session")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=1, help="load generator processes")
    parser.add_argument("--warmup", type=int, default=0, help="messages sent before timing starts")
    a = parser.parse_args(argv)
    spec = LoadSpec(host=a.host, port=a.port, mode=a.mode, messages=a.messages, size=a.size,
                    concurrency=a.concurrency, per_connection=a.per_connection, cafile=a.cafile,
                    server_name=a.server_name, auth=tuple(a.auth) if a.auth else None, sender=a.sender,
                    recipient=a.recipient, resume=a.resume, timeout=a.timeout, workers=a.workers,
                    warmup=a.warmup)
    result = run(spec)
    print(result.summary())
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(_worker() if sys.argv[1:] == ["--worker"] else main())
