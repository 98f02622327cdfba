"""`mailward sendmail` (and the `sendmail` command): hand a message from a local program to the server.

Programs on this host (cron, PHP's mail(), scripts that run ``sendmail -t -i``) write a message to
standard input. This command reads it, completes the header (Date, Message-ID and From when
missing; Bcc removed, always, so no copy shows who was blind-copied), and submits it over SMTP on
the server's local socket, ``state_dir/mailward.sock``, with the project's own client engine. The
socket's mode is its access control, so the server needs no TLS or AUTH there and accepts any
sender, as Postfix does for its sendmail and postdrop.

The socket is found from -C/--config FILE, else $MAILWARD_SOCKET, else the configuration that
`mailward` itself would read ($MAILWARD_CONFIG, ./mailward.toml), else the default state_dir
(/var/lib/mailward): cron and web servers run it with none of these set.

Options, getopt-style as sendmail's (``-f addr`` and ``-faddr`` are the same):
  -t          recipients from the To:, Cc: and Bcc: headers too (added to those given as arguments)
  -f ADDR     envelope sender (-r is the old spelling); "<>" or "" is the null sender; default
              the login name of this user @ the server's hostname
  -F NAME     full name for a From: header this command adds
  -i, -oi     a line holding a single "." does not end the message (without it, it does)
  -N DSN      NOTIFY: never, or a comma list of success, failure, delay
  -R RET      RET: full or hdrs;  -V ENVID: ENVID;  -B TYPE: 7BIT or 8BITMIME
  -bm         read a message and deliver it (the default);  -bp  list the queue (mailq)
  -C FILE, --config FILE   the mailward configuration naming state_dir
  -o..., -c, -e, -G, -m, -n, -U, -v, -d X, -h N, -L X, -O X, -p X, -X X   accepted and ignored
Addresses without a domain (``root``) get the server's hostname, as Postfix's myorigin does.
Lines longer than SMTP's 998 octets are broken by inserting a line break and a space, as Postfix
does. Nothing is printed on success.

Exit status (sysexits.h, as callers of sendmail expect):
  0  EX_OK           the message is queued
  64 EX_USAGE        bad command line: unknown option or mode, malformed address argument, no recipient
  65 EX_DATAERR      the message or an address in its header is malformed, or the server refused
                     the sender, the message or its content permanently (5xx)
  67 EX_NOUSER       the server refused a recipient permanently (5xx); the others, if any, got the
                     message
  69 EX_UNAVAILABLE  the server refused the session permanently
  74 EX_IOERR        standard input could not be read
  75 EX_TEMPFAIL     try again later: the server is not running, went away, or answered 4xx
  77 EX_NOPERM       this user may not connect to the socket (not in the server's group)
  78 EX_CONFIG       the configuration that names the socket cannot be read
"""

from __future__ import annotations

import argparse
import asyncio
import email.errors
import email.headerregistry
import email.policy
import email.utils
import getopt
import os
import pwd
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailward.config import CONFIG_ENV, DEFAULT_CONFIG_FILE, Config, ConfigError, load_config
from mailward.inbound import local_socket_path
from mailward.smtp.address import AddressError, Mailbox, domain_to_ascii, parse_mailbox, parse_reverse_path
from mailward.smtp.client import (
    ClientConnection,
    ClientEvent,
    ClientProtocolError,
    EhloCompleted,
    EhloRefused,
    GreetingReceived,
    ReadyForBody,
    ReplyReceived,
    ServerClosed,
    TransactionResult,
)
from mailward.smtp.codes import Reply
from mailward.smtp.commands import MailParams, RcptParams
from mailward.stream import SmtpStream

PROG = "mailward sendmail"
SOCKET_ENV = "MAILWARD_SOCKET"
DEFAULT_STATE_DIR = Path("/var/lib/mailward")  # Config's default state_dir; a unit test keeps them equal
READ_TIMEOUT = 300.0  # RFC 5321 §4.5.3.2: five minutes for a reply is what servers may take
MAX_LINE = 997  # 998 octets of text per line (RFC 5321 §4.5.3.1.6), one kept for a stuffed dot

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# sendmail's own option letters (a trailing ":" takes an argument), so scripts written for it parse.
_SHORT_OPTIONS = "B:b:C:cd:eF:f:Gh:iL:mN:nO:o:p:R:r:tUV:vX:"
_LONG_OPTIONS = ["config=", "help"]
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_ADDRESS_HEADERS = (b"to", b"cc", b"bcc")
_POLICY = email.policy.SMTPUTF8
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_BARE_NAME = "addr-spec local part with no domain"  # the parser's note on "root"; qualified later


