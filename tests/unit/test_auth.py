"""SASL exchanges, the argon2id user store and the AUTH throttle."""

from __future__ import annotations

import os
import stat
import threading
import time
import unicodedata
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from hypothesis import given
from hypothesis import strategies as st

from mailward import auth
from mailward.auth import (
    AuthThrottle,
    Challenge,
    Credentials,
    SaslFailure,
    UnsupportedMechanism,
    UserRecord,
    UserStore,
    UserStoreError,
    start_exchange,
)


def cheap_hasher(time_cost: int = 1) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=8, parallelism=1)


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[str] = []

    def verify(self, hash, password):
        self.verified.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith(".")


# --- SASL PLAIN ------------------------------------------------------------------------------


def plain(ir: bytes | None) -> object:
    return start_exchange("PLAIN", ir).step(None)


def test_plain_initial_response():
    exchange = start_exchange("PLAIN", b"\x00alice\x00s3cret")
    assert exchange.mechanism == "PLAIN"
    assert exchange.step(None) == Credentials("", "alice", "s3cret")
    assert exchange.done


def test_plain_after_empty_challenge():
    exchange = start_exchange("plain", None)
    assert exchange.step(None) == Challenge(b"")
    assert not exchange.done
    assert exchange.step(b"alice\x00alice\x00pw") == Credentials("alice", "alice", "pw")
    assert exchange.done


def test_plain_authzid_equal_ignoring_case():
    assert plain(b"Alice@Example.org\x00alice@example.org\x00pw") == Credentials(
        "Alice@Example.org", "alice@example.org", "pw"
    )


def test_plain_utf8_is_nfc_normalised():
    decomposed = unicodedata.normalize("NFD", "j\u00f6rg")
    result = plain(f"\x00{decomposed}\x00p\u00e4ss".encode())
    assert result == Credentials("", "j\u00f6rg", "p\u00e4ss")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", "authzid NUL authcid NUL password"),  # "=" as initial response
        (b"alice", "authzid NUL authcid NUL password"),
        (b"alice\x00secret", "authzid NUL authcid NUL password"),
        (b"\x00alice\x00secret\x00", "authzid NUL authcid NUL password"),
        (b"a\x00b\x00c\x00d", "authzid NUL authcid NUL password"),
        (b"\x00\x00secret", "empty authentication identity"),
        (b"\x00alice\x00", "empty password"),
        (b"\x00\x00", "empty authentication identity"),
        (b"bob\x00alice\x00secret", "differs from the authentication identity"),
        (b"\x00al\xffice\x00secret", "authentication identity is not UTF-8"),
        (b"\x00alice\x00se\xc3cret", "password is not UTF-8"),
        (b"\xfe\x00alice\x00secret", "authorization identity is not UTF-8"),
        (b"\x00alice\x00sec\x7fret", "password contains a control character"),
        (b"\x00ali\nce\x00secret", "authentication identity contains a control character"),
        (b"\x00alice\x00" + b"x" * (auth.MAX_FIELD_OCTETS + 1), "password longer than"),
    ],
)
def test_plain_malformed(message, reason):
    result = plain(message)
    assert isinstance(result, SaslFailure)
    assert reason in result.reason


def test_plain_malformed_after_challenge():
    exchange = start_exchange("PLAIN", None)
    assert exchange.step(None) == Challenge(b"")
    result = exchange.step(b"nonuls")
    assert isinstance(result, SaslFailure)
    assert exchange.done


@given(st.binary(max_size=64))
def test_plain_never_raises(data):
    result = plain(data)
    assert isinstance(result, Credentials | SaslFailure)
    if isinstance(result, Credentials):
        assert result.authcid and result.password
        assert result.authzid in ("", result.authzid) and (
            not result.authzid or result.authzid.casefold() == result.authcid.casefold()
        )


def test_credentials_repr_hides_password():
    assert "s3cret" not in repr(Credentials("", "alice", "s3cret"))


# --- SASL LOGIN ------------------------------------------------------------------------------


def test_login_two_prompts():
    exchange = start_exchange("LOGIN", None)
    assert exchange.step(None) == Challenge(b"Username:")
    assert exchange.step(b"alice") == Challenge(b"Password:")
    assert exchange.step(b"s3cret") == Credentials("", "alice", "s3cret")
    assert exchange.done


