"""MTA-STS (RFC 8461) for outbound delivery: discovery, fetch, strict parsing and a persistent cache.

The parsers are pure (`parse_txt`, `parse_policy`) and tested from tables; `MtaSts` is the small
driver that asks DNS for `_mta-sts.<domain>` TXT, fetches the policy over HTTPS and keeps it in a
`PolicyStore` (the queue database, so the cache survives restarts and is shared by every node
that shares the queue). What the policy means for a delivery is decided in `policy.plan`, which
receives `StsPolicy.facts()`; DANE outranks it there.

Rules kept here, and why:

* §3.1: exactly one TXT record starting with ``v=STSv1`` and carrying a valid ``id``; anything else
  is "no policy published". A missing TXT does not evict a cached policy (§5.1): an attacker who
  suppresses the TXT must not switch enforcement off.
* §3.3: only HTTP 200 counts, redirects are never followed, the certificate must be valid for
  ``mta-sts.<domain>`` under the Web PKI (the CA bundle is configurable), the body is capped at
  64 KiB and the fetch is bounded in time. No proxy from the environment is used.
* §5.1 / §10.2: the policy is fetched again when the TXT id changes, and proactively before it
  expires; a failed fetch keeps using an unexpired cached policy. With neither, delivery goes on as
  if the domain had no policy (§3.3), and the failure is reported with an RFC 8460 result type.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol, runtime_checkable

from mailward.config import Config
from mailward.delivery.dns import DnsError, HostAddresses
from mailward.delivery.policy import Destination, RouteFacts, SecurityLevel, StsFacts, sts_matches
from mailward.queue import StsPolicyRecord

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_POLICY_BYTES",
    "RESULT_FETCH_ERROR",
    "RESULT_INVALID",
    "RESULT_WEBPKI_INVALID",
    "CachedPolicy",
    "MtaSts",
    "PolicyError",
    "PolicyStore",
    "StsLookup",
    "StsPolicy",
    "StsRecord",
    "StsResultType",
    "TxtResolver",
    "for_delivery",
    "parse_policy",
    "parse_txt",
    "sts_facts",
]

log = logging.getLogger("mailward.delivery")

MAX_POLICY_BYTES: Final = 64 * 1024  # §3.3 suggests 64 KB; a policy is a few lines
MAX_AGE_LIMIT: Final = 31_557_600  # §3.2: about one year
REFRESH_AFTER: Final = 86_400.0  # §10.2: refresh at least daily while the policy is in use
RETRY_FAILED_FETCH: Final = 300.0  # a failed refresh is not retried for every delivery
WELL_KNOWN: Final = "/.well-known/mta-sts.txt"

# RFC 8460 §4.3 result types for the MTA-STS failures this module detects; TLS-RPT reads them.
StsResultType = Literal["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]
RESULT_FETCH_ERROR: Final[StsResultType] = "sts-policy-fetch-error"
RESULT_INVALID: Final[StsResultType] = "sts-policy-invalid"
RESULT_WEBPKI_INVALID: Final[StsResultType] = "sts-webpki-invalid"


class PolicyError(Exception):
    """A policy could not be had or is not valid; `result_type` names it for TLS-RPT."""

    def __init__(self, reason: str, result_type: StsResultType = RESULT_INVALID) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result_type: StsResultType = result_type


# --- the TXT record (§3.1) -------------------------------------------------------------------------

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")


@dataclass(frozen=True, slots=True)
class StsRecord:
    """The `_mta-sts` TXT record: only its id matters to a sender."""

    id: str


def parse_txt(records: Sequence[str | bytes]) -> StsRecord | None:
    """The one valid STSv1 record among the TXT strings of `_mta-sts.<domain>`, or None.

    Records not starting with ``v=STSv1`` are someone else's and ignored; two STSv1 records, or
    one that is malformed, mean no policy is published (§3.1).
    """
    ours: list[str] = []
    for raw in records:
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        if text.startswith("v=STSv1"):
            ours.append(text)
    if len(ours) != 1:
        return None
    return _record(ours[0])


def _record(text: str) -> StsRecord | None:
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing ";" is allowed
    if not fields or fields[0] != "v=STSv1":
        return None
    found: str | None = None
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            return None
        if name == "id":
            if found is not None or not _ID.fullmatch(value):
                return None
            found = value
        elif not (_EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            return None
    return None if found is None else StsRecord(found)


# --- the policy (§3.2) -----------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed, valid policy."""

    mode: Literal["enforce", "testing", "none"]
    mx: tuple[str, ...]
    max_age: int
    text: str = ""  # as served, for TLS-RPT's policy-string and the cache

    def facts(self, ca_file: Path | None = None) -> StsFacts:
        return StsFacts(self.mode, self.mx, ca_file)

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """RFC 8460 §4.4 policy-string: the policy's lines."""
        return tuple(line for line in self.text.replace("\r\n", "\n").split("\n") if line)


