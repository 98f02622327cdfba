"""TLS-RPT: record parsing, the tally, and the report JSON (RFC 8460)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import json
import logging
import ssl
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailward import tlsrpttool
from mailward.config import Config, ConfigError, config_from_dict
from mailward.delivery.dns import DnsTemporaryError, HostAddresses
from mailward.delivery.mtasts import StsLookup, parse_policy
from mailward.delivery.policy import Candidate, SecurityLevel, TlsaRecord, TlsRequirement
from mailward.queue import TlsRptTally
from mailward.queue.sqlite import SqliteQueue
from mailward.reports.tlsrpt import (
    NO_POLICY,
    ReportPolicy,
    ReportSender,
    TlsReporter,
    TlsRptRecord,
    TlsRptRecordError,
    build_report,
    build_report_mail,
    handshake_result_type,
    next_run_at,
    parse_tlsrpt_record,
    policy_for,
    report_bytes,
    report_id,
    select_tlsrpt_record,
    sts_testing_failure,
)
from postgres_server import PgServer, pg_server  # noqa: F401 - the fixture

# --- the _smtp._tls record (§3) -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "rua"), [
    ("v=TLSRPTv1; rua=mailto:reports@example.com", ("mailto:reports@example.com",)),
    ("v=TLSRPTv1;rua=https://reporting.example.com/v1/tlsrpt", ("https://reporting.example.com/v1/tlsrpt",)),
    ("v=TLSRPTv1; rua=mailto:a@example.com, https://r.example.com/x;",
     ("mailto:a@example.com", "https://r.example.com/x")),
    ("v=TLSRPTv1 ; rua=mailto:a@example.com ; ext_1=val", ("mailto:a@example.com",)),
    ("v=TLSRPTv1; x-future=1; rua=mailto:a@example.com", ("mailto:a@example.com",)),
    ("v=TLSRPTv1; rua=ftp://example.com/x", ("ftp://example.com/x",)),
])
def test_valid_records(text: str, rua: tuple[str, ...]) -> None:
    assert parse_tlsrpt_record(text) == TlsRptRecord(rua)


@pytest.mark.parametrize("text", [
    "",
    "v=TLSRPTv1",
    "v=TLSRPTv1;",
    "v=tlsrptv1; rua=mailto:a@example.com",  # the version is case-sensitive
    "rua=mailto:a@example.com; v=TLSRPTv1",
    "v=TLSRPTv2; rua=mailto:a@example.com",
    "v=TLSRPTv1; rua=",
    "v=TLSRPTv1; rua=mailto:a@example.com,",
    "v=TLSRPTv1; rua=reports@example.com",  # not a URI
    "v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com",
    "v=TLSRPTv1; rua=mailto:a@example.com;; ",
    "v=TLSRPTv1; rua=mailto:a@example.com; junk",
    "v=TLSRPTv1; rua=mailto:a@example.com; _bad=1",
    "v=TLSRPTv1; rua=mailto:a@exa mple.com",
    "v=TLSRPTv1; rua=mailto:a!b@example.com",  # "!" must be encoded (§3)
])
def test_invalid_records(text: str) -> None:
    with pytest.raises(TlsRptRecordError):
        parse_tlsrpt_record(text)


def test_select_ignores_other_records_and_refuses_two() -> None:
    record = select_tlsrpt_record([b"v=spf1 -all", b"v=TLSRPTv1; rua=mailto:r@example.com"])
    assert record.rua == ("mailto:r@example.com",)
    with pytest.raises(TlsRptRecordError, match="exactly one"):
        select_tlsrpt_record(["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"])
    with pytest.raises(TlsRptRecordError, match="no TXT record"):
        select_tlsrpt_record(["v=spf1 -all"])
    with pytest.raises(TlsRptRecordError):  # one candidate, malformed: no reports, not a guess
        select_tlsrpt_record(["v=TLSRPTv1; rua=", "v=spf1 -all"])


def test_record_splits_schemes() -> None:
    record = parse_tlsrpt_record(
        "v=TLSRPTv1; rua=mailto:tls%2Breports@example.com?subject=x,https://r.example.com/,ftp://x.example/")
    assert record.mailto == ("tls+reports@example.com",)
    assert record.https == ("https://r.example.com/",)


# --- result types ---------------------------------------------------------------------------------


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = code
    exc.verify_message = "x"
    return exc


@pytest.mark.parametrize(("exc", "expected"), [
    (_verify_error(10), "certificate-expired"),
    (_verify_error(9), "certificate-expired"),
    (_verify_error(62), "certificate-host-mismatch"),
    (_verify_error(20), "certificate-not-trusted"),
    (_verify_error(18), "certificate-not-trusted"),
    (_verify_error(19), "certificate-not-trusted"),
    (_verify_error(7), "validation-failure"),  # bad signature: nothing more specific fits
    (ssl.SSLError(1, "handshake failure"), "validation-failure"),
    (TimeoutError(), "validation-failure"),
])
def test_handshake_result_types(exc: BaseException, expected: str) -> None:
    assert handshake_result_type(exc) == expected


# --- which policy a session counts under ----------------------------------------------------------

TLSA = TlsaRecord(3, 1, 1, bytes.fromhex("ab" * 32))
STS_TEXT = (b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmx: *.example.org\r\n"
            b"max_age: 86400\r\n")


def _candidate(tls: TlsRequirement) -> Candidate:
    return Candidate("mx1.example.org", "192.0.2.1", 25, tls)


def test_dane_outranks_sts_in_the_reported_policy() -> None:
    sts = StsLookup("example.org", parse_policy(STS_TEXT))
    dane = TlsRequirement(SecurityLevel.DANE, starttls=True, required=True, verify="dane", tlsa=(TLSA,))
    assert policy_for(_candidate(dane), sts) == ReportPolicy("tlsa", (f"3 1 1 {'AB' * 32}",),
                                                             ("mx1.example.org",))
    verify = TlsRequirement(SecurityLevel.VERIFY, starttls=True, required=True, verify="pkix")
    assert policy_for(_candidate(verify), sts) == ReportPolicy(
        "sts",
        ("version: STSv1", "mode: enforce", "mx: mx1.example.org", "mx: *.example.org", "max_age: 86400"),
        ("mx1.example.org", "*.example.org"))
    may = TlsRequirement(SecurityLevel.MAY, starttls=True, required=False)
    assert policy_for(_candidate(may), None) == NO_POLICY
    none_mode = StsLookup("example.org", parse_policy(b"version: STSv1\nmode: none\nmax_age: 60\n"))
    assert policy_for(_candidate(may), none_mode) == NO_POLICY
    failed = StsLookup("example.org", failure="sts-policy-fetch-error")
    assert policy_for(_candidate(may), failed) == NO_POLICY


# --- the tally, through a real queue --------------------------------------------------------------

DAY = "2026-11-28"
NOON = datetime(2026, 11, 28, 12, tzinfo=UTC).timestamp()


def test_reporter_counts_sessions_per_day_and_detail(tmp_path: Path) -> None:
    async def go() -> list[TlsRptTally]:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            now = [NOON]
            reporter = TlsReporter(queue, clock=lambda: now[0], flush_delay=0.01)
            sts = NO_POLICY
            for _ in range(3):
                reporter.session("Example.ORG.", sts, None, mx_host="mx1.example.org",
                                 receiving_ip="192.0.2.1")
            reporter.session("example.org", sts, "starttls-not-supported", mx_host="mx2.example.org",
                             receiving_ip="192.0.2.2", sending_ip="192.0.2.9",
                             reason="STARTTLS not\r\n offered\x1b")
            reporter.session("example.org", sts, "starttls-not-supported", mx_host="mx2.example.org",
                             receiving_ip="192.0.2.2", sending_ip="192.0.2.9", reason="STARTTLS not offered?")
            for _ in range(500):  # the timer writes the batch, without a flush() of ours
                if len(await queue.load_tlsrpt_tallies(DAY)) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(await queue.load_tlsrpt_tallies(DAY)) == 2
            reporter.sts_lookup(StsLookup("example.net", failure="sts-policy-invalid", detail="bad mode"))
            reporter.sts_failure("example.net", count=True)
            reporter.sts_failure("example.net", count=True)  # one failed fetch counts once
            reporter.sts_lookup(StsLookup("example.com", failure="sts-webpki-invalid", detail="x"))
            reporter.sts_failure("example.com", count=False)  # looked up for our own reports only
            now[0] += 86400  # the next day's sessions go to the next day
            reporter.session("example.org", sts, None)
            await reporter.close()
            assert len(await queue.load_tlsrpt_tallies("2026-11-29")) == 1
            return await queue.load_tlsrpt_tallies(DAY)

    tallies = asyncio.run(go())
    by = {(t.domain, t.result_type): t for t in tallies}
    assert by["example.org", ""].count == 3
    assert by["example.org", ""].receiving_mx == ""  # successes are not split by host
    failed = by["example.org", "starttls-not-supported"]
    got = (failed.count, failed.receiving_mx, failed.receiving_ip, failed.sending_ip, failed.reason_code)
    assert got == (2, "mx2.example.org", "192.0.2.2", "192.0.2.9", "STARTTLS not offered?")
    fetch = by["example.net", "sts-policy-invalid"]
    assert (fetch.policy_type, fetch.count, fetch.reason_code) == ("sts", 1, "bad mode")
    assert len(tallies) == 3


def test_reporter_survives_a_closed_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        queue = await SqliteQueue.open(tmp_path / "q.db")
        await queue.close()
        reporter = TlsReporter(queue, clock=lambda: NOON)
        reporter.session("example.org", NO_POLICY, None)
        await reporter.close()  # logs, does not raise: a lost count is not lost mail

    asyncio.run(go())
    assert "could not be stored" in caplog.text


# --- the report JSON (§4) -------------------------------------------------------------------------

SCHEMA = json.loads((Path(__file__).parents[2] / "data" / "tlsrpt-schema.json").read_text())


def _tallies() -> list[TlsRptTally]:
    sts = ("sts", ("version: STSv1", "mode: enforce"), ("*.example.org",))
    tlsa = ("tlsa", (f"3 1 1 {'AB' * 32}",), ("mx1.example.org",))
    return [
        TlsRptTally(DAY, "example.org", *tlsa, count=5),
        TlsRptTally(DAY, "example.org", *tlsa, result_type="tlsa-invalid", sending_ip="192.0.2.9",
                    receiving_mx="mx1.example.org", receiving_ip="2001:db8::1",
                    reason_code="DANE: no TLSA record matches the certificate chain", count=2),
        TlsRptTally(DAY, "example.org", *sts, count=4),
        TlsRptTally(DAY, "example.org", *sts, result_type="certificate-expired",
                    receiving_mx="mx2.example.org", receiving_ip="192.0.2.2", count=1),
        TlsRptTally(DAY, "example.org", "no-policy-found", result_type="starttls-not-supported", count=1),
        TlsRptTally(DAY, "other.example", "no-policy-found", count=9),  # another domain's report
        TlsRptTally("2026-11-27", "example.org", "no-policy-found", count=9),  # another day's
    ]


def test_report_json_follows_rfc_8460() -> None:
    report = build_report("example.org", DAY, _tallies(), organization="Example Sender",
                          contact="tls@example.net", report_id="rid@mx.example.net")
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
    assert report["date-range"] == {"start-datetime": "2026-11-28T00:00:00Z",
                                    "end-datetime": "2026-11-28T23:59:59Z"}
    assert (report["organization-name"], report["contact-info"], report["report-id"]) == (
        "Example Sender", "tls@example.net", "rid@mx.example.net")
    policies = {p["policy"]["policy-type"]: p for p in report["policies"]}
    assert set(policies) == {"tlsa", "sts", "no-policy-found"}
    tlsa = policies["tlsa"]
    assert tlsa["policy"] == {"policy-type": "tlsa", "policy-string": [f"3 1 1 {'AB' * 32}"],
                              "policy-domain": "example.org", "mx-host": ["mx1.example.org"]}
    assert tlsa["summary"] == {"total-successful-session-count": 5, "total-failure-session-count": 2}
    assert tlsa["failure-details"] == [{
        "result-type": "tlsa-invalid", "sending-mta-ip": "192.0.2.9",
        "receiving-mx-hostname": "mx1.example.org", "receiving-ip": "2001:db8::1", "failed-session-count": 2,
        "failure-reason-code": "DANE: no TLSA record matches the certificate chain"}]
    assert policies["sts"]["summary"] == {"total-successful-session-count": 4,
                                          "total-failure-session-count": 1}
    assert policies["no-policy-found"]["policy"] == {"policy-type": "no-policy-found",
                                                     "policy-domain": "example.org"}
    assert policies["no-policy-found"]["summary"]["total-successful-session-count"] == 0


def test_schema_rejects_what_rfc_8460_does_not_allow() -> None:
    report = build_report("example.org", DAY, _tallies(), organization="o", contact="c", report_id="r")
    broken = json.loads(json.dumps(report))
    broken["policies"][0]["failure-details"][0]["result-type"] = "certificate-revoked"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    broken = json.loads(json.dumps(report))
    del broken["policies"][0]["summary"]["total-failure-session-count"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_report_ids_are_stable_and_distinct() -> None:
    a = report_id(DAY, "example.org", "mx.example.net")
    assert a == report_id(DAY, "example.org", "mx.example.net")
    assert a.endswith("@mx.example.net") and a.startswith(DAY)
    assert len({a, report_id(DAY, "example.com", "mx.example.net"), report_id("2026-11-29", "example.org",
                                                                              "mx.example.net")}) == 3


# --- the report as mail (§5.3) --------------------------------------------------------------------


def test_report_mail_is_a_multipart_report() -> None:
    report = build_report("example.org", DAY, _tallies(), organization="o", contact="c",
                          report_id=report_id(DAY, "example.org", "mx.example.net"))
    gz = report_bytes(report)
    mail = build_report_mail(report, gz, domain="example.org", day=DAY, submitter="mx.example.net",
                             sender="postmaster@mx.example.net", recipients=["tls@example.org"], now=NOON)
    assert mail.envelope.tlsrpt and mail.envelope.sender == "postmaster@mx.example.net"
    assert mail.recipients == ("tls@example.org",)
    assert b"\r\n" in mail.data and b"\n" not in mail.data.replace(b"\r\n", b"")
    assert max(len(line) for line in mail.data.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    rid = report["report-id"]
    assert " ".join(str(msg["Subject"]).split()) == (
        f"Report Domain: example.org Submitter: mx.example.net Report-ID: <{rid}>")
    assert msg["TLS-Report-Domain"] == "example.org"
    assert msg["TLS-Report-Submitter"] == "mx.example.net"
    assert msg["TLS-Required"] == "No"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    attachment = parts[1]
    start = int(datetime(2026, 11, 28, tzinfo=UTC).timestamp())
    end = start + 86400 - 1
    unique = rid.partition("@")[0]
    assert attachment.get_filename() == f"mx.example.net!example.org!{start}!{end}!{unique}.json.gz"
    assert json.loads(gzip.decompress(attachment.get_content())) == report


# --- the sender, with a real queue and a DNS stand-in ---------------------------------------------


class _Txt:
    def __init__(self, records: dict[str, tuple[bytes, ...] | Exception]) -> None:
        self.records = records
        self.asked: list[str] = []

    async def txt(self, name: str) -> tuple[bytes, ...]:
        self.asked.append(name)
        found = self.records.get(name, ())
        if isinstance(found, Exception):
            raise found
        return found

    async def addresses(self, host: str) -> HostAddresses:
        return HostAddresses(host, (), "insecure", error="no address")


def _config(tmp_path: Path) -> Config:
    return config_from_dict({"hostname": "mx.example.net", "state_dir": str(tmp_path),
                             "listener": [{"kind": "mx", "port": 2525}],
                             "tlsrpt": {"organization": "Example Sender"}}, tmp_path)


def test_sender_queues_each_report_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolver = _Txt({
        "_smtp._tls.example.org": (b"v=spf1 -all", b"v=TLSRPTv1; rua=mailto:tls@example.org,https://r.example.org/x"),
        "_smtp._tls.other.example": (b"v=TLSRPTv1; rua=mailto:a@b",),
        "_smtp._tls.broken.example": (b"v=TLSRPTv1; rua=mailto:a@b", b"v=TLSRPTv1; rua=mailto:c@d"),
        "_smtp._tls.later.example": DnsTemporaryError("SERVFAIL"),
    })

    async def go() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            await queue.add_tlsrpt_tallies([
                TlsRptTally(DAY, d, "no-policy-found", count=2)
                for d in ("example.org", "other.example", "broken.example", "later.example",
                          "silent.example")])
            sender = ReportSender(_config(tmp_path), queue, resolver, clock=lambda: NOON, retry_delays=())
            results = await sender.send_day(DAY)
            assert results["example.org"].startswith("queued ")
            assert "r.example.org" in results["example.org"]  # the upload failed: no address
            assert results["broken.example"].startswith("no reports wanted")
            assert results["silent.example"].startswith("no reports wanted")
            assert results["later.example"].startswith("lookup failed")
            messages = await queue.list()
            assert len(messages) == 2
            assert all(m.envelope.tlsrpt for m in messages)
            assert {m.envelope.sender for m in messages} == {"postmaster@mx.example.net"}
            addresses = sorted(r.recipient.address for m in messages for r in m.recipients)
            assert addresses == ["a@b", "tls@example.org"]
            body = b"".join([c async for c in await queue.open_body(messages[0].id)])
            assert b"TLS-Required: No" in body
            sent = await queue.tlsrpt_sent(DAY)
            assert set(sent) == {"example.org", "other.example", "broken.example", "silent.example"}
            resolver.asked.clear()
            again = await sender.send_day(DAY)  # only the domain whose lookup failed is tried again
            assert set(again) == {"later.example"} and resolver.asked == ["_smtp._tls.later.example"]
            assert len(await queue.list()) == 2

    asyncio.run(go())
    assert "giving up on https://r.example.org/x" in caplog.text


# --- mailward tlsrpt show -------------------------------------------------------------------------


def _show(config: Config, *argv: str) -> int:
    from mailward.cli import build_parser

    args = build_parser().parse_args(["tlsrpt", "show", *argv])
    return tlsrpttool.run(args, config, now=NOON + 86400)


def test_show_prints_what_would_be_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    config.queue.path.parent.mkdir(parents=True)

    async def fill() -> None:
        async with await SqliteQueue.open(config.queue.path) as queue:
            await queue.add_tlsrpt_tallies(_tallies())
            await queue.mark_tlsrpt_sent(DAY, "other.example", "rid", NOON)

    asyncio.run(fill())
    assert _show(config, "--json") == 0  # yesterday by default, from "now" the day after DAY
    shown = json.loads(capsys.readouterr().out)
    assert [(s["domain"], s["sent"]) for s in shown] == [("example.org", None), ("other.example", "rid")]
    for s in shown:
        jsonschema.validate(s["report"], SCHEMA)
    assert shown[0]["report"] == build_report("example.org", DAY, _tallies(), organization="Example Sender",
                                              contact="postmaster@mx.example.net",
                                              report_id=report_id(DAY, "example.org", "mx.example.net"))
    assert _show(config, "--date", DAY, "--domain", "Example.org.") == 0
    text = capsys.readouterr().out
    assert "example.org" in text and "not sent yet" in text and "other.example" not in text
    assert "2 tlsa-invalid mx1.example.org[2001:db8::1]: DANE: no TLSA record matches" in text
    assert _show(config, "--date", "2026-11-20") == 0
    assert "no TLS sessions counted on 2026-11-20" in capsys.readouterr().out
    assert _show(config, "--date", "28.11.2026") == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_show_without_a_queue_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _show(_config(tmp_path)) == 2
    assert "there is no queue" in capsys.readouterr().err


# --- the daily run --------------------------------------------------------------------------------


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("now", "hour", "expected"), [
    ("2026-11-28T00:30:00", 1, "2026-11-28T01:00:00"),
    ("2026-11-28T01:00:00", 1, "2026-11-29T01:00:00"),  # exactly at the hour: that run is now
    ("2026-11-28T23:59:59", 0, "2026-11-29T00:00:00"),
    ("2026-12-31T05:00:00", 3, "2027-01-01T03:00:00"),
])
def test_next_run(now: str, hour: int, expected: str) -> None:
    assert next_run_at(_at(now), hour) == _at(expected)


def test_daily_run_sends_yesterday_and_forgets_old_days(tmp_path: Path) -> None:
    resolver = _Txt({"_smtp._tls.example.org": (b"v=TLSRPTv1; rua=mailto:tls@example.org",)})

    async def go() -> None:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            await queue.add_tlsrpt_tallies([TlsRptTally(DAY, "example.org", "no-policy-found"),
                                            TlsRptTally("2026-11-29", "example.org", "no-policy-found"),
                                            TlsRptTally("2026-10-01", "example.org", "no-policy-found")])
            sender = ReportSender(_config(tmp_path), queue, resolver, retry_delays=())
            await sender.daily(_at("2026-11-29T01:00:00"))
            rid = report_id(DAY, "example.org", "mx.example.net")
            assert await queue.tlsrpt_sent(DAY) == {"example.org": rid}
            assert await queue.tlsrpt_sent("2026-11-29") == {}  # today is not over
            assert await queue.load_tlsrpt_tallies("2026-10-01") == []
            assert len(await queue.list()) == 1
            await sender.daily(_at("2026-11-29T05:00:00"))  # a restart later that day: nothing twice
            assert len(await queue.list()) == 1

    asyncio.run(go())


# --- MTA-STS testing: what enforce would have refused (RFC 8461 §5) -------------------------------


def test_sts_testing_failures(tmp_path: Path) -> None:
    ca, other = trustme.CA(), trustme.CA()
    ca_file, other_file = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other.cert_pem.write_to_path(str(other_file))
    leaf = ca.issue_cert("mx1.example.org")
    chain = [x509.load_pem_x509_certificate(p.bytes()).public_bytes(serialization.Encoding.DER)
             for p in leaf.cert_chain_pems]
    mx = ("*.example.org",)
    assert sts_testing_failure(mx, "mx1.example.org", chain, ca_file) is None
    assert sts_testing_failure(mx, "mx1.example.net", chain, ca_file) == (
        "validation-failure", "mx1.example.net is not listed in the MTA-STS policy")
    assert sts_testing_failure(mx, "mx2.example.org", chain, ca_file) == (
        "certificate-host-mismatch", "the certificate does not name mx2.example.org")
    assert sts_testing_failure(mx, "mx1.example.org", chain, other_file) == (
        "certificate-not-trusted", "the certificate does not chain to a trusted CA")
    assert sts_testing_failure(mx, "mx1.example.org", [], ca_file) == (
        "certificate-not-trusted", "the server sent no certificate")
    later = datetime(9000, 1, 1, tzinfo=UTC)  # trustme certificates last for centuries
    expired = sts_testing_failure(mx, "mx1.example.org", chain, ca_file, now=later)
    assert expired is not None and expired[0] == "certificate-expired"


def test_odd_report_urls_are_failed_uploads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailward.tlsrpt")
    resolver = _Txt({"_smtp._tls.example.org": (
        b"v=TLSRPTv1; rua=https://r.example.org:99999/x,https://[::1/x,mailto:bad%0d%0aaddress@example.org",)})

    async def go() -> dict[str, str]:
        async with await SqliteQueue.open(tmp_path / "q.db") as queue:
            await queue.add_tlsrpt_tallies([TlsRptTally(DAY, "example.org", "no-policy-found")])
            return await ReportSender(_config(tmp_path), queue, resolver, retry_delays=()).send_day(DAY)

    result = asyncio.run(go())["example.org"]
    assert "https://r.example.org:99999/x failed: " in result and "https://[::1/x failed: " in result
    assert "mailto:'bad\\r\\naddress@example.org' is not an address; skipped" in caplog.text


def test_an_unusable_ca_file_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    for ca in (tmp_path / "ca.pem", tmp_path / "missing.pem"):
        config = config_from_dict({"hostname": "mx.example.net", "state_dir": str(tmp_path), "listener": [],
                                   "tlsrpt": {"https_ca_file": str(ca)}}, tmp_path)
        with pytest.raises(ConfigError, match=r"^tlsrpt\.https_ca_file: .* point it at a file of PEM CA "):
            ReportSender(config, None, None)  # type: ignore[arg-type]


def test_show_reads_a_shared_postgresql_queue(pg_server: PgServer, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")
    from mailward.queue.postgres import PostgresQueue

    url = pg_server.database()

    async def fill() -> None:
        queue = await PostgresQueue.open(url)
        try:
            await queue.add_tlsrpt_tallies(_tallies())
            await queue.mark_tlsrpt_sent(DAY, "example.org", "rid@mx", NOON)
        finally:
            await queue.close()

    asyncio.run(fill())
    config = config_from_dict({"hostname": "mx.example.net", "state_dir": str(tmp_path), "listener": [],
                               "queue": {"url": url}}, tmp_path)
    assert _show(config, "--date", DAY, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(s["domain"], s["sent"]) for s in shown] == [("example.org", "rid@mx"), ("other.example", None)]
    assert shown[0]["report"] == build_report("example.org", DAY, _tallies(), organization="mx.example.net",
                                              contact="postmaster@mx.example.net",
                                              report_id=report_id(DAY, "example.org", "mx.example.net"))