class SendmailError(Exception):
    """Why the message was not (entirely) submitted: one line for stderr and a sysexits status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(slots=True)
class Options:
    extract: bool = False  # -t
    sender: str | None = None  # -f/-r as given; None: the login user
    full_name: str | None = None  # -F
    ignore_dots: bool = False  # -i/-oi
    mode: str = "m"  # -b
    config: str | None = None
    notify: frozenset[str] | None = None
    ret: str | None = None
    envid: str | None = None
    body_type: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    try:
        pairs, rest = getopt.gnu_getopt(list(argv), _SHORT_OPTIONS, _LONG_OPTIONS)
    except getopt.GetoptError as exc:
        raise SendmailError(EX_USAGE, f"{exc}; see {PROG} --help.") from None
    opts = Options(recipients=rest)
    for flag, value in pairs:
        if flag == "--help":
            raise SendmailError(EX_OK, _help())
        if flag == "-t":
            opts.extract = True
        elif flag in ("-f", "-r"):
            opts.sender = value
        elif flag == "-F":
            opts.full_name = value
        elif flag == "-i" or (flag == "-o" and value == "i"):
            opts.ignore_dots = True
        elif flag == "-b":
            if value not in ("m", "p"):
                raise SendmailError(EX_USAGE, f"mode -b{value} is not supported; {PROG} delivers a message "
                                    "(-bm) or lists the queue (-bp).")
            opts.mode = value
        elif flag in ("-C", "--config"):
            opts.config = value
        elif flag == "-N":
            opts.notify = _notify(value)
        elif flag == "-R":
            if value.upper() not in ("FULL", "HDRS"):
                raise SendmailError(EX_USAGE, f"-R takes full or hdrs, not {value!r}.")
            opts.ret = value.upper()
        elif flag == "-V":
            if not value or not value.isascii() or not value.isprintable():
                raise SendmailError(EX_USAGE, "-V takes a non-empty envelope id of printable ASCII.")
            opts.envid = value
        elif flag == "-B":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise SendmailError(EX_USAGE, f"-B takes 7BIT or 8BITMIME, not {value!r}.")
            opts.body_type = value.upper()
        # Every other option sendmail defines (delivery mode, error mode, verbosity...) means
        # nothing here: the server queues and delivers, and errors come back as exit status.
    return opts


def _help() -> str:
    doc = __doc__ or ""
    return f"usage: {PROG} [options] [recipient ...] < message\n\n" + doc[doc.index("Options,"):]


def _notify(value: str) -> frozenset[str]:
    words = frozenset(w.strip().upper() for w in value.split(",") if w.strip())
    if words == {"NEVER"} or (words and words <= {"SUCCESS", "FAILURE", "DELAY"}):
        return words
    raise SendmailError(EX_USAGE, "-N takes never, or a comma list of success, failure and delay, not "
                        f"{value!r}.")


# --- the message ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    fields: list[list[bytes]]  # each header field as its physical lines, without line endings
    body: list[bytes]

    def names(self) -> set[bytes]:
        return {_field_name(f[0]) for f in self.fields}

    def values(self, names: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """(name, unfolded value) of every field named in `names`."""
        return [(_field_name(f[0]), b"".join(f).split(b":", 1)[1]) for f in self.fields
                if _field_name(f[0]) in names]

    def remove(self, name: bytes) -> None:
        self.fields = [f for f in self.fields if _field_name(f[0]) != name]

    def to_bytes(self) -> bytes:
        lines = [piece for f in self.fields for line in f for piece in _break_line(line)]
        lines.append(b"")
        lines += [piece for line in self.body for piece in _break_line(line)]
        return b"\r\n".join(lines) + b"\r\n"


def _field_name(line: bytes) -> bytes:
    return line.split(b":", 1)[0].strip().lower()


def _break_line(line: bytes) -> list[bytes]:
    """A line SMTP can carry, or pieces of it joined by CRLF SP (Postfix's smtp_line_length_limit)."""
    if len(line) <= MAX_LINE:
        return [line]
    pieces = []
    while len(line) > MAX_LINE:
        cut = MAX_LINE
        while cut > MAX_LINE - 4 and 0x80 <= line[cut] < 0xC0:  # never inside a UTF-8 sequence
            cut -= 1
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return pieces


def read_message(data: bytes, *, ignore_dots: bool) -> Message:
    """Split input into header fields and body; line ends become uniform, a lone "." may end it."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    if not ignore_dots and b"." in lines:
        lines = lines[: lines.index(b".")]
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]  # an mbox separator, not a header field
    fields: list[list[bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == b"":
            i += 1
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD_NAME.match(line):
            fields.append([line])
        else:
            break  # the body starts without a blank line; to_bytes() puts one in
        i += 1
    return Message(fields, lines[i:])


def header_addresses(value: bytes) -> list[str]:
    """The addr-specs of an address-list header value (groups and display names dropped)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise SendmailError(EX_DATAERR, "an address header is not UTF-8 text; fix the message.") from None
    return _address_list(text, EX_DATAERR)


def _address_list(text: str, status: int) -> list[str]:
    header = _POLICY.header_factory("To", text)
    # The parser recovers from errors by dropping or re-quoting words ("a@b.c<TAB>d@e.f" keeps
    # only the first address); anything it had to repair is refused rather than guessed at.
    for defect in header.defects:
        if isinstance(defect, email.errors.InvalidHeaderDefect) and str(defect) != _BARE_NAME:
            raise SendmailError(status, f"malformed address in {text.strip()!r}.")
    out = []
    for address in header.addresses:
        if not address.username:
            raise SendmailError(status, f"malformed address in {text.strip()!r}.")
        out.append(address.addr_spec)
    return out


def qualify(address: str, hostname: str, status: int) -> Mailbox:
    """A recipient as a Mailbox; a bare name gets the server's hostname."""
    full = address if "@" in address else f"{address}@{hostname}"
    try:
        return parse_mailbox(full)
    except AddressError:
        raise SendmailError(status, f"malformed address {address!r}.") from None


def sender_mailbox(given: str | None, hostname: str) -> Mailbox | None:
    if given is None:
        return qualify(login_name(), hostname, EX_USAGE)
    text = given.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text == "":
        return None  # the null sender, for programs that send notifications that must not bounce
    full = text if "@" in text else f"{text}@{hostname}"
    try:
        return parse_reverse_path(f"<{full}>", smtputf8=True)
    except AddressError:
        raise SendmailError(EX_USAGE, f"malformed sender address {given!r}.") from None


def login_name() -> str:
    # The uid's name, not $USER: that is what Postfix uses, and what cron's environment may lack.
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def _full_name(opts: Options) -> str:
    if opts.full_name is not None:
        name = opts.full_name
    elif os.environ.get("NAME"):
        name = os.environ["NAME"]
    else:
        try:
            name = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0]
        except KeyError:
            name = ""
    return " ".join(_CONTROL.sub(" ", name).split())  # a line break would start a new header field


