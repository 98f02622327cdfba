"""Local delivery without sockets: who a recipient is, Maildir files on a real file system, forwarding
through a real queue, disk errors, and the Deliverer's log line for local recipients."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailward.auth import UserStore
from mailward.config import config_from_dict
from mailward.delivery import Deliverer
from mailward.delivery.local import (
    Forward,
    LocalDelivery,
    LocalMailbox,
    LocalRecipients,
    LocalResult,
    Problem,
    Resolution,
    mailbox_name,
    maildir_file_name,
    write_maildir,
)
from mailward.queue import Envelope, Recipient, RecipientState, StoredMessage
from mailward.queue.sqlite import SqliteQueue

DOMAINS = ("example.test", "other.test")
BODY = b"Received: from c by mx\r\nSubject: hi\r\n\r\nhello\r\n.dot\r\n"


def recipients(users: set[str] | None = None, catch_all: str | None = None,
               **aliases: list[str]) -> LocalRecipients:
    known = {"alice", "bob", "carol"} if users is None else users
    return LocalRecipients(local_domains=DOMAINS, default_domain="example.test",
                           aliases={k.replace("_", "-"): v for k, v in aliases.items()},
                           catch_all=catch_all, is_user=known.__contains__)


def box(user: str, domain: str = "example.test") -> LocalMailbox:
    return LocalMailbox(user, domain)


def message(*rcpts: str, sender: str = "sender@remote.test", body: bytes = BODY,
            notify: frozenset[str] = frozenset()) -> StoredMessage:
    env = Envelope(sender=sender, client_ip="192.0.2.9", client_helo="c", listener="mx",
                   received_at=time.time())
    # The queue never holds CR, LF or NUL; the hostile-name test still hands such names to deliver().
    states = tuple(RecipientState(Recipient(r, notify), "queued") for r in rcpts if "\x00" not in r)
    return StoredMessage(id="0TEST", envelope=env, recipients=states, size=len(body), digest="0" * 64,
                         created_at=time.time())


def agent(root: Path, resolver: LocalRecipients | None = None, **kw: Any) -> LocalDelivery:
    return LocalDelivery(resolver or recipients(), maildir=root, hostname="mx.example.test", **kw)


def deliver(local: LocalDelivery, *rcpts: str, body: bytes = BODY, **kw: Any) -> dict[str, LocalResult]:
    return asyncio.run(local.deliver(message(*rcpts, body=body, **kw), body, list(rcpts)))


def files(root: Path, user: str) -> list[Path]:
    new = root / user / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


# --- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("local", "name"), [
    ("alice", "alice"), ("Alice", "alice"), ("ALICE.Smith", "alice.smith"), ("a_b-c=d+e", "a_b-c=d+e"),
    ("jürgen", "jürgen"), ("\uff2a", "\uff4a"), ("a" * 64, "a" * 64),
    ("", None), (".", None), ("..", None), (".hidden", None), ("../evil", None), ("a/b", None),
    ("a\\b", None), ("a\x00b", None), ("a\nb", None), ("a b", None), ("-rf", None), ("_x", None),
    ("a" * 65, None), ("~root", None), ("a:b", None),
])
def test_mailbox_names_are_one_safe_directory(local: str, name: str | None) -> None:
    assert mailbox_name(local) == name


def test_maildir_file_names_follow_the_convention_and_are_unique() -> None:
    pattern = re.compile(rf"1700000000\.M123456P{os.getpid()}Q(\d+)\.mx\\057a\\072b,S=42")
    first = maildir_file_name(1700000000.123456, 42, host="mx/a:b")
    second = maildir_file_name(1700000000.123456, 42, host="mx/a:b")
    m1, m2 = pattern.fullmatch(first), pattern.fullmatch(second)
    assert m1 and m2, (first, second)
    assert int(m2[1]) == int(m1[1]) + 1  # the same microsecond still gives another name


# --- who a recipient is ---------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "expected"), [
    ("alice@example.test", Resolution((box("alice"),), direct=True)),
    ("ALICE@other.test", Resolution((box("alice", "other.test"),), direct=True)),
    ("alice+news@example.test", Resolution((box("alice"),), direct=True)),
    ("nobody@example.test", Resolution((), (Problem("5.1.1 <nobody@example.test>: no such user here"),))),
    ("../alice@example.test",
     Resolution((), (Problem("5.1.1 <../alice@example.test>: no such user here"),))),
])
def test_users(address: str, expected: Resolution) -> None:
    assert recipients().resolve(address) == expected


def test_hostile_local_parts_never_reach_the_user_lookup() -> None:
    asked: list[str] = []

    def everyone(name: str) -> bool:
        asked.append(name)
        return True

    r = LocalRecipients(local_domains=DOMAINS, default_domain="example.test", aliases={}, catch_all=None,
                        is_user=everyone)
    for local in ("..", "../../etc", "a/b", ".ssh", "x\x00y", "/abs"):
        assert r.resolve(f"{local}@example.test").targets == ()
    assert asked == []


def test_aliases_expand_to_users_local_addresses_and_remote_addresses() -> None:
    r = recipients(postmaster=["alice"], team=["Bob", "carol@other.test", "dan@remote.test", "postmaster"],
                   all_users=["team", "alice@example.test"])
    assert r.resolve("Postmaster@example.test") == Resolution((box("alice"),))
    assert r.resolve("team@other.test") == Resolution(
        (box("bob", "other.test"), box("carol", "other.test"), Forward("dan@remote.test"),
         box("alice", "other.test")))
    # Duplicates collapse: alice is reached twice through all-users.
    assert r.resolve("all-users@example.test").targets == (
        box("bob"), box("carol", "other.test"), Forward("dan@remote.test"), box("alice"))
    assert r.resolve("postmaster").targets == (box("alice"),)  # <postmaster> without a domain


def test_alias_names_win_and_subaddresses_fall_back() -> None:
    r = recipients(alice_sales=["bob"], carol=["bob"])
    assert r.resolve("alice-sales@example.test").targets == (box("bob"),)
    assert r.resolve("carol@example.test").targets == (box("bob"),)  # an alias shadows the user
    assert r.resolve("carol+x@example.test").targets == (box("bob"),)
    assert r.resolve("alice+x@example.test").targets == (box("alice"),)


def test_alias_loops_and_self_reference() -> None:
    r = recipients(a=["b"], b=["c", "a"], c=["bob"], alice=["alice", "alice@remote.test"])
    looped = r.resolve("a@example.test")
    assert looped.targets == (box("bob"),)  # what can be delivered is; the loop is reported
    assert looped.problems == (Problem("5.4.6 alias loop: a -> b -> a"),)
    only_loop = recipients(x=["y"], y=["x"]).resolve("x@example.test")
    assert only_loop == Resolution((), (Problem("5.4.6 alias loop: x -> y -> x"),))
    # Naming itself keeps a copy in the user's own mailbox, as in aliases(5).
    assert r.resolve("alice@example.test").targets == (box("alice"), Forward("alice@remote.test"))
    deep = recipients(**{f"n{i}": [f"n{i + 1}"] for i in range(30)})
    assert deep.resolve("n0@example.test").problems[0].reply.startswith("5.4.6 aliases nested deeper")


def test_catch_all_takes_unknown_names_only() -> None:
    r = recipients(catch_all="carol", broken=["ghost"])
    assert r.resolve("nobody@other.test").targets == (box("carol", "other.test"),)
    assert r.resolve("../../x@example.test").targets == (box("carol"),)  # still inside the root
    assert r.resolve("alice@example.test").targets == (box("alice"),)
    # An alias pointing at no user is a configuration mistake, not an unknown name.
    assert r.resolve("broken@example.test").problems == (
        Problem("5.1.1 <ghost@example.test>: no such user here"),)
    assert recipients(catch_all="x@remote.test").resolve("z@example.test").targets == (
        Forward("x@remote.test"),)


def test_lmtp_mode_passes_local_parts_on_as_they_came() -> None:
    r = LocalRecipients(local_domains=DOMAINS, default_domain="example.test", aliases={"sales": ["bob"]},
                        catch_all="carol", is_user=None)
    assert r.resolve("Alice+Tag@example.test") == Resolution((box("Alice+Tag"),), direct=True)
    assert r.resolve("sales@example.test") == Resolution((box("bob"),))
    assert r.catch_all_for("other.test") == Resolution((box("carol", "other.test"),))


# --- Maildir ----------------------------------------------------------------------------------------

def test_first_delivery_creates_the_maildir_0700_and_writes_through_tmp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mail"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        where = next((str(p.relative_to(tmp_path)) for p in [root / "alice" / "new", root / "alice", root]
                      if p.exists() and os.stat(p).st_ino == st.st_ino), "?")
        synced.append(f"{kind}:{where}")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(0o022)
    try:
        path = write_maildir(root, "alice", b"Subject: x\n\nbody\n", 1700000000.5)
    finally:
        os.umask(old)
    assert path.parent == root / "alice" / "new"
    assert path.read_bytes() == b"Subject: x\n\nbody\n"
    assert path.name.endswith(",S=17")
    for d in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(root / "alice" / d).st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list((root / "alice" / "tmp").iterdir()) == []
    # The file before its rename, new/ after it; on first delivery the new directories too.
    assert synced[-2:] == ["file:?", "dir:mail/alice/new"], synced
    assert "dir:mail/alice" in synced and "dir:mail" in synced
    synced.clear()
    write_maildir(root, "alice", b"second\n", 1700000001.0)
    assert synced == ["file:?", "dir:mail/alice/new"]  # the directories already exist


def test_write_maildir_refuses_a_name_that_is_not_one_directory(tmp_path: Path) -> None:
    for name in ("..", "../x", "a/b", ".x", "Alice"):
        with pytest.raises(ValueError):
            write_maildir(tmp_path / "mail", name, b"x", 1.0)
    assert list(tmp_path.iterdir()) == []


def test_delivery_prepends_return_path_and_delivered_to_with_lf_line_ends(tmp_path: Path) -> None:
    results = deliver(agent(tmp_path), "Alice@example.test", "bob+x@other.test")
    assert results["Alice@example.test"].outcome.status == "delivered"
    assert results["Alice@example.test"].outcome.reply == "2.0.0 delivered to maildir of alice"
    assert results["Alice@example.test"].relay == "local"
    [a] = files(tmp_path, "alice")
    assert a.read_bytes() == (b"Return-Path: <sender@remote.test>\nDelivered-To: Alice@example.test\n"
                              b"Received: from c by mx\nSubject: hi\n\nhello\n.dot\n")
    [b] = files(tmp_path, "bob")
    assert b.read_bytes().startswith(b"Return-Path: <sender@remote.test>\nDelivered-To: bob+x@other.test\n")
    null = asyncio.run(agent(tmp_path).deliver(message("carol@example.test", sender=""), BODY,
                                               ["carol@example.test"]))
    assert null["carol@example.test"].outcome.status == "delivered"
    assert files(tmp_path, "carol")[0].read_bytes().startswith(b"Return-Path: <>\n")


def test_one_copy_per_mailbox_and_unknown_users_fail(tmp_path: Path) -> None:
    local = agent(tmp_path, recipients(postmaster=["alice"]))
    results = deliver(local, "alice@example.test", "postmaster@other.test", "ghost@example.test")
    assert {r: v.outcome.status for r, v in results.items()} == {
        "alice@example.test": "delivered", "postmaster@other.test": "delivered",
        "ghost@example.test": "failed"}
    assert results["ghost@example.test"].outcome.enhanced == "5.1.1"
    assert results["ghost@example.test"].outcome.reply == "5.1.1 <ghost@example.test>: no such user here"
    assert len(files(tmp_path, "alice")) == 1


def test_hostile_local_parts_do_not_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    (tmp_path / "evil").mkdir()
    everyone = LocalRecipients(local_domains=DOMAINS, default_domain="example.test", aliases={},
                               catch_all=None, is_user=lambda name: True)
    hostile = ["../evil@example.test", "..@example.test", "a/../../evil@example.test", ".evil@example.test",
               "/tmp@example.test", "x\x00y@example.test", "..%2fevil@example.test"]
    results = deliver(agent(root, everyone), *hostile)
    assert {r.outcome.status for r in results.values()} == {"failed"}
    assert list((tmp_path / "evil").iterdir()) == []
    assert not root.exists() or all(p.is_relative_to(root) for p in root.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]
    # With a catch-all they are simply unknown names: the mail goes to the catch-all's mailbox.
    caught = deliver(agent(root, recipients(catch_all="carol")), "../evil@example.test")
    assert caught["../evil@example.test"].outcome.status == "delivered"
    assert [p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()] == ["carol"]


def test_a_recipient_already_delivered_to_is_a_loop(tmp_path: Path) -> None:
    looped = b"Delivered-To: <Alice@Example.test>\r\nSubject: again\r\n\r\nx\r\n"
    results = deliver(agent(tmp_path), "alice@example.test", "bob@example.test", body=looped)
    assert results["alice@example.test"].outcome.status == "failed"
    loop = results["alice@example.test"].outcome
    assert loop.reply == "5.4.6 mail forwarding loop for <alice@example.test>"
    assert results["bob@example.test"].outcome.status == "delivered"
    assert files(tmp_path, "alice") == []


# --- disk trouble -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "hint"), [
    (errno.ENOSPC, "free disk space"), (errno.EACCES, "give the mailward user write access there"),
    (errno.EDQUOT, "raise the disk quota"), (errno.EIO, "check the file system"),
])
def test_disk_errors_defer_with_one_log_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture, code: int, hint: str) -> None:
    real_open = os.open

    def failing_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if "/tmp/" in str(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", failing_open)
    with caplog.at_level(logging.ERROR, "mailward.delivery"):
        results = deliver(agent(tmp_path / "mail"), "alice@example.test")
    outcome = results["alice@example.test"].outcome
    assert (outcome.status, outcome.enhanced, outcome.reply) == (
        "deferred", "4.3.0", "4.3.0 mailbox temporarily unavailable")
    [record] = caplog.records
    text = record.getMessage()
    assert text.startswith("0TEST: delivery to the maildir of alice failed at ")
    assert os.strerror(code) in text and f"; {hint}, the message stays queued and is retried" in text
    assert "\n" not in text
    assert list((tmp_path / "mail" / "alice" / "tmp").iterdir()) == []


def test_a_file_in_the_way_of_the_maildir_defers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    (root / "alice").write_text("not a directory")
    with caplog.at_level(logging.ERROR, "mailward.delivery"):
        results = deliver(agent(root), "alice@example.test")
    assert results["alice@example.test"].outcome.status == "deferred"
    assert "move the file that is in the way" in caplog.text


def test_a_partial_write_leaves_nothing_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_maildir(tmp_path, "alice", b"data", 1.0)
    assert list((tmp_path / "alice" / "tmp").iterdir()) == []
    assert list((tmp_path / "alice" / "new").iterdir()) == []


# --- forwarding through the queue -------------------------------------------------------------------

def test_remote_alias_targets_become_one_new_queued_message(tmp_path: Path) -> None:
    async def run() -> None:
        queue = await SqliteQueue.open(tmp_path / "q.db")
        try:
            r = recipients(team=["alice", "dan@remote.test", "erin@Remote.Test"], fwd=["dan@remote.test"])
            local = agent(tmp_path / "mail", r, queue=queue)
            msg = message("team@example.test", "fwd@example.test", notify=frozenset({"FAILURE"}))
            results = await local.deliver(msg, BODY, ["team@example.test", "fwd@example.test"])
            [(stored, body)] = [(m, b"".join([c async for c in await queue.open_body(m.id)]))
                                for m in await queue.list()]
            assert stored.envelope.sender == "sender@remote.test" and stored.envelope.listener == "forward"
            assert [(s.recipient.address, s.recipient.dsn_notify, s.recipient.dsn_orcpt)
                    for s in stored.recipients] == [
                ("dan@remote.test", frozenset({"FAILURE"}), "rfc822;team@example.test"),
                ("erin@remote.test", frozenset({"FAILURE"}), "rfc822;team@example.test")]
            assert body == b"Delivered-To: team@example.test\r\n" + BODY
            team = results["team@example.test"].outcome
            assert team.status == "delivered"
            assert team.reply == (f"2.0.0 delivered to maildir of alice; forwarded to <dan@remote.test> as "
                                  f"{stored.id}; forwarded to <erin@remote.test> as {stored.id}")
            assert results["fwd@example.test"].outcome.reply == \
                f"2.0.0 forwarded to <dan@remote.test> as {stored.id}"
            # The copy coming back is recognised by the header it carries.
            again = await local.deliver(message("team@example.test"), body, ["team@example.test"])
            assert again["team@example.test"].outcome.enhanced == "5.4.6"
        finally:
            await queue.close()

    asyncio.run(run())


def test_forwarding_without_a_queue_defers(tmp_path: Path) -> None:
    results = deliver(agent(tmp_path, recipients(ext=["x@remote.test", "alice"])), "ext@example.test")
    assert results["ext@example.test"].outcome.reply == "4.3.0 forwarding is not available"
    assert len(files(tmp_path, "alice")) == 1  # delivered now, and again on the retry (as Postfix)


# --- from the configuration -------------------------------------------------------------------------

def make_config(tmp_path: Path, **local: Any) -> Any:
    return config_from_dict({
        "listener": [], "hostname": "mx.example.test", "state_dir": str(tmp_path),
        "local_domains": list(DOMAINS), "local": local,
    }, "test", base_dir=tmp_path)


def test_users_come_from_the_users_file_and_existing_maildirs(tmp_path: Path) -> None:
    config = make_config(tmp_path, alias=[{"name": "postmaster", "targets": ["alice"]}])
    store = UserStore(config.auth.users_file)
    store.add("alice@example.test", "pw-alice-1")
    store.add("bob", "pw-bob-1")
    store.add("carol@elsewhere.test", "pw-carol-1")  # a login, but not in a local domain
    (tmp_path / "mail" / "dora").mkdir(parents=True)  # a mailbox without a login
    local = LocalDelivery.from_config(config)
    r = local.recipients
    assert r.resolve("Alice@other.test").targets == (box("alice", "other.test"),)
    assert r.resolve("bob@example.test").targets == (box("bob"),)
    assert r.resolve("dora@example.test").targets == (box("dora"),)
    assert r.resolve("carol@example.test").targets == ()
    assert r.resolve("postmaster").targets == (box("alice"),)
    assert local.maildir == tmp_path / "mail" and local.lmtp is None


def test_lmtp_from_the_configuration(tmp_path: Path) -> None:
    tcp = LocalDelivery.from_config(make_config(tmp_path, lmtp="127.0.0.1:24"))
    assert tcp.lmtp is not None and tcp.lmtp.relay == "lmtp[127.0.0.1]:24"
    assert tcp.recipients.is_user is None
    unix = LocalDelivery.from_config(make_config(tmp_path, lmtp="unix:/run/dovecot/lmtp"))
    assert unix.lmtp is not None and unix.lmtp.relay == "lmtp[/run/dovecot/lmtp]"


# --- through the Deliverer --------------------------------------------------------------------------

def test_the_deliverer_logs_local_deliveries_like_remote_ones(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, catch_all="nobody-home")
    UserStore(config.auth.users_file).add("alice", "pw-alice-1")

    async def run() -> None:
        queue = await SqliteQueue.open(tmp_path / "q.db")
        deliverer = Deliverer(config, queue, None, LocalDelivery.from_config(config, queue), owner="t:1")
        task = asyncio.create_task(deliverer.run())
        try:
            env = Envelope(sender="s@remote.test", client_ip="192.0.2.9", client_helo="c", listener="mx",
                           received_at=time.time())
            async with await queue.begin(env) as txn:
                await txn.add_rcpt(Recipient("alice@example.test"))
                await txn.add_rcpt(Recipient("ghost@example.test"))
                await txn.write_body(BODY)
                mid = await txn.commit()
            await until(lambda: _gone(queue, mid))
        finally:
            await deliverer.stop(grace=1)
            await asyncio.wait_for(task, 2)
            await queue.close()

    with caplog.at_level(logging.INFO, "mailward.delivery"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "to=<" in r.getMessage()]
    assert any(re.fullmatch(r"\w+: to=<alice@example\.test>, relay=local, delay=[0-9.]+, tls=plaintext, "
                            r"dsn=2\.0\.0, status=sent \(2\.0\.0 delivered to maildir of alice\)", ln)
               for ln in lines), lines
    assert any(re.fullmatch(r"\w+: to=<ghost@example\.test>, relay=local, delay=[0-9.]+, tls=plaintext, "
                            r"dsn=5\.1\.1, status=bounced \(5\.1\.1 <nobody-home@example\.test>: no such "
                            r"user here\)", ln) for ln in lines), lines
    assert len(files(tmp_path / "mail", "alice")) == 1


async def _gone(queue: SqliteQueue, mid: str) -> bool:
    return await queue.get(mid) is None


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
