"""Outbound delivery against real peers on loopback: Postfix's smtp-sink, a second mailward, a
per-recipient server built on our own engine, a host that never answers, and SIGKILL mid-delivery.

Every message enters the sending mailward the way mail does (SMTP on its listeners) and leaves
through `[[delivery.route]]` next hops (or the smarthost) on loopback ports.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from mailward_server import PASSWORD, USER, MailwardServer, free_port
from smtp_peer import verifying_context

from conftest import MakeServer, require_tool
from mailward.queue.sqlite import SqliteQueue
from mailward.smtp import codes
from mailward.smtp.events import (
    BodyChunk,
    BodyEnded,
    DataStarted,
    EhloReceived,
    MailReceived,
    RcptReceived,
    StartTlsRequested,
)
from mailward.smtp.server import ServerConnection, ServerOptions

DELIVERY_LINE = re.compile(
    r"(?P<id>\w+): to=<(?P<rcpt>[^>]*)>, relay=(?P<relay>\S+), delay=[0-9.]+, tls=(?P<tls>[^,]+), "
    r"dsn=(?P<dsn>[0-9.]+), status=(?P<status>sent|deferred|bounced|expired) \((?P<reply>.*)\)$")


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def deliveries(server: MailwardServer) -> list[dict[str, str]]:
    """The Postfix-style delivery lines the server logged, parsed."""
    out = []
    for line in server.log().splitlines():
        m = DELIVERY_LINE.search(line)
        if m:
            out.append(m.groupdict())
    return out


def queue_count(server: MailwardServer) -> int:
    """Messages in the running server's queue (messages() reads bodies, which may vanish meanwhile)."""
    async def count() -> int:
        q = await SqliteQueue.open(server.queue_path)
        try:
            return await q.count()
        finally:
            await q.close()
    return asyncio.run(count())


def route(domain: str, next_hop: str, **extra: str) -> str:
    lines = [f'[[delivery.route]]\ndomain = "{domain}"\nnext_hop = "{next_hop}"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def delivery_toml(*routes: str, relay: tuple[str, ...] = (), **settings: object) -> str:
    domains = ", ".join(f'"{d}"' for d in relay)
    text = f"relay_domains = [{domains}]\n[delivery]\n"
    text += "".join(f"{k} = {v}\n" for k, v in settings.items())
    return text + "".join(routes)


# --- peers ----------------------------------------------------------------------------------------------

@dataclass
class SinkMessage:
    mail: str
    rcpts: list[str]
    body: bytes


@dataclass
class Sink:
    """Postfix's smtp-sink, dumping every transaction to a file."""

    root: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    options: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        binary = require_tool("smtp-sink")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o777)  # smtp-sink drops to nobody before it writes
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [binary, *user, "-R", str(self.root), "-d", "%M.", *self.options,
             f"{self.host}:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.recv(100)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)

    def messages(self) -> list[SinkMessage]:
        out = []
        for path in sorted(self.root.iterdir()):
            if not path.is_file():
                continue
            data = path.read_bytes()
            mail, rcpts = "", []
            lines = data.split(b"\n")
            i = 0
            while i < len(lines) and lines[i].startswith(b"X-"):
                name, _, value = lines[i].decode().partition(": ")
                if name == "X-Mail-Args":
                    mail = value
                elif name == "X-Rcpt-Args":
                    rcpts.append(value)
                i += 1
            out.append(SinkMessage(mail, rcpts, b"\n".join(lines[i:])))
        return out


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path / "sink").start()
    yield s
    s.stop()


@dataclass
class Received:
    mail_from: str
    rcpts: list[tuple[str, str]]  # (address, ESMTP parameters as the client sent them)
    data: bytes


StartTlsMode = Literal["absent", "refuse", "broken"]