def _author(name: str, address: str) -> str:
    if address.isascii():
        return email.utils.formataddr((name, address), charset="utf-8")  # RFC 2047 for the name
    # formataddr() refuses a UTF-8 address; such a message travels with SMTPUTF8, which takes both.
    return str(email.headerregistry.Address(display_name=name, addr_spec=address))


def complete_header(message: Message, opts: Options, sender: Mailbox | None, hostname: str) -> None:
    """Add From, Date and Message-ID when missing (RFC 5322 §3.6 requires the first two)."""
    names = message.names()
    if b"from" not in names:
        author = str(sender) if sender is not None else f"{login_name()}@{hostname}"
        value = _author(_full_name(opts), author)
        message.fields.append([f"From: {value}".encode()])
    if b"date" not in names:
        message.fields.append([f"Date: {email.utils.formatdate(localtime=True)}".encode()])
    if b"message-id" not in names:
        message.fields.append([f"Message-ID: {email.utils.make_msgid(domain=hostname)}".encode()])


# --- finding the server ---------------------------------------------------------------------------


def locate(opts: Options) -> tuple[Path, Config | None]:
    """The socket path, and the configuration it came from when one was read."""
    try:
        if opts.config:
            config = load_config(Path(opts.config))
            return local_socket_path(config.state_dir), config
        if os.environ.get(SOCKET_ENV):
            return Path(os.environ[SOCKET_ENV]), None
        if os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE.exists():
            config = load_config()
            return local_socket_path(config.state_dir), config
    except ConfigError as exc:
        raise SendmailError(EX_CONFIG, str(exc)) from None
    return local_socket_path(DEFAULT_STATE_DIR), None


