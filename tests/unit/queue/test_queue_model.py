"""The backend-independent queue model: ids, validation, envelope serialisation."""

from __future__ import annotations

import json
import re

import pytest

from mailward.queue import (
    Envelope,
    Recipient,
    RecipientResult,
    RecipientState,
    StoredMessage,
    TlsFacts,
    TlsVerdict,
    new_queue_id,
)


def envelope(**overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "sender": "alice@example.org",
        "client_ip": "192.0.2.10",
        "client_helo": "client.example.org",
        "listener": "submissions",
        "received_at": 1_700_000_000.25,
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_queue_ids_are_short_sortable_and_unique() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{14}", i) for i in ids)


def test_queue_ids_follow_time_even_when_the_clock_steps_back() -> None:
    early, late = new_queue_id(2_000_000_000.0), new_queue_id(2_000_000_001.0)
    assert early < late
    assert new_queue_id(1_000_000_000.0) > late  # never goes backwards within a process


def test_envelope_json_round_trip_keeps_every_field() -> None:
    full = envelope(
        sender="",
        smtputf8=True,
        body_type="BINARYMIME",
        size_hint=12345,
        dsn_ret="HDRS",
        dsn_envid="QQ314159",
        requiretls=True,
        auth_user="alice",
        tls=TlsFacts(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256),
    )
    assert Envelope.from_json(full.to_json()) == full
    assert Envelope.from_json(envelope().to_json()) == envelope()
    assert Envelope.from_json(envelope(sender="josé@exämple.org").to_json()).sender == "josé@exämple.org"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(v=2),
        lambda d: d.pop("sender"),
        lambda d: d.update(smtputf8=1),
        lambda d: d.update(size_hint=True),
        lambda d: d.update(body_type="QUOTED"),
        lambda d: d.update(tls={"version": "TLSv1.3"}),
        lambda d: d.update(sender="a@b\r\nRCPT TO:<x@y>"),
    ],
)
def test_envelope_from_json_rejects_anything_but_its_own_shape(mutate) -> None:
    data = json.loads(envelope().to_json())
    mutate(data)
    with pytest.raises(ValueError):
        Envelope.from_json(json.dumps(data))
    with pytest.raises(ValueError):
        Envelope.from_json("not json")


def test_envelope_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="body_type"):
        envelope(body_type="8BIT")
    with pytest.raises(ValueError, match="dsn_ret"):
        envelope(dsn_ret="ALL")
    with pytest.raises(ValueError, match="CR, LF"):
        envelope(client_helo="evil\nhost")
    with pytest.raises(ValueError, match="size_hint"):
        envelope(size_hint=-1)


def test_recipient_dsn_notify_rules() -> None:
    assert Recipient("b@example.net", frozenset({"SUCCESS", "DELAY"})).dsn_notify == {"SUCCESS", "DELAY"}
    with pytest.raises(ValueError, match="NEVER"):
        Recipient("b@example.net", frozenset({"NEVER", "FAILURE"}))
    with pytest.raises(ValueError, match="unknown"):
        Recipient("b@example.net", frozenset({"SOMETIMES"}))
    with pytest.raises(ValueError, match="CR, LF"):
        Recipient("b@example.net\r\n")


def test_recipient_result_requires_a_next_attempt_only_when_deferred() -> None:
    RecipientResult("deferred", "451 4.4.1 try later", next_attempt_at=10.0)
    RecipientResult("delivered", "250 2.0.0 ok")
    with pytest.raises(ValueError):
        RecipientResult("deferred", "451 4.4.1 try later")
    with pytest.raises(ValueError):
        RecipientResult("failed", "550 5.1.1 no such user", next_attempt_at=10.0)
    with pytest.raises(ValueError):
        RecipientResult("held", "x")  # type: ignore[arg-type]


def test_stored_message_pending_and_next_attempt() -> None:
    def state(addr: str, status: str, due: float | None) -> RecipientState:
        return RecipientState(Recipient(addr), status, next_attempt_at=due)  # type: ignore[arg-type]

    message = StoredMessage(
        id=new_queue_id(),
        envelope=envelope(),
        recipients=(
            state("a@x", "delivered", None),
            state("b@x", "deferred", 50.0),
            state("c@x", "queued", 20.0),
            state("d@x", "failed", None),
        ),
        size=0,
        digest="",
        created_at=0.0,
    )
    assert [r.recipient.address for r in message.pending] == ["b@x", "c@x"]
    assert message.next_attempt_at == 20.0


def test_tls_verdict_json_round_trip_and_summary() -> None:
    verdict = TlsVerdict(protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=True, policy="verify")
    assert TlsVerdict.from_json(verdict.to_json()) == verdict
    assert verdict.trust == "Verified"  # from `verified` when not given
    assert verdict.summary() == "Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (pkix)"
    dane = TlsVerdict(protocol="TLSv1.3", cipher="C", verified=True, policy="dane", dane="2 1 1")
    assert TlsVerdict.from_json(dane.to_json()) == dane
    assert dane.summary() == "Verified TLSv1.3/C (dane 2 1 1)"
    plaintext = TlsVerdict(policy="may", failure="STARTTLS not offered")
    assert TlsVerdict.from_json(plaintext.to_json()) == plaintext
    assert (plaintext.trust, plaintext.outcome, plaintext.summary()) == (None, "plaintext", "plaintext")
    assert TlsVerdict(protocol="TLSv1.2", cipher="X").summary() == "Untrusted TLSv1.2/X"
    for word in ("Trusted", "Untrusted", "Anonymous"):
        v = TlsVerdict(protocol="TLSv1.3", cipher="X", trust=word)  # type: ignore[arg-type]
        assert TlsVerdict.from_json(v.to_json()) == v and v.summary() == f"{word} TLSv1.3/X"


def test_tls_verdict_reads_later_versions_and_rejects_malformed_ones() -> None:
    # A later mailward may add keys (a DANE usage, an MTA-STS policy id); this one skips them.
    later = {"protocol": "TLSv1.3", "cipher": "C", "verified": True, "policy": "dane", "dane_usage": 3}
    assert TlsVerdict.from_json(json.dumps(later)) == TlsVerdict(protocol="TLSv1.3", cipher="C",
                                                                 verified=True, policy="dane")
    # Stored before `trust` was: the word follows `verified`.
    old = {"protocol": "TLSv1.3", "cipher": "C", "verified": False, "policy": "may", "failure": None}
    assert TlsVerdict.from_json(json.dumps(old)).outcome == "Untrusted"
    for bad in ('{"verified": 1}', '{"protocol": 13}', '{"trust": "Sure"}', "[]", "null", "{"):
        with pytest.raises(ValueError, match="malformed TLS verdict"):
            TlsVerdict.from_json(bad)
