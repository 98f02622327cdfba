"""The MTA-STS policy fetch over real TLS on loopback: what the Web PKI check, the status and media
type rules, the size cap and the time limit make of each server (RFC 8461 §3.3), with the RFC 8460
result type each failure reports. DNS is replaced; the HTTPS server is real.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trustme

from mailward.delivery.dns import HostAddresses
from mailward.delivery.mtasts import (
    RESULT_FETCH_ERROR,
    RESULT_INVALID,
    RESULT_WEBPKI_INVALID,
    MtaSts,
    StsLookup,
)

DOMAIN = "example.org"
POLICY = b"version: STSv1\nmode: enforce\nmx: mx.example.org\nmax_age: 86400\n"


class Dns:
    async def txt(self, name: str) -> tuple[bytes, ...]:
        return (b"v=STSv1; id=1",)

    async def addresses(self, host: str) -> HostAddresses:
        assert host == f"mta-sts.{DOMAIN}"
        return HostAddresses(host, ("127.0.0.1",), "insecure")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answer(status: int, body: bytes, content_type: str = "text/plain", extra: str = "") -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
                         f"\r\nConnection: close\r\n{extra}\r\n".encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
    return handle


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


def lookup(tmp_path: Path, handler: Handler, *, names: tuple[str, ...] = (f"mta-sts.{DOMAIN}",),
           trusted: bool = True, timeout: float = 3.0) -> StsLookup:
    ca, other = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "ca.pem"
    (ca if trusted else other).cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)

    async def go() -> StsLookup:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            return await MtaSts(Dns(), None, ca_file=ca_file, timeout=timeout, port=port).lookup(DOMAIN)
        finally:
            server.close()

    return asyncio.run(go())


def test_a_valid_policy(tmp_path: Path) -> None:
    found = lookup(tmp_path, answer(200, POLICY, "text/plain; charset=utf-8"))
    assert found.policy is not None and found.policy.mx == ("mx.example.org",) and found.failure is None


@pytest.mark.parametrize(("names", "trusted"), [
    ((f"mta-sts.{DOMAIN}",), False),  # a CA the sender does not trust
    (("mta-sts.example.net",), True),  # a trusted certificate for another name
    ((DOMAIN,), True),  # the policy domain itself is not the name (§3.3)
])
def test_web_pki_failures(tmp_path: Path, names: tuple[str, ...], trusted: bool) -> None:
    found = lookup(tmp_path, answer(200, POLICY), names=names, trusted=trusted)
    assert found.policy is None and found.failure == RESULT_WEBPKI_INVALID, found


@pytest.mark.parametrize(("handler", "result", "detail"), [
    (answer(404, b"no\n"), RESULT_FETCH_ERROR, "HTTP 404"),
    (answer(302, b"", extra="Location: https://elsewhere.example/p\r\n"), RESULT_FETCH_ERROR, "not followed"),
    (answer(200, POLICY, "text/html"), RESULT_INVALID, "not text/plain"),
    (answer(200, POLICY + b"x: y\n" * 20_000), RESULT_INVALID, "larger than 65536 bytes"),
    (answer(200, b"version: STSv1\nmode: enforce\nmax_age: 1\n"), RESULT_INVALID, "needs at least one mx"),
    (silent, RESULT_FETCH_ERROR, "within 1s"),
])
def test_fetch_failures(tmp_path: Path, handler: Handler, result: str, detail: str) -> None:
    found = lookup(tmp_path, handler, timeout=1.0)
    assert found.policy is None and found.failure == result, found
    assert detail in found.detail, found.detail