def test_login_initial_response_is_username():
    exchange = start_exchange("login", b"alice")
    assert exchange.step(None) == Challenge(b"Password:")
    assert exchange.step(b"s3cret") == Credentials("", "alice", "s3cret")


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ([b""], "empty authentication identity"),
        ([b"alice", b""], "empty password"),
        ([b"al\xffice"], "username is not UTF-8"),
        ([b"alice", b"\xff\xfe"], "password is not UTF-8"),
        ([b"ali\x00ce"], "username contains a control character"),
        ([b"alice", b"pass\rword"], "password contains a control character"),
        ([b"alice", None], "no response"),
    ],
)
def test_login_malformed(answers, reason):
    exchange = start_exchange("LOGIN", None)
    assert exchange.step(None) == Challenge(b"Username:")
    result = None
    for answer in answers:
        result = exchange.step(answer)
    assert isinstance(result, SaslFailure)
    assert reason in result.reason
    assert exchange.done


def test_login_empty_initial_response_fails():
    assert start_exchange("LOGIN", b"").step(None) == SaslFailure("empty authentication identity")


# --- SASL misuse and mechanisms ----------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2", "", "PLAIN "])
def test_unsupported_mechanism(mechanism):
    with pytest.raises(UnsupportedMechanism):
        start_exchange(mechanism, None)


def test_mechanisms_listed():
    assert auth.MECHANISMS == ("PLAIN", "LOGIN")
    for mechanism in auth.MECHANISMS:
        assert start_exchange(mechanism, None).mechanism == mechanism


def test_step_misuse_is_a_programming_error():
    finished = start_exchange("PLAIN", b"\x00a\x00b")
    finished.step(None)
    with pytest.raises(RuntimeError):
        finished.step(b"more")
    with pytest.raises(RuntimeError):
        start_exchange("LOGIN", None).step(b"alice")


# --- user store ------------------------------------------------------------------------------


@pytest.fixture
def users_path(tmp_path) -> Path:
    return tmp_path / "users"


@pytest.fixture
def store(users_path) -> UserStore:
    return UserStore(users_path, hasher=cheap_hasher())


def test_missing_file_means_no_users(store):
    assert store.list() == []
    assert store.get("alice") is None
    assert store.verify("alice", "pw") is None


def test_crud(store, users_path):
    alice = store.add("Alice@Example.org", "pw1", ["alice@example.org", "@Sales.Example.org"])
    assert alice.name == "alice@example.org"
    assert alice.addresses == ("alice@example.org", "@sales.example.org")
    bob = store.add("bob", "pw2")
    assert [r.name for r in store.list()] == ["alice@example.org", "bob"]
    assert store.get("ALICE@example.ORG") == alice

    with pytest.raises(UserStoreError, match="already exists") as info:
        store.add("alice@example.org", "other")
    assert_one_sentence(str(info.value))

    store.set_password("bob", "new")
    assert store.verify("bob", "pw2") is None
    assert store.verify("Bob", "new") == UserRecord("bob", store.get("bob").password_hash, ())
    assert store.get("bob").password_hash != bob.password_hash

    assert store.set_addresses("bob", ["bob@example.net"]).addresses == ("bob@example.net",)

    store.delete("BOB")
    assert store.get("bob") is None
    for change in (lambda: store.delete("bob"), lambda: store.set_password("bob", "x")):
        with pytest.raises(UserStoreError, match="there is no user bob") as info:
            change()
        assert_one_sentence(str(info.value))