class PickyServer:
    """An SMTP server on our own engine that answers each recipient by its local part:
    soft-* gets 450 4.2.1, hard-* gets 550 5.1.1, anything else is accepted.

    `starttls`: "absent" does not offer STARTTLS (as a stripping attacker leaves EHLO), "refuse"
    offers it and answers 454, "broken" says 220 and then answers the ClientHello with plaintext.
    `broken_starttls=True` is the older spelling of "broken".
    """

    def __init__(self, *, broken_starttls: bool = False, starttls: StartTlsMode | None = None) -> None:
        self.starttls: StartTlsMode = starttls or ("broken" if broken_starttls else "absent")
        self.broken_starttls = self.starttls == "broken"
        self.port = free_port()
        self.received: list[Received] = []
        self.sessions = 0
        self.mails = 0  # MAIL commands that reached us, whatever came of them
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def __enter__(self) -> PickyServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
            # A client may keep an idle connection open (mailward parks them for reuse): end
            # those sessions here, before the loop closes under them.
            for task in self._sessions:
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", self.port)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
        eng = ServerConnection(ServerOptions(hostname="picky.test", starttls=self.starttls != "absent"))
        eng.greet()
        mail_from, rcpts, body = "", [], bytearray()
        try:
            while not eng.closed:
                ev = eng.next_event()
                if ev is None:
                    writer.write(eng.data_to_send())
                    await writer.drain()
                    data = await reader.read(65536)
                    if not data:
                        break
                    eng.receive_data(data)
                    continue
                if isinstance(ev, MailReceived):
                    self.mails += 1
                    mail_from, rcpts, body = str(ev.sender or ""), [], bytearray()
                    eng.accept()
                elif isinstance(ev, RcptReceived):
                    local = ev.recipient.local_part
                    if local.startswith("soft"):
                        eng.respond(codes.r(450, "4.2.1", "Mailbox busy, try later"))
                    elif local.startswith("hard"):
                        eng.respond(codes.r(550, "5.1.1", f"<{ev.recipient}>: no such user here"))
                    else:
                        rcpts.append((str(ev.recipient), ev.params.to_esmtp()))
                        eng.accept()
                elif isinstance(ev, BodyChunk):
                    body += ev.data
                elif isinstance(ev, BodyEnded):
                    self.received.append(Received(mail_from, rcpts, bytes(body)))
                    eng.accept(codes.r(250, "2.0.0", f"Ok: kept as {len(self.received)}"))
                elif isinstance(ev, EhloReceived | DataStarted):
                    eng.accept()
                elif isinstance(ev, StartTlsRequested):
                    if self.starttls != "broken":
                        eng.respond(codes.TLS_UNAVAILABLE)  # 454 4.7.0
                        continue
                    eng.accept()
                    writer.write(eng.data_to_send() + b"this is not TLS\r\n")
                    await writer.drain()
                    await reader.read(65536)
                    break
            writer.write(eng.data_to_send())
        finally:
            writer.close()


@pytest.fixture
def picky() -> Iterator[PickyServer]:
    with PickyServer() as server:
        yield server


def submit_mx(server: MailwardServer, sender: str, rcpts: list[str], body: bytes,
              mail_options: tuple[str, ...] = (), rcpt_options: dict[str, list[str]] | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", server.mx, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(sender, list(mail_options))
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt, (rcpt_options or {}).get(rcpt, []))
            assert code == 250, (rcpt, code, text)
        code, text = smtp.data(body)
        assert code == 250, text


def message(subject: str, sender: str = "sender@back.test") -> bytes:
    return (f"From: {sender}\r\nTo: undisclosed-recipients:;\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@back.test>\r\n\r\nbody of {subject}\r\n").encode()


# --- tests ------------------------------------------------------------------------------------------------

