"""MTA-STS destinations for the DNS lab (dnssec.py): the unsigned ``sts.test`` zone, the records
added to the signed ``dane.test`` zone, and the policies the HTTPS policy server hands out.

Every ``mta-sts.<domain>`` name points at POLICY_SERVER, where a test runs one HTTPS server on
port 443 (RFC 8461 §3.3 names no other port) with a certificate from a private CA that names all
of them. MX hosts live on their own loopback addresses with the lab's shared SMTP port:

* PKIX: a mailward whose certificate, from the same private CA, names mx-good.sts.test only.
* STRIP: a test's proxy that removes STARTTLS in front of PKIX.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

POLICY_SERVER = "127.0.54.1"
PKIX = "127.0.54.10"
STRIP = "127.0.54.11"
ADDRESSES = (PKIX, STRIP)

ZONE = "sts.test"
MAX_AGE = 86400


def _policy(mode: str, *mx: str) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {MAX_AGE}"]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass(frozen=True)
class Served:
    """What the policy server answers for one mta-sts.<domain>."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)


# The cached policy a test stores in the sender's queue before it starts, under an id the TXT
# record no longer carries: the fetch is due, and what happens then is the test.
CACHED_ID = "old1"
CACHED = {
    f"changed.{ZONE}": _policy("enforce", f"elsewhere.{ZONE}"),  # replaced by a testing policy
    f"cached.{ZONE}": _policy("enforce", f"elsewhere.{ZONE}"),  # the refresh fails: still enforced
}

POLICIES: dict[str, Served] = {
    f"enforce-ok.{ZONE}": Served(body=_policy("enforce", f"mx-good.{ZONE}")),
    f"enforce-bad.{ZONE}": Served(body=_policy("enforce", f"mx-good.{ZONE}")),
    f"wildcard.{ZONE}": Served(body=_policy("enforce", f"*.{ZONE}")),
    f"testing.{ZONE}": Served(body=_policy("testing", f"mx-good.{ZONE}")),
    # A redirect to a policy that would refuse the MX: following it would defer the mail.
    f"redirect.{ZONE}": Served(301, b"", (("Location", f"https://mta-sts.enforce-bad.{ZONE}"
                                                        "/.well-known/mta-sts.txt"),)),
    # Valid lines, too many of them: over 64 KiB, so no policy and opportunistic delivery.
    f"oversized.{ZONE}": Served(body=_policy("enforce", f"elsewhere.{ZONE}") + b"x: y\r\n" * 12_000),
    f"strip.{ZONE}": Served(body=_policy("enforce", f"*.{ZONE}")),
    f"changed.{ZONE}": Served(body=_policy("testing", f"mx-good.{ZONE}")),
    f"cached.{ZONE}": Served(500, b"down for maintenance\n"),
    # DANE and MTA-STS both published; the TLSA record matches nothing, so the mail waits.
    "nomatch-only.dane.test": Served(body=_policy("enforce", "nomatch.dane.test")),
}


def sts_zone(nsd: str) -> str:
    """The unsigned zone: every destination has its TXT record and its mta-sts host."""
    mx = {
        "enforce-ok": "mx-good", "enforce-bad": "mx-other", "wildcard": "mx-other", "testing": "mx-other",
        "redirect": "mx-other", "oversized": "mx-other", "strip": "mx-strip", "changed": "mx-other",
        "cached": "mx-good",
    }
    records = "".join(
        f'{name:<16}  MX    10 {host}\n_mta-sts.{name:<7}  TXT   "v=STSv1; id=new1"\n'
        f"mta-sts.{name:<8}  A     {POLICY_SERVER}\n"
        for name, host in mx.items())
    return f"""\
$ORIGIN {ZONE}.
$TTL 300
@                 SOA   ns hostmaster 1 3600 600 86400 300
@                 NS    ns
ns                A     {nsd}
mx-good           A     {PKIX}
mx-other          A     {PKIX}
mx-strip          A     {STRIP}
{records}"""


def dane_zone_records() -> str:
    """Lines for the signed dane.test zone: an MTA-STS policy beside failing DANE."""
    return f"""\
_mta-sts.nomatch-only  TXT  "v=STSv1; id=dane1"
mta-sts.nomatch-only   A    {POLICY_SERVER}
"""


def policy_names() -> list[str]:
    return [f"mta-sts.{domain}" for domain in POLICIES]


class StsPki:
    """The lab's private Web PKI: a CA (its PEM at `ca_file`, for a sender's mta_sts.ca_file),
    server contexts for the HTTPS servers, and the certificate of mx-good.sts.test for PKIX."""

    def __init__(self, root: Path, organization: str) -> None:
        self.ca = trustme.CA(organization_name=organization)
        self.ca_file = root / "sts-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        mx = self.ca.issue_cert("mx-good.sts.test")
        self.mx_cert, self.mx_key = root / "mx.pem", root / "mx.key"
        for pem in mx.cert_chain_pems:
            pem.write_to_path(str(self.mx_cert), append=True)
        mx.private_key_pem.write_to_path(str(self.mx_key))

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side context with a certificate for `names` (default: every policy host)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*(names or policy_names())).configure_cert(context)
        return context