def test_file_format_and_mode(store, users_path):
    store.add("alice", "pw", ["a@example.org", "@example.net"])
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o600
    lines = [line for line in users_path.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 1
    name, password_hash, addresses = lines[0].split(":")
    assert name == "alice"
    assert password_hash.startswith("$argon2id$")
    assert addresses == "a@example.org,@example.net"
    assert "pw" not in users_path.read_text().replace(password_hash, "")
    # Only the users file and its lock remain: no temporary files.
    assert sorted(p.name for p in users_path.parent.iterdir()) == [".users.lock", "users"]


def test_write_is_atomic(store, users_path, monkeypatch):
    store.add("alice", "pw")
    before = users_path.read_bytes()
    inode = users_path.stat().st_ino

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.add("bob", "pw")
    monkeypatch.undo()
    assert users_path.read_bytes() == before
    assert sorted(p.name for p in users_path.parent.iterdir()) == [".users.lock", "users"]
    assert store.get("bob") is None

    store.add("carol", "pw")
    assert users_path.stat().st_ino != inode  # replaced by rename, never rewritten in place


def test_reload_when_another_process_changes_the_file(users_path):
    server = UserStore(users_path, hasher=cheap_hasher())
    admin = UserStore(users_path, hasher=cheap_hasher())
    assert server.get("alice") is None
    admin.add("alice", "pw")
    assert server.verify("alice", "pw") is not None
    admin.delete("alice")
    assert server.get("alice") is None

    # A hand edit counts too.
    admin.add("bob", "pw")
    text = users_path.read_text().replace("bob:", "robert:")
    users_path.write_text(text)
    assert server.get("bob") is None
    assert server.verify("robert", "pw") is not None


def test_modification_rereads_before_writing(users_path):
    first = UserStore(users_path, hasher=cheap_hasher())
    second = UserStore(users_path, hasher=cheap_hasher())
    first.list()
    second.add("bob", "pw")
    first.add("alice", "pw")
    assert [r.name for r in second.list()] == ["alice", "bob"]


def test_comments_and_blank_lines(store, users_path):
    password_hash = cheap_hasher().hash("pw")
    users_path.write_text(f"# staff\n\n  alice:{password_hash}:\ncarol:{password_hash}\r\n")
    assert [r.name for r in store.list()] == ["alice", "carol"]
    assert store.verify("carol", "pw") is not None


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("alice", "line 2 is malformed"),
        ("alice:{h}:a@b:c", "line 2 is malformed"),
        ("alice:plaintext:", "line 2 has no argon2id password hash"),
        ("alice:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA:", "line 2 has no argon2id password hash"),
        (":{h}:", "line 2: the user name is empty"),
        ("al ice:{h}:", "line 2: the user name"),
        ("alice:{h}:not-an-address", "line 2: the sender address 'not-an-address'"),
        ("bob:{h}:\nBOB:{h}:", "line 3 repeats user bob"),
    ],
)
def test_malformed_line(store, users_path, line, fragment):
    users_path.write_text("# users\n" + line.replace("{h}", cheap_hasher().hash("pw")) + "\n")
    with pytest.raises(UserStoreError) as info:
        store.list()
    message = str(info.value)
    assert str(users_path) in message
    assert fragment in message
    assert_one_sentence(message)
    with pytest.raises(UserStoreError):
        store.verify("alice", "pw")


def test_non_utf8_line(store, users_path):
    users_path.write_bytes(b"al\xffice:x:\n")
    with pytest.raises(UserStoreError, match="line 1 is not UTF-8"):
        store.list()


def test_unreadable_file(tmp_path):
    directory = tmp_path / "users"
    directory.mkdir()
    with pytest.raises(UserStoreError, match="cannot be read") as info:
        UserStore(directory, hasher=cheap_hasher()).list()
    assert str(directory) in str(info.value)
    assert_one_sentence(str(info.value))


@pytest.mark.parametrize(
    ("name", "password", "addresses"),
    [
        ("", "pw", ()),
        ("a:b", "pw", ()),
        ("a b", "pw", ()),
        ("alice", "", ()),
        ("alice", "pass\x00word", ()),
        ("alice", "pw", ("nobody",)),
        ("alice", "pw", ("a,b@example.org",)),
    ],
)
def test_add_rejects_bad_input(store, name, password, addresses):
    with pytest.raises(UserStoreError) as info:
        store.add(name, password, addresses)
    assert_one_sentence(str(info.value))
    assert store.list() == []


def test_verify(store):
    store.add("alice", "correct horse")
    assert store.verify("alice", "correct horse") == store.get("alice")
    assert store.verify("ALICE", "correct horse") is not None
    assert store.verify("alice", "wrong") is None
    assert store.verify("alice", "") is None
    assert store.verify("", "correct horse") is None
    assert store.verify("nobody", "correct horse") is None


