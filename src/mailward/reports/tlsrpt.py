"""SMTP TLS reporting (RFC 8460): the `_smtp._tls` record, the tally of outcomes and the daily report.

This module owns everything TLS-RPT:

* `parse_tlsrpt_record` / `select_tlsrpt_record`: the reporting policy a domain publishes in DNS
  (§3), parsed strictly; `mailward check` uses them too.
* `TlsReporter`: the Deliverer hands it one typed outcome per outbound TLS session (and the MTA-STS
  lookups); it batches the counts into the queue store (`TlsRptStore`, implemented by the queue),
  so every node that shares a queue reports together and a restart does not lose the day.
* `build_report`: the §4 JSON document for one domain and UTC day, from the stored tallies.
* `ReportSender`: once a day, looks up each reported domain's record and delivers the gzipped report
  to every ``rua``: ``mailto:`` as a §5.3 ``multipart/report`` message queued like any other mail
  (marked in its envelope so its own delivery is never reported), ``https:`` by POST with httpx.

Libraries: the stdlib's `gzip`, `json` and `email` (MIME), and httpx for the HTTPS upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args, runtime_checkable
from urllib.parse import unquote, urlsplit

from mailward.queue import Envelope, QueueError, Recipient, TlsRptTally

if TYPE_CHECKING:
    from mailward.config import Config
    from mailward.delivery.dns import HostAddresses
    from mailward.delivery.mtasts import StsLookup
    from mailward.delivery.policy import Candidate
    from mailward.queue import Transaction

__all__ = [
    "NO_POLICY",
    "RESULT_TYPES",
    "PolicyType",
    "ReportPolicy",
    "ReportSender",
    "ReportUploadError",
    "ResultType",
    "TlsReporter",
    "TlsRptRecord",
    "TlsRptRecordError",
    "TlsRptStore",
    "build_report",
    "build_report_mail",
    "handshake_result_type",
    "next_run_at",
    "parse_tlsrpt_record",
    "policy_for",
    "report_bytes",
    "report_id",
    "select_tlsrpt_record",
    "sts_testing_failure",
    "utc_day",
]

log = logging.getLogger("mailward.tlsrpt")

VERSION: Final = "v=TLSRPTv1"

# RFC 8460 §3 ABNF: extension names and values; unknown extensions are allowed and ignored.
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# A URI as RFC 3986 spells it, loosely: scheme ":" then visible ASCII without "," or "!" (which
# §3 says MUST be percent-encoded inside a rua URI).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x22-\x2b\x2d-\x7e]+")


class TlsRptRecordError(ValueError):
    """The `_smtp._tls` TXT record is not a valid TLSRPTv1 record; the message says why."""


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A valid TLSRPTv1 record: where reports go, in the order published."""

    rua: tuple[str, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        """The addresses of the mailto: URIs (query parts dropped)."""
        return tuple(_mailto_address(uri) for uri in self.rua if uri[:7].lower() == "mailto:")

    @property
    def https(self) -> tuple[str, ...]:
        return tuple(uri for uri in self.rua if uri[:8].lower() == "https://")


def _mailto_address(uri: str) -> str:
    return unquote(uri[7:].partition("?")[0])


def parse_tlsrpt_record(text: str) -> TlsRptRecord:
    """Parse one TXT record strictly (RFC 8460 §3); raises TlsRptRecordError when it is not valid.

    The version is case-sensitive and must come first; there must be exactly one ``rua`` field with
    at least one URI; other fields must be syntactically valid extensions and are ignored. Every
    URI is kept, whatever its scheme: the sender uses the ones it supports (mailto, https).
    """
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "" and len(fields) > 1:
        fields.pop()  # a trailing ";" is allowed
    if not fields or fields[0] != VERSION:
        raise TlsRptRecordError(f"the record does not start with {VERSION}")
    rua: tuple[str, ...] | None = None
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            raise TlsRptRecordError(f"field {item!r} is not name=value")
        if name == "rua":
            if rua is not None:
                raise TlsRptRecordError("the record has more than one rua field")
            uris = tuple(u.strip(" \t") for u in value.split(","))
            for uri in uris:
                if not _URI.fullmatch(uri):
                    raise TlsRptRecordError(f"rua {uri!r} is not a URI")
            rua = uris
        elif not (_EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            raise TlsRptRecordError(f"field {item!r} is not a valid extension")
    if rua is None:
        raise TlsRptRecordError("the record has no rua field")
    return TlsRptRecord(rua)


def select_tlsrpt_record(records: Sequence[str | bytes]) -> TlsRptRecord:
    """The one valid record among the TXT strings of `_smtp._tls.<domain>`.

    Records not starting with ``v=TLSRPTv1`` are someone else's and ignored; none, or more than
    one, or one that is malformed means the domain does not take reports (§3). Raises
    TlsRptRecordError saying which.
    """
    ours: list[str] = []
    for raw in records:
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        if text.startswith(VERSION):
            ours.append(text)
    if not ours:
        raise TlsRptRecordError("no TXT record starts with v=TLSRPTv1")
    if len(ours) > 1:
        raise TlsRptRecordError(f"{len(ours)} TXT records start with v=TLSRPTv1; exactly one may")
    return parse_tlsrpt_record(ours[0])


# --- result and policy types (§4.3, §4.4) ---------------------------------------------------------

ResultType = Literal[
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid",
]
RESULT_TYPES: Final = frozenset(get_args(ResultType))
PolicyType = Literal["tlsa", "sts", "no-policy-found"]

# OpenSSL's X509_V_ERR_* codes that have a result type of their own; anything else is a
# validation-failure (§4.3.1: "a general failure for a reason not matching a category above").
_EXPIRED: Final = frozenset({9, 10})  # not yet valid, has expired
_NOT_TRUSTED: Final = frozenset({2, 18, 19, 20, 21, 27})  # unknown issuer, self-signed, untrusted
_HOST_MISMATCH: Final = 62


def handshake_result_type(exc: BaseException) -> ResultType:
    """The result type of a TLS handshake that failed with `exc`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _EXPIRED:
            return "certificate-expired"
        if code == _HOST_MISMATCH:
            return "certificate-host-mismatch"
        if code in _NOT_TRUSTED:
            return "certificate-not-trusted"
    return "validation-failure"


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The policy a session was held to, as §4.4 names it."""

    type: PolicyType
    strings: tuple[str, ...] = ()  # policy-string: TLSA records, or the MTA-STS policy's lines
    mx_hosts: tuple[str, ...] = ()  # mx-host: the MX host (tlsa) or the policy's mx patterns (sts)


NO_POLICY: Final = ReportPolicy("no-policy-found")


def policy_for(candidate: Candidate, sts: StsLookup | None) -> ReportPolicy:
    """The policy a connection to `candidate` was planned under: DANE when TLSA records decided
    its requirement (DANE outranks MTA-STS), MTA-STS when the domain's policy is enforced or
    tested, otherwise none."""
    tls = candidate.tls
    if tls.tlsa:
        records = tuple(f"{r.usage} {r.selector} {r.matching_type} {r.data.hex().upper()}" for r in tls.tlsa)
        return ReportPolicy("tlsa", records, (candidate.host,))
    if sts is not None and sts.policy is not None and sts.policy.mode != "none":
        return ReportPolicy("sts", sts.policy.policy_strings, sts.policy.mx)
    return NO_POLICY


# --- the tally ------------------------------------------------------------------------------------


@runtime_checkable
class TlsRptStore(Protocol):
    """Where tallies and sent reports persist (`SqliteQueue` implements it)."""

    async def add_tlsrpt_tallies(self, tallies: Sequence[TlsRptTally]) -> None: ...

    async def load_tlsrpt_tallies(self, day: str, domain: str | None = None) -> list[TlsRptTally]: ...

    async def mark_tlsrpt_sent(self, day: str, domain: str, report_id: str, now: float) -> bool: ...

    async def tlsrpt_sent(self, day: str) -> dict[str, str]: ...

    async def prune_tlsrpt(self, before: str) -> None: ...


def utc_day(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).date().isoformat()


FLUSH_DELAY: Final = 2.0  # seconds of outcomes written in one store transaction
_REASON_LIMIT: Final = 300  # characters of diagnostic text kept per failure


class TlsReporter:
    """Counts outbound TLS sessions per policy domain and UTC day, writing them in batches.

    Nothing here may hold up delivery: a store that fails loses counts and says so in the log.
    """

    def __init__(self, store: TlsRptStore, *, clock: Callable[[], float] = time.time,
                 flush_delay: float = FLUSH_DELAY) -> None:
        self.store = store
        self.clock = clock
        self.flush_delay = flush_delay
        self._pending: dict[TlsRptTally, int] = {}
        self._sts: dict[str, StsLookup] = {}
        self._failed_fetch: dict[str, StsLookup] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    # --- what the Deliverer and MtaSts report ---

    def sts_lookup(self, lookup: StsLookup) -> None:
        """An MTA-STS lookup finished (MtaSts.observer): remember the policy for the sessions that
        follow; a failed fetch waits for `sts_failure` to say whether it counts."""
        self._sts[lookup.domain] = lookup
        if lookup.failure is not None:
            self._failed_fetch[lookup.domain] = lookup

    def sts_failure(self, domain: str, *, count: bool) -> None:
        """The Deliverer consulted `domain`'s policy: count a fetch that failed meanwhile (§4.3.2.2),
        unless the lookup was made only for our own reports (`count` False), which must not report
        on themselves."""
        lookup = self._failed_fetch.pop(domain, None)
        if lookup is not None and lookup.failure is not None and count:
            self._add(domain, policy_for_sts(lookup), lookup.failure, reason=lookup.detail)

    def sts(self, domain: str) -> StsLookup | None:
        return self._sts.get(domain)

    def session(self, domain: str, policy: ReportPolicy, result_type: ResultType | None, *,
                mx_host: str = "", receiving_ip: str = "", sending_ip: str = "", reason: str = "") -> None:
        """One TLS session with a host of `domain`: successful (`result_type` None) or failed."""
        if result_type is None:
            self._add(domain, policy, None)
        else:
            self._add(domain, policy, result_type, mx_host=mx_host, receiving_ip=receiving_ip,
                      sending_ip=sending_ip, reason=reason)

    def _add(self, domain: str, policy: ReportPolicy, result_type: ResultType | None, *, mx_host: str = "",
             receiving_ip: str = "", sending_ip: str = "", reason: str = "") -> None:
        domain = domain.lower().rstrip(".")
        if not domain:
            return
        key = TlsRptTally(utc_day(self.clock()), domain, policy.type, policy.strings, policy.mx_hosts,
                          result_type or "", sending_ip, mx_host, receiving_ip,
                          _one_line(reason)[:_REASON_LIMIT] if result_type else "", count=1)
        self._pending[key] = self._pending.get(key, 0) + 1
        if self._timer is None:
            with contextlib.suppress(RuntimeError):  # no loop: the next flush() writes it
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.flush_delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Write the counts gathered so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch = [replace(key, count=n) for key, n in self._pending.items()]
        self._pending.clear()
        try:
            await self.store.add_tlsrpt_tallies(batch)
        except Exception as exc:  # whatever the store raises, delivery goes on
            log.warning("TLS report counts for %d sessions could not be stored: %s",
                        sum(t.count for t in batch), exc)

    async def close(self) -> None:
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        await self.flush()


def sts_testing_failure(mx: Sequence[str], host: str, chain: Sequence[bytes], ca_file: Path | None,
                        now: datetime | None = None) -> tuple[ResultType, str] | None:
    """What an enforced MTA-STS policy would have refused in a session held to a `testing` one
    (RFC 8461 §5: delivered anyway, and reported): an MX host the policy does not list (§4.1), or a
    certificate that is not valid for the host under the Web PKI (§4.2). None when it would pass."""
    from cryptography import x509

    from mailward.delivery.dane import name_matches
    from mailward.delivery.policy import sts_matches
    from mailward.tls import chain_trusted

    if not any(sts_matches(pattern, host) for pattern in mx):
        return "validation-failure", f"{host} is not listed in the MTA-STS policy"
    if not chain:
        return "certificate-not-trusted", "the server sent no certificate"
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
    except ValueError:
        return "validation-failure", "the server's certificate cannot be parsed"
    moment = now or datetime.now(UTC)
    if not leaf.not_valid_before_utc <= moment <= leaf.not_valid_after_utc:
        return "certificate-expired", f"the certificate is valid from {leaf.not_valid_before_utc:%Y-%m-%d} " \
                                      f"to {leaf.not_valid_after_utc:%Y-%m-%d}"
    if not chain_trusted(chain, ca_file):
        return "certificate-not-trusted", "the certificate does not chain to a trusted CA"
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):  # none, or one that cannot be decoded
        names = []
    if not any(name_matches(n, host) for n in names):
        return "certificate-host-mismatch", f"the certificate does not name {host}"
    return None


def policy_for_sts(lookup: StsLookup) -> ReportPolicy:
    """The sts policy a failed fetch is reported under: the cached policy when one is still used."""
    if lookup.policy is not None:
        return ReportPolicy("sts", lookup.policy.policy_strings, lookup.policy.mx)
    return ReportPolicy("sts")


def _one_line(text: str) -> str:
    # Reasons may quote a peer's reply: one line of printable text, whatever the peer sent.
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))