def parse_policy(body: bytes) -> StsPolicy:
    """Parse a policy body strictly; raises PolicyError (sts-policy-invalid) when it is not valid.

    Keys and the version, mode values are case-sensitive (%s in the ABNF). Unknown keys are
    ignored (§3.2); a repeated version, mode or max_age is refused rather than guessed at.
    """
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError(f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the policy is not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line ending
    values: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        key, colon, value = line.partition(":")
        if not colon or not _KEY.fullmatch(key):
            raise PolicyError(f"line {number} is not a \"key: value\" field")
        value = value.lstrip(" \t").rstrip(" \t")
        if key == "mx":
            mx.append(_mx_pattern(value, number))
        elif key in ("version", "mode", "max_age"):
            if key in values:
                raise PolicyError(f"line {number} repeats the {key} field")
            values[key] = value
    if values.get("version") != "STSv1":
        raise PolicyError("the policy has no \"version: STSv1\" field")
    mode = values.get("mode")
    if mode is None:
        raise PolicyError("the policy has no mode field")
    modes: dict[str, Literal["enforce", "testing", "none"]] = {
        "enforce": "enforce", "testing": "testing", "none": "none"}
    if mode not in modes:
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    age = values.get("max_age")
    if age is None:
        raise PolicyError("the policy has no max_age field")
    if not (1 <= len(age) <= 10 and age.isascii() and age.isdigit()):
        raise PolicyError(f"max_age {age!r} is not a number of seconds")
    max_age = int(age)
    if max_age > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age} is over the limit of {MAX_AGE_LIMIT} seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} needs at least one mx field")
    return StsPolicy(modes[mode], tuple(dict.fromkeys(mx)), max_age, text)


def _mx_pattern(value: str, number: int) -> str:
    pattern = value.lower()
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.rstrip(".").split(".") if name else []
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"line {number}: mx {value!r} is not a host name or *.domain pattern")
    return pattern.rstrip(".")


# --- the cache and the fetch ------------------------------------------------------------------------


# A policy as kept in the store: its TXT id, the text as served, and when it was fetched.
CachedPolicy = StsPolicyRecord


@runtime_checkable
class PolicyStore(Protocol):
    """Where policies persist (`SqliteQueue` implements it)."""

    async def load_sts_policy(self, domain: str) -> CachedPolicy | None: ...

    async def save_sts_policy(self, policy: CachedPolicy) -> None: ...


@runtime_checkable
class TxtResolver(Protocol):
    """What `MtaSts` needs from `dns.DnsResolver`; DnsError for failed lookups."""

    async def txt(self, name: str) -> tuple[bytes, ...]: ...

    async def addresses(self, host: str) -> HostAddresses: ...


@dataclass(frozen=True, slots=True)
class StsLookup:
    """The policy to apply (None: none published, or none could be had) and what went wrong."""

    domain: str
    policy: StsPolicy | None = None
    failure: StsResultType | None = None
    detail: str = ""
    from_cache: bool = False
    txt_failed: bool = False  # the TXT lookup failed: whether a policy is published is unknown

    @property
    def facts(self) -> StsFacts | None:
        return None if self.policy is None else self.policy.facts()