def test_verify_normalises_password(store):
    store.add("alice", unicodedata.normalize("NFD", "p\u00e4ss"))
    assert store.verify("alice", "p\u00e4ss") is not None


def test_unknown_user_still_costs_a_hash_verification(users_path):
    hasher = CountingHasher()
    store = UserStore(users_path, hasher=hasher)
    store.add("alice", "pw")
    hasher.verified.clear()
    assert store.verify("alice", "wrong") is None
    assert store.verify("nobody", "pw") is None
    assert store.verify("bad name", "pw") is None
    assert len(hasher.verified) == 3
    assert all(h.startswith("$argon2id$") for h in hasher.verified)


def test_verified_password_is_remembered_not_rehashed(users_path):
    hasher = CountingHasher()
    store = UserStore(users_path, hasher=hasher)
    store.add("alice", "pw")
    hasher.verified.clear()
    assert store.verify("alice", "pw") is not None
    assert store.verify("ALICE", "pw") is not None
    assert len(hasher.verified) == 1
    # Wrong passwords are never answered from memory: each costs a full check.
    assert store.verify("alice", "wrong") is None
    assert store.verify("alice", "wrong") is None
    assert len(hasher.verified) == 3


def test_verify_cached_answers_only_a_recently_verified_password(users_path):
    hasher = CountingHasher()
    store = UserStore(users_path, hasher=hasher)
    store.add("alice", "pw")
    hasher.verified.clear()
    assert store.verify_cached("alice", "pw") is None  # never verified yet
    assert store.verify("alice", "pw") is not None
    record = store.verify_cached("ALICE", "pw")
    assert record is not None and record.name == "alice"
    assert store.verify_cached("alice", "wrong") is None
    assert store.verify_cached("nobody", "pw") is None
    assert len(hasher.verified) == 1  # the fast path never runs argon2
    store.set_password("alice", "new")
    assert store.verify_cached("alice", "pw") is None
    assert UserStore(users_path, verified_ttl=0).verify_cached("alice", "new") is None


def test_cache_off_checks_every_login_in_full(users_path):
    hasher = CountingHasher()
    store = UserStore(users_path, hasher=hasher, verified_ttl=0)
    store.add("alice", "pw")
    hasher.verified.clear()
    assert store.verify("alice", "pw") is not None
    assert store.verify("alice", "pw") is not None
    assert len(hasher.verified) == 2


def test_remembered_password_stops_matching_when_it_changes(store):
    store.add("alice", "old")
    store.add("bob", "pw")
    assert store.verify("alice", "old") is not None
    store.set_password("alice", "new")
    assert store.verify("alice", "old") is None
    assert store.verify("alice", "new") is not None
    store.delete("alice")
    assert store.verify("alice", "new") is None
    assert store.verify("bob", "pw") is not None


def test_remembered_password_expires():
    from mailward.auth import UserRecord, _VerifiedLogins

    now = [0.0]
    logins = _VerifiedLogins(ttl=10.0, size=2, clock=lambda: now[0])
    alice, bob, carol = (UserRecord(n, f"$argon2id$h-{n}") for n in ("alice", "bob", "carol"))
    logins.remember(alice, "pw")
    assert logins.known(alice, "pw")
    assert not logins.known(alice, "pw2")
    assert not logins.known(UserRecord("alice", "$argon2id$other"), "pw")
    now[0] = 10.0
    assert not logins.known(alice, "pw")
    logins.remember(alice, "pw")
    logins.remember(bob, "pw")
    logins.remember(carol, "pw")  # over the size: the oldest goes
    assert not logins.known(alice, "pw")
    assert logins.known(bob, "pw") and logins.known(carol, "pw")


def test_successful_verify_upgrades_old_hash(users_path):
    UserStore(users_path, hasher=cheap_hasher(time_cost=1)).add("alice", "pw", ["a@example.org"])
    old = UserStore(users_path, hasher=cheap_hasher(time_cost=1)).get("alice").password_hash
    assert "t=1" in old
    store = UserStore(users_path, hasher=cheap_hasher(time_cost=2))
    assert store.verify("alice", "wrong") is None
    assert store.get("alice").password_hash == old
    assert store.verify("alice", "pw") is not None
    upgraded = store.get("alice")
    assert "t=2" in upgraded.password_hash
    assert upgraded.addresses == ("a@example.org",)
    assert store.verify("alice", "pw") is not None


