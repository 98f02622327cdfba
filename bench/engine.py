"""Throughput of the sans-IO SMTP engine alone: no sockets, no TLS, no queue, one core.

Three figures:
* wired: a ClientConnection and a ServerConnection back to back in memory, the client sending
  pipelined MAIL/RCPT/DATA, a 2 KB body and end of data per message, many messages per
  connection; the server accepts everything and counts the body octets it reports;
* server sessions: the same client bytes pre-built and fed to a ServerConnection in 64 KiB reads;
* server DATA: one large message fed in 64 KiB reads, the content parser alone.

MB is 10^6 octets of message body (what the peer meant to send, before dot-stuffing).

    python bench/engine.py [--messages N] [--size B] [--per-connection K] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mailward.smtp.address import parse_mailbox
from mailward.smtp.client import (
    ClientConnection,
    EhloCompleted,
    GreetingReceived,
    ReadyForBody,
    ReplyReceived,
    TransactionResult,
)
from mailward.smtp.commands import RcptParams
from mailward.smtp.events import DECISION_EVENTS, BodyChunk, BodyEnded
from mailward.smtp.server import ServerConnection, ServerOptions

READ_SIZE = 64 * 1024
TARGET_MB_S = 50.0
OPTIONS = ServerOptions(hostname="mx.bench")
SENDER = parse_mailbox("sender@client.bench")
RECIPIENT = parse_mailbox("rcpt@mx.bench")


@dataclass(frozen=True)
class Figure:
    name: str
    messages: int
    body_bytes: int
    seconds: float

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.body_bytes / self.seconds / 1e6


def make_body(size: int) -> bytes:
    """A plain text message of exactly `size` octets: headers, then 76-character lines, some of
    them starting with a dot so the stuffing paths run too."""
    head = (b"From: sender@client.bench\r\nTo: rcpt@mx.bench\r\nSubject: bench\r\n"
            b"Message-ID: <bench@client.bench>\r\n\r\n")
    if size < len(head) + 3:
        raise ValueError(f"body size must be at least {len(head) + 3} octets")
    lines = [head]
    n = len(head)
    i = 0
    while size - n > 80:
        line = (b"." if i % 10 == 9 else b"x") + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
        lines.append(line)
        n += len(line)
        i += 1
    lines.append(b"y" * (size - n - 2) + b"\r\n")
    return b"".join(lines)


# --- client and server wired together ------------------------------------------------------------


def wired_connection(count: int, body: bytes) -> int:
    """One connection carrying `count` messages; returns the body octets the server reported."""
    srv = ServerConnection(OPTIONS)
    cli = ClientConnection("client.bench")
    rcpts = [(RECIPIENT, RcptParams())]
    srv.greet()
    received = 0
    sent = 0
    srv_next, srv_accept = srv.next_event, srv.accept
    cli_next = cli.next_event
    while True:
        data = srv.data_to_send()
        if data:
            cli.receive_data(data)
        while (cev := cli_next()) is not None:
            if isinstance(cev, ReadyForBody):
                cli.send_body(body)
                cli.end_body()
            elif isinstance(cev, TransactionResult | EhloCompleted):
                if sent < count:
                    sent += 1
                    cli.start_transaction(SENDER, rcpts)
                else:
                    cli.quit()
            elif isinstance(cev, GreetingReceived):
                cli.ehlo()
            elif isinstance(cev, ReplyReceived):
                return received
            else:
                raise RuntimeError(f"unexpected client event {cev!r}")
        data = cli.data_to_send()
        if not data:
            raise RuntimeError("the conversation stalled")
        srv.receive_data(data)
        while (sev := srv_next()) is not None:
            if isinstance(sev, BodyChunk):
                received += len(sev.data)
            elif isinstance(sev, DECISION_EVENTS):
                srv_accept()


def bench_wired(messages: int, size: int, per_connection: int) -> Figure:
    body = make_body(size)
    total = 0
    start = time.perf_counter()
    left = messages
    while left:
        n = min(per_connection, left)
        total += wired_connection(n, body)
        left -= n
    seconds = time.perf_counter() - start
    if total != messages * size:
        raise RuntimeError(f"server reported {total} body octets, expected {messages * size}")
    return Figure(f"server+client, {size} B msgs, {per_connection} per connection", messages, total, seconds)


# --- server alone ---------------------------------------------------------------------------------


def client_stream(messages: int, body: bytes) -> bytes:
    """What a pipelining client writes for `messages` messages on one connection."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    one = b"MAIL FROM:<sender@client.bench>\r\nRCPT TO:<rcpt@mx.bench>\r\nDATA\r\n" + stuffed + b".\r\n"
    return b"EHLO client.bench\r\n" + one * messages + b"QUIT\r\n"


