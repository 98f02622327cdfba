"""`sendmail` from a subprocess into a real mailward over its local socket, as cron and PHP run it."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_submit import PARKED, ok, parked_toml, sendmail, socket_path
from mailward_server import USER, MailwardServer, free_port

from conftest import MakeServer
from mailward.sendmail import login_name


@pytest.fixture
def server(make_server: MakeServer) -> MailwardServer:
    return make_server(extra_toml=parked_toml())


def header(body: bytes) -> bytes:
    return body.split(b"\r\n\r\n", 1)[0]


def test_t_i_takes_to_cc_bcc_and_strips_bcc(server: MailwardServer) -> None:
    message = (b"To: Ann <ann@parked.test>\nCc: bob@parked.test,\n  Carl <carl@parked.test>\n"
               b"Bcc: dora@parked.test\nSubject: nightly report\n\nall good\n")
    ok(sendmail(server, "-t", "-i", stdin=message))
    [(m, body)] = server.messages()
    env = m.envelope
    assert env.sender == f"{login_name()}@mx.example.test"
    assert (env.listener, env.client_ip, env.auth_user, env.tls) == ("local", "local", None, None)
    names = ("ann", "bob", "carl", "dora")
    assert [r.recipient.address for r in m.recipients] == [f"{n}@{PARKED}" for n in names]
    assert b"dora" not in body and b"Bcc" not in body
    head = header(body)
    assert head.startswith(f"Received: (from userid {os.getuid()})\r\n\tby mx.example.test ".encode())
    assert b"\r\nTo: Ann <ann@parked.test>\r\nCc: bob@parked.test,\r\n  Carl <carl@parked.test>\r\n" in head
    assert re.search(rb"\r\nFrom: .*<" + f"{login_name()}@mx.example.test".encode() + rb">\r\n", head), head
    assert re.search(rb"\r\nDate: [A-Z][a-z]{2}, ", head)
    assert re.search(rb"\r\nMessage-ID: <[^>]+@mx\.example\.test>", head)
    assert body.endswith(b"\r\n\r\nall good\r\n")
    assert body.count(b"\n") == body.count(b"\r\n")  # every line end became CRLF


def test_sender_and_recipients_as_arguments(server: MailwardServer) -> None:
    ok(sendmail(server, "-f", "x@y.example", "a@parked.test", "B <b@parked.test>, c@parked.test"))
    ok(sendmail(server, "-oi", "-rz@y.example", "-F", "Zed", "d@parked.test"))
    ok(sendmail(server, "-f", "<>", "e@parked.test"))
    (m1, b1), (m2, b2), (m3, _) = server.messages()
    assert m1.envelope.sender == "x@y.example"
    assert [r.recipient.address for r in m1.recipients] == ["a@parked.test", "b@parked.test", "c@parked.test"]
    assert re.search(rb"\r\nFrom: .*<?x@y\.example>?\r\n", header(b1))
    assert m2.envelope.sender == "z@y.example" and b"\r\nFrom: Zed <z@y.example>\r\n" in header(b2)
    assert m3.envelope.sender == ""  # the null sender, for notices that must not bounce


def test_a_lone_dot_ends_input_unless_i(server: MailwardServer) -> None:
    text = b"Subject: dots\n\nbefore\n.\nafter\n..twice\n"
    ok(sendmail(server, "-i", f"a@{PARKED}", stdin=text))
    ok(sendmail(server, "-oi", f"a@{PARKED}", stdin=text))
    ok(sendmail(server, f"a@{PARKED}", stdin=text))
    (_, with_i), (_, with_oi), (_, without) = server.messages()
    assert with_i.endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n..twice\r\n")  # stored exactly as written
    assert with_oi.endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n..twice\r\n")
    assert without.endswith(b"\r\n\r\nbefore\r\n")


def test_server_down_is_a_temporary_failure(make_server: MakeServer) -> None:
    down = make_server(start=False)
    path = socket_path(down)
    result = sendmail(down, "-t", "-i", stdin=b"To: a@parked.test\n\nx\n")
    assert result.returncode == 75  # EX_TEMPFAIL: cron and PHP report it, callers retry
    assert result.stdout == b""
    assert result.stderr.decode() == ("mailward sendmail: the mailward server is not running (no socket at "
                                      f"{path}); start it with mailward serve.\n")
    via_env = sendmail(None, "a@parked.test", env={"MAILWARD_SOCKET": str(path)})
    assert via_env.returncode == 75 and via_env.stderr == result.stderr


def test_socket_is_0660_and_removed_on_sigterm(server: MailwardServer) -> None:
    path = socket_path(server)
    mode = os.lstat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    assert not [p for p in server.state_dir.iterdir() if p.name.startswith(".mw")]  # no temporary name left
    assert server.stop(signal.SIGTERM) == 0
    assert not path.exists()


def test_stale_socket_is_replaced_and_a_live_one_is_not(server: MailwardServer) -> None:
    path = socket_path(server)
    # A second server on the same state_dir must not take the socket from the running one.
    second = server.root / "second.toml"
    text = server.config_text()
    for kind in ("mx", "submission", "submissions"):
        text = text.replace(f"port = {server.port(kind)}\n", f"port = {free_port()}\n")
    second.write_text(text)
    clash = subprocess.run([sys.executable, "-m", "mailward.cli", "serve", "--config", str(second)],
                           capture_output=True, text=True, timeout=60, cwd=server.root)
    assert clash.returncode == 2
    assert f"mailward: another mailward is already listening on {path}; stop it first" in clash.stderr
    ok(sendmail(server, f"a@{PARKED}"))  # the first one still has its socket

    server.kill()  # SIGKILL leaves the socket file behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    server.start()
    ok(sendmail(server, f"b@{PARKED}"))
    assert [m.recipients[0].recipient.address for m, _ in server.messages()] == [f"a@{PARKED}", f"b@{PARKED}"]


def test_socket_from_the_environment_and_bare_names(server: MailwardServer, tmp_path: Path) -> None:
    # No configuration at all: the greeting names the host that bare names belong to.
    ok(sendmail(None, "root", env={"MAILWARD_SOCKET": str(socket_path(server))}, cwd=tmp_path))
    [(m, _)] = server.messages()
    assert m.envelope.sender == f"{login_name()}@mx.example.test"
    assert [r.recipient.address for r in m.recipients] == ["root@mx.example.test"]


def test_too_many_recipients_go_in_further_transactions(make_server: MakeServer) -> None:
    two = {kind: "max_recipients = 2" for kind in ("mx", "submission", "submissions")}
    limited = make_server(extra_toml=parked_toml(), listener_toml=two)
    ok(sendmail(limited, *[f"r{i}@{PARKED}" for i in range(5)]))
    got = [[r.recipient.address for r in m.recipients] for m, _ in limited.messages()]
    assert got == [[f"r0@{PARKED}", f"r1@{PARKED}"], [f"r2@{PARKED}", f"r3@{PARKED}"], [f"r4@{PARKED}"]]


@pytest.mark.parametrize(("args", "stdin", "status", "text"), [
    (("-t",), b"To: a@b@c\n\nx\n", 65, "malformed address"),
    (("-t",), b"Subject: no recipients\n\nx\n", 65, "no recipient addresses found"),
    ((), b"Subject: s\n\nx\n", 64, "no recipients"),
    (("-q",), b"", 64, "option -q not recognized"),
    (("a b@parked.test",), b"x\n", 64, "malformed address"),
])
def test_refusals_before_anything_is_queued(server: MailwardServer, args: tuple[str, ...], stdin: bytes,
                                            status: int, text: str) -> None:
    result = sendmail(server, *args, stdin=stdin)
    assert result.returncode == status
    err = result.stderr.decode()
    assert err.startswith("mailward sendmail: ") and text in err and err.count("\n") == 1, err
    assert server.messages() == []


def test_mailward_sendmail_subcommand_and_bp(server: MailwardServer) -> None:
    result = server.cli("sendmail", f"a@{PARKED}", stdin="Subject: via mailward\n\nhi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    listing = sendmail(server, "-bp")
    assert listing.returncode == 0
    assert listing.stdout.decode().splitlines()[-1].startswith("1 message, 1 recipient, oldest ")


def test_console_script_is_declared() -> None:
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    assert 'sendmail = "mailward.sendmail:main"' in pyproject.read_text()


def test_sendmail_t_delivers_into_a_maildir(make_server: MakeServer) -> None:
    delivering = make_server(deliver=True)
    marker = "maildir-check-7f3a"
    ok(sendmail(delivering, "-t", "-i", stdin=f"To: {USER}\nBcc: {USER}\nSubject: {marker}\n\nhi\n".encode()))
    maildirs = delivering.state_dir / "mail"
    deadline = time.monotonic() + 20
    found: list[Path] = []
    while not found and time.monotonic() < deadline:
        found = [p for p in maildirs.rglob("*") if p.parent.name == "new" and p.is_file()
                 and marker.encode() in p.read_bytes()]
        time.sleep(0.1)
    assert len(found) == 1, delivering.log_since_start()
    content = found[0].read_bytes()
    assert b"Bcc" not in content and b"\nhi" in content.replace(b"\r\n", b"\n")
