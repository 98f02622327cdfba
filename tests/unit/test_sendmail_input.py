"""`mailward sendmail` without a server: options, reading the message, header completion, addresses."""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

import pytest

from mailward import sendmail
from mailward.config import config_from_dict
from mailward.inbound import local_socket_path
from mailward.sendmail import (
    EX_CONFIG,
    EX_DATAERR,
    EX_USAGE,
    Options,
    SendmailError,
    complete_header,
    header_addresses,
    locate,
    parse_args,
    qualify,
    read_message,
    sender_mailbox,
)


def test_cron_and_php_command_lines_parse() -> None:
    # Debian cron: /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem root
    opts = parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert (opts.full_name, opts.ignore_dots, opts.body_type, opts.recipients) == (
        "CronDaemon", True, "8BITMIME", ["root"])
    # PHP's default sendmail_path, plus its additional_params "-f bounce@example.org".
    opts = parse_args(["-t", "-i", "-f", "bounce@example.org"])
    assert (opts.extract, opts.ignore_dots, opts.sender, opts.recipients) == (
        True, True, "bounce@example.org", [])
    opts = parse_args(["-ti", "-odb", "-oi", "-rme@example.org", "a@example.org", "-v", "b@example.org"])
    assert (opts.extract, opts.ignore_dots, opts.sender) == (True, True, "me@example.org")
    assert opts.recipients == ["a@example.org", "b@example.org"]
    opts = parse_args(["-bm", "-N", "success,delay", "-R", "hdrs", "-V", "env-1", "x@example.org"])
    assert opts == Options(notify=frozenset({"SUCCESS", "DELAY"}), ret="HDRS", envid="env-1",
                           recipients=["x@example.org"])
    assert parse_args(["--config", "/etc/mailward.toml", "-C", "/other.toml"]).config == "/other.toml"


@pytest.mark.parametrize("argv", [["-q"], ["-bs"], ["-bd"], ["-N", "sometimes"], ["-N", "never,success"],
                                  ["-R", "all"], ["-B", "BINARY"], ["-V", "idé"], ["-f"]])
def test_bad_command_lines_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SendmailError) as info:
        parse_args(argv)
    assert info.value.status == EX_USAGE
    assert info.value.text.endswith(".")


def test_help_prints_usage_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert sendmail.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mailward sendmail [options] [recipient ...] < message")
    assert "75 EX_TEMPFAIL" in out and "-t " in out


def test_reading_converts_line_ends_and_honours_the_dot() -> None:
    data = (b"From sender@example.org Mon Jan  1 00:00:00 2024\n"  # an mbox separator is dropped
            b"Subject: hi\r\nTo: a@example.org\n\none\n.\ntwo")
    m = read_message(data, ignore_dots=False)
    assert m.to_bytes() == b"Subject: hi\r\nTo: a@example.org\r\n\r\none\r\n"
    m = read_message(data, ignore_dots=True)
    assert m.to_bytes() == b"Subject: hi\r\nTo: a@example.org\r\n\r\none\r\n.\r\ntwo\r\n"


def test_a_body_without_header_gets_its_blank_line() -> None:
    assert read_message(b"just text\nmore\n", ignore_dots=False).to_bytes() == b"\r\njust text\r\nmore\r\n"
    m = read_message(b"Subject: x\nnot a header line\n", ignore_dots=False)
    assert m.to_bytes() == b"Subject: x\r\n\r\nnot a header line\r\n"


def test_long_lines_are_broken_as_postfix_does() -> None:
    text = "é" * 700  # 1400 octets of UTF-8
    m = read_message(b"Subject: x\n\n" + text.encode() + b"\n", ignore_dots=True)
    out = m.to_bytes()
    lines = out.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert body.replace(b"\r\n ", b"").rstrip(b"\r\n").decode("utf-8") == text  # never inside a character


def test_recipients_from_headers_and_bcc_removal() -> None:
    m = read_message(b"To: A <a@example.org>,\n  b@example.org\nCc: undisclosed-recipients:;\n"
                     b"Bcc: secret@example.org\nBCC: other@example.org\nSubject: s\n\nbody\n",
                     ignore_dots=False)
    found = [a for _, value in m.values((b"to", b"cc", b"bcc")) for a in header_addresses(value)]
    assert found == ["a@example.org", "b@example.org", "secret@example.org", "other@example.org"]
    m.remove(b"bcc")
    assert b"secret" not in m.to_bytes() and b"other@" not in m.to_bytes()
    assert m.to_bytes().startswith(b"To: A <a@example.org>,\r\n  b@example.org\r\nCc: ")


