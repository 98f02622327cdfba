"""`mailward check --host H --port 465|587`: a submission server as a mail client should insist on
it (RFC 8314).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailward.check.parts import SCHEMA, CheckError, note, probe, probe_settings, requirement_report
from mailward.config import Config
from mailward.delivery.dns import DnsError, DnsPermanentError, DnsResolver
from mailward.delivery.policy import Candidate, SecurityLevel, TlsRequirement

# --- a submission server -----------------------------------------------------------------------------


def _legacy_context() -> ssl.SSLContext:
    # Only TLS 1.0 and 1.1, and OpenSSL's security level lowered so it will still offer them:
    # a server that completes this handshake accepts what RFC 8996 retired.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await reader.readuntil(b"\n")).decode("ascii", "replace")
        if line[3:4] != "-":
            return line


async def legacy_tls(host: str, address: str, port: int, *, implicit: bool, helo: str,
                     timeout: float) -> str | None:
    """The TLS version older than 1.2 that the server accepts, or None when it refuses them all (or
    cannot be asked). A second connection, for this question only: delivery's contexts never offer
    such versions."""
    ctx = _legacy_context()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            if implicit:
                _, writer = await asyncio.open_connection(address, port, ssl=ctx, server_hostname=host)
            else:
                reader, writer = await asyncio.open_connection(address, port)
                await _reply(reader)
                writer.write(f"EHLO {helo}\r\n".encode())
                await _reply(reader)
                writer.write(b"STARTTLS\r\n")
                if not (await _reply(reader)).startswith("220"):
                    return None
                await writer.start_tls(ctx, server_hostname=host)
            sslobj = writer.get_extra_info("ssl_object")
            return None if sslobj is None else str(sslobj.version())
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None  # ssl.SSLError is an OSError: the server refused the old versions
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await writer.wait_closed()


async def check_submission(host: str, port: int, config: Config, resolver: DnsResolver, *,
                           ca_file: Path | None = None, implicit: bool | None = None) -> dict[str, Any]:
    """Implicit TLS (465) or STARTTLS (587) to `host`, as a mail client should insist on it
    (RFC 8314): a certificate valid for the name, TLS 1.2 or newer, AUTH only after TLS."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    status = "insecure"  # an address literal carries no DNSSEC status
    if literal is not None:
        addresses: Sequence[str] = (str(literal),)
    else:
        try:
            found = await resolver.addresses(host)
        except DnsPermanentError:
            raise CheckError(f"host {host} does not exist (NXDOMAIN); check the name.") from None
        except DnsError as exc:
            raise CheckError(f"the addresses of {host} cannot be looked up: {exc}") from None
        if not found.addresses:
            raise CheckError(f"host {host} has no address records; check the name.")
        addresses, status = found.addresses, found.status
    if implicit is None:
        implicit = port == 465
    requirement = TlsRequirement(SecurityLevel.VERIFY, starttls=True, required=True, verify="pkix",
                                 verify_name=host.strip("[]"), ca_file=ca_file, implicit=implicit,
                                 reason="a submission client must verify the server (RFC 8314 §5)")
    settings = probe_settings(config)
    entry: dict[str, Any] = {"name": host, "preference": 0, "addresses": list(addresses), "dnssec": status,
                             "error": None, "tlsa": None, "tlsa_skipped": "a submission server has no DANE",
                             "tlsa_ignored": None, "mta_sts_match": None, "skipped": None,
                             "requirement": requirement_report(requirement)}
    report: dict[str, Any] = {"schema": SCHEMA, "kind": "submission", "domain": host, "port": port,
                              "verdict": "error", "reason": "", "mx": [entry], "findings": [],
                              "delivery": None}
    connections = [await probe(Candidate(host.strip("[]"), a, port, requirement), settings, ca_file=ca_file)
                   for a in addresses]
    for c in connections:
        c["legacy_tls"] = await legacy_tls(host.strip("[]"), c["address"], port, implicit=implicit,
                                           helo=settings.helo_name, timeout=settings.connect_timeout)
    entry["connections"] = connections
    first = next((c for c in connections if c["accepted"]), connections[0])
    entry["verdict"] = first["verdict"]
    entry["reason"] = first["error"] or first["outcome"]
    problems: list[str] = []
    for c in connections:
        before = c["ehlo"] or []
        if not implicit and any(k.split()[0] in ("AUTH", "AUTH=") for k in before):
            problems.append(f"{c['relay']} offers AUTH before STARTTLS: passwords may be sent in clear "
                            "(RFC 8314 §5, RFC 4954 §4)")
        if c["legacy_tls"] is not None:
            problems.append(f"{c['relay']} accepts {c['legacy_tls']}; TLS 1.2 is the minimum (RFC 8996, "
                            "RFC 8314 §4.1): disable the older versions")
        pkix = c["pkix"]
        if not c["accepted"] and pkix is not None:
            if not pkix["name_matches"]:
                problems.append(f"the certificate of {c['relay']} is not valid for {host} (names: "
                                f"{', '.join(c['certificates'][0].get('names', [])) or 'none'})")
            if not pkix["trusted"]:
                problems.append(f"the certificate of {c['relay']} does not chain to a trusted CA"
                                + ("" if ca_file is None else f" in {ca_file}"))
    for text in problems:
        note(report, "error", text, host)
    if any(c["accepted"] for c in connections):
        auth = [k for k in (first["ehlo_tls"] or []) if k.split()[0] == "AUTH"]
        if not auth:
            note(report, "info", "no AUTH offered after TLS: users cannot log in here", host)
        report["verdict"] = "insecure" if problems else "secure"
        report["reason"] = (f"{first['outcome']}" + (f"; {problems[0]}" if problems else
                                                     "; AUTH is offered only over TLS"))
    elif any(c["connected"] for c in connections) and problems:
        report["verdict"] = "insecure"
        report["reason"] = problems[0]
    else:
        report["verdict"] = "defer"
        report["reason"] = f"a client could not submit: {first['error']}"
    return report