def test_failed_hash_upgrade_does_not_fail_login(users_path, monkeypatch, caplog):
    UserStore(users_path, hasher=cheap_hasher(time_cost=1)).add("alice", "pw")
    store = UserStore(users_path, hasher=cheap_hasher(time_cost=2))

    def refuse(*args, **kwargs):
        raise UserStoreError("cannot write; fix it.")

    monkeypatch.setattr(store, "_write", refuse)
    assert store.verify("alice", "pw") is not None
    assert "upgraded password hash" in caplog.text


def test_threads_verify_while_users_change(store):
    store.add("alice", "pw")
    errors: list[BaseException] = []

    def login():
        try:
            for _ in range(20):
                assert store.verify("alice", "pw") is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=login) for _ in range(4)]
    for thread in threads:
        thread.start()
    for number in range(10):
        store.add(f"user{number}", "pw")
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list()) == 11


def test_default_hasher_is_argon2id():
    hasher = auth.default_hasher()
    assert hasher.type.name == "ID"
    assert hasher.memory_cost >= 19 * 1024


# --- may_send_as -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "sender", "allowed"),
    [
        (("alice@example.org",), "alice@example.org", True),
        (("alice@example.org",), "alice@EXAMPLE.Org", True),
        (("alice@example.org",), "alice@example.org.", True),
        (("alice@example.org",), "Alice@example.org", False),
        (("alice@example.org",), "alicex@example.org", False),
        (("alice@example.org",), "alice@example.net", False),
        (("alice@example.org",), "alice@sub.example.org", False),
        (("@example.net",), "anyone@Example.NET", True),
        (("@example.net",), "anyone@sub.example.net", False),
        (("@example.net", "alice@example.org"), "alice@example.org", True),
        (("alice@b\u00fccher.example",), "alice@xn--bcher-kva.example", True),
        (("alice@example.org",), "", False),
        (("alice@example.org",), "alice", False),
        (("alice@example.org",), "@example.org", False),
    ],
)
def test_may_send_as_listed(store, addresses, sender, allowed):
    record = store.add("alice", "pw", addresses)
    assert store.may_send_as(record, sender) is allowed
    assert store.may_send_as("alice", sender) is allowed


def test_may_send_as_login_name(store):
    store.add("Alice@Example.org", "pw")
    store.add("bob", "pw")
    assert store.may_send_as("alice@example.org", "alice@example.org")
    assert store.may_send_as("alice@example.org", "Alice@EXAMPLE.org")
    assert not store.may_send_as("alice@example.org", "bob@example.org")
    assert not store.may_send_as("bob", "bob@example.org")
    assert not store.may_send_as("nobody@example.org", "nobody@example.org")


# --- throttle --------------------------------------------------------------------------------


def test_delay_grows_and_caps():
    throttle = AuthThrottle()
    assert throttle.delay_for("192.0.2.1", "alice", 0.0) == 0.0
    delays = []
    for attempt in range(7):
        throttle.failure("192.0.2.1", f"user{attempt}", float(attempt))
        delays.append(throttle.delay_for("192.0.2.1", None, float(attempt)))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_user_lockout_and_expiry():
    throttle = AuthThrottle(user_limit=5, lockout=900.0)
    for attempt in range(4):
        throttle.failure(f"192.0.2.{attempt}", "Alice", 10.0 + attempt)
        assert throttle.check("198.51.100.1", "alice", 10.0 + attempt) is None
    throttle.failure("192.0.2.9", "alice", 20.0)
    assert throttle.check("198.51.100.1", "ALICE", 20.0) == pytest.approx(900.0)
    assert throttle.check("198.51.100.1", "alice", 500.0) == pytest.approx(420.0)
    assert throttle.check("198.51.100.1", "bob", 500.0) is None
    assert throttle.check("198.51.100.1", None, 500.0) is None
    assert throttle.check("198.51.100.1", "alice", 920.0) is None