def _hostname_word(text: str) -> str | None:
    try:
        return domain_to_ascii(text)
    except AddressError:
        return None


# --- the SMTP session -----------------------------------------------------------------------------


@dataclass(slots=True)
class Submission:
    """What to send, built once the server's greeting has named its host."""

    sender: Mailbox | None
    recipients: list[Mailbox]
    content: bytes
    params: MailParams
    rcpt_params: RcptParams


class _Session:
    def __init__(self, stream: SmtpStream, client: ClientConnection) -> None:
        self.stream = stream
        self.client = client

    def flush(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.stream.write(data)

    async def next_event(self) -> ClientEvent:
        while True:
            event = self.client.next_event()
            if event is not None:
                return event
            self.flush()
            await self.stream.drain()
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    data = await self.stream.read()
            except TimeoutError:
                raise SendmailError(EX_TEMPFAIL, "the mailward server did not answer in time; try again "
                                    "later.") from None
            if data:
                self.client.receive_data(data)
            else:
                self.client.receive_eof()


def _refusal(reply: Reply) -> str:
    enhanced = f"{reply.enhanced} " if reply.enhanced else ""
    return f"{reply.code} {enhanced}{' '.join(reply.lines)}".strip()


async def _connect(path: Path) -> SmtpStream:
    loop = asyncio.get_running_loop()
    try:
        _, stream = await loop.create_unix_connection(SmtpStream, str(path))
    except FileNotFoundError:
        raise SendmailError(EX_TEMPFAIL, f"the mailward server is not running (no socket at {path}); "
                            "start it with mailward serve.") from None
    except ConnectionRefusedError:
        raise SendmailError(EX_TEMPFAIL, f"the mailward server is not running (nothing listens on {path}); "
                            "start it with mailward serve.") from None
    except PermissionError:
        raise SendmailError(EX_NOPERM, f"this user may not use the mailward socket {path}; add the user to "
                            "the group of the mailward server (the socket is mode 0660).") from None
    except OSError as exc:
        raise SendmailError(EX_TEMPFAIL, f"cannot connect to the mailward server at {path} "
                            f"({exc.strerror or exc}); try again later.") from None
    return stream


_Builder = Callable[[Reply], Submission]


async def submit(path: Path, ehlo_name: str, build: _Builder) -> list[tuple[Mailbox, Reply]]:
    """Run one SMTP session; returns the recipients that were refused (empty: all queued).

    `build` makes the submission once the greeting has named the server's host, which bare
    addresses (``root``) belong to.
    """
    stream = await _connect(path)
    session = _Session(stream, ClientConnection(ehlo_name))
    try:
        return await _converse(session, build)
    finally:
        stream.close()


async def _converse(session: _Session, build: _Builder) -> list[tuple[Mailbox, Reply]]:
    client = session.client
    work: Submission | None = None
    remaining: list[Mailbox] = []
    refused: list[tuple[Mailbox, Reply]] = []
    quitting = False
    while True:
        event = await session.next_event()
        if isinstance(event, GreetingReceived):
            if event.reply.code != 220:
                raise _failure("refused the session", event.reply, EX_UNAVAILABLE)
            try:
                work = build(event.reply)
            except SendmailError:
                client.quit()
                session.flush()
                raise
            remaining = list(work.recipients)
            client.ehlo()
        elif isinstance(event, EhloRefused):
            raise _failure("refused EHLO", event.reply, EX_UNAVAILABLE)
        elif isinstance(event, EhloCompleted):
            assert work is not None
            _start(client, work, remaining)
        elif isinstance(event, ReadyForBody):
            assert work is not None
            client.send_body(work.content)
            client.end_body()
        elif isinstance(event, TransactionResult):
            assert work is not None
            if not 200 <= event.mail_reply.code < 300:
                raise _failure("refused the message", event.mail_reply, EX_DATAERR)
            data = event.data_reply
            if data is not None and not 200 <= data.code < 300:
                raise _failure("refused the message", data, EX_DATAERR)
            delivered = set(event.delivered)
            # RFC 5321 §4.5.3.1.10: "too many recipients" asks for the rest in another transaction.
            more = [mb for mb, reply in event.outcomes if (reply.code, reply.enhanced) == (452, "4.5.3")]
            remaining = more if delivered else []
            refused += [(mb, reply) for mb, reply in event.outcomes
                        if mb not in delivered and mb not in remaining]
            if remaining:
                _start(client, work, remaining)
            else:
                quitting = True
                client.quit()
        elif isinstance(event, ReplyReceived):
            return refused  # the answer to QUIT
        elif isinstance(event, ServerClosed | ClientProtocolError):
            if quitting:  # every transaction was finished; a missing 221 loses nothing
                return refused
            raise SendmailError(EX_TEMPFAIL, "the mailward server closed the connection before the message "
                                "was queued; try again later.")


def _failure(what: str, reply: Reply, permanent_status: int) -> SendmailError:
    status = EX_TEMPFAIL if reply.transient else permanent_status
    return SendmailError(status, f"the mailward server {what}: {_refusal(reply)}.")


def _start(client: ClientConnection, work: Submission, recipients: list[Mailbox]) -> None:
    client.start_transaction(work.sender, [(mb, work.rcpt_params) for mb in recipients], work.params,
                             size=len(work.content))


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(args)
    except SendmailError as exc:
        if exc.status == EX_OK:
            print(exc.text)
        else:
            print(f"{PROG}: {exc.text}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return EX_TEMPFAIL


def _main(argv: list[str]) -> int:
    opts = parse_args(argv)
    path, config = locate(opts)
    if opts.mode == "p":
        return _list_queue(config)
    try:
        data = sys.stdin.buffer.read()
    except OSError as exc:
        raise SendmailError(EX_IOERR, f"cannot read the message from standard input ({exc.strerror}).") \
            from None
    message = read_message(data, ignore_dots=opts.ignore_dots)
    # Each address with the status its being malformed earns: the caller's or the message's fault.
    wanted = [(a, EX_USAGE) for arg in opts.recipients for a in _address_list(arg, EX_USAGE)]
    if opts.extract:
        for _, value in message.values(_ADDRESS_HEADERS):
            wanted += [(a, EX_DATAERR) for a in header_addresses(value)]
    if not wanted:
        if opts.extract:
            raise SendmailError(EX_DATAERR, "no recipient addresses found in the To:, Cc: or Bcc: header.")
        raise SendmailError(EX_USAGE, "no recipients: name them as arguments, or use -t to take them from "
                            "the To:, Cc: and Bcc: headers.")
    message.remove(b"bcc")
    fallback = config.hostname if config is not None else _hostname_word(socket.gethostname()) or "localhost"

    def build(greeting: Reply) -> Submission:
        hostname = fallback
        if config is None and greeting.lines and greeting.lines[0].split():
            hostname = _hostname_word(greeting.lines[0].split()[0]) or fallback
        sender = sender_mailbox(opts.sender, hostname)
        recipients: list[Mailbox] = []
        for address, status in wanted:
            mailbox = qualify(address, hostname, status)
            if mailbox not in recipients:
                recipients.append(mailbox)
        complete_header(message, opts, sender, hostname)
        content = message.to_bytes()
        head = content.split(b"\r\n\r\n", 1)[0]
        eight_bit = opts.body_type == "8BITMIME" or not content.isascii()
        params = MailParams(body="8BITMIME" if eight_bit else None, smtputf8=not head.isascii(),
                            ret=opts.ret, envid=opts.envid)
        return Submission(sender, recipients, content, params, RcptParams(notify=opts.notify))

    refused = asyncio.run(submit(path, fallback, build))
    for mailbox, reply in refused:
        print(f"{PROG}: <{mailbox}>: {_refusal(reply)}", file=sys.stderr)
    if not refused:
        return EX_OK
    return EX_NOUSER if any(reply.permanent for _, reply in refused) else EX_TEMPFAIL


def _list_queue(config: Config | None) -> int:
    from mailward import queuetool

    if config is None:
        raise SendmailError(EX_CONFIG, "-bp needs the configuration to find the queue; pass -C FILE or set "
                            f"${CONFIG_ENV}.")
    return queuetool.run(argparse.Namespace(queue_command="list", json=False), config.queue.path)


if __name__ == "__main__":
    sys.exit(main())