def test_header_address_errors() -> None:
    with pytest.raises(SendmailError) as info:
        header_addresses(b" a@b@c")
    assert info.value.status == EX_DATAERR
    with pytest.raises(SendmailError):
        header_addresses(b" \xff@example.org")


def test_addresses_are_qualified_with_the_hostname() -> None:
    assert str(qualify("root", "mx.example.org", EX_USAGE)) == "root@mx.example.org"
    assert str(qualify("a@Example.ORG", "mx.example.org", EX_USAGE)) == "a@Example.ORG"
    with pytest.raises(SendmailError) as info:
        qualify("a b@example.org", "mx.example.org", EX_DATAERR)
    assert info.value.status == EX_DATAERR
    assert sender_mailbox("<>", "h.example") is None
    assert sender_mailbox("", "h.example") is None
    assert str(sender_mailbox("<x@y.example>", "h.example")) == "x@y.example"
    assert str(sender_mailbox("daemon", "h.example")) == "daemon@h.example"
    assert str(sender_mailbox(None, "h.example")) == f"{sendmail.login_name()}@h.example"
    with pytest.raises(SendmailError):
        sender_mailbox("a@@b", "h.example")


def test_missing_fields_are_added() -> None:
    m = read_message(b"Subject: s\n\nbody\n", ignore_dots=False)
    author = qualify("j@example.org", "h", EX_USAGE)
    complete_header(m, Options(full_name='Jörg "the" Admin\nX-Injected: 1'), author, "mx.example.org")
    parsed = email.message_from_bytes(m.to_bytes(), policy=email.policy.SMTPUTF8)
    [address] = parsed["From"].addresses
    assert (address.display_name, address.addr_spec) == ('Jörg "the" Admin X-Injected: 1', "j@example.org")
    assert parsed["X-Injected"] is None
    assert parsed["Date"].datetime is not None
    assert str(parsed["Message-ID"]).endswith("@mx.example.org>")
    assert m.to_bytes().isascii()  # the name is RFC 2047 encoded for an ASCII address
    present = read_message(b"From: me@example.org\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
                           b"Message-ID: <1@example.org>\n\nx\n", ignore_dots=False)
    before = present.to_bytes()
    complete_header(present, Options(), None, "mx.example.org")
    assert present.to_bytes() == before


def test_null_sender_still_gets_an_author() -> None:
    m = read_message(b"\nbody\n", ignore_dots=False)
    complete_header(m, Options(full_name=""), None, "mx.example.org")
    assert f"From: {sendmail.login_name()}@mx.example.org\r\n".encode() in m.to_bytes()


def test_default_state_dir_is_the_configs() -> None:
    config = config_from_dict({"hostname": "mx.example.org", "listener": []}, "test")
    assert config.state_dir == sendmail.DEFAULT_STATE_DIR


def test_locate_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write(name: str, state: str) -> Path:
        path = tmp_path / name
        path.write_text(f'hostname = "mx.example.org"\nstate_dir = "{state}"\nlistener = []\n')
        return path
    explicit = write("explicit.toml", "/srv/explicit")
    from_env = write("env.toml", "/srv/env")
    write("mailward.toml", "/srv/cwd")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILWARD_SOCKET", "/run/mw.sock")
    monkeypatch.setenv("MAILWARD_CONFIG", str(from_env))
    path, config = locate(Options(config=str(explicit)))
    assert path == Path("/srv/explicit/mailward.sock") and config is not None
    assert locate(Options()) == (Path("/run/mw.sock"), None)
    monkeypatch.delenv("MAILWARD_SOCKET")
    assert locate(Options())[0] == Path("/srv/env/mailward.sock")
    monkeypatch.delenv("MAILWARD_CONFIG")
    assert locate(Options())[0] == Path("/srv/cwd/mailward.sock")
    os.remove("mailward.toml")
    assert locate(Options()) == (local_socket_path(Path("/var/lib/mailward")), None)
    with pytest.raises(SendmailError) as info:
        locate(Options(config=str(tmp_path / "missing.toml")))
    assert info.value.status == EX_CONFIG


@pytest.mark.parametrize("value", ["a b@example.org", "a@example.org\tb@example.org", "a.@example.org",
                                   "a@example.org;"])
def test_addresses_the_parser_would_repair_are_refused(value: str) -> None:
    with pytest.raises(SendmailError) as info:
        header_addresses(value.encode())
    assert info.value.status == EX_DATAERR


def test_bare_names_and_groups_are_addresses() -> None:
    assert header_addresses(b" root, Team: x@example.org;, Name <y>") == ["root", "x@example.org", "y"]
