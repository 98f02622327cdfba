"""TLS reporting (RFC 8460) for the DNS lab (dnssec.py): `_smtp._tls` records beside the DANE, plain
and MTA-STS destinations, and the two places reports go.

* MAILBOX: a mailward on its own loopback address (the lab's shared SMTP port) whose local domain
  is REPORT_DOMAIN; ``mailto:`` reports are delivered to its Maildir by the sender's own queue.
* SINK: an HTTPS server (a test's, with a certificate from the test's private CA for SINK_NAME)
  on the shared port, taking ``https:`` reports. A POST to FLAKY_PATH fails once before it works;
  a URL naming the sink by its address fails every time, as the certificate does not name it.

Some destinations publish nothing, or a record that is not valid (two rua fields): no report goes
to them.
"""

from __future__ import annotations

MAILBOX = "127.0.55.10"
SINK = "127.0.55.1"
ADDRESSES = (MAILBOX, SINK)

REPORT_DOMAIN = "reports.sts.test"
REPORT_BOX = "tlsrpt"
SINK_NAME = "tlsrpt-sink.sts.test"
REPORT_PATH = "/v1/tlsrpt"
FLAKY_PATH = "/v1/flaky"


def mailto() -> str:
    return f"mailto:{REPORT_BOX}@{REPORT_DOMAIN}"


def https(port: int, path: str = REPORT_PATH) -> str:
    return f"https://{SINK_NAME}:{port}{path}"


def untrusted(port: int) -> str:
    return f"https://{SINK}:{port}{REPORT_PATH}"


def rua(port: int) -> dict[str, str]:
    """The rua field of each destination that publishes a valid record."""
    return {
        "fallback.dane.test": f"{mailto()},{https(port)}",
        "bogus.dane.test": mailto(),
        "clear.unsigned.test": mailto(),
        "tls.unsigned.test": f"{https(port)},{untrusted(port)}",
        "enforce-ok.sts.test": https(port),
        "wildcard.sts.test": f"{mailto()},{https(port, FLAKY_PATH)}",
        "enforce-bad.sts.test": mailto(),
        "cached.sts.test": mailto(),
    }


INVALID = {"testing.sts.test": "v=TLSRPTv1; rua=mailto:a@reports.sts.test; rua=mailto:b@reports.sts.test"}


def _records(zone: str, port: int) -> str:
    lines = [f'_smtp._tls.{d.removesuffix("." + zone):<12} TXT "v=TLSRPTv1; rua={r}"'
             for d, r in rua(port).items() if d.endswith("." + zone)]
    lines += [f'_smtp._tls.{d.removesuffix("." + zone):<12} TXT "{text}"'
              for d, text in INVALID.items() if d.endswith("." + zone)]
    return "\n".join(lines) + "\n"


def dane_zone_records(port: int) -> str:
    """Lines for the signed dane.test zone."""
    return _records("dane.test", port)


def unsigned_zone_records(port: int) -> str:
    """Lines for the unsigned.test zone."""
    return _records("unsigned.test", port)


def sts_zone_records(port: int) -> str:
    """Lines for the sts.test zone: the records, the mailbox's MX and the sink's address."""
    box = REPORT_DOMAIN.removesuffix(".sts.test")
    return _records("sts.test", port) + f"""\
{box:<17} MX    10 mx-{box}
mx-{box:<14} A     {MAILBOX}
{SINK_NAME.removesuffix(".sts.test"):<17} A     {SINK}
"""
