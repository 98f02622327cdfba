"""`mailward check` against the DANE lab (dnssec.py, dane_lab.py): for every destination the check's
domain verdict must be what the sender's delivery actually did with a real message (the `world`
of test_dane_delivery.py delivers one to each), each host's verdict must be the one expected, and,
where Postfix's posttls-finger can run, its verdict must agree with ours.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from dane_lab import EE_SELF
from test_dane_delivery import CASES, Case, World, posttls_finger
from test_dane_delivery import world as dane_world  # noqa: F401  (the fixture, under its own name)
from tlsrpt_lab import rua


def run_check(world: World, *args: str) -> tuple[int, Any]:
    result = world.sender.cli("check", *args, "--json", check=False)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def delivery_verdict(line: dict[str, str]) -> str:
    """What the sender's delivery did, in the check's words."""
    if line["status"] == "sent":
        return "secure" if line["tls"].startswith("Verified") else "insecure"
    return "defer" if line["status"] == "deferred" else "error"


def finger_word(host_verdict: str) -> str:
    # posttls-finger names the TLS of a session; without one it has no word ("none").
    return host_verdict if host_verdict in ("Verified", "Trusted", "Untrusted") else "none"


@pytest.fixture(scope="module")
def checks(dane_world: World) -> dict[str, tuple[int, Any]]:  # noqa: F811
    return {c.domain: run_check(dane_world, c.domain) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.domain for c in CASES])
def test_verdict_is_what_delivery_did(dane_world: World, checks: dict[str, tuple[int, Any]],  # noqa: F811
                                      case: Case) -> None:
    status, report = checks[case.domain]
    line = dane_world.lines[case.rcpt]
    assert report["domain"] == case.domain and report["schema"] == 1
    assert report["verdict"] == delivery_verdict(line), (report["reason"], line)
    assert status == {"secure": 0, "insecure": 1, "defer": 2, "error": 3}[report["verdict"]]
    if line["status"] == "sent":
        assert report["delivery"]["relay"] == line["relay"], report["delivery"]
        assert re.fullmatch(case.tls, report["delivery"]["tls"]), report["delivery"]
    else:
        assert report["delivery"] is None
    # The first MX host's verdict is the one posttls-finger gives (it stops at the first MX).
    first = report["mx"][0]
    assert finger_word(first["verdict"]) == case.finger, first


@pytest.mark.parametrize("case", CASES, ids=[c.domain for c in CASES])
def test_posttls_finger_agrees_with_the_check(dane_world: World, checks: dict[str, tuple[int, Any]],  # noqa: F811
                                               case: Case) -> None:
    _, report = checks[case.domain]
    finger = posttls_finger(dane_world, f"{case.domain}:{dane_world.lab.smtp_port}")
    assert finger == finger_word(report["mx"][0]["verdict"]), report["mx"][0]


def test_details_of_a_dane_ee_host(checks: dict[str, tuple[int, Any]]) -> None:
    _, report = checks["selfsigned.dane.test"]
    assert report["dns"]["mx"]["status"] == "secure"
    (host,) = report["mx"]
    assert (host["name"], host["dnssec"], host["verdict"]) == ("ee-self.dane.test", "secure", "Verified")
    (record,) = host["tlsa"]["records"]
    assert (record["meaning"], record["usable"], record["matches"]) == ("DANE-EE SPKI SHA2-256", True, [0])
    (conn,) = host["connections"]
    assert conn["banner"].startswith("220 ") and conn["starttls"] is True
    assert any(k.startswith("PIPELINING") for k in conn["ehlo_tls"])
    assert conn["tls"]["protocol"] in ("TLSv1.2", "TLSv1.3")
    (leaf,) = conn["certificates"]
    assert leaf["names"] == ["selfsigned.example"] and leaf["key"] == "ECDSA secp256r1"
    assert leaf["tlsa_matches"] == [0]
    assert conn["dane"] == {"verified": True, "reason": "DANE-EE matched the leaf certificate", "depth": 0,
                            "record": "3 1 1"}
    assert conn["pkix"]["trusted"] is False  # DANE-EE needs no CA


def test_dane_ta_match_is_at_the_anchor(checks: dict[str, tuple[int, Any]]) -> None:
    _, report = checks["ta-cert.dane.test"]
    (conn,) = report["mx"][0]["connections"]
    assert [c["tlsa_matches"] for c in conn["certificates"]] == [[], [0]]
    assert report["mx"][0]["tlsa"]["records"][0]["matches"] == [1]


def test_breakage_is_called_out(checks: dict[str, tuple[int, Any]]) -> None:
    def texts(domain: str) -> str:
        return "\n".join(f["text"] for f in checks[domain][1]["findings"])

    # A DANE-EE record for another key: the rollover failure, with the record to publish.
    nomatch = texts("nomatch-only.dane.test")
    assert "Let's Encrypt rollover" in nomatch and "IN TLSA 3 1 1 " in nomatch
    assert "failed or is bogus" in texts("bogus.dane.test")
    # TLSA records that an insecure MX RRset makes unusable.
    assert "delivery does not use them because the MX records are not DNSSEC-secure" in \
        texts("tls.unsigned.test")
    assert "all unusable for SMTP" in texts("pkix-only.dane.test")


def test_text_report(dane_world: World) -> None:  # noqa: F811
    result = dane_world.sender.cli("check", "selfsigned.dane.test", check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "selfsigned.dane.test: SECURE" in out
    assert "MX 10 ee-self.dane.test: Verified" in out
    assert "DANE-EE SPKI SHA2-256; usable" in out


def test_tlsrpt_records(dane_world: World, checks: dict[str, tuple[int, Any]]) -> None:  # noqa: F811
    published = rua(dane_world.lab.smtp_port)
    for case in CASES:
        tlsrpt = checks[case.domain][1]["tlsrpt"]
        if case.domain in published:
            assert (tlsrpt["rua"], tlsrpt["error"]) == (published[case.domain].split(","), None), tlsrpt
        else:
            assert tlsrpt["rua"] == [] and tlsrpt["error"] == "no TXT record starts with v=TLSRPTv1", tlsrpt


def test_an_address_literal(dane_world: World) -> None:  # noqa: F811
    # No DNS, so no DANE: opportunistic TLS to the address, as delivery to [address] would do.
    status, report = run_check(dane_world, f"[{EE_SELF}]")
    assert (status, report["verdict"], report["tlsrpt"]) == (1, "insecure", None), report["reason"]
    (host,) = report["mx"]
    assert (host["name"], host["verdict"]) == (EE_SELF, "Untrusted")
    assert report["delivery"]["relay"] == f"{EE_SELF}[{EE_SELF}]:{dane_world.lab.smtp_port}"


# The fields docs/check.md promises; a report may carry more, never fewer.
TOP = {"schema", "kind", "domain", "verdict", "reason", "mx", "findings", "level", "level_source",
       "destination", "dns", "mta_sts", "tlsrpt", "plan", "delivery"}
HOST = {"name", "preference", "addresses", "dnssec", "error", "tlsa", "tlsa_skipped", "tlsa_ignored",
        "mta_sts_match", "skipped", "requirement", "connections", "verdict", "reason"}
CONNECTION = {"address", "port", "relay", "requirement", "connected", "banner", "ehlo", "ehlo_tls",
              "starttls", "tls", "certificates", "certificates_from", "pkix", "dane", "accepted", "outcome",
              "error", "plaintext_retry", "verdict"}
RECORD = {"usage", "selector", "matching_type", "data", "meaning", "usable", "why_unusable", "ignored",
          "matches"}
CERT = {"depth", "subject", "issuer", "names", "ip_addresses", "not_before", "not_after", "expired", "key",
        "spki_sha256", "tlsa_matches"}


def test_every_report_has_the_documented_fields(checks: dict[str, tuple[int, Any]]) -> None:
    for domain, (_, report) in checks.items():
        assert set(report) >= TOP, (domain, TOP - set(report))
        assert report["verdict"] in ("secure", "insecure", "defer", "error")
        for finding in report["findings"]:
            assert set(finding) == {"severity", "host", "text"} and finding["severity"] in (
                "error", "warning", "info")
        for host in report["mx"]:
            assert set(host) >= HOST, (domain, HOST - set(host))
            assert host["verdict"] in ("Verified", "Trusted", "Untrusted", "Plaintext", "Unreachable")
            for record in (host["tlsa"] or {}).get("records", []):
                assert set(record) >= RECORD, (domain, RECORD - set(record))
            for conn in host["connections"]:
                assert set(conn) >= CONNECTION, (domain, CONNECTION - set(conn))
                for cert in conn["certificates"]:
                    assert set(cert) >= CERT, (domain, CERT - set(cert))
