"""Local delivery with real peers: swaks and smtplib into a running mailward whose local domain
delivers into Maildirs, Dovecot's LMTP server run from its own config in a temporary directory,
a scripted LMTP server for the failures Dovecot will not produce on demand, and the demo config."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_submit import ok, sendmail
from mailward_server import MailwardServer

from conftest import MakeServer, require_tool
from mailward.delivery.local import LmtpServer, LocalDelivery, LocalRecipients, LocalResult
from mailward.queue import Envelope, Recipient, RecipientState, StoredMessage
from mailward.service import DEMO_USER, prepare_demo

DELIVERY_LINE = re.compile(
    r"(?P<id>\w+): to=<(?P<rcpt>[^>]*)>, relay=(?P<relay>\S+), delay=[0-9.]+, tls=(?P<tls>[^,]+), "
    r"dsn=(?P<dsn>[0-9.]+), status=(?P<status>sent|deferred|bounced|expired) \((?P<reply>.*)\)$")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def deliveries(server: MailwardServer) -> dict[str, dict[str, str]]:
    """The last Postfix-style delivery line logged for each recipient."""
    out = {}
    for line in server.log_since_start().splitlines():
        if m := DELIVERY_LINE.search(line):
            out[m["rcpt"]] = m.groupdict()
    return out


def logged(server: MailwardServer, *rcpts: str) -> dict[str, dict[str, str]]:
    wait_for(lambda: set(rcpts) <= deliveries(server).keys(), f"delivery lines for {rcpts}")
    return deliveries(server)


def maildir_files(new: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def smtp_send(server: MailwardServer, sender: str, rcpts: list[str], text: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.mx, timeout=15) as client:
        client.ehlo("client.example")
        refused = client.sendmail(sender, rcpts, text.encode())
    assert refused == {}


# --- Maildir through a running server ---------------------------------------------------------------

def test_swaks_to_a_local_user_lands_in_new_with_trace_headers(make_server: MakeServer) -> None:
    swaks = require_tool("swaks")
    server = make_server(deliver=True)
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.mx}", "--helo", "client.example", "--timeout", "15",
         "--from", "bob@remote.example", "--to", "Alice+lists@example.test",
         "--header", "Subject: swaks-local-1", "--body", "line one\n.leading dot\n"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    line = logged(server, "Alice+lists@example.test")["Alice+lists@example.test"]
    assert (line["relay"], line["dsn"], line["status"], line["reply"]) == (
        "local", "2.0.0", "sent", "2.0.0 delivered to maildir of alice")
    new = server.state_dir / "mail" / "alice" / "new"
    [content] = maildir_files(new)
    head, _, body = content.partition(b"\n\n")
    lines = head.split(b"\n")
    assert lines[:2] == [b"Return-Path: <bob@remote.example>", b"Delivered-To: Alice+lists@example.test"]
    assert lines[2].startswith(b"Received: from client.example")
    assert b"Subject: swaks-local-1" in head and b"\r" not in content
    assert body.startswith(b"line one\n.leading dot\n")  # un-stuffed: the dot line is content
    assert os.stat(new.parent).st_mode & 0o777 == 0o700
    [name] = os.listdir(new)
    assert re.fullmatch(rf"\d+\.M\d+P\d+Q\d+\.[^/]+,S={len(content)}", name)
    assert os.listdir(new.parent / "tmp") == [] and os.listdir(new.parent / "cur") == []


def test_unknown_local_user_is_refused_at_rcpt(make_server: MakeServer) -> None:
    # Refused in the session (as Postfix's local_recipient_maps does), not bounced afterwards to a
    # sender that may be forged; postmaster is always accepted.
    server = make_server(deliver=True)
    with smtplib.SMTP("127.0.0.1", server.mx, timeout=15) as client:
        client.ehlo("client.example")
        refused = client.sendmail("someone@far.example", ["ghost@example.test", "Postmaster@example.test"],
                                  b"Subject: rcpt-check\r\n\r\nhello\r\n")
    assert refused == {"ghost@example.test": (550, b"5.1.1 Recipient address rejected: user unknown")}
    assert "recipient <ghost@example.test> refused: 5.1.1" in server.log()
    assert not (server.state_dir / "mail" / "ghost").exists()


def test_unknown_local_user_bounces_back_to_a_local_sender(make_server: MakeServer) -> None:
    # Local submissions are accepted whole, as Postfix's sendmail does; the unknown user bounces.
    alias = '[local]\nalias = [{name = "postmaster", targets = ["alice"]}]\n'
    server = make_server(deliver=True, extra_toml=alias)
    ok(sendmail(server, "-f", "alice@example.test", "ghost@example.test", "postmaster@example.test",
                stdin=b"Subject: local-bounce-2\n\nhello\n"))
    lines = logged(server, "ghost@example.test", "postmaster@example.test")
    assert (lines["ghost@example.test"]["dsn"], lines["ghost@example.test"]["status"]) == ("5.1.1", "bounced")
    assert lines["postmaster@example.test"]["status"] == "sent"
    new = server.state_dir / "mail" / "alice" / "new"
    # The message itself (through the alias) and the notification for ghost, both in alice's Maildir.
    wait_for(lambda: len(maildir_files(new)) == 2, "the bounce in alice's Maildir")
    bounce = next(m for m in maildir_files(new) if b"Return-Path: <>" in m)
    assert b"ghost@example.test" in bounce and b"5.1.1" in bounce
    assert not (server.state_dir / "mail" / "ghost").exists()


# --- Dovecot LMTP -----------------------------------------------------------------------------------

@dataclass
class Dovecot:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.root / "run" / "lmtp"

    def new(self, user: str) -> Path:
        return self.root / "mail" / user / "Maildir" / "new"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    binary = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        require_tool("dovecot")  # skips, naming the fix
    assert binary is not None
    # Outside pytest's 0700 tmp tree: as root, Dovecot delivers as an unprivileged uid that must
    # reach its mail directory.
    root = Path(tempfile.mkdtemp(prefix="mw-dovecot-"))
    os.chmod(root, 0o755)
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    mail_user = pwd.getpwnam("nobody") if os.getuid() == 0 else pwd.getpwuid(os.getuid())
    (root / "mail").mkdir()
    os.chown(root / "mail", mail_user.pw_uid, mail_user.pw_gid)
    (root / "passwd").write_text(f"alice:{{PLAIN}}unused:{mail_user.pw_uid}:{mail_user.pw_gid}::"
                                 f"{root}/mail/alice::\n")
    port = _free_port()
    (root / "dovecot.conf").write_text(f"""