class MtaSts:
    """Finds the MTA-STS policy of a next-hop domain, with a memory and a persistent cache."""

    def __init__(
        self,
        resolver: TxtResolver,
        store: PolicyStore | None,
        *,
        ca_file: Path | None = None,
        timeout: float = 10.0,
        port: int = 443,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.store = store
        self.timeout = timeout
        self.port = port  # 443 (§3.3); tests may move it
        self.clock = clock
        self._context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._memory: dict[str, CachedPolicy] = {}
        self._failed_until: dict[str, float] = {}  # domain -> when a failed fetch may be tried again
        self._inflight: dict[str, asyncio.Task[StsLookup]] = {}
        # Told of every lookup made (not of callers that shared one): TLS reporting counts failed
        # fetches and reports the policy that applied.
        self.observer: Callable[[StsLookup], None] | None = None

    async def lookup(self, domain: str, *, refetch: bool = False) -> StsLookup:
        """The policy for `domain`. `refetch` fetches even when the cached id is current (§5: before
        a message fails under enforce). Never raises for a domain's misconfiguration."""
        domain = domain.lower().rstrip(".")
        key = f"{domain}\0{refetch}"
        task = self._inflight.get(key)
        if task is None:
            # Concurrent deliveries to one domain fetch once.
            task = asyncio.ensure_future(self._observed(domain, refetch))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _observed(self, domain: str, refetch: bool) -> StsLookup:
        found = await self._lookup(domain, refetch)
        if self.observer is not None:
            self.observer(found)
        return found

    async def _lookup(self, domain: str, refetch: bool) -> StsLookup:
        now = self.clock()
        cached = await self._cached(domain, now)
        try:
            record = parse_txt(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DnsError as exc:
            # A failed TXT lookup is no reason to drop a policy we hold, nor to fetch one.
            if cached is not None:
                return self._use(domain, cached, detail=f"TXT lookup failed ({exc}); using the cached policy")
            return StsLookup(domain, detail=f"TXT lookup failed ({exc})", txt_failed=True)
        if record is None:
            if cached is not None:
                return self._use(domain, cached, detail="no valid TXT record; the cached policy stays (§5.1)")
            return StsLookup(domain)
        due = cached is None or cached.id != record.id or refetch or \
            now >= cached.fetched_at + min(REFRESH_AFTER, (cached.expires_at - cached.fetched_at) / 2)
        if not due and cached is not None:
            return self._use(domain, cached)
        if cached is not None and not refetch and now < self._failed_until.get(domain, 0.0):
            return self._use(domain, cached, detail="a recent refresh failed; using the cached policy")
        try:
            body = await self._fetch(domain)
            policy = parse_policy(body)
        except PolicyError as exc:
            self._failed_until[domain] = now + RETRY_FAILED_FETCH
            log.warning("MTA-STS policy of %s: %s (%s)", domain, exc.reason, exc.result_type)
            if cached is not None:
                why = f"refresh failed ({exc.reason}); using the cached policy"
                used = self._use(domain, cached, detail=why)
                return StsLookup(domain, used.policy, exc.result_type, used.detail, from_cache=True)
            return StsLookup(domain, None, exc.result_type, exc.reason)
        self._failed_until.pop(domain, None)
        fresh = CachedPolicy(domain, record.id, policy.text, now, now + policy.max_age)
        self._memory[domain] = fresh
        if self.store is not None:
            try:
                await self.store.save_sts_policy(fresh)
            except Exception as exc:  # the policy still applies; only persistence failed
                log.warning("MTA-STS policy of %s could not be stored: %s", domain, exc)
        log.info("MTA-STS policy of %s fetched: id %s, mode %s, max_age %d, mx %s", domain, record.id,
                 policy.mode, policy.max_age, ", ".join(policy.mx) or "(none)")
        return StsLookup(domain, policy)

    async def _cached(self, domain: str, now: float) -> CachedPolicy | None:
        cached = self._memory.get(domain)
        if cached is None and self.store is not None:
            try:
                cached = await self.store.load_sts_policy(domain)
            except Exception as exc:
                log.warning("MTA-STS cache for %s could not be read: %s", domain, exc)
                cached = None
            if cached is not None:
                self._memory[domain] = cached
        if cached is None or cached.expires_at <= now:
            return None
        return cached

    def _use(self, domain: str, cached: CachedPolicy, *, detail: str = "") -> StsLookup:
        try:
            policy = parse_policy(cached.text.encode())
        except PolicyError:
            # Only valid policies are stored; a damaged row is as good as none.
            self._memory.pop(domain, None)
            return StsLookup(domain, detail="the cached policy is damaged")
        if detail:
            log.info("MTA-STS %s: %s", domain, detail)
        return StsLookup(domain, policy, detail=detail, from_cache=True)

    async def _fetch(self, domain: str) -> bytes:
        host = f"mta-sts.{domain}"
        try:
            addresses = (await self.resolver.addresses(host)).addresses
        except DnsError as exc:
            raise PolicyError(f"{host} cannot be resolved ({exc})", RESULT_FETCH_ERROR) from None
        if not addresses:
            raise PolicyError(f"{host} has no address records", RESULT_FETCH_ERROR)
        errors: list[str] = []
        for address in addresses:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._get(host, address)
            except TimeoutError:
                errors.append(f"{address}: no policy within {self.timeout:g}s")
            except PolicyError as exc:
                if exc.result_type != RESULT_FETCH_ERROR or not exc.reason.startswith("connect:"):
                    raise  # the server answered: another address would not be more trustworthy
                errors.append(f"{address}: {exc.reason.removeprefix('connect: ')}")
            except (OSError, ValueError) as exc:
                # Whatever else a hostile server provokes is a failed fetch, not a failed delivery.
                errors.append(f"{address}: {exc or type(exc).__name__}")
        raise PolicyError(f"https://{host}{WELL_KNOWN} could not be fetched ({'; '.join(errors)})",
                          RESULT_FETCH_ERROR)

    async def _get(self, host: str, address: str) -> bytes:
        import httpx  # only delivery with MTA-STS needs it

        ip = ipaddress.ip_address(address)
        authority = f"[{ip}]" if ip.version == 6 else str(ip)
        # Connect to the address our resolver gave, and verify the certificate against the name
        # (httpcore takes the SNI and verification name from `sni_hostname`).
        url = f"https://{authority}:{self.port}{WELL_KNOWN}"
        timeout = httpx.Timeout(self.timeout)
        try:
            async with httpx.AsyncClient(verify=self._context, timeout=timeout, follow_redirects=False,
                                         trust_env=False) as client:
                request = client.build_request(
                    "GET", url, headers={"Host": host, "Accept-Encoding": "identity"},
                    extensions={"sni_hostname": host})
                response = await client.send(request, stream=True)
                try:
                    return await _read_policy(response, host)
                finally:
                    await response.aclose()
        except httpx.ConnectError as exc:
            if _certificate_error(exc) is not None:
                raise PolicyError(f"the certificate of {host} is not valid: {_certificate_error(exc)}",
                                  RESULT_WEBPKI_INVALID) from None
            raise PolicyError(f"connect: {exc or type(exc).__name__}", RESULT_FETCH_ERROR) from None
        except httpx.TimeoutException:
            raise PolicyError(f"connect: no answer within {self.timeout:g}s", RESULT_FETCH_ERROR) from None
        except httpx.HTTPError as exc:
            raise PolicyError(f"the HTTPS exchange with {host} failed ({exc or type(exc).__name__})",
                              RESULT_FETCH_ERROR) from None


async def _read_policy(response: object, host: str) -> bytes:
    import httpx

    assert isinstance(response, httpx.Response)
    if response.status_code != 200:
        where = response.headers.get("location")
        what = f"HTTP {response.status_code}" + (f" redirecting to {where} (not followed)" if where else "")
        raise PolicyError(f"https://{host}{WELL_KNOWN} answered {what}", RESULT_FETCH_ERROR)
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "text/plain":
        raise PolicyError(f"the policy is served as {kind or 'no media type'}, not text/plain",
                          RESULT_INVALID)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > MAX_POLICY_BYTES:
            raise PolicyError(f"the policy is larger than {MAX_POLICY_BYTES} bytes", RESULT_INVALID)
    return bytes(body)


def for_delivery(config: Config, resolver: object, store: object) -> MtaSts | None:
    """The Deliverer's MtaSts (memory cache, TLS context), or None when MTA-STS is off or the
    resolver cannot look up TXT records."""
    ms = config.mta_sts
    if not ms.enabled or not isinstance(resolver, TxtResolver):
        return None
    return MtaSts(resolver, store if isinstance(store, PolicyStore) else None,
                  ca_file=ms.ca_file, timeout=ms.fetch_timeout)


async def sts_facts(sts: MtaSts | None, config: Config, destination: Destination, facts: RouteFacts, *,
                    final: bool = False) -> StsFacts | None:
    """The MTA-STS facts `policy.plan` needs for one delivery, or None where MTA-STS does not apply.

    MTA-STS is about the recipient domain's own MX hosts (§4), and `plan` consults it only at level
    `dane`, so routes, the smarthost and explicit levels skip the lookups. `final` (a message about
    to expire) fetches the policy again before an enforce failure becomes a bounce (§5).
    """
    if (sts is None or destination.kind != "mx" or destination.next_hop is not None
            or destination.level is not SecurityLevel.DANE):
        return None
    found = await sts.lookup(destination.domain)
    if final and found.policy is not None and found.policy.mode == "enforce":
        found = await sts.lookup(destination.domain, refetch=True)
    policy = found.policy
    if policy is None:
        # Announced, or not known to be absent, but not to be had, and nothing cached: delivered as
        # if there were none, except what needs it (REQUIRETLS), which waits.
        unavailable = found.failure is not None or found.txt_failed
        return StsFacts("none", unavailable=True) if unavailable else None
    if policy.mode == "testing":
        # Delivered anyway (§5); what enforce would have refused is logged for the operator.
        for host in facts.hosts:
            if not any(sts_matches(p, host.name) for p in policy.mx):
                log.info("%s: MTA-STS policy in testing mode does not list MX host %s; delivering anyway",
                         destination.key, host.name)
    return policy.facts(config.mta_sts.ca_file)


def _certificate_error(exc: BaseException) -> str | None:
    """The certificate verification failure behind a connect error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return text if "CERTIFICATE_VERIFY_FAILED" in text else None