# --- the report (§4) ------------------------------------------------------------------------------


def report_id(day: str, domain: str, submitter: str) -> str:
    """A report id unique per (day, domain, submitter) and the same on every node, so a report that
    two nodes both try to send carries one id."""
    digest = hashlib.sha256(f"{day}\0{domain}\0{submitter}".encode()).hexdigest()[:16]
    return f"{day}.{digest}@{submitter}"


def day_range(day: str) -> tuple[datetime, datetime]:
    """The first and the last second of a UTC day."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
    return start, start + timedelta(days=1, seconds=-1)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(domain: str, day: str, tallies: Iterable[TlsRptTally], *, organization: str,
                 contact: str, report_id: str) -> dict[str, Any]:
    """The RFC 8460 §4 report for one policy domain and UTC day, as a JSON-ready dict."""
    start, end = day_range(day)
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[TlsRptTally]] = {}
    for t in tallies:
        if t.domain == domain and t.day == day:
            groups.setdefault((t.policy_type, t.policy_strings, t.mx_hosts), []).append(t)
    policies: list[dict[str, Any]] = []
    for (kind, strings, hosts), rows in sorted(groups.items()):
        policy: dict[str, Any] = {"policy-type": kind}
        if strings:
            policy["policy-string"] = list(strings)
        policy["policy-domain"] = domain
        if hosts:
            policy["mx-host"] = list(hosts)
        failures: dict[tuple[str, str, str, str, str], int] = {}
        successes = 0
        for t in rows:
            if t.result_type:
                key = (t.result_type, t.sending_ip, t.receiving_mx, t.receiving_ip, t.reason_code)
                failures[key] = failures.get(key, 0) + t.count
            else:
                successes += t.count
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": successes,
                        "total-failure-session-count": sum(failures.values())},
        }
        if failures:
            entry["failure-details"] = [_failure(key, n) for key, n in sorted(failures.items())]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _rfc3339(start), "end-datetime": _rfc3339(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def _failure(key: tuple[str, str, str, str, str], count: int) -> dict[str, Any]:
    result_type, sending_ip, mx, receiving_ip, reason = key
    detail: dict[str, Any] = {"result-type": result_type}
    if sending_ip:
        detail["sending-mta-ip"] = sending_ip
    if mx:
        detail["receiving-mx-hostname"] = mx
    if receiving_ip:
        detail["receiving-ip"] = receiving_ip
    detail["failed-session-count"] = count
    if reason:
        detail["failure-reason-code"] = reason
    return detail


def report_bytes(report: dict[str, Any]) -> bytes:
    """The report gzipped, as §5.1 sends it (mtime 0: the same report gives the same bytes)."""
    return gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)


def report_filename(submitter: str, domain: str, day: str, unique: str) -> str:
    """§5.3: ``sender!policy-domain!begin-timestamp!end-timestamp!unique-id.json.gz``."""
    start, end = day_range(day)
    safe = re.sub(r"[^A-Za-z0-9.-]", "", unique) or "0"
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}!{safe}.json.gz"


@dataclass(frozen=True, slots=True)
class ReportMail:
    """A report as a mail message ready to queue."""

    envelope: Envelope
    recipients: tuple[str, ...]
    data: bytes


def build_report_mail(report: dict[str, Any], gz: bytes, *, domain: str, day: str, submitter: str,
                      sender: str, recipients: Sequence[str], now: float) -> ReportMail:
    """The §5.3 message: multipart/report; report-type="tlsrpt" with the gzipped JSON attached.

    It says "TLS-Required: No" (RFC 8689 §5), as §5.3 wants reports delivered despite the very TLS
    failures they report; its envelope is marked so that delivery is not counted again.
    """
    rid = str(report["report-id"])
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{rid}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"This is an aggregate TLS report from {submitter} about mail sent to {domain} on {day} (UTC),\r\n"
        "as RFC 8460 describes. The report is attached as gzipped JSON.\r\n", cte="7bit")
    msg.add_attachment(gz, maintype="application", subtype="tlsrpt+gzip",
                       filename=report_filename(submitter, domain, day, rid.partition("@")[0]))
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    envelope = Envelope(sender=sender, client_ip="127.0.0.1", client_helo=submitter, listener="tlsrpt",
                        received_at=now, tlsrpt=True)
    return ReportMail(envelope, tuple(recipients), msg.as_bytes(policy=SMTP))


# --- sending (§5) ---------------------------------------------------------------------------------


@runtime_checkable
class ReportResolver(Protocol):
    """What the sender needs from `dns.DnsResolver`; DnsError for failed lookups."""

    async def txt(self, name: str) -> tuple[bytes, ...]: ...

    async def addresses(self, host: str) -> HostAddresses: ...


class ReportQueue(TlsRptStore, Protocol):
    async def begin(self, envelope: Envelope) -> Transaction: ...


RETRY_DELAYS: Final = (300.0, 1800.0, 7200.0)  # HTTPS uploads that failed are tried again this much later
KEEP_DAYS: Final = 14  # tallies older than this are removed


@dataclass(slots=True)
class _Upload:
    domain: str
    url: str
    body: bytes
    tries: int = 0
    last_error: str = ""


class ReportSender:
    """Sends the reports of one UTC day, once per (domain, day), and runs that daily."""

    def __init__(self, config: Config, queue: ReportQueue, resolver: ReportResolver | None, *,
                 clock: Callable[[], float] = time.time,
                 retry_delays: Sequence[float] = RETRY_DELAYS) -> None:
        """Raises ConfigError when tlsrpt.https_ca_file cannot be loaded."""
        self.config = config
        self.queue = queue
        self.resolver = resolver
        self.clock = clock
        self.retry_delays = tuple(retry_delays)
        ca = config.tlsrpt.https_ca_file
        try:
            self._context = ssl.create_default_context(cafile=None if ca is None else str(ca))
        except (OSError, ssl.SSLError) as exc:
            from mailward.config import ConfigError

            raise ConfigError(f"tlsrpt.https_ca_file: {ca} cannot be used ({exc}); point it at a file of "
                              "PEM CA certificates.") from None
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2

    @property
    def submitter(self) -> str:
        return self.config.hostname

    async def reports(self, day: str, domain: str | None = None) -> dict[str, dict[str, Any]]:
        """The reports `day` has tallies for, by domain: what `send_day` would send."""
        tallies = await self.queue.load_tlsrpt_tallies(day, domain)
        cfg = self.config.tlsrpt
        domains = sorted({t.domain for t in tallies})
        return {d: build_report(d, day, tallies, organization=cfg.organization, contact=cfg.contact,
                                report_id=report_id(day, d, self.submitter)) for d in domains}

    async def send_day(self, day: str) -> dict[str, str]:
        """Send every report of `day` not sent before; returns what happened per domain."""
        sent = await self.queue.tlsrpt_sent(day)
        results: dict[str, str] = {}
        uploads: list[_Upload] = []
        for domain, report in (await self.reports(day)).items():
            if domain in sent:
                continue
            try:
                results[domain] = await self._send_one(day, domain, report, uploads)
            except Exception as exc:  # one domain's trouble never stops the others
                log.exception("TLS report for %s (%s) failed", domain, day)
                results[domain] = f"failed: {exc}"
        await self._upload(uploads, day)
        for up in uploads:
            if up.last_error:
                results[up.domain] += f"; {up.url} failed: {up.last_error}"
        return results

    async def _send_one(self, day: str, domain: str, report: dict[str, Any], uploads: list[_Upload]) -> str:
        from mailward.delivery.dns import DnsError

        if self.resolver is None:
            return "no DNS resolver configured"
        try:
            txt = await self.resolver.txt(f"_smtp._tls.{domain}")
        except DnsError as exc:
            log.warning("TLS report for %s (%s): _smtp._tls lookup failed (%s); trying again later",
                        domain, day, exc)
            return f"lookup failed: {exc}"
        rid = str(report["report-id"])
        try:
            record = select_tlsrpt_record(txt)
        except TlsRptRecordError as exc:
            log.info("TLS report for %s (%s) not sent: %s", domain, day, exc)
            await self.queue.mark_tlsrpt_sent(day, domain, "", self.clock())
            return f"no reports wanted: {exc}"
        # Claimed before anything goes out: a report is sent at most once per (day, domain), even by
        # nodes sharing the queue, or after a restart while a failing upload was being retried.
        if not await self.queue.mark_tlsrpt_sent(day, domain, rid, self.clock()):
            return "already sent"
        gz = report_bytes(report)
        done: list[str] = []
        mailto = [a for a in record.mailto if _plausible_address(a)]
        for uri in record.rua:
            scheme = uri.partition(":")[0].lower()
            if scheme not in ("mailto", "https"):
                log.info("TLS report for %s: rua %s has a scheme we do not send to", domain, uri)
        if mailto:
            mail = build_report_mail(report, gz, domain=domain, day=day, submitter=self.submitter,
                                     sender=self.config.tlsrpt.sender, recipients=mailto, now=self.clock())
            try:
                queued = await self._queue_mail(mail)
            except (QueueError, ValueError) as exc:
                log.error("TLS report for %s (%s) could not be queued, and is not sent by mail: %s",
                          domain, day, exc)
                done.append(f"not queued: {exc}")
            else:
                log.info("TLS report %s for %s queued as %s to %s", rid, domain, queued, ", ".join(mailto))
                done.append(f"queued {queued} to {', '.join(mailto)}")
        for url in record.https:
            uploads.append(_Upload(domain, url, gz))
            done.append(f"POST {url}")
        return "; ".join(done) or "no usable rua"

    async def _queue_mail(self, mail: ReportMail) -> str:
        async with await self.queue.begin(mail.envelope) as txn:
            for address in mail.recipients:
                await txn.add_rcpt(Recipient(address))
            await txn.write_body(mail.data)
            return await txn.commit()

    async def _upload(self, uploads: list[_Upload], day: str) -> None:
        pending = list(uploads)
        for delay in (0.0, *self.retry_delays):
            if not pending:
                return
            if delay:
                await asyncio.sleep(delay)
            failed: list[_Upload] = []
            for up in pending:
                up.tries += 1
                try:
                    await self.post(up.url, up.body)
                except Exception as exc:  # a hostile or broken endpoint is a failed upload, no more
                    up.last_error = str(exc) if isinstance(exc, ReportUploadError) else repr(exc)
                    log.warning("TLS report for %s (%s): POST %s failed (try %d): %s", up.domain, day,
                                up.url, up.tries, exc)
                    failed.append(up)
                else:
                    up.last_error = ""
                    log.info("TLS report for %s (%s) posted to %s", up.domain, day, up.url)
            pending = failed
        for up in pending:
            log.error("TLS report for %s (%s): giving up on %s after %d tries", up.domain, day, up.url,
                      up.tries)

    async def post(self, url: str, body: bytes) -> None:
        """POST one gzipped report (§5.4); raises ReportUploadError unless the server took it (2xx)."""
        import httpx

        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port or 443
        except ValueError as exc:  # a port out of range, a malformed IPv6 literal
            raise ReportUploadError(f"{url} is not a usable URL ({exc})") from None
        if parts.scheme.lower() != "https" or not host:
            raise ReportUploadError(f"{url} is not an https URL")
        connect_to = host
        if self.resolver is not None and not _is_ip(host):
            # Dial what delivery's resolver says, as the MTA-STS fetch does; the certificate is
            # still checked against the URL's host name.
            from mailward.delivery.dns import DnsError

            try:
                found = (await self.resolver.addresses(host)).addresses
            except DnsError as exc:
                raise ReportUploadError(f"{host} cannot be resolved ({exc})") from None
            if not found:
                raise ReportUploadError(f"{host} has no address records")
            connect_to = found[0]
        ip_host = f"[{connect_to}]" if ":" in connect_to else connect_to
        target = parts._replace(netloc=f"{ip_host}:{port}").geturl()
        headers = {"Content-Type": "application/tlsrpt+gzip", "Host": parts.netloc.rpartition("@")[2],
                   "User-Agent": "mailward"}
        limit = self.config.tlsrpt.https_timeout
        try:
            async with asyncio.timeout(limit), httpx.AsyncClient(
                    verify=self._context, timeout=limit, follow_redirects=False, trust_env=False) as client:
                # The certificate is checked against the URL's host name, whatever address we dial.
                request = client.build_request("POST", target, content=body, headers=headers,
                                               extensions={"sni_hostname": host})
                # Only the status matters: whatever body the server sends back is never read.
                response = await client.send(request, stream=True)
                await response.aclose()
        except TimeoutError:
            raise ReportUploadError(f"no answer within {limit:g}s") from None
        except (httpx.HTTPError, OSError, ValueError) as exc:
            raise ReportUploadError(_one_line(str(exc)) or type(exc).__name__) from None
        if not 200 <= response.status_code < 300:
            raise ReportUploadError(f"HTTP {response.status_code}")

    async def run(self) -> None:
        """Every day at tlsrpt.send_hour (UTC), send the previous day's reports; after a restart
        past that hour, send what is still due at once (reports already sent are not sent again)."""
        hour = self.config.tlsrpt.send_hour
        log.info("TLS reports: each UTC day's reports are sent the next day at %02d:00 UTC", hour)
        while True:
            now = self.clock()
            if datetime.fromtimestamp(now, UTC).hour >= hour:
                await self.daily(now)
            await asyncio.sleep(max(1.0, next_run_at(now, hour) - self.clock()))

    async def daily(self, now: float) -> None:
        """One daily run: yesterday's reports, then tallies too old to matter are dropped."""
        today = datetime.fromtimestamp(now, UTC).date()
        yesterday = (today - timedelta(days=1)).isoformat()
        try:
            for domain, what in (await self.send_day(yesterday)).items():
                log.info("TLS report for %s (%s): %s", domain, yesterday, what)
            await self.queue.prune_tlsrpt((today - timedelta(days=KEEP_DAYS)).isoformat())
        except Exception:  # the daily task must live to run tomorrow
            log.exception("TLS reports for %s failed", yesterday)


def next_run_at(now: float, hour: int) -> float:
    """The first `hour`:00 UTC after `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    run = datetime.combine(moment.date(), datetime.min.time(), UTC) + timedelta(hours=hour)
    if run <= moment:
        run += timedelta(days=1)
    return run.timestamp()


class ReportUploadError(Exception):
    """An HTTPS upload did not succeed; the message says why."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _plausible_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    odd = any(c.isspace() or ord(c) < 0x20 or c in "<>,;" for c in address)
    ok = bool(at and local and domain) and not odd
    if not ok:
        log.info("TLS report rua mailto:%r is not an address; skipped", address)
    return ok
