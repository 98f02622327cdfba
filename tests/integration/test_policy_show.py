"""`mailward policy show` against a real validating resolver: Unbound over NSD with zones signed at
set-up (dnssec.py). The command asks DNS only; no mail host is contacted."""

from __future__ import annotations

import json
from typing import Any

from dnssec import DEAD, LIVE, TLSA_DATA, DnsLab
from mailward_server import MailwardServer
from test_delivery import delivery_toml

from conftest import MakeServer

POLICY = """
[[delivery.policy]]
destination = "mixed.secure.test"
level = "dane-only"

[[delivery.policy]]
destination = ".outward.secure.test"
level = "verify"

[[delivery.policy]]
destination = "outward.secure.test"
level = "secure"
"""


def show(server: MailwardServer, domain: str, *options: str) -> Any:
    result = server.cli("policy", "show", domain, *options)
    return json.loads(result.stdout) if "--json" in options else result.stdout


def candidates(report: Any) -> list[tuple[str, str, bool, str | None]]:
    return [(c["host"], c["level"], c["required"], c["verify_name"]) for c in report["plan"]["candidates"]]


def test_live_facts_and_the_plan(make_server: MakeServer, dns_lab: DnsLab) -> None:
    # Port 25: TLSA records live at _25._tcp; nothing connects anywhere.
    server = make_server(start=False, deliver=True,
                         extra_toml=delivery_toml(port=25) + POLICY + dns_lab.dns_toml)

    fall = show(server, "fall.secure.test", "--json")
    assert (fall["level"], fall["source"]) == ("dane", "delivery.security, the default")
    assert fall["dns"]["consulted"] and fall["dns"]["dnssec_trusted"]
    assert fall["dns"]["mx"] == {"status": "secure", "null_mx": False, "implicit": False}
    hosts = {h["name"]: h for h in fall["dns"]["hosts"]}
    assert (hosts["dead.secure.test"]["preference"], hosts["dead.secure.test"]["addresses"]) == (10, [DEAD])
    assert hosts["dead.secure.test"]["tlsa"] == {"status": "secure", "base_domain": "dead.secure.test",
                                                 "records": []}
    assert hosts["live.secure.test"]["tlsa"] == {
        "status": "secure", "base_domain": "live.secure.test",
        "records": [{"usage": 3, "selector": 1, "matching_type": 1, "data": TLSA_DATA.hex(), "usable": True}]}
    # RFC 7672 §2.2.1: the better MX without TLSA stays first, opportunistic; the worse one needs DANE.
    assert candidates(fall) == [("dead.secure.test", "may", False, None),
                                ("live.secure.test", "dane", True, "live.secure.test")]

    # The MX host is a secure alias: the TLSA base domain (and SNI) is the alias's target.
    alias = show(server, "alias.secure.test", "--json")
    assert candidates(alias) == [("mx-alias.secure.test", "dane", True, "live.secure.test")]

    # An unsigned zone: no TLSA lookup at all, opportunistic TLS.
    insecure = show(server, "insecure.test", "--json")
    assert insecure["dns"]["mx"]["status"] == "insecure"
    assert insecure["dns"]["hosts"][0]["tlsa_skipped"] == "the MX records are not DNSSEC-secure"
    assert candidates(insecure) == [("mx.insecure.test", "may", False, None)]

    # dane-only from a policy row: the bogus host is out, the host with TLSA carries the mail.
    mixed = show(server, "mixed.secure.test", "--json")
    assert (mixed["level"], mixed["source"]) == ("dane-only", "delivery.policy[0] for mixed.secure.test")
    assert candidates(mixed) == [("live.secure.test", "dane", True, "live.secure.test")]
    assert mixed["plan"]["skipped"] == ["mx.bogus.test: dane-only, and its address records are not "
                                        "DNSSEC-secure"]

    # secure: an alias out of the signed zone makes the MX answer insecure, so nothing is tried.
    outward = show(server, "outward.secure.test", "--json")
    assert outward["source"] == "delivery.policy[2] for outward.secure.test"  # exact beats .suffix
    assert outward["plan"]["candidates"] == [] and outward["plan"]["refusal"] == {
        "permanent": False, "status": "4.7.5",
        "reason": "level secure (delivery.policy[2] for outward.secure.test) needs DNSSEC-secure MX records, "
                  "and those of outward.secure.test are not"}

    # A zone that fails validation: DNS gives no answer to use, and delivery would wait.
    bogus = show(server, "bogus.test", "--json")
    assert bogus["dns"]["consulted"] is False and "SERVFAIL for MX bogus.test" in bogus["dns"]["reason"]
    assert bogus["plan"]["refusal"]["status"] == "4.4.3"

    text = show(server, "fall.secure.test")
    assert text.startswith("fall.secure.test: MX delivery (mx:fall.secure.test, port 25)\n"
                           "level: dane (DANE where the host has DNSSEC-secure TLSA records, otherwise as "
                           "may)\n  set by delivery.security, the default\n")
    assert (f"   20 live.secure.test: {LIVE} (secure)\n"
            "      TLSA: secure, 3 1 1; base domain live.secure.test\n") in text
    assert f"  live.secure.test[{LIVE}]:25: dane: TLS required, authenticated by the TLSA records" in text


def test_unreachable_resolver_leaves_the_configured_part(make_server: MakeServer) -> None:
    # The test servers' default resolver is a loopback port where nothing answers.
    server = make_server(start=False, deliver=True, extra_toml=delivery_toml(security='"encrypt"'))
    text = show(server, "example.org")
    assert text.startswith("example.org: MX delivery (mx:example.org, port 25)\n"
                           "level: encrypt (TLS required, the certificate is not checked)\n"
                           "  set by delivery.security, the default\n"
                           "DNS was not consulted: ")
    # Refused or unanswered, depending on the kernel; either way one sentence naming the resolver.
    (reason,) = [line for line in text.splitlines() if line.startswith("DNS was not consulted")]
    assert "resolver 127.0.0.1:9" in reason and reason.endswith("check dns.resolvers.")
    assert "  the mail is deferred: 4.4.3 DNS lookup for example.org failed" in text
    local = show(server, "example.test")
    assert local == ("example.test: local delivery\nlevel: none (never TLS)\n"
                     "  set by local_domains: delivered here without SMTP\n"
                     "DNS was not consulted: local delivery makes no SMTP connection.\n")
