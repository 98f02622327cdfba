"""DANE authentication of a real STARTTLS handshake: the outbound session against a mailward peer.

The TLSA records are computed from the peer's own certificate files; the DNS side of DANE (which
records apply, and when) is the policy's and the resolver's, tested on their own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509
from mailward_server import MailwardServer

from mailward.delivery.attempt import AttemptError, AttemptSettings, Session
from mailward.delivery.dane import association_data
from mailward.delivery.policy import Candidate, SecurityLevel, TlsaRecord, TlsRequirement

SETTINGS = AttemptSettings(helo_name="client.example.org", connect_timeout=5, command_timeout=5,
                           data_timeout=5)


def chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def dane(server: MailwardServer, records: tuple[TlsaRecord, ...], names: tuple[str, ...]) -> Candidate:
    tls = TlsRequirement(SecurityLevel.DANE, starttls=True, required=True, verify="dane",
                         verify_name=names[0], tlsa=records, dane_names=names, reason="test")
    return Candidate(host=names[0], address="127.0.0.1", port=server.mx, tls=tls)


async def open_and_close(candidate: Candidate) -> Session:
    session = await Session.open(candidate, SETTINGS)
    await session.close()
    return session


@pytest.mark.parametrize("usage,selector,mtype,depth", [
    (3, 1, 1, 0),  # the usual "3 1 1" of the leaf's key
    (3, 0, 2, 0),
    (2, 0, 1, 1),  # the CA the server sends after its leaf
    (2, 1, 2, 1),
])
def test_matching_tlsa_authenticates_the_session(server: MailwardServer, usage: int, selector: int,
                                                 mtype: int, depth: int) -> None:
    cert = chain(server.cert)[depth]
    record = TlsaRecord(usage, selector, mtype, association_data(cert, selector, mtype))
    session = asyncio.run(open_and_close(dane(server, (record,), ("localhost",))))
    assert session.tls.active and session.tls.verified
    assert session.tls.protocol in ("TLSv1.2", "TLSv1.3")


def test_a_stale_tlsa_record_stops_the_session_before_mail(server: MailwardServer) -> None:
    # The usual rollover failure: the certificate got a new key, the TLSA record did not follow.
    stale = TlsaRecord(3, 1, 1, b"\x5a" * 32)
    with pytest.raises(AttemptError) as err:
        asyncio.run(open_and_close(dane(server, (stale,), ("localhost",))))
    assert err.value.status == "4.7.5"  # temporary: DANE failures defer, never bounce
    assert "DANE" in (err.value.tls.failure or "")
    assert "MAIL FROM" not in server.log()


def test_dane_ta_needs_the_reference_name(server: MailwardServer) -> None:
    ca = chain(server.cert)[1]
    record = TlsaRecord(2, 0, 1, association_data(ca, 0, 1))
    with pytest.raises(AttemptError) as err:
        asyncio.run(open_and_close(dane(server, (record,), ("mx.example.org",))))
    assert "names" in str(err.value)
