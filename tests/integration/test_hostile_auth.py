"""AUTH guessing against a running server: 1,000 wrong passwords for one user from one address,
then 1,000 from a hundred addresses, with the failure delays configured small so it runs fast.

What must hold: a user's password is checked at most `max_failures_per_user` times however the
guesses are spread; everything else is answered 454 4.7.0 without a check; the user still logs in
from the address they normally use; and no reply (code, text or time) tells an existing user from
one that does not exist.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from hostile import RecordProperty, Tally
from mailward_server import MailwardServer
from smtp_peer import Peer, Reply, plain_auth

from conftest import MakeServer

USER_LIMIT = 5
IP_LIMIT = 10
FAILED = (535, "5.7.8 Authentication credentials invalid")
LOCKED = (454, "4.7.0 Temporary authentication failure")
PASSWORDS = {"carol@example.test": "carol's own password", "dave@example.test": "dave's own password",
             "erin@example.test": "erin's own password"}


def start(make_server: MakeServer) -> MailwardServer:
    server = make_server(start=False, log_level="info", extra_toml=(
        f"[auth]\nmax_failures_per_ip = {IP_LIMIT}\nmax_failures_per_user = {USER_LIMIT}\n"
        "lockout_seconds = 120\nfailure_delay = 0.01\nmax_failure_delay = 0.05\n"))
    for user, password in PASSWORDS.items():
        server.cli("user", "add", user, "--password-stdin", stdin=password + "\n")
    server.start()
    return server


def connect(server: MailwardServer, source: str) -> Peer:
    peer = Peer(server.submissions, ca=server.ca, implicit_tls=True, source=source)
    peer.ehlo()
    return peer


def login(server: MailwardServer, source: str, user: str, password: str) -> Reply:
    with connect(server, source) as peer:
        return peer.cmd(f"AUTH PLAIN {plain_auth(user, password)}")


def guess(server: MailwardServer, source: str, user: str, attempts: int) -> list[Reply]:
    """Wrong passwords from one address, reconnecting whenever the server ends the session."""
    replies: list[Reply] = []
    while len(replies) < attempts:
        with connect(server, source) as peer:
            while len(replies) < attempts:
                try:
                    r = peer.cmd(f"AUTH PLAIN {plain_auth(user, f'guess {len(replies)}')}")
                except ConnectionError:
                    break
                if r.code == 421:  # too many errors on this connection: a new one
                    break
                replies.append(r)
    return replies


def tally_replies(tally: Tally, replies: list[Reply]) -> int:
    checks = 0
    for i, r in enumerate(replies):
        tally.check((r.code, r.first) in (FAILED, LOCKED), f"guess {i}: {r}")
        checks += (r.code, r.first) == FAILED
    return checks


def test_guessing_from_one_address(make_server: MakeServer, record_property: RecordProperty) -> None:
    server = start(make_server)
    user, password = "carol@example.test", PASSWORDS["carol@example.test"]
    assert login(server, "127.0.0.200", user, password).code == 235  # where carol usually is
    tally = Tally("AUTH guessing, one address")
    started = time.monotonic()
    replies = guess(server, "127.0.7.1", user, 1000)
    took = time.monotonic() - started
    checked = tally_replies(tally, replies)
    # One address, one user: the user's limit is reached first; every later guess is refused
    # without a password check.
    tally.check(checked == USER_LIMIT, f"{checked} passwords checked, the limit is {USER_LIMIT}")
    tally.check(login(server, "127.0.0.200", user, password).code == 235,
                "carol cannot log in from her usual address")
    # Another user from carol's usual address is unaffected; the guessing address is locked out
    # even for the right password, and so is carol from an address she never used.
    tally.check(login(server, "127.0.0.200", "erin@example.test", PASSWORDS["erin@example.test"]).code == 235,
                "another user cannot log in")
    r = login(server, "127.0.7.1", user, password)
    tally.check((r.code, r.first) == LOCKED, f"the right password from the guessing address: {r}")
    r = login(server, "127.0.7.2", user, password)
    tally.check((r.code, r.first) == LOCKED, f"carol from a new address during the lockout: {r}")
    record_property("hostile_note", f"1,000 AUTH guesses from one address answered in {took:.1f}s, "
                                    f"{checked} password checks")
    assert server.stop() == 0
    assert PASSWORDS[user] not in server.log()
    tally.record(record_property)


def test_guessing_from_many_addresses(make_server: MakeServer, record_property: RecordProperty) -> None:
    server = start(make_server)
    user, password = "dave@example.test", PASSWORDS["dave@example.test"]
    assert login(server, "127.0.0.201", user, password).code == 235
    tally = Tally("AUTH guessing, 100 addresses")
    sources = [f"127.0.8.{i}" for i in range(1, 101)]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda source: guess(server, source, user, 10), sources))
    took = time.monotonic() - started
    checked = sum(tally_replies(tally, replies) for replies in results)
    tally.check(checked == USER_LIMIT, f"{checked} passwords checked across addresses, the limit is "
                                       f"{USER_LIMIT}")
    tally.check(login(server, "127.0.0.201", user, password).code == 235,
                "dave cannot log in from his usual address")
    r = login(server, "127.0.8.200", user, password)
    tally.check((r.code, r.first) == LOCKED, f"dave from a new address during the lockout: {r}")
    record_property("hostile_note", f"1,000 AUTH guesses from 100 addresses answered in {took:.1f}s, "
                                    f"{checked} password checks")
    assert server.stop() == 0
    tally.record(record_property)


def test_replies_do_not_reveal_whether_a_user_exists(make_server: MakeServer,
                                                     record_property: RecordProperty) -> None:
    """Same code, same text and about the same time for a wrong password of a real user and of a
    name that does not exist, both before and after the lockout."""
    server = start(make_server)
    tally = Tally("AUTH user enumeration")
    seen: dict[str, list[tuple[int, str]]] = {}
    times: dict[str, list[float]] = {}
    # Alternating the two users, so a change in machine load affects both alike.
    for i in range(USER_LIMIT + 2):
        for n, user in enumerate(("erin@example.test", "nobody@example.test")):
            with connect(server, f"127.0.9.{n * 20 + i + 1}") as peer:
                t = time.monotonic()
                r = peer.cmd(f"AUTH PLAIN {plain_auth(user, 'wrong')}")
                times.setdefault(user, []).append(time.monotonic() - t)
                seen.setdefault(user, []).append((r.code, r.first))
    real, ghost = seen["erin@example.test"], seen["nobody@example.test"]
    expected = [FAILED] * USER_LIMIT + [LOCKED] * 2
    for i, (a, b) in enumerate(zip(real, ghost, strict=True)):
        tally.check(a == b == expected[i], f"attempt {i}: real user {a}, unknown user {b}")
    # Only the attempts that reached a password check (argon2 for a real hash or the dummy one).
    fast_real = statistics.median(times["erin@example.test"][:USER_LIMIT])
    fast_ghost = statistics.median(times["nobody@example.test"][:USER_LIMIT])
    ratio = fast_ghost / fast_real
    record_property("hostile_note", f"AUTH failure time, real user {fast_real * 1000:.0f} ms, unknown user "
                                    f"{fast_ghost * 1000:.0f} ms")
    tally.check(0.5 < ratio < 2.0, f"failure time real {fast_real:.3f}s vs unknown {fast_ghost:.3f}s")
    assert server.stop() == 0
    tally.record(record_property)


def test_a_burst_of_correct_logins_from_one_address_is_never_locked_out(make_server: MakeServer) -> None:
    """An application opening as many connections as one address may (10) and logging in on each
    at once, twice the per-user limit: every password check in flight might still fail, so the
    throttle makes some wait, but none is refused and nothing is locked out afterwards."""
    server = start(make_server)
    user, password = "erin@example.test", PASSWORDS["erin@example.test"]
    peers = [connect(server, "127.0.10.1") for _ in range(2 * USER_LIMIT)]
    barrier = threading.Barrier(len(peers))

    def auth(peer: Peer) -> Reply:
        barrier.wait()
        return peer.cmd(f"AUTH PLAIN {plain_auth(user, password)}")

    try:
        with ThreadPoolExecutor(len(peers)) as pool:
            replies = list(pool.map(auth, peers))
    finally:
        for peer in peers:
            peer.close()
    assert [r.code for r in replies] == [235] * len(peers), replies
    assert login(server, "127.0.10.1", user, password).code == 235
    assert server.stop() == 0
    assert "locked out" not in server.log()
