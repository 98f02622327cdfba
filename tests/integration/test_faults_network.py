"""Faults on the way out: a resolver that is down or answers SERVFAIL, a next hop that resets the
connection mid-DATA, a TLS peer that sends garbage. Each must defer the mail and retry it, never
bounce it, never send it in plaintext where the policy forbids, and deliver it exactly once when
the fault clears.

The peers are real and on loopback: `FlakyResolver` is a small UDP DNS server the test switches
between silence, SERVFAIL and answers (with or without the AD bit, which mailward trusts from
loopback); `FaultySink` is the hostile-input suite's recording peer with faults for its first
connections. (Bogus DNSSEC and a broken handshake before any TLS data are in test_dns_delivery.py,
test_dane_delivery.py and test_delivery.py.)
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hostile import RawSink, RecordProperty, _Wire
from mailward_server import MailwardServer
from test_delivery import (
    Sink,
    deliveries,
    delivery_toml,
    message,
    route,
    submit_mx,
    wait_until,
)

from conftest import MakeServer

Mode = Literal["silent", "servfail", "answer"]


class FlakyResolver:
    """A DNS server on 127.0.0.1 answering from `records` as `mode` says, in a thread.

    `servfail_types` get SERVFAIL even in "answer" mode (a zone whose address or TLSA servers are
    broken while its MX records still resolve). `secure` sets the AD bit on answers. TTLs are 0,
    so mailward asks again on every attempt.
    """

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = {(name.lower().rstrip(".") + ".", dns.rdatatype.from_text(t)): v
                        for (name, t), v in records.items()}
        self.names = {name for name, _ in self.records}
        self.mode: Mode = "silent"
        self.servfail_types: set[dns.rdatatype.RdataType] = set()
        self.secure = False
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def toml(self) -> str:
        return f'[dns]\nresolvers = ["127.0.0.1:{self.port}"]\ntimeout = 1\n'

    def __enter__(self) -> FlakyResolver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.queries += 1
            reply = self._answer(dns.message.from_wire(data))
            if reply is not None:
                self._sock.sendto(reply.to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        if self.mode == "silent":
            return None
        reply = dns.message.make_response(query)
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), question.rdtype
        if self.mode == "servfail" or rdtype in self.servfail_types:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply
        if self.secure:
            reply.flags |= dns.flags.AD
        data = self.records.get((name, rdtype))
        if data:
            reply.answer.append(dns.rrset.from_text(name, 0, "IN", dns.rdatatype.to_text(rdtype), *data))
        elif name not in self.names:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply  # else NODATA: the name exists, the type does not


Fault = Literal["reset-in-data", "garbage-in-data"]


class FaultySink(RawSink):
    """RawSink whose first connections each meet one fault from `faults`, then behave.

    "reset-in-data": once some of the message content has arrived, the connection is reset (RST).
    "garbage-in-data": the same moment, bytes that are no TLS record are written under the TLS
    session. Every MAIL command is kept with whether TLS was on (`mails`).
    """

    def __init__(self, root: Path, faults: list[Fault], *, tls: bool) -> None:
        super().__init__(root, tls=tls)
        self.faults = list(faults)
        self.mails: list[bool] = []
        self.connections = 0

    def __enter__(self) -> FaultySink:
        super().__enter__()
        return self

    def _session(self, wire: _Wire) -> None:
        with self._lock:
            n = self.connections
            self.connections += 1
        watch = _MailWatch(wire, self)
        try:
            if n >= len(self.faults):
                super()._session(watch)
            else:
                self._faulty_session(watch, self.faults[n])
        finally:
            watch.sock.close()  # after STARTTLS the TLS socket, which the caller does not close

    def _faulty_session(self, wire: _MailWatch, fault: Fault) -> None:
        wire.send(b"220 faulty.test ESMTP\r\n")
        while (line := wire.line()) is not None:
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                caps = b"250-faulty.test\r\n250-PIPELINING\r\n" + (
                    b"250-STARTTLS\r\n" if self._context is not None and not wire.tls else b"")
                wire.send(caps + b"250 8BITMIME\r\n")
            elif verb == b"STAR" and self._context is not None and not wire.tls:
                wire.send(b"220 2.0.0 Ready to start TLS\r\n")
                wire.start_tls(self._context)
            elif verb == b"DATA":
                wire.send(b"354 go ahead\r\n")
                wire.until(b"\r\n")  # the first line of content is in
                if fault == "reset-in-data":
                    # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    # A TLS application-data record header over random bytes (which fail the
                    # record's integrity check), written under the TLS layer, then more noise.
                    os.write(wire.sock.fileno(), b"\x17\x03\x03\x00\x10" + os.urandom(16 + 64))
                    while wire.line() is not None:  # until the client gives up
                        pass
                return
            else:  # MAIL, RCPT and the rest
                wire.send(b"250 2.0.0 Ok\r\n")


class _MailWatch(_Wire):
    """A session's wire that notes the TLS state of every MAIL command it reads."""

    def __init__(self, wire: _Wire, sink: FaultySink) -> None:
        super().__init__(wire.sock, wire.stop)
        self.sink = sink
        self.tls = False

    def start_tls(self, context: ssl.SSLContext) -> None:
        super().start_tls(context)
        self.tls = True

    def line(self) -> bytes | None:
        got = super().line()
        if got is not None and got[:4].upper() == b"MAIL":
            with self.sink._lock:
                self.sink.mails.append(self.tls)
        return got


