"""Metrics and structured logs of a running mailward: mail in over 465 with AUTH (and a failed
AUTH), out to a loopback peer with and without TLS and to a Maildir, then /metrics scraped over
HTTP; and a `--log-format json` run whose every stderr line is a JSON object."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from mailward_server import PASSWORD, USER, MailwardServer, free_port
from prometheus_client.parser import text_string_to_metric_families
from smtp_peer import verifying_context

from conftest import MakeServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def scrape(port: int) -> Samples:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def routes(peer: MailwardServer) -> str:
    """tls.test: opportunistic STARTTLS to the peer (its demo certificate is not trusted);
    plain.test: the same peer without TLS; strict.test: verify, which that certificate fails."""
    hop = f"[127.0.0.1]:{peer.mx}"
    return f"""relay_domains = ["tls.test", "plain.test", "strict.test"]
[delivery]
[[delivery.route]]
domain = "tls.test"
next_hop = "{hop}"
security = "may"
[[delivery.route]]
domain = "plain.test"
next_hop = "{hop}"
security = "none"
[[delivery.route]]
domain = "strict.test"
next_hop = "{hop}"
security = "verify"
"""


def metrics_toml(port: int) -> str:
    return f"[metrics]\nenabled = true\nport = {port}\n"


def message(subject: str, rcpts: list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = USER, ", ".join(rcpts), subject
    msg.set_content("metrics\n")
    return msg


def submit_465(server: MailwardServer, rcpts: list[str]) -> None:
    ctx = verifying_context(server.ca)
    with (smtplib.SMTP_SSL("localhost", server.submissions, context=ctx, timeout=15) as smtp,
          pytest.raises(smtplib.SMTPAuthenticationError)):
        smtp.login(USER, "not the password")
    with smtplib.SMTP_SSL("localhost", server.submissions, context=ctx, timeout=15) as smtp:
        smtp.login(USER, PASSWORD)
        assert smtp.send_message(message("metrics", rcpts), USER, rcpts) == {}


RCPTS = ["x@tls.test", "y@plain.test", "z@strict.test", USER]


def test_scrape_after_submission_and_delivery(make_server: MakeServer) -> None:
    peer = make_server(extra_toml='relay_domains = ["tls.test", "plain.test", "strict.test"]\n')
    mport = free_port()
    server = make_server(deliver=True, extra_toml=routes(peer) + metrics_toml(mport))
    before = scrape(mport)
    for result in ("dane_verified", "sts_verified", "opportunistic", "plaintext", "deferred_policy"):
        assert sample(before, "mailward_delivery_tls_total", tls=result) == 0
    assert sample(before, "mailward_queue_messages") == 0

    submit_465(server, RCPTS)
    s465 = f"submissions-{server.submissions}"

    def settled() -> bool:
        got = scrape(mport)
        return (sample(got, "mailward_deliveries_total", status="delivered") == 3
                and sample(got, "mailward_deliveries_total", status="deferred") == 1
                and sample(got, "mailward_sessions_active", listener=s465) == 0)

    wait_until(settled, "three deliveries, one deferral and both sessions closed")
    got = scrape(mport)
    assert sample(got, "mailward_connections_total", listener=s465) == 2
    versions = {dict(labels)["tls_version"]: v for (name, labels), v in got.items()
                if name == "mailward_sessions_total" and dict(labels)["listener"] == s465}
    assert sum(versions.values()) == 2 and set(versions) <= {"TLSv1.2", "TLSv1.3"}, versions
    assert sample(got, "mailward_auth_total", listener=s465, result="success") == 1
    # smtplib tries PLAIN, then LOGIN, with the wrong password: two failures.
    assert sample(got, "mailward_auth_total", listener=s465, result="failure") == 2
    assert not [name for name, _ in got if name.endswith("_created")]
    assert sample(got, "mailward_messages_accepted_total", listener=s465) == 1
    assert sample(got, "mailward_tls_handshake_seconds_count", side="inbound", result="ok") == 2
    # To the peer: one STARTTLS session that succeeded (tls.test), one that failed verification.
    assert sample(got, "mailward_tls_handshake_seconds_count", side="outbound", result="ok") == 1
    assert sample(got, "mailward_tls_handshake_seconds_count", side="outbound", result="failed") >= 1
    assert sample(got, "mailward_delivery_tls_total", tls="opportunistic") == 1
    assert sample(got, "mailward_delivery_tls_total", tls="plaintext") == 1
    assert sample(got, "mailward_delivery_tls_total", tls="deferred_policy") == 1
    assert sample(got, "mailward_delivery_tls_total", tls="dane_verified") == 0
    # The Maildir delivery reached no SMTP host, so it has no TLS result.
    assert sum(v for (name, _), v in got.items() if name == "mailward_delivery_tls_total") == 3
    # z@strict.test keeps the message queued; the gauges are read at scrape time.
    assert sample(got, "mailward_queue_messages") == 1
    assert sample(got, "mailward_queue_oldest_message_age_seconds") > 0
    # The peer took two messages over its mx listener: one with STARTTLS, one without.
    mx = f"mx-{peer.mx}"
    assert len(peer.messages()) == 2
    assert f"{mx}[127.0.0.1]: TLS TLSv1." in peer.log()

    r = httpx.get(f"http://127.0.0.1:{mport}/", timeout=10)
    assert r.status_code == 404


def test_a_busy_metrics_port_stops_start_up(make_server: MakeServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = make_server(start=False, extra_toml=metrics_toml(port))
        with pytest.raises(RuntimeError) as info:
            server.start()
    assert "exited early with status 2" in str(info.value)
    assert (f"mailward: the metrics endpoint cannot listen on 127.0.0.1:{port}: address already in use; stop "
            "the other server or change metrics.port.") in server.log()


def start_json(server: MailwardServer, timeout: float = 20.0) -> None:
    """`mailward serve --log-format json`, stderr into the server's log file (as start() does)."""
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "mailward.cli", "serve", "--config", str(server.config_path),
             "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            cwd=server.root)
    proc = server.proc

    def started() -> bool:
        assert proc.poll() is None, server.log()
        try:
            return int(server.pid_path.read_text().strip()) == proc.pid
        except (OSError, ValueError):
            return False

    wait_until(started, "the pid file", timeout)