def feed_server(stream: bytes, read_size: int) -> tuple[int, int]:
    """Feeds `stream` in reads of `read_size`; returns (messages ended, body octets)."""
    srv = ServerConnection(OPTIONS)
    srv.greet()
    received = ended = 0
    srv_next, srv_accept = srv.next_event, srv.accept
    for pos in range(0, len(stream), read_size):
        srv.receive_data(stream[pos : pos + read_size])
        while (ev := srv_next()) is not None:
            if isinstance(ev, BodyChunk):
                received += len(ev.data)
            elif isinstance(ev, DECISION_EVENTS):
                if isinstance(ev, BodyEnded):
                    ended += 1
                srv_accept()
        srv.data_to_send()
    return ended, received


def bench_server_sessions(messages: int, size: int) -> Figure:
    stream = client_stream(messages, make_body(size))
    start = time.perf_counter()
    ended, received = feed_server(stream, READ_SIZE)
    seconds = time.perf_counter() - start
    if ended != messages or received != messages * size:
        raise RuntimeError(f"server ended {ended} messages with {received} octets")
    return Figure(f"server only, {size} B msgs, pre-built session", messages, received, seconds)


def bench_server_data(total: int) -> Figure:
    body = make_body(2048) * (total // 2048)
    stream = client_stream(1, body)
    options_limit = OPTIONS.max_message_size or 0
    if len(body) > options_limit:
        raise RuntimeError("DATA benchmark larger than the server's message size limit")
    start = time.perf_counter()
    ended, received = feed_server(stream, READ_SIZE)
    seconds = time.perf_counter() - start
    if ended != 1 or received != len(body):
        raise RuntimeError(f"server ended {ended} messages with {received} octets")
    return Figure(f"server only, one {len(body) / 1e6:.0f} MB message in DATA", 1, received, seconds)


# --- entry points ---------------------------------------------------------------------------------


def run(messages: int = 100_000, size: int = 2048, per_connection: int = 100) -> list[Figure]:
    """Runs the three benchmarks, printing one line each, and returns the figures."""
    figures = []
    wired = bench_wired(messages, size, per_connection)
    print(f"engine: {messages} msgs, {size} B each: {wired.msgs_per_s:,.0f} msgs/s, "
          f"{wired.mb_per_s:.1f} MB/s (server+client, {per_connection} msgs per connection)", flush=True)
    figures.append(wired)
    server = bench_server_sessions(messages, size)
    print(f"engine: {messages} msgs, {size} B each: {server.msgs_per_s:,.0f} msgs/s, "
          f"{server.mb_per_s:.1f} MB/s (server only, pre-built session in 64 KiB reads)", flush=True)
    figures.append(server)
    data = bench_server_data(48_000_000)
    print(f"engine: DATA parse: {data.body_bytes / 1e6:.0f} MB in one message: {data.mb_per_s:.1f} MB/s "
          f"(server only, 64 KiB reads)", flush=True)
    figures.append(data)
    for fig in figures:
        if fig.mb_per_s < TARGET_MB_S:
            print(f"engine: below the {TARGET_MB_S:.0f} MB/s target: {fig.name}", flush=True)
    return figures


def profile(messages: int, size: int, per_connection: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    bench_wired(messages, size, per_connection)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=2048, help="body octets per message")
    parser.add_argument("--per-connection", type=int, default=100, help="messages per connection")
    parser.add_argument("--profile", action="store_true", help="cProfile the wired run instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Figure]:
    args = parse_args(argv)
    if args.profile:
        profile(args.messages, args.size, args.per_connection)
        return []
    return run(args.messages, args.size, args.per_connection)


if __name__ == "__main__":
    main()
