"""Downgrade resistance of outbound sessions against real loopback peers.

A level that demands TLS meets STARTTLS stripped from EHLO, a 454 to STARTTLS, a broken handshake
or a certificate that does not match: the session stops before MAIL with a temporary reason
(4.7.4, 4.7.0, 4.7.5) and is never retried in clear. At `may` only the broken handshake is such a
failure, and it is retried in clear only when the operator opted in. The TLS requirements come
from `policy.plan` with hand-made DNS and TLSA facts, as the Deliverer would build them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from mailward_server import MailwardServer
from test_delivery import (
    PickyServer,
    StartTlsMode,
    deliveries,
    delivery_toml,
    message,
    route,
    submit_mx,
    wait_until,
)

from conftest import MakeServer
from mailward.delivery.attempt import AttemptError, AttemptSettings, Session
from mailward.delivery.dane import association_data
from mailward.delivery.policy import (
    Candidate,
    Destination,
    HostFacts,
    RouteFacts,
    SecurityLevel,
    TlsaFacts,
    TlsaRecord,
    plan,
)

SETTINGS = AttemptSettings(helo_name="client.example.org", connect_timeout=5, command_timeout=5,
                           data_timeout=5)
HOST = "mx.picky.test"
EE = TlsaRecord(3, 1, 1, bytes(range(32)))


def candidate(level: SecurityLevel, port: int, *, tlsa: tuple[TlsaRecord, ...] = (EE,), host: str = HOST,
              ca_file: Path | None = None, retry: bool = False) -> Candidate:
    """The first candidate `plan` gives for one DNSSEC-secure MX host on 127.0.0.1:port."""
    dest = Destination(key=f"mx:{host}", kind="mx", domain="picky.test", port=port, level=level,
                       ca_file=ca_file, level_source="the test", may_retry_plaintext=retry)
    facts = RouteFacts((HostFacts(host, ("127.0.0.1",), 10, secure=True),), mx_secure=True)
    decision = plan(dest, facts, tlsa={host: TlsaFacts("secure", tlsa, host)})
    assert decision.candidates, decision
    return decision.candidates[0]


async def open_and_close(c: Candidate, *, plaintext: bool = False) -> Session:
    session = await Session.open(c, SETTINGS, plaintext=plaintext)
    await session.close()
    return session


@pytest.fixture(params=["absent", "refuse", "broken"])
def faulty(request: pytest.FixtureRequest) -> Iterator[PickyServer]:
    with PickyServer(starttls=request.param) as server:
        yield server


EXPECTED: dict[StartTlsMode, tuple[str, str]] = {
    "absent": ("4.7.4", "does not offer STARTTLS"),
    "refuse": ("4.7.4", "refused STARTTLS: 454 4.7.0 TLS not available"),
    "broken": ("4.7.0", f"TLS with {HOST}[127.0.0.1]"),
}


@pytest.mark.parametrize("level", [SecurityLevel.ENCRYPT, SecurityLevel.VERIFY, SecurityLevel.DANE,
                                   SecurityLevel.DANE_ONLY, SecurityLevel.SECURE])
def test_levels_that_demand_tls_stop_before_mail(faulty: PickyServer, level: SecurityLevel) -> None:
    c = candidate(level, faulty.port, retry=True)  # the opt-in must not matter here
    assert c.tls.required and not c.tls.plaintext_after_failed_handshake
    with pytest.raises(AttemptError) as err:
        asyncio.run(open_and_close(c))
    status, text = EXPECTED[faulty.starttls]
    assert (err.value.status, err.value.retry_plaintext) == (status, False), err.value
    assert text in err.value.reason
    assert err.value.tls.failure and not err.value.tls.active
    assert faulty.mails == 0 and faulty.received == []


def test_unusable_tlsa_records_still_demand_tls(faulty: PickyServer) -> None:
    c = candidate(SecurityLevel.DANE, faulty.port, tlsa=(TlsaRecord(1, 1, 1, bytes(32)),))
    assert (c.tls.level, c.tls.required, c.tls.verify) == (SecurityLevel.ENCRYPT, True, "none")
    with pytest.raises(AttemptError) as err:
        asyncio.run(open_and_close(c))
    assert err.value.status == EXPECTED[faulty.starttls][0] and faulty.mails == 0


def test_may_goes_on_in_clear_only_where_tls_never_started(faulty: PickyServer) -> None:
    c = candidate(SecurityLevel.MAY, faulty.port)
    if faulty.starttls == "broken":
        with pytest.raises(AttemptError) as err:
            asyncio.run(open_and_close(c))
        assert (err.value.status, err.value.retry_plaintext) == ("4.7.0", False)
    else:
        # Nothing offered, or 454: opportunistic TLS was never going to happen; plaintext is may.
        session = asyncio.run(open_and_close(c))
        assert not session.tls.active and session.tls.failure
    assert faulty.mails == 0


def test_may_retries_a_broken_handshake_in_clear_when_allowed() -> None:
    with PickyServer(starttls="broken") as broken:
        c = candidate(SecurityLevel.MAY, broken.port, retry=True)
        with pytest.raises(AttemptError) as err:
            asyncio.run(open_and_close(c))
        assert err.value.retry_plaintext  # the Deliverer then opens once more, in plaintext
        session = asyncio.run(open_and_close(c, plaintext=True))
        assert not session.tls.active and broken.sessions == 2


# --- certificates that do not match ---------------------------------------------------------------

def test_certificate_mismatch_defers_with_4_7_5(server: MailwardServer) -> None:
    leaf = x509.load_pem_x509_certificates(server.cert.read_bytes())[0]
    good = TlsaRecord(3, 1, 1, association_data(leaf, 1, 1))
    cases = [
        candidate(SecurityLevel.VERIFY, server.mx, host="localhost"),  # demo CA not trusted
        candidate(SecurityLevel.VERIFY, server.mx, host="mx.wrong.test", ca_file=server.ca),  # wrong name
        candidate(SecurityLevel.SECURE, server.mx, host="mx.wrong.test", ca_file=server.ca),
        candidate(SecurityLevel.DANE, server.mx, host="localhost", tlsa=(EE,)),  # stale TLSA record
    ]
    for c in cases:
        with pytest.raises(AttemptError) as err:
            asyncio.run(open_and_close(c))
        assert (err.value.status, err.value.retry_plaintext) == ("4.7.5", False), (c, err.value)
    # The same peer with what does match: the failures above were about the certificate only.
    for c in (candidate(SecurityLevel.VERIFY, server.mx, host="localhost", ca_file=server.ca),
              candidate(SecurityLevel.DANE_ONLY, server.mx, host="localhost", tlsa=(good,))):
        assert asyncio.run(open_and_close(c)).tls.verified
    assert "MAIL FROM" not in server.log()


# --- through a whole mailward: the log line and the queue ------------------------------------------

def test_stripped_refused_and_broken_starttls_defer_per_recipient(make_server: MakeServer) -> None:
    with (PickyServer(starttls="absent") as absent, PickyServer(starttls="refuse") as refuse,
          PickyServer(starttls="broken") as broken):
        server = make_server(deliver=True, extra_toml=delivery_toml(
            route("absent.test", f"[127.0.0.1]:{absent.port}", security="encrypt"),
            route("refuse.test", f"[127.0.0.1]:{refuse.port}", security="verify"),
            route("broken.test", f"[127.0.0.1]:{broken.port}", security="encrypt"),
            relay=("absent.test", "refuse.test", "broken.test"), may_retry_plaintext="true"))
        rcpts = ["a@absent.test", "r@refuse.test", "b@broken.test"]
        submit_mx(server, "sender@back.test", rcpts, message("dg1"))
        wait_until(lambda: len(deliveries(server)) == 3, what="three results")
        lines = {d["rcpt"]: d for d in deliveries(server)}
        assert {r: (lines[r]["status"], lines[r]["dsn"]) for r in rcpts} == {
            "a@absent.test": ("deferred", "4.7.4"), "r@refuse.test": ("deferred", "4.7.4"),
            "b@broken.test": ("deferred", "4.7.0")}
        assert ("TLS is required (encrypt from delivery.route[0] for absent.test)"
                in lines["a@absent.test"]["reply"])
        assert absent.mails == refuse.mails == broken.mails == 0
        assert "DOWNGRADE" not in server.log()
        listing = server.cli("queue", "list").stdout
        for reason in ("4.7.4 TLS is required", "4.7.4 TLS is required but", "4.7.0 TLS with"):
            assert reason in listing, listing