def test_json_log_lines(make_server: MakeServer) -> None:
    peer = make_server(extra_toml='relay_domains = ["tls.test", "plain.test", "strict.test"]\n')
    # The configuration leaves log.format at its default, human; the option overrides it.
    server = make_server(start=False, deliver=True, extra_toml=routes(peer))
    start_json(server)
    submit_465(server, RCPTS)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in server.log().splitlines()]

    wait_until(lambda: sum(1 for e in lines() if e["event"] == "delivery") == 4, "four delivery events")
    server.stop()
    events = lines()
    assert events, "nothing logged"
    for e in events:
        assert {"time", "level", "logger", "event", "message"} <= e.keys(), e
    kinds = {e["event"] for e in events}
    assert {"connect", "tls", "auth", "accepted", "delivery", "disconnect", "log"} <= kinds, kinds
    assert any(e["event"] == "log" and e["message"].startswith("listening: submissions") for e in events)
    auth = [(e["user"], e["ok"]) for e in events if e["event"] == "auth"]
    assert auth == [(USER, False), (USER, False), (USER, True)]
    (accepted,) = [e for e in events if e["event"] == "accepted"]
    assert accepted["nrcpt"] == 4 and accepted["sender"] == USER
    assert accepted["tls_version"].startswith("TLSv1.")
    deliveries = {e["to"]: e for e in events if e["event"] == "delivery"}
    tls = deliveries["x@tls.test"]
    assert tls["status"] == "delivered" and tls["tls_result"] == "opportunistic"
    assert tls["tls"].startswith("Untrusted TLSv1.") and tls["relay"] == f"127.0.0.1[127.0.0.1]:{peer.mx}"
    assert tls["queue_id"] == accepted["queue_id"] and tls["dsn"] == "2.0.0"
    assert isinstance(tls["delay"], float)
    assert tls["message"].startswith(f"{tls['queue_id']}: to=<x@tls.test>")
    assert deliveries["y@plain.test"]["tls_result"] == "plaintext"
    assert deliveries["y@plain.test"]["tls"] == "plaintext"
    strict = deliveries["z@strict.test"]
    assert strict["status"] == "deferred" and strict["tls_result"] == "deferred_policy", strict
    assert strict["dsn"].startswith("4.7.")
    assert deliveries[USER]["tls_result"] is None and deliveries[USER]["relay"] == "local"