def statuses(server: MailwardServer, rcpt: str) -> list[tuple[str, str]]:
    return [(d["status"], d["dsn"]) for d in deliveries(server) if d["rcpt"] == rcpt]


def settle(server: MailwardServer, rcpt: str, check: Callable[[list[tuple[str, str]]], bool],
           what: str, timeout: float = 20.0) -> list[tuple[str, str]]:
    wait_until(lambda: check(statuses(server, rcpt)), timeout=timeout, what=what)
    return statuses(server, rcpt)


def deferrals(results: list[tuple[str, str]]) -> int:
    return sum(1 for status, _ in results if status == "deferred")


def no_wrong_outcome(results: list[tuple[str, str]]) -> bool:
    """Nothing bounced, and every deferral temporary (4.x.x)."""
    return all(status in ("deferred", "sent") for status, _ in results) and all(
        dsn.startswith("4.") for status, dsn in results if status == "deferred")


# --- resolver ------------------------------------------------------------------------------------

RECORDS = {("flaky.test", "MX"): ["10 mx.flaky.test."], ("mx.flaky.test", "A"): ["127.0.0.1"]}


@pytest.fixture
def resolver() -> Iterator[FlakyResolver]:
    with FlakyResolver(RECORDS) as r:
        yield r


def test_resolver_down_then_servfail_defers_and_retries(make_server: MakeServer, resolver: FlakyResolver,
                                                         sink: Sink, record_property: RecordProperty,
                                                         ) -> None:
    server = make_server(deliver=True, extra_toml=delivery_toml(
        relay=("flaky.test",), port=sink.port, retry_initial=1, retry_max=2) + resolver.toml)
    rcpt = "x@flaky.test"
    submit_mx(server, "sender@client.test", [rcpt], message("dns-1"))
    # Down: the resolver takes queries and never answers.
    results = settle(server, rcpt, lambda r: deferrals(r) >= 1, "a deferral while the resolver is down")
    assert resolver.queries > 0
    # SERVFAIL for everything; then only for the MX host's addresses, while the MX resolves.
    resolver.mode = "servfail"
    n = deferrals(results)
    results = settle(server, rcpt, lambda r: deferrals(r) >= n + 2, "deferrals on SERVFAIL")
    resolver.mode, resolver.servfail_types = "answer", {dns.rdatatype.A, dns.rdatatype.AAAA}
    n = deferrals(results)
    results = settle(server, rcpt, lambda r: deferrals(r) >= n + 2, "deferrals on SERVFAIL for addresses")
    phases = 3
    assert not sink.messages(), "delivered while DNS failed"
    resolver.servfail_types = set()
    results = settle(server, rcpt, lambda r: ("sent", "2.0.0") in r, "delivery once DNS answers")
    log = server.log()
    assert "no answer from resolver" in log and "answered SERVFAIL for MX flaky.test" in log
    assert "answered SERVFAIL for A mx.flaky.test" in log or "SERVFAIL for AAAA mx.flaky.test" in log
    handled = phases if no_wrong_outcome(results) else 0
    record_property("fault", ("resolver down or SERVFAIL: deferred, then delivered once", phases, handled))
    assert no_wrong_outcome(results), results
    assert [m.rcpts for m in sink.messages()] == [[f"<{rcpt}>"]]