def test_routes_deliver_defer_and_bounce(make_server: MakeServer, sink: Sink, picky: PickyServer) -> None:
    server = make_server(deliver=True, extra_toml=delivery_toml(
        route("sink.test", f"[127.0.0.1]:{sink.port}"),
        route("sink2.test", f"[127.0.0.1]:{sink.port}"),
        route("picky.test", f"[127.0.0.1]:{picky.port}"),
        route("back.test", f"[127.0.0.1]:{picky.port}"),
        relay=("sink.test", "sink2.test", "picky.test")))
    rcpts = ["a@sink.test", "b@sink2.test", "ok@picky.test", "soft-x@picky.test", "hard-y@picky.test"]
    submit_mx(server, "sender@back.test", rcpts, message("m1"), mail_options=("RET=HDRS", "ENVID=env-m1"),
              rcpt_options={"ok@picky.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;ok@picky.test"],
                            "hard-y@picky.test": ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Hard-Y@picky.test"]})

    # The bounce for hard-y comes back to the sender's domain, which routes to the picky server.
    wait_until(lambda: any(r.mail_from == "" for r in picky.received), what="the bounce")
    # The log line follows the recorded result, which may trail the peer's receipt a little.
    wait_until(lambda: set(rcpts) <= {d["rcpt"] for d in deliveries(server)}, what="every result logged")
    lines = {d["rcpt"]: d for d in deliveries(server)}
    assert {r: lines[r]["status"] for r in rcpts} == {
        "a@sink.test": "sent", "b@sink2.test": "sent", "ok@picky.test": "sent",
        "soft-x@picky.test": "deferred", "hard-y@picky.test": "bounced"}
    assert lines["a@sink.test"]["relay"] == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert lines["soft-x@picky.test"]["dsn"] == "4.2.1" and "450 4.2.1" in lines["soft-x@picky.test"]["reply"]
    assert lines["hard-y@picky.test"]["dsn"] == "5.1.1"
    assert lines["a@sink.test"]["tls"] == "plaintext"  # smtp-sink offers no STARTTLS

    # Both sink domains share one route, hence one transaction; DSN parameters went along.
    (sunk,) = sink.messages()
    assert sorted(sunk.rcpts) == ["<a@sink.test>", "<b@sink2.test>"]
    assert sunk.mail.startswith("<sender@back.test>")
    assert "RET=HDRS" in sunk.mail and "ENVID=env-m1" in sunk.mail
    assert b"Subject: m1" in sunk.body
    (original,) = [r for r in picky.received if r.mail_from]
    assert original.rcpts == [("ok@picky.test", "NOTIFY=FAILURE ORCPT=rfc822;ok@picky.test")]

    # The bounce: RFC 3464 fields for the failed recipient only.
    (bounce,) = [r for r in picky.received if r.mail_from == ""]
    assert [a for a, _ in bounce.rcpts] == ["sender@back.test"]
    report = email.message_from_bytes(bounce.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["In-Reply-To"] == "<m1@back.test>"
    text = bounce.data.decode()
    assert "Original-Envelope-Id: env-m1" in text and "Reporting-MTA: dns; mx.example.test" in text
    assert "Original-Recipient: rfc822; Hard-Y@picky.test" in text
    assert "Final-Recipient: rfc822; hard-y@picky.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "Remote-MTA: dns; 127.0.0.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 <hard-y@picky.test>: no such user here" in text
    assert "soft-x@picky.test" not in text and "ok@picky.test" not in text
    assert "Subject: m1" in text  # RET=HDRS: the headers come back
    assert "body of m1" not in text

    # The queue keeps only the deferred recipient, due again after the backoff.
    wait_until(lambda: queue_count(server) == 1, what="the bounce to leave the queue")
    ((stored, _),) = server.messages()
    states = {r.recipient.address: r for r in stored.recipients}
    assert {a: s.status for a, s in states.items()} == {
        "a@sink.test": "delivered", "b@sink2.test": "delivered", "ok@picky.test": "delivered",
        "soft-x@picky.test": "deferred", "hard-y@picky.test": "failed"}
    soft = states["soft-x@picky.test"]
    assert soft.attempts == 1 and soft.last_reply is not None and "450 4.2.1" in soft.last_reply
    assert soft.next_attempt_at is not None and soft.last_attempt_at is not None
    assert 270 <= soft.next_attempt_at - soft.last_attempt_at <= 300  # retry_initial, less jitter


def test_starttls_to_a_second_mailward(make_server: MakeServer, sink: Sink) -> None:
    relay = make_server(deliver=True, extra_toml=delivery_toml(
        route("b.test", f"[127.0.0.1]:{sink.port}"), relay=("b.test",)))
    sender = make_server(deliver=True, extra_toml=delivery_toml(
        route("b.test", f"[127.0.0.1]:{relay.mx}", security="verify", ca_file=str(relay.ca)),
        route("b2.test", f"[127.0.0.1]:{relay.mx}", security="encrypt"), relay=("b.test", "b2.test")))
    submit_mx(sender, "sender@back.test", ["carol@b.test"], message("tls1"))
    wait_until(lambda: len(sink.messages()) == 1, what="relayed delivery")
    wait_until(lambda: any(d["rcpt"] == "carol@b.test" for d in deliveries(sender)), what="the log line")
    (line,) = [d for d in deliveries(sender) if d["rcpt"] == "carol@b.test"]
    assert line["status"] == "sent" and line["relay"] == f"127.0.0.1[127.0.0.1]:{relay.mx}"
    assert re.fullmatch(r"Verified TLSv1\.[23]/\S+ \(pkix\)", line["tls"]), line
    assert "TLS TLSv1." in relay.log()  # the receiving side saw the upgrade
    body = sink.messages()[0].body.decode()
    assert re.search(r"with ESMTPS id", body), body  # its Received: header records TLS


def test_encrypt_without_verification(make_server: MakeServer, sink: Sink) -> None:
    relay = make_server(deliver=True, extra_toml=delivery_toml(
        route("b2.test", f"[127.0.0.1]:{sink.port}"), relay=("b2.test",)))
    sender = make_server(deliver=True, extra_toml=delivery_toml(
        route("b2.test", f"[127.0.0.1]:{relay.mx}", security="encrypt"),
        route("plain.test", f"[127.0.0.1]:{sink.port}", security="encrypt"), relay=("b2.test", "plain.test")))
    submit_mx(sender, "sender@back.test", ["dave@b2.test", "erin@plain.test"], message("tls2"))
    wait_until(lambda: len(deliveries(sender)) >= 2, what="both results")
    lines = {d["rcpt"]: d for d in deliveries(sender)}
    assert lines["dave@b2.test"]["status"] == "sent"
    # The demo CA is not among the system's: the chain proves nothing, and the log says so.
    assert re.fullmatch(r"Untrusted TLSv1\.[23]/\S+", lines["dave@b2.test"]["tls"]), lines
    # smtp-sink offers no STARTTLS: under encrypt nothing may go in clear.
    assert lines["erin@plain.test"]["status"] == "deferred" and lines["erin@plain.test"]["dsn"] == "4.7.4"
    assert "does not offer STARTTLS" in lines["erin@plain.test"]["reply"]
    wait_until(lambda: len(sink.messages()) == 1, what="the relay's delivery")
    assert [m.rcpts for m in sink.messages()] == [["<dave@b2.test>"]]


def test_failed_handshake_defers_under_may_and_encrypt(make_server: MakeServer) -> None:
    with PickyServer(starttls="broken") as broken:
        server = make_server(deliver=True, extra_toml=delivery_toml(
            route("may.test", f"[127.0.0.1]:{broken.port}"),
            route("enc.test", f"[127.0.0.1]:{broken.port}", security="encrypt"),
            relay=("may.test", "enc.test")))
        submit_mx(server, "sender@back.test", ["a@may.test"], message("hs1"))
        submit_mx(server, "sender@back.test", ["b@enc.test"], message("hs2"))
        wait_until(lambda: len(deliveries(server)) == 2, what="both results")
        lines = {d["rcpt"]: d for d in deliveries(server)}
        # Whoever breaks a handshake must not get the mail in clear: not even at may, by default.
        for rcpt in ("a@may.test", "b@enc.test"):
            assert lines[rcpt]["status"] == "deferred" and lines[rcpt]["dsn"] == "4.7.0", lines[rcpt]
            assert "TLS with 127.0.0.1[127.0.0.1]" in lines[rcpt]["reply"]
        assert broken.mails == 0 and broken.received == []
        assert f"route:[127.0.0.1]:{broken.port}: 4.7.0 TLS with" in server.log()
        assert "DOWNGRADE" not in server.log()
        # The reason is kept per recipient, for `queue list`.
        listing = server.cli("queue", "list").stdout
        assert listing.count("4.7.0 TLS with 127.0.0.1[127.0.0.1]") == 2, listing
        stored = {r.recipient.address: r for m, _ in server.messages() for r in m.recipients}
        tls = stored["a@may.test"].tls
        assert tls is not None and tls.policy == "may" and tls.protocol is None and tls.failure


def test_failed_handshake_under_may_retries_in_clear_only_when_allowed(make_server: MakeServer) -> None:
    with PickyServer(starttls="broken") as broken:
        server = make_server(deliver=True, extra_toml=delivery_toml(
            route("may.test", f"[127.0.0.1]:{broken.port}"),
            route("enc.test", f"[127.0.0.1]:{broken.port}", security="encrypt"),
            relay=("may.test", "enc.test"), may_retry_plaintext="true"))
        submit_mx(server, "sender@back.test", ["a@may.test"], message("hs3"))
        submit_mx(server, "sender@back.test", ["b@enc.test"], message("hs4"))
        wait_until(lambda: len(deliveries(server)) == 2, what="both results")
        lines = {d["rcpt"]: d for d in deliveries(server)}
        # may with the opt-in: the same host once more without STARTTLS, logged as a downgrade
        assert lines["a@may.test"]["status"] == "sent"
        assert [r.rcpts for r in broken.received] == [[("a@may.test", "")]]
        assert (f"route:[127.0.0.1]:{broken.port}: TLS DOWNGRADE: retrying "
                f"127.0.0.1[127.0.0.1]:{broken.port} without TLS") in server.log()
        # encrypt: never in clear, whatever the opt-in says
        assert lines["b@enc.test"]["status"] == "deferred" and lines["b@enc.test"]["dsn"] == "4.7.0"
        assert broken.mails == 1


def test_silent_host_times_out_then_is_skipped(make_server: MakeServer) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshake; nobody ever says a word
    port = silent.getsockname()[1]
    try:
        server = make_server(deliver=True, extra_toml=delivery_toml(
            route("silent.test", f"[127.0.0.1]:{port}"), relay=("silent.test",),
            connect_timeout=1, command_timeout=1))
        submit_mx(server, "sender@back.test", ["x@silent.test"], message("s1"))
        wait_until(lambda: len(deliveries(server)) == 1, timeout=8, what="the first deferral")
        (first,) = deliveries(server)
        assert first["status"] == "deferred" and first["relay"] == "none"
        assert f"127.0.0.1[127.0.0.1]:{port}: no greeting within 1s" in first["reply"]
        # Within dead_host_seconds the host is not tried again: the next message waits at once.
        submit_mx(server, "sender@back.test", ["y@silent.test"], message("s2"))
        wait_until(lambda: len(deliveries(server)) == 2, timeout=5, what="the second deferral")
        second = deliveries(server)[1]
        assert second["status"] == "deferred" and "unreachable recently" in second["reply"]
        assert {m.recipients[0].status for m, _ in server.messages()} == {"deferred"}
    finally:
        silent.close()


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_smarthost_with_auth(make_server: MakeServer, sink: Sink, mode: str) -> None:
    relay = make_server(deliver=True, extra_toml=delivery_toml(
        route("far.test", f"[127.0.0.1]:{sink.port}")))
    port = relay.submissions if mode == "implicit" else relay.submission
    password_file = relay.root.parent / "smarthost-password"
    password_file.write_text(PASSWORD + "\n")
    sender = make_server(deliver=True, extra_toml=f"""
[delivery.smarthost]
host = "[127.0.0.1]"
port = {port}
tls = "{mode}"
username = "{USER}"
password_file = "{password_file}"
ca_file = "{relay.ca}"
""")
    ctx = verifying_context(sender.ca)
    with smtplib.SMTP_SSL("localhost", sender.submissions, context=ctx, timeout=10) as smtp:
        smtp.login(USER, PASSWORD)
        smtp.sendmail(USER, ["zed@far.test"], message("smart1", sender=USER))
    wait_until(lambda: len(sink.messages()) == 1, what="delivery through the smarthost")
    # The log line is written once the result is recorded, after QUIT: it may trail the sink.
    wait_until(lambda: len(deliveries(sender)) == 1, what="the delivery log line")
    (line,) = deliveries(sender)
    assert line["status"] == "sent" and line["relay"] == f"127.0.0.1[127.0.0.1]:{port}"
    assert re.fullmatch(r"Verified TLSv1\.[23]/\S+ \(pkix\)", line["tls"]), line
    assert f"AUTH {USER} ok" in relay.log()
    (msg,) = sink.messages()
    assert msg.rcpts == ["<zed@far.test>"] and msg.mail.startswith(f"<{USER}>")
    assert "with ESMTPSA" in msg.body.decode()  # the relay accepted it authenticated over TLS


def test_smarthost_certificate_must_verify(make_server: MakeServer, sink: Sink) -> None:
    relay = make_server(deliver=True, extra_toml=delivery_toml(route("far.test", f"[127.0.0.1]:{sink.port}")))
    password_file = relay.root.parent / "smarthost-password"
    password_file.write_text(PASSWORD + "\n")
    sender = make_server(deliver=True, extra_toml=f"""
[delivery.smarthost]
host = "[127.0.0.1]"
port = {relay.submissions}
username = "{USER}"
password_file = "{password_file}"
""")  # no ca_file: the demo CA is not among the system's, so the relay is not trusted
    ctx = verifying_context(sender.ca)
    with smtplib.SMTP_SSL("localhost", sender.submissions, context=ctx, timeout=10) as smtp:
        smtp.login(USER, PASSWORD)
        smtp.sendmail(USER, ["zed@far.test"], message("smart2", sender=USER))
    wait_until(lambda: len(deliveries(sender)) == 1, what="the deferral")
    (line,) = deliveries(sender)
    assert line["status"] == "deferred" and line["dsn"] == "4.7.5", line
    assert "certificate verification failed" in line["reply"]
    assert "AUTH" not in relay.log() and not sink.messages()  # no credentials, no mail


def test_smarthost_password_file_must_be_readable(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(start=False, deliver=True, extra_toml=f"""
[delivery.smarthost]
host = "[127.0.0.1]"
username = "{USER}"
password_file = "{tmp_path / 'missing'}"
""")
    result = server.cli("serve", check=False)
    assert result.returncode == 2
    assert "delivery.smarthost.password_file" in result.stderr and "cannot be read" in result.stderr


def test_sigkill_during_delivery_loses_nothing(make_server: MakeServer, tmp_path: Path) -> None:
    # smtp-sink waits before answering DATA, so the kill lands while transactions are open.
    slow = Sink(tmp_path / "slow-sink", options=("-w", "1")).start()
    try:
        server = make_server(deliver=True, extra_toml=delivery_toml(
            route("sink.test", f"[127.0.0.1]:{slow.port}"), relay=("sink.test",),
            lease_seconds=5, slow_start_initial=10, per_destination=10, retry_initial=1))
        ids = [f"crash-{i}-{uuid.uuid4().hex[:8]}" for i in range(40)]
        with smtplib.SMTP("127.0.0.1", server.mx, timeout=10) as smtp:
            for msg_id in ids:
                smtp.sendmail("sender@back.test", [f"{msg_id}@sink.test"], message(msg_id))

        def delivered() -> list[str]:
            # A dump only counts once its content arrived: the kill leaves some without it.
            return [m.rcpts[0][1:-1].split("@")[0] for m in slow.messages()
                    if m.rcpts and f"body of {m.rcpts[0][1:-1].split('@')[0]}".encode() in m.body]

        wait_until(lambda: len(delivered()) >= 5, what="deliveries under way")
        server.kill()
        assert len(set(delivered())) < len(ids), "all delivered before the kill: nothing was tested"
        server.start()
        wait_until(lambda: set(ids) <= set(delivered()), timeout=30, what="every message after the restart")
        wait_until(lambda: queue_count(server) == 0, timeout=10, what="an empty queue")
        counts: dict[str, int] = {}
        for key in delivered():
            counts[key] = counts.get(key, 0) + 1
        # At least once each; only messages caught between a reply and its record repeat.
        assert set(counts) == set(ids)
        assert sum(counts.values()) - len(ids) <= 10, counts
    finally:
        slow.stop()


def test_an_idle_connection_carries_the_next_message_then_closes(make_server: MakeServer,
                                                                  picky: PickyServer) -> None:
    server = make_server(deliver=True, extra_toml=delivery_toml(
        route("picky.test", f"[127.0.0.1]:{picky.port}", security="may"), relay=("picky.test",)))
    submit_mx(server, "sender@back.test", ["a@picky.test"], message("reuse1"))
    wait_until(lambda: len(picky.received) == 1, what="the first message")
    # Mail arriving while the connection is parked goes over it (after RSET), not a new one.
    submit_mx(server, "sender@back.test", ["b@picky.test"], message("reuse2"))
    wait_until(lambda: len(picky.received) == 2, what="the second message")
    assert picky.sessions == 1
    # Parked connections are closed (QUIT) once idle for a couple of seconds.
    wait_until(lambda: picky.open_sessions == 0, timeout=8, what="the idle close")
    submit_mx(server, "sender@back.test", ["c@picky.test"], message("reuse3"))
    wait_until(lambda: len(picky.received) == 3, what="the third message")
    assert picky.sessions == 2