protocols = lmtp
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailward-test-{os.getpid()}
log_path = {root}/dovecot.log
ssl = no
listen = 127.0.0.1
default_internal_user = {me}
default_internal_group = {group}
default_login_user = {me}
first_valid_uid = {mail_user.pw_uid}
mail_location = maildir:~/Maildir
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
""")
    proc = subprocess.Popen([binary, "-F", "-c", str(root / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Dovecot(root, port, proc)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                log = (root / "dovecot.log").read_text() if (root / "dovecot.log").exists() else ""
                raise RuntimeError(f"dovecot exited with {proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    return s.recv(100).startswith(b"220 ") and server.socket.exists()
            except OSError:
                return False
        wait_for(listening, "Dovecot's LMTP listener", timeout=15)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


def test_lmtp_to_dovecot_delivers_and_fails_only_the_unknown_user(make_server: MakeServer,
                                                                   dovecot: Dovecot) -> None:
    server = make_server(deliver=True, extra_toml=f'[local]\nlmtp = "127.0.0.1:{dovecot.port}"\n')
    rcpts = ["alice@example.test", "nobody@example.test", "Alice+tag@example.test"]
    smtp_send(server, "", rcpts, "Subject: lmtp-dovecot-3\r\n\r\nover lmtp\r\n")
    lines = logged(server, *rcpts)
    relay = f"lmtp[127.0.0.1]:{dovecot.port}"
    assert {r: (v["relay"], v["status"], v["dsn"]) for r, v in lines.items()} == {
        "alice@example.test": (relay, "sent", "2.0.0"),
        "Alice+tag@example.test": (relay, "sent", "2.0.0"),
        "nobody@example.test": (relay, "bounced", "5.1.1")}
    assert "Saved" in lines["alice@example.test"]["reply"]  # Dovecot's own per-recipient reply
    got = [m for m in maildir_files(dovecot.new("alice")) if b"lmtp-dovecot-3" in m]
    assert len(got) == 2 and all(m.startswith(b"Return-Path: <>") for m in got)
    assert not (server.state_dir / "mail").exists()  # nothing went to the built-in Maildirs


def test_lmtp_over_dovecot_unix_socket_with_catch_all(make_server: MakeServer, dovecot: Dovecot) -> None:
    toml = f'[local]\nlmtp = "unix:{dovecot.socket}"\ncatch_all = "alice"\n'
    server = make_server(deliver=True, extra_toml=toml)
    smtp_send(server, "bob@example.test", ["whoever@example.test"], "Subject: lmtp-unix-4\r\n\r\nx\r\n")
    line = logged(server, "whoever@example.test")["whoever@example.test"]
    assert (line["relay"], line["status"]) == (f"lmtp[{dovecot.socket}]", "sent")
    wait_for(lambda: any(b"lmtp-unix-4" in m for m in maildir_files(dovecot.new("alice"))),
             "the catch-all copy in Dovecot's Maildir")


def test_an_unreachable_lmtp_server_defers(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(deliver=True, extra_toml=f'[local]\nlmtp = "unix:{tmp_path}/no-such.sock"\n')
    smtp_send(server, "", ["alice@example.test"], "Subject: lmtp-down-5\r\n\r\nx\r\n")
    line = logged(server, "alice@example.test")["alice@example.test"]
    assert (line["status"], line["dsn"]) == ("deferred", "4.4.1")
    assert line["reply"] == f"4.4.1 connect to lmtp[{tmp_path}/no-such.sock]: No such file or directory"


# --- a scripted LMTP server, in process --------------------------------------------------------------

class ScriptedLmtp:
    """Accepts every RCPT but ghost's; after the dot answers `finals`, then may hang up."""

    def __init__(self, finals: list[bytes], *, greeting: bytes = b"220 scripted LMTP\r\n",
                 hang_up: bool = False) -> None:
        self.finals = finals
        self.greeting = greeting
        self.hang_up = hang_up
        self.rcpts: list[list[bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.greeting)
        accepted = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"MAIL":
                self.rcpts.append([])
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                self.rcpts[-1].append(line[8:].strip())
                known = b"ghost" not in line
                accepted += known
                writer.write(b"250 2.1.5 ok\r\n" if known else b"550 5.1.1 unknown user\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while await reader.readline() != b".\r\n":
                    pass
                for reply in self.finals[:accepted]:
                    writer.write(reply)
                if self.hang_up:
                    break
                accepted = 0
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        await writer.drain()
        writer.close()


def stored(*rcpts: str) -> StoredMessage:
    env = Envelope(sender="s@remote.test", client_ip="192.0.2.9", client_helo="c", listener="mx",
                   received_at=time.time())
    return StoredMessage(id="0LMTP", envelope=env, size=10, digest="0" * 64, created_at=time.time(),
                         recipients=tuple(RecipientState(Recipient(r), "queued") for r in rcpts))


def run_scripted(script: ScriptedLmtp, rcpts: list[str],
                 catch_all: str | None = None) -> dict[str, LocalResult]:
    async def run() -> dict[str, LocalResult]:
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        resolver = LocalRecipients(local_domains=["example.test"], default_domain="example.test",
                                   aliases={}, catch_all=catch_all, is_user=None)
        local = LocalDelivery(resolver, maildir=Path("/nonexistent"), hostname="mx.example.test",
                              lmtp=LmtpServer(host="127.0.0.1", port=port))
        try:
            return await local.deliver(stored(*rcpts), b"Subject: s\r\n\r\nbody\r\n", rcpts)
        finally:
            server.close()
            await server.wait_closed()
    return asyncio.run(asyncio.wait_for(run(), 20))


def test_a_hang_up_after_some_final_replies_defers_only_the_rest() -> None:
    script = ScriptedLmtp([b"250 2.0.0 alice saved\r\n"], hang_up=True)
    rcpts = ["alice@example.test", "ghost@example.test", "bob@example.test", "carol@example.test"]
    results = run_scripted(script, rcpts)
    assert {r: (v.outcome.status, v.outcome.enhanced) for r, v in results.items()} == {
        "alice@example.test": ("delivered", "2.0.0"), "ghost@example.test": ("failed", "5.1.1"),
        "bob@example.test": ("deferred", "4.4.2"), "carol@example.test": ("deferred", "4.4.2")}
    assert results["alice@example.test"].outcome.reply == "250 2.0.0 alice saved"
    assert {v.relay for v in results.values()} == {f"lmtp[127.0.0.1]:{script_port(results)}"}


def script_port(results: dict[str, LocalResult]) -> str:
    return next(iter(results.values())).relay.rpartition(":")[2]


def test_a_refusing_greeting_defers_everyone() -> None:
    results = run_scripted(ScriptedLmtp([], greeting=b"554 5.3.2 not today\r\n"), ["alice@example.test"])
    outcome = results["alice@example.test"].outcome
    assert (outcome.status, outcome.enhanced) == ("deferred", "4.3.2")
    assert outcome.reply.endswith("refused the greeting: 554 5.3.2 not today")


def test_catch_all_takes_what_the_lmtp_server_does_not_know() -> None:
    script = ScriptedLmtp([b"250 2.0.0 saved\r\n"] * 3)
    results = run_scripted(script, ["alice@example.test", "ghost@example.test"], catch_all="postbox")
    assert {r: v.outcome.status for r, v in results.items()} == {
        "alice@example.test": "delivered", "ghost@example.test": "delivered"}
    assert script.rcpts == [[b"<alice@example.test>", b"<ghost@example.test>"], [b"<postbox@example.test>"]]


# --- the demo configuration -------------------------------------------------------------------------

def test_the_demo_config_delivers_into_var_mail_of_the_demo_user(tmp_path: Path) -> None:
    var = tmp_path / "var"
    config, _ = prepare_demo(var)
    assert "localhost" in config.local_domains and config.local.maildir == var / "mail"
    local = LocalDelivery.from_config(config)
    rcpts = [DEMO_USER, "demo@localhost", "postmaster@localhost", "someone@localhost"]
    results = asyncio.run(local.deliver(stored(*rcpts), b"Subject: demo\r\n\r\nhi\r\n", rcpts))
    assert {v.outcome.status for v in results.values()} == {"delivered"}
    assert results["demo@localhost"].outcome.reply == "2.0.0 delivered to maildir of demo"
    new = var / "mail" / "demo" / "new"
    assert len(maildir_files(new)) == 1  # one copy, whatever the address that led there
    assert sorted(p.name for p in (var / "mail").iterdir()) == ["demo"]