def test_tlsa_servfail_never_falls_back_to_plaintext(make_server: MakeServer, sink: Sink,
                                                      record_property: RecordProperty) -> None:
    """RFC 7672 §2.1.1: with DNSSEC-secure MX and address records, a failed TLSA lookup makes the
    host unusable: defer, never deliver in clear (smtp-sink offers no STARTTLS)."""
    with FlakyResolver(RECORDS) as resolver:
        resolver.mode, resolver.secure, resolver.servfail_types = "answer", True, {dns.rdatatype.TLSA}
        server = make_server(deliver=True, extra_toml=delivery_toml(
            relay=("flaky.test",), port=sink.port, retry_initial=1, retry_max=2) + resolver.toml)
        rcpt = "y@flaky.test"
        submit_mx(server, "sender@client.test", [rcpt], message("dns-2"))
        results = settle(server, rcpt, lambda r: deferrals(r) >= 3, "deferrals while TLSA fails")
        assert not sink.messages(), "delivered in plaintext although the TLSA lookup failed"
        assert "mx.flaky.test: TLSA lookup failed or is bogus (RFC 7672 §2.1.1)" in server.log()
        # A secure denial of TLSA records: no DANE for this host, so opportunistic TLS, then clear.
        resolver.servfail_types = set()
        results = settle(server, rcpt, lambda r: ("sent", "2.0.0") in r, "delivery once TLSA is denied")
    ok = no_wrong_outcome(results) and deferrals(results) >= 3
    record_property("fault", ("TLSA SERVFAIL under DNSSEC: deferred, never plaintext", 1, int(ok)))
    assert ok, results
    assert len(sink.messages()) == 1


# --- next hop ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fault", "level"), [
    ("reset-in-data", "may"), ("reset-in-data", "encrypt"),
    ("garbage-in-data", "may"), ("garbage-in-data", "encrypt")])
def test_next_hop_faults_mid_data_defer_and_retry(make_server: MakeServer, tmp_path: Path, fault: Fault,
                                                   level: str, record_property: RecordProperty,
                                                   ) -> None:
    faults: list[Fault] = [fault, fault]
    # Garbage under TLS needs TLS; a reset is tried on a plaintext session at may, where
    # the peer offers no STARTTLS.
    tls = fault == "garbage-in-data" or level == "encrypt"
    with FaultySink(tmp_path, faults, tls=tls) as peer:
        # may_retry_plaintext: the opt-in to retry a failed *handshake* in clear; these faults
        # come after a good handshake and must not count as one.
        server = make_server(deliver=True, extra_toml=delivery_toml(
            route("faulty.test", f"[127.0.0.1]:{peer.port}", security=level), relay=("faulty.test",),
            retry_initial=1, retry_max=2, dead_host_seconds=1, may_retry_plaintext="true"))
        rcpt = "z@faulty.test"
        submit_mx(server, "sender@client.test", [rcpt], message(f"{fault}-{level}"))
        results = settle(server, rcpt, lambda r: ("sent", "2.0.0") in r, "delivery after the faults",
                         timeout=30)
    assert peer.connections >= len(faults) + 1
    handled = sum(1 for status, dsn in results if status == "deferred" and dsn.startswith("4."))
    record_property("fault", (f"next hop {fault.replace('-', ' ')}: deferred and retried", len(faults),
                              min(handled, len(faults))))
    assert no_wrong_outcome(results), results
    assert deferrals(results) == len(faults), results
    assert "DOWNGRADE" not in server.log()
    (got,) = peer.messages  # exactly once, complete
    assert f"body of {fault}-{level}".encode() in got.raw
    if tls:
        assert all(peer.mails) and got.tls, "a MAIL command went in clear"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path / "sink").start()
    yield s
    s.stop()
