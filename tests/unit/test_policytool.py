"""`mailward policy show`: the configured level and its source, and the live part from DNS facts
(a stand-in resolver here; tests/integration/test_policy_show.py asks a real validating one)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mailward.cli import main
from mailward.config import config_from_dict
from mailward.delivery.dns import DnsPermanentError, DnsTemporaryError, HostAddresses, MailHost, NextHops
from mailward.delivery.policy import TlsaFacts, TlsaRecord
from mailward.policytool import PolicyToolError, format_text, inspect, normalise_domain

EE = TlsaRecord(3, 1, 1, b"\x01" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\x02" * 32)


def config(**delivery: Any) -> Any:
    return config_from_dict({"listener": [], "hostname": "out.example.net", "local_domains": ["example.net"],
                             "delivery": delivery}, "test", base_dir=Path("/etc"))


class FakeDns:
    """Answers from tables; records every TLSA question so tests see which hosts were asked."""

    def __init__(self, hops: dict[str, NextHops | Exception] | None = None,
                 hosts: dict[str, HostAddresses | Exception] | None = None,
                 tlsa: dict[str, TlsaFacts] | None = None) -> None:
        self.hops = hops or {}
        self.hosts = hosts or {}
        self.tlsa_facts = tlsa or {}
        self.tlsa_asked: list[tuple[str, int]] = []

    async def next_hops(self, domain: str) -> NextHops:
        answer = self.hops[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def addresses(self, host: str) -> HostAddresses:
        answer = self.hosts[host]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def tlsa(self, host: str, port: int = 25) -> TlsaFacts:
        self.tlsa_asked.append((host, port))
        return self.tlsa_facts.get(host, TlsaFacts("secure", (), base_domain=host))


def host(name: str, *addresses: str, status: str = "secure") -> HostAddresses:
    return HostAddresses(name, addresses, status)  # type: ignore[arg-type]


SECURE_HOPS = NextHops("example.org", (MailHost(10, host("mx1.example.org", "192.0.2.1")),
                                       MailHost(20, host("mx2.example.org", "192.0.2.2")),
                                       MailHost(30, host("mx3.example.org", "192.0.2.3", status="insecure"))),
                       "secure")
INSECURE_HOPS = NextHops("example.org", (MailHost(10, host("mx.example.org", "192.0.2.1",
                                                          status="insecure")),), "insecure")


def show(domain: str, cfg: Any, dns: FakeDns | None, **kw: Any) -> dict[str, Any]:
    return asyncio.run(inspect(domain, cfg, dns, resolvers="127.0.0.1:53", dnssec_trusted=True, **kw))


def test_default_dane_with_live_facts() -> None:
    dns = FakeDns(hops={"example.org": SECURE_HOPS}, tlsa={"mx2.example.org": TlsaFacts("secure", (EE,),
                                                                                          "mx2.example.org")})
    report = show("example.org", config(), dns)
    # TLSA only for hosts whose address records are secure (RFC 7672 §2.2.2), at the port used.
    assert dns.tlsa_asked == [("mx1.example.org", 25), ("mx2.example.org", 25)]
    assert (report["level"], report["source"]) == ("dane", "delivery.security, the default")
    assert report["destination"] == {"key": "mx:example.org", "kind": "mx", "next_hop": None,
                                     "lookup": "example.org", "port": 25}
    assert report["dns"]["mx"] == {"status": "secure", "null_mx": False, "implicit": False}
    hosts = report["dns"]["hosts"]
    assert [h["tlsa"]["status"] if h["tlsa"] else h["tlsa_skipped"] for h in hosts] == [
        "secure", "secure", "its address records are not DNSSEC-secure"]
    assert hosts[1]["tlsa"]["records"] == [{"usage": 3, "selector": 1, "matching_type": 1, "data": "01" * 32,
                                            "usable": True}]
    # Preference order stands: the host with TLSA does not jump the queue.
    assert [(c["host"], c["level"], c["required"], c["verify"]) for c in report["plan"]["candidates"]] == [
        ("mx1.example.org", "may", False, "none"), ("mx2.example.org", "dane", True, "dane"),
        ("mx3.example.org", "may", False, "none")]
    text = format_text(report)
    assert text.startswith("example.org: MX delivery (mx:example.org, port 25)\n")
    assert ("level: dane (DANE where the host has DNSSEC-secure TLSA records, otherwise as may)\n"
            "  set by delivery.security, the default\n"
            "  a failed TLS handshake defers the mail; it is never retried in plaintext\n") in text
    assert "DNS (resolver 127.0.0.1:53, DNSSEC status trusted):\n  MX records: found, secure\n" in text
    assert ("   20 mx2.example.org: 192.0.2.2 (secure)\n"
            "      TLSA: secure, 3 1 1; base domain mx2.example.org\n") in text
    assert "      TLSA: none (secure denial)\n" in text
    assert "      TLSA: not looked up: its address records are not DNSSEC-secure\n" in text
    assert ("  mx2.example.org[192.0.2.2]:25: dane: TLS required, authenticated by the TLSA records "
            "(SNI mx2.example.org)\n      because dane from delivery.security, the default: DNSSEC-secure "
            "TLSA records\n") in text
    assert ("  mx1.example.org[192.0.2.1]:25: may: STARTTLS when offered; a failed handshake is "
            "deferred\n") in text
    json.dumps(report)  # the --json form


def test_policy_row_dane_only_and_unusable_records() -> None:
    dns = FakeDns(hops={"a.example.org": SECURE_HOPS}, tlsa={"mx1.example.org": TlsaFacts("secure", (PKIX,)),
                                                           "mx2.example.org": TlsaFacts("bogus")})
    cfg = config(policy=[{"destination": ".example.org", "level": "dane-only"}])
    report = show("a.example.org", cfg, dns)
    assert (report["level"], report["source"]) == ("dane-only", "delivery.policy[0] for .example.org")
    assert report["plan"]["candidates"] == []
    assert report["plan"]["skipped"] == [
        "mx1.example.org: dane-only, and its DNSSEC-secure TLSA records are all unusable",
        "mx2.example.org: TLSA lookup failed or is bogus (RFC 7672 §2.1.1)",
        "mx3.example.org: dane-only, and its address records are not DNSSEC-secure"]
    assert report["plan"]["refusal"]["status"] == "4.7.5" and not report["plan"]["refusal"]["permanent"]
    text = format_text(report)
    assert "      TLSA: secure, 1 1 1 (unusable)\n" in text
    assert "      TLSA: lookup failed or bogus: the host is not used (RFC 7672 §2.1.1)\n" in text
    assert "  the mail is deferred: 4.7.5 no mail host of a.example.org meets the TLS policy (" in text
    assert "  a failed TLS handshake" not in text  # dane-only never falls back to may


def test_levels_without_dane_ask_no_tlsa() -> None:
    dns = FakeDns(hops={"example.org": SECURE_HOPS})
    report = show("example.org", config(security="verify", may_retry_plaintext=True), dns)
    assert dns.tlsa_asked == []
    assert {h["tlsa_skipped"] for h in report["dns"]["hosts"]} == {"level verify does not use DANE"}
    assert [c["verify_name"] for c in report["plan"]["candidates"]] == [
        "mx1.example.org", "mx2.example.org", "mx3.example.org"]
    assert ("  mx1.example.org[192.0.2.1]:25: verify: TLS required, certificate verified for "
            "mx1.example.org\n") in format_text(report)


def test_plaintext_opt_in_is_shown() -> None:
    dns = FakeDns(hops={"example.org": INSECURE_HOPS})
    text = format_text(show("example.org", config(may_retry_plaintext=True), dns))
    assert "  a failed TLS handshake is retried in plaintext (delivery.may_retry_plaintext = true)\n" in text
    assert "a failed handshake is retried in plaintext\n" in text
    assert "      TLSA: not looked up: the MX records are not DNSSEC-secure\n" in text


def test_secure_level_without_dnssec_says_why() -> None:
    dns = FakeDns(hops={"example.org": INSECURE_HOPS})
    text = format_text(show("example.org", config(policy=[{"destination": "example.org", "level": "secure"}]),
                            dns))
    assert ("  the mail is deferred: 4.7.5 level secure (delivery.policy[0] for example.org) needs "
            "DNSSEC-secure MX records, and those of example.org are not\n") in text


def test_dns_not_consulted() -> None:
    report = show("example.org", config(), None, no_dns="--no-dns was given")
    assert report["dns"] == {"consulted": False, "reason": "--no-dns was given"} and report["plan"] is None
    text = format_text(report)
    assert text.endswith("DNS was not consulted: --no-dns was given.\n")
    assert "level: dane" in text and "Delivery now" not in text


def test_unanswered_dns_is_one_sentence_and_a_deferral() -> None:
    why = "no answer from resolver 127.0.0.1:9 within 1s for MX example.org; check dns.resolvers"
    report = show("example.org", config(), FakeDns(hops={"example.org": DnsTemporaryError(why)}))
    assert report["dns"]["consulted"] is False and report["dns"]["reason"] == why
    text = format_text(report)
    assert f"DNS was not consulted: {why}.\n" in text
    assert f"  the mail is deferred: 4.4.3 DNS lookup for example.org failed: {why}\n" in text


def test_nonexistent_domain_fails() -> None:
    report = show("gone.example", config(), FakeDns(hops={
        "gone.example": DnsPermanentError("domain gone.example does not exist (NXDOMAIN)")}))
    assert report["dns"]["consulted"]
    assert report["dns"]["error"] == "domain gone.example does not exist (NXDOMAIN)"
    assert report["plan"]["refusal"] == {"permanent": True, "status": "5.1.2",
                                         "reason": "domain gone.example does not exist (NXDOMAIN)"}
    assert "  the mail fails: 5.1.2 domain gone.example does not exist (NXDOMAIN)\n" in format_text(report)


def test_route_to_an_explicit_host_and_local_and_literal() -> None:
    cfg = config(route=[{"domain": "partner.example", "next_hop": "relay.partner.example:2525",
                         "security": "encrypt"}])
    dns = FakeDns(hosts={"relay.partner.example": host("relay.partner.example", "192.0.2.9")})
    report = show("partner.example", cfg, dns)
    assert report["destination"]["kind"] == "route" and report["destination"]["next_hop"] == \
        "relay.partner.example:2525"
    assert (report["level"], report["source"]) == ("encrypt", "delivery.route[0] for partner.example")
    assert report["dns"]["mx"] is None
    assert [c["relay"] for c in report["plan"]["candidates"]] == ["relay.partner.example[192.0.2.9]:2525"]
    assert "partner.example: a configured route (route:relay.partner.example:2525, port 2525)\n" in \
        format_text(report)

    local = show("example.net", cfg, FakeDns())
    assert local["dns"] == {"consulted": False, "reason": "local delivery makes no SMTP connection"}
    assert format_text(local).startswith("example.net: local delivery\nlevel: none (never TLS)\n")

    literal = show("[192.0.2.7]", cfg, FakeDns())
    assert literal["dns"]["reason"] == "an address literal needs no DNS"
    assert [c["relay"] for c in literal["plan"]["candidates"]] == ["192.0.2.7[192.0.2.7]:25"]


@pytest.mark.parametrize(("given", "domain"), [
    ("Example.ORG", "example.org"), ("bob@Example.org.", "example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("[192.0.2.7]", "[192.0.2.7]"), ("x@[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
])
def test_normalise_domain(given: str, domain: str) -> None:
    assert normalise_domain(given) == domain


@pytest.mark.parametrize("given", ["example.org:25", "exa mple.org", "", "[example.org]"])
def test_normalise_domain_refuses(given: str) -> None:
    with pytest.raises(PolicyToolError):
        normalise_domain(given)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mailward.toml"
    path.write_text('listener = []\nlocal_domains = ["example.net"]\n[delivery]\nsecurity = "encrypt"\n'
                    '[[delivery.policy]]\ndestination = "example.org"\nlevel = "verify"\n')
    assert main(["policy", "show", "Example.org", "--no-dns", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == ("example.org: MX delivery (mx:example.org, port 25)\n"
                   "level: verify (TLS required, with a certificate valid for the host name)\n"
                   "  set by delivery.policy[0] for example.org\n"
                   "DNS was not consulted: --no-dns was given.\n")
    assert main(["policy", "show", "other.example", "--no-dns", "--json", "--config", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["level"], report["source"]) == ("encrypt", "delivery.security, the default")
    assert main(["policy", "show", "not a domain", "--no-dns", "--config", str(path)]) == 2
    assert "is not a domain" in capsys.readouterr().err
