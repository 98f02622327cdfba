"""The event vocabulary: one event gives one log line (human or JSON) and moves its metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mailward.config import ConfigError, config_from_dict
from mailward.delivery import _Outcome
from mailward.delivery.attempt import RecipientOutcome, TlsOutcome
from mailward.metrics import (
    TLS_RESULTS,
    AuthResult,
    Connected,
    DeliveryResult,
    Disconnected,
    DnsLookup,
    Event,
    JsonFormatter,
    MessageAccepted,
    Metrics,
    MetricsEndpoint,
    QueueSize,
    TlsEstablished,
    TlsFailed,
    TlsHandshake,
    emit,
)

# The pattern the integration tests (test_local_delivery.py) read delivery lines with.
DELIVERY_LINE = re.compile(
    r"(?P<id>\w+): to=<(?P<rcpt>[^>]*)>, relay=(?P<relay>\S+), delay=[0-9.]+, tls=(?P<tls>[^,]+), "
    r"dsn=(?P<dsn>[0-9.]+), status=(?P<status>sent|deferred|bounced|expired) \((?P<reply>.*)\)$")

DELIVERED = DeliveryResult(
    queue_id="0PJ2M3W9K1X7QF", to="bob@example.org", relay="mx.example.org[192.0.2.7]:25", delay=1.25,
    tls="Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (dane 3 1 1)", tls_result="dane_verified", dsn="2.0.0",
    status="delivered", reply="250 2.0.0 Ok")


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    m.attach()
    yield m
    m.detach()


def value(m: Metrics, name: str, **labels: str) -> float:
    found = m.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def json_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    fmt = JsonFormatter()
    lines = [fmt.format(r) for r in records]
    assert all("\n" not in line for line in lines)
    return [json.loads(line) for line in lines]


# --- log lines ------------------------------------------------------------------------------------

def test_delivery_line_keeps_postfix_shape() -> None:
    text = str(DELIVERED)
    assert text == ("0PJ2M3W9K1X7QF: to=<bob@example.org>, relay=mx.example.org[192.0.2.7]:25, delay=1.2, "
                    "tls=Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (dane 3 1 1), dsn=2.0.0, status=sent "
                    "(250 2.0.0 Ok)")
    m = DELIVERY_LINE.search(text)
    assert m is not None and m["status"] == "sent"


@pytest.mark.parametrize(("status", "expired", "word"), [
    ("delivered", False, "sent"), ("deferred", False, "deferred"), ("bounced", False, "bounced"),
    ("bounced", True, "expired")])
def test_delivery_status_words(status: Any, expired: bool, word: str) -> None:
    ev = DeliveryResult(queue_id="Q", to="a@b.example", relay="none", delay=0.0, tls="plaintext",
                        tls_result=None, dsn="4.4.1", status=status, expired=expired, reply="x")
    assert f"status={word} (x)" in str(ev)


def test_session_lines_keep_their_text() -> None:
    assert str(Connected(listener="mx-25", client="192.0.2.1")) == "mx-25[192.0.2.1]: connect"
    assert str(Disconnected(listener="mx-25", client="192.0.2.1", seconds=2.04, tls_version=None)) == (
        "mx-25[192.0.2.1]: disconnect after 2.0s")
    assert str(TlsFailed(listener="s", client="::1", reason="timeout", seconds=10.0)) == (
        "s[::1]: TLS handshake failed: timeout")
    assert str(AuthResult(listener="s", client="::1", user="alice@example.test", ok=True)) == (
        "s[::1]: AUTH alice@example.test ok")
    assert str(AuthResult(listener="s", client="::1", user=None, ok=False, reason="bad")) == (
        "s[::1]: AUTH failed for ?: bad")
    assert str(MessageAccepted(listener="s", client="::1", queue_id="Q1", sender="", nrcpt=2, size=10,
                               tls_version="TLSv1.3")) == "s[::1]: Q1: from=<> nrcpt=2 size=10 tls=TLSv1.3"


def test_emit_logs_one_line_at_the_event_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    emit(AuthResult(listener="s", client="::1", user="eve", ok=False, reason="bad credentials"))
    emit(DELIVERED)
    emit(DnsLookup(query="MX example.org", rdtype="MX", seconds=0.002, ok=True))
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("mailward.inbound", logging.WARNING), ("mailward.delivery", logging.INFO),
        ("mailward.delivery", logging.DEBUG)]
    assert caplog.records[1].getMessage() == str(DELIVERED)


def test_emit_below_the_level_writes_nothing_but_still_counts(caplog: pytest.LogCaptureFixture,
                                                              metrics: Metrics) -> None:
    caplog.set_level(logging.INFO)
    emit(DnsLookup(query="MX example.org", rdtype="MX", seconds=0.002, ok=True))
    assert caplog.records == []
    assert value(metrics, "mailward_dns_lookup_seconds_count", type="MX", result="ok") == 1


def test_json_lines_carry_typed_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    emit(DELIVERED)
    emit(MessageAccepted(listener="submissions-465", client="127.0.0.1", queue_id="Q1", sender="a@b.example",
                         nrcpt=3, size=2048, tls_version=None))
    delivery, accepted = json_lines(caplog.records)
    assert delivery["event"] == "delivery" and delivery["level"] == "info"
    assert delivery["logger"] == "mailward.delivery"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", delivery["time"])
    assert delivery["message"] == str(DELIVERED)
    assert delivery["delay"] == 1.25 and delivery["tls_result"] == "dane_verified"
    assert delivery["to"] == "bob@example.org" and delivery["status"] == "delivered"
    assert delivery["expired"] is False and delivery["dsn"] == "2.0.0"
    assert accepted["event"] == "accepted" and accepted["nrcpt"] == 3 and accepted["tls_version"] is None


def test_json_for_plain_log_calls_and_exceptions() -> None:
    logger = logging.getLogger("mailward.test_metrics")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.warning("odd %s: %r", "value", 'quote " and\nnewline')
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "log" and first["level"] == "warning"
    assert first["message"] == "odd value: 'quote \" and\\nnewline'"
    assert second["message"] == "failed" and "ValueError: boom" in second["exception"]


def test_event_fields_never_replace_the_line_keys() -> None:
    reserved = {"time", "level", "logger", "event", "message", "exception"}
    for cls in Event.__subclasses__() + [c for s in Event.__subclasses__() for c in s.__subclasses__()]:
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & reserved, cls


# --- metrics --------------------------------------------------------------------------------------

def test_session_events_move_counters(metrics: Metrics) -> None:
    emit(Connected(listener="submissions-465", client="127.0.0.1"))
    emit(TlsEstablished(listener="submissions-465", client="127.0.0.1", version="TLSv1.3",
                        cipher="TLS_AES_256_GCM_SHA384", seconds=0.004))
    assert value(metrics, "mailward_sessions_active", listener="submissions-465") == 1
    emit(AuthResult(listener="submissions-465", client="127.0.0.1", user="a", ok=True))
    emit(AuthResult(listener="submissions-465", client="127.0.0.1", user="a", ok=False, reason="bad"))
    emit(AuthResult(listener="submissions-465", client="127.0.0.1", user="a", ok=False, reason="bad"))
    emit(Disconnected(listener="submissions-465", client="127.0.0.1", seconds=1.0, tls_version="TLSv1.3"))
    assert value(metrics, "mailward_connections_total", listener="submissions-465") == 1
    assert value(metrics, "mailward_sessions_active", listener="submissions-465") == 0
    assert value(metrics, "mailward_sessions_total", listener="submissions-465", tls_version="TLSv1.3") == 1
    assert value(metrics, "mailward_auth_total", listener="submissions-465", result="success") == 1
    assert value(metrics, "mailward_auth_total", listener="submissions-465", result="failure") == 2
    assert value(metrics, "mailward_tls_handshake_seconds_count", side="inbound", result="ok") == 1


def test_delivery_events_move_counters(metrics: Metrics) -> None:
    for result in TLS_RESULTS:
        assert value(metrics, "mailward_delivery_tls_total", tls=result) == 0
        assert metrics.registry.get_sample_value("mailward_delivery_tls_total", {"tls": result}) == 0.0
    emit(DELIVERED)
    emit(DeliveryResult(queue_id="Q", to="a@b.example", relay="none", delay=3.0, tls="plaintext",
                        tls_result="deferred_policy", dsn="4.7.5", status="deferred", reply="4.7.5 no"))
    emit(DeliveryResult(queue_id="Q", to="c@b.example", relay="local", delay=3.0, tls="plaintext",
                        tls_result=None, dsn="2.0.0", status="delivered", reply="delivered"))
    emit(TlsHandshake(relay="mx[192.0.2.1]:25", seconds=0.01, ok=False))
    emit(QueueSize(messages=4, oldest_age=12.5))
    assert value(metrics, "mailward_deliveries_total", status="delivered") == 2
    assert value(metrics, "mailward_deliveries_total", status="deferred") == 1
    assert value(metrics, "mailward_delivery_tls_total", tls="dane_verified") == 1
    assert value(metrics, "mailward_delivery_tls_total", tls="deferred_policy") == 1
    assert value(metrics, "mailward_delivery_tls_total", tls="plaintext") == 0
    assert value(metrics, "mailward_tls_handshake_seconds_count", side="outbound", result="failed") == 1
    assert value(metrics, "mailward_queue_messages") == 4
    assert value(metrics, "mailward_queue_oldest_message_age_seconds") == 12.5


def test_registries_are_separate_and_detached_ones_stop_counting(metrics: Metrics) -> None:
    other = Metrics()  # a second registry with the same names: no clash with the first
    emit(Connected(listener="mx-25", client="192.0.2.1"))
    assert value(metrics, "mailward_connections_total", listener="mx-25") == 1
    assert value(other, "mailward_connections_total", listener="mx-25") == 0
    metrics.detach()
    emit(Connected(listener="mx-25", client="192.0.2.1"))
    assert value(metrics, "mailward_connections_total", listener="mx-25") == 1
    text = metrics.exposition().decode()
    assert 'mailward_connections_total{listener="mx-25"} 1.0' in text
    assert "# TYPE mailward_dns_lookup_seconds histogram" in text


# --- what delivery reports as the TLS result ------------------------------------------------------

VERIFIED_DANE = TlsOutcome(protocol="TLSv1.3", cipher="X", verified=True, trust="Verified", dane="3 1 1")
VERIFIED_PKIX = TlsOutcome(protocol="TLSv1.3", cipher="X", verified=True, trust="Verified")
UNTRUSTED = TlsOutcome(protocol="TLSv1.2", cipher="X", trust="Untrusted")
NO_STARTTLS = TlsOutcome(failure="STARTTLS not offered", result_type="starttls-not-supported")
HANDSHAKE_FAILED = TlsOutcome(failure="handshake failure", result_type="validation-failure")
SENT = RecipientOutcome("delivered", "250 2.0.0 Ok", "2.0.0")
DEFERRED = RecipientOutcome("deferred", "451 4.3.0 later", "4.3.0")
RELAY = "mx.example.org[192.0.2.7]:25"


@pytest.mark.parametrize(("outcome", "relay", "tls", "policy", "expected"), [
    (SENT, RELAY, VERIFIED_DANE, "dane", "dane_verified"),
    (SENT, RELAY, VERIFIED_PKIX, "verify", "sts_verified"),
    (SENT, RELAY, UNTRUSTED, "may", "opportunistic"),
    (SENT, RELAY, UNTRUSTED, "encrypt", "opportunistic"),
    (SENT, RELAY, TlsOutcome(), "none", "plaintext"),
    (SENT, RELAY, NO_STARTTLS, "may", "plaintext"),
    (DEFERRED, RELAY, UNTRUSTED, "may", "opportunistic"),  # a recipient's 4xx over TLS
    (DEFERRED, "none", HANDSHAKE_FAILED, "dane", "deferred_policy"),
    (DEFERRED, "none", NO_STARTTLS, "verify", "deferred_policy"),
    (RecipientOutcome("deferred", "4.7.5 no mail host meets the TLS policy", "4.7.5"), "none", TlsOutcome(),
     None, "deferred_policy"),
    (RecipientOutcome("failed", "5.7.30 REQUIRETLS", "5.7.30"), "none", TlsOutcome(), None,
     "deferred_policy"),
    (RecipientOutcome("deferred", "4.4.1 connection refused", "4.4.1"), "none", TlsOutcome(), "may", None),
    (RecipientOutcome("deferred", "4.4.3 no DNS", "4.4.3"), "none", TlsOutcome(), None, None),
    (SENT, "local", TlsOutcome(), None, None),
])
def test_tls_result_of_an_attempt(outcome: RecipientOutcome, relay: str, tls: TlsOutcome, policy: str | None,
                                  expected: str | None) -> None:
    assert _Outcome(outcome, relay, tls, policy=policy).tls_result() == expected


# --- configuration --------------------------------------------------------------------------------

CERTS = {"certificates": [{"cert": "/etc/tls/fullchain.pem", "key": "/etc/tls/privkey.pem"}]}
MX = {"listener": [{"kind": "mx", "address": "127.0.0.1", "port": 2525}]}


def load_metrics(metrics: dict[str, Any]) -> Any:
    return config_from_dict({**MX, "hostname": "mx.example.org", "metrics": metrics}, "/etc/mailward.toml")


def test_metrics_config_defaults_and_values() -> None:
    mc = load_metrics({}).metrics
    assert (mc.enabled, mc.address, mc.port, mc.allow_remote) == (False, "127.0.0.1", 9425, False)
    assert load_metrics({"enabled": True, "address": "[::1]", "port": 9100}).metrics.address == "::1"
    assert load_metrics({"enabled": True, "address": "0.0.0.0", "allow_remote": True}).metrics.address == (
        "0.0.0.0")


@pytest.mark.parametrize(("metrics", "expected"), [
    ({"enabled": True, "address": "0.0.0.0"},
     "metrics.address 0.0.0.0 is not a loopback address, and the endpoint has no authentication; use "
     "127.0.0.1 or ::1, or set metrics.allow_remote = true behind a firewall."),
    ({"enabled": True, "port": 2525},
     "metrics.port 2525 clashes with listener[0] (127.0.0.1:2525); give the metrics endpoint another port."),
    ({"port": 0}, "metrics.port must be an integer between 1 and 65535, got 0."),
    ({"address": "localhost"}, "metrics.address must be an IPv4 or IPv6 address such as 0.0.0.0 or ::, got "
     "'localhost'."),
    ({"enable": True}, "unknown key 'metrics.enable' in /etc/mailward.toml; did you mean 'enabled'?"),
])
def test_metrics_config_errors_are_one_sentence(metrics: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_metrics(metrics)
    assert str(info.value).startswith(expected)


def test_a_non_loopback_address_is_fine_while_disabled() -> None:
    assert load_metrics({"address": "192.0.2.1"}).metrics.enabled is False


# --- the endpoint ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_endpoint_serves_metrics_after_refreshing(metrics: Metrics) -> None:
    port = free_port()
    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)
        emit(QueueSize(messages=len(refreshed) * 10, oldest_age=1.0))

    async def main() -> None:
        endpoint = MetricsEndpoint(metrics, "127.0.0.1", port, refresh)
        await endpoint.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                r = await client.get("/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
                assert "mailward_queue_messages 10.0" in r.text
                r = await client.get("/metrics?x=1")
                assert "mailward_queue_messages 20.0" in r.text
                assert (await client.get("/")).status_code == 404
                assert (await client.post("/metrics")).status_code == 405
                # A client that sends half a request and stalls must not keep stop() waiting.
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.1\r\n")
                await writer.drain()
        finally:
            await asyncio.wait_for(endpoint.stop(), 6)
            writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())
    assert len(refreshed) == 2


def test_endpoint_start_fails_on_a_port_in_use(metrics: Metrics) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def main() -> None:
            with pytest.raises(OSError):
                await MetricsEndpoint(metrics, "127.0.0.1", port).start()

        asyncio.run(main())
