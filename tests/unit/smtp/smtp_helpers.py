"""Drives a ServerConnection in tests: feed bytes, answer decisions, collect events and output."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mailward.smtp.codes import Reply
from mailward.smtp.events import (
    DECISION_EVENTS,
    AuthRequested,
    AuthResponse,
    ServerEvent,
    StartTlsRequested,
)
from mailward.smtp.server import ServerConnection, ServerOptions

Decider = Callable[[ServerConnection, ServerEvent], None]


def accept_all(srv: ServerConnection, ev: ServerEvent) -> None:
    if isinstance(ev, AuthRequested | AuthResponse):
        srv.auth_succeeded("user")
    else:
        srv.accept()


def pump(srv: ServerConnection, chunks: Iterable[bytes], decide: Decider = accept_all) -> list[ServerEvent]:
    events: list[ServerEvent] = []
    for chunk in chunks:
        srv.receive_data(chunk)
        drain(srv, events, decide)
    return events


def drain(srv: ServerConnection, events: list[ServerEvent], decide: Decider = accept_all) -> None:
    while (ev := srv.next_event()) is not None:
        events.append(ev)
        if isinstance(ev, DECISION_EVENTS):
            decide(srv, ev)
            if isinstance(ev, StartTlsRequested) and srv.awaiting_tls:
                srv.tls_established()


def session(data: bytes | Iterable[bytes], options: ServerOptions | None = None, *,
            decide: Decider = accept_all, tls: bool = False) -> tuple[list[ServerEvent], bytes]:
    srv = ServerConnection(options or ServerOptions(hostname="mx.test"), tls_active=tls)
    srv.greet()
    chunks = [data] if isinstance(data, bytes) else list(data)
    events = pump(srv, chunks, decide)
    return events, srv.data_to_send()


def codes_of(output: bytes) -> list[str]:
    """The final line of each reply: '250 2.1.0' style prefixes, for compact assertions."""
    out = []
    for line in output.split(b"\r\n"):
        if len(line) >= 4 and line[3:4] == b" ":
            parts = line.decode().split(" ")
            enh = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() and "." in parts[1] else ""
            out.append(f"{parts[0]} {enh}".strip())
    return out


def reject_with(reply: Reply) -> Decider:
    def decide(srv: ServerConnection, ev: ServerEvent) -> None:
        srv.respond(reply)
    return decide