def test_ip_lockout_across_user_names():
    throttle = AuthThrottle(ip_limit=10)
    for attempt in range(9):
        throttle.failure("203.0.113.7", f"user{attempt}", float(attempt))
    assert throttle.check("203.0.113.7", "someone", 9.0) is None
    throttle.failure("203.0.113.7", None, 9.0)
    assert throttle.check("203.0.113.7", "someone", 9.0) == pytest.approx(900.0)
    assert throttle.check("203.0.113.7", None, 9.0) == pytest.approx(900.0)
    assert throttle.check("203.0.113.8", "someone", 9.0) is None


def test_failures_outside_window_do_not_count():
    throttle = AuthThrottle(user_limit=3, window=60.0)
    for attempt in range(10):
        throttle.failure(f"192.0.2.{attempt}", "alice", attempt * 40.0)
        assert throttle.check("192.0.2.200", "alice", attempt * 40.0) is None
    assert throttle.delay_for("192.0.2.200", "alice", 360.0) == 1.0


def test_success_keeps_the_counts_a_guesser_built_up():
    """A login of the real user must not hand a guesser a fresh allowance for that user."""
    throttle = AuthThrottle(user_limit=5, ip_limit=10)
    for attempt in range(4):
        throttle.failure(f"192.0.2.{attempt}", "alice", float(attempt))
    throttle.success("198.51.100.1", "Alice", 4.0)
    throttle.failure("192.0.2.9", "alice", 5.0)
    assert throttle.check("192.0.2.10", "alice", 5.0) is not None
    assert throttle.check("198.51.100.1", "alice", 5.0) is None  # where she logged in
    assert throttle.delay_for("192.0.2.0", None, 5.0) == 0.5


def test_a_succeeding_check_in_flight_is_no_failure():
    throttle = AuthThrottle(user_limit=2, ip_limit=10, lockout=60.0)
    throttle.failure("192.0.2.1", "alice", 1.0)
    ticket = throttle.admit("192.0.2.1", "alice", 2.0)
    assert ticket is not None
    assert throttle.check("192.0.2.5", "alice", 2.0) is None  # in flight, not failed
    throttle.settle(ticket, failed=False, now=2.0)
    assert throttle.check("192.0.2.5", "alice", 2.0) is None
    assert throttle.delay_for("192.0.2.1", None, 2.0) == 0.5


def test_user_lockout_spares_addresses_the_user_logged_in_from():
    """Guessing alice's password from many addresses locks alice out everywhere except where she
    logged in recently; that address still has its own limit, and the exemption expires."""
    throttle = AuthThrottle(user_limit=5, ip_limit=10, lockout=900.0, known_for=3600.0)
    throttle.success("198.51.100.7", "alice", 0.0)
    for attempt in range(20):
        throttle.failure(f"192.0.2.{attempt}", "alice", 10.0 + attempt)
    assert throttle.check("192.0.2.200", "alice", 40.0) is not None  # a new address: locked
    assert throttle.check("198.51.100.7", "ALICE", 40.0) is None  # her usual one: not
    assert throttle.delay_for("198.51.100.7", "alice", 40.0) == 0.0
    assert throttle.check("198.51.100.7", "bob", 40.0) is None
    for attempt in range(10):
        throttle.failure("198.51.100.7", None, 50.0 + attempt)
    assert throttle.check("198.51.100.7", "alice", 60.0) is not None  # its own limit still holds
    throttle.success("198.51.100.8", "alice", 0.0)
    for attempt in range(5):
        throttle.failure(f"203.0.113.{attempt}", "alice", 3700.0 + attempt)
    assert throttle.check("198.51.100.8", "alice", 3705.0) is not None  # known_for has passed


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4():
    throttle = AuthThrottle(ip_limit=2)
    throttle.failure("2001:db8:1:2::1", None, 0.0)
    throttle.failure("2001:db8:1:2:ffff::9", None, 1.0)
    assert throttle.check("2001:db8:1:2::abcd", None, 1.0) is not None
    assert throttle.check("2001:db8:1:3::1", None, 1.0) is None
    throttle.failure("::ffff:192.0.2.5", None, 2.0)
    throttle.failure("192.0.2.5", None, 3.0)
    assert throttle.check("192.0.2.5", None, 3.0) is not None
    throttle.failure("local", None, 4.0)  # not an IP address (e.g. a Unix socket peer)
    assert throttle.check("local", None, 4.0) is None


def test_memory_is_bounded():
    throttle = AuthThrottle(max_entries=3)
    for number in range(10):
        throttle.failure(f"192.0.2.{number}", f"user{number}", float(number))
    assert len(throttle) == 6
    # The least recently failing are gone, the recent ones kept.
    assert throttle.delay_for("192.0.2.0", "user0", 10.0) == 0.0
    assert throttle.delay_for("192.0.2.9", None, 10.0) == 0.5


def test_stale_entries_are_evicted():
    throttle = AuthThrottle(window=60.0, lockout=60.0)
    for number in range(50):
        throttle.failure(f"192.0.2.{number}", None, 0.0)
    throttle.failure("198.51.100.1", None, 1000.0)
    assert len(throttle) == 1


def test_locked_entry_survives_until_lockout_ends():
    throttle = AuthThrottle(user_limit=1, window=10.0, lockout=100.0)
    throttle.failure("192.0.2.1", "alice", 0.0)
    throttle.failure("192.0.2.2", "bob", 50.0)
    assert throttle.check("192.0.2.3", "alice", 50.0) == pytest.approx(50.0)
    throttle.failure("192.0.2.2", "carol", 150.0)
    assert throttle.check("192.0.2.3", "alice", 150.0) is None


def test_throttle_is_fast_enough_for_a_flood():
    throttle = AuthThrottle(max_entries=1000)
    started = time.perf_counter()
    for number in range(20_000):
        throttle.failure(f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}", "root", number / 100)
    assert time.perf_counter() - started < 2.0
    assert len(throttle) <= 1001


def test_checks_in_flight_hold_guesses_within_the_limit():
    """Parallel guesses cannot all pass `check` first: checks in flight count against the limit."""
    throttle = AuthThrottle(user_limit=3, ip_limit=10)
    tickets = [throttle.admit(f"192.0.2.{n}", "alice", 1.0) for n in range(3)]
    assert all(t is not None for t in tickets)
    assert throttle.admit("192.0.2.9", "alice", 1.0) is None  # waits: three could still fail
    assert throttle.check("192.0.2.9", "alice", 1.0) is None  # ... but is not locked out
    for ticket in tickets:
        assert ticket is not None
        throttle.settle(ticket, failed=True, now=2.0)
    assert throttle.check("192.0.2.9", "alice", 2.0) is not None
    assert throttle.admit("192.0.2.9", "alice", 2.0) is None


def test_a_burst_of_correct_logins_never_locks_its_address():
    """Fifty connections of one application logging in at once wait for slots; none is refused."""
    throttle = AuthThrottle(ip_limit=10, user_limit=5)
    waiting = 50
    admitted_total = 0
    now = 0.0
    while waiting:
        batch = []
        while waiting and (ticket := throttle.admit("127.0.0.1", "app@example.org", now)) is not None:
            batch.append(ticket)
            waiting -= 1
        assert batch, "no slot although every earlier check succeeded"
        for ticket in batch:
            throttle.settle(ticket, failed=False, now=now)
            throttle.success("127.0.0.1", "app@example.org", now)
        admitted_total += len(batch)
        now += 0.01
    assert admitted_total == 50
    assert throttle.check("127.0.0.1", "app@example.org", now) is None
    assert throttle.delay_for("127.0.0.1", "app@example.org", now) == 0.0


def test_settled_slots_are_given_back():
    throttle = AuthThrottle(ip_limit=2, user_limit=2)
    first = throttle.admit("198.51.100.7", "bob", 0.0)
    second = throttle.admit("198.51.100.7", "bob", 0.0)
    assert first is not None and second is not None
    assert throttle.admit("198.51.100.7", "bob", 0.0) is None
    throttle.settle(first, failed=False, now=0.5)
    third = throttle.admit("198.51.100.7", "bob", 0.5)
    assert third is not None
    throttle.settle(second, failed=True, now=0.6)
    throttle.settle(third, failed=False, now=0.6)
    # One failure counted: one more check may run, a second waits for it.
    assert throttle.admit("198.51.100.7", "bob", 0.7) is not None
    assert throttle.admit("198.51.100.7", "bob", 0.7) is None
