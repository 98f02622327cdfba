"""TLS reporting (RFC 8460) end to end: a day of real deliveries through the DNS lab, then the reports.

A mailward delivers one message to destinations that give every kind of outcome (DANE verified
and failed on two MX hosts of one domain, a bogus TLSA lookup, no STARTTLS, opportunistic TLS,
MTA-STS enforced and verified, MTA-STS enforced with a certificate for another name, a policy
fetch that fails). Its queue then holds the day's counts; the report sender builds the reports,
queues the mailto: ones (which the restarted mailward delivers through the lab into a receiving
mailward's Maildir) and POSTs the https: ones to an HTTPS sink with a certificate from a private
CA. Every report that arrives is gunzipped and checked against the RFC 8460 schema
(tests/data/tlsrpt-schema.json) and against what the deliveries did.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import gzip
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from background import BackgroundServer
from dane_lab import CLEAR, EE_SELF
from dnssec import DnsLab
from mailward_server import MailwardServer
from sts_lab import PKIX, StsPki
from test_delivery import Sink, deliveries, delivery_toml, message, submit_mx, wait_until
from test_mtasts_delivery import PolicyServer
from tlsrpt_lab import (
    FLAKY_PATH,
    INVALID,
    MAILBOX,
    REPORT_BOX,
    REPORT_DOMAIN,
    REPORT_PATH,
    SINK,
    SINK_NAME,
    rua,
    untrusted,
)

from mailward.config import load_config
from mailward.delivery.dns import DnsResolver
from mailward.queue import TlsRptTally
from mailward.queue.sqlite import SqliteQueue
from mailward.queuetool import QueueFile
from mailward.reports.tlsrpt import ReportSender, utc_day

SENDER = "sender@example.test"
DAILY = "enforce-ok.sts.test"  # has counts for yesterday too, for the server's own daily run
REUSED = "tls.unsigned.test"
SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "tlsrpt-schema.json").read_text())

# Where each destination's mail ends up, as test_dane_delivery and test_mtasts_delivery establish.
OUTCOMES = {
    "fallback.dane.test": "sent",  # nomatch fails DANE, ee-self passes
    "bogus.dane.test": "deferred",  # the TLSA lookup is bogus: no connection
    "clear.unsigned.test": "sent",  # no STARTTLS: plaintext
    "tls.unsigned.test": "sent",  # opportunistic TLS
    "enforce-ok.sts.test": "sent",  # MTA-STS enforce, verified
    "wildcard.sts.test": "deferred",  # MTA-STS enforce, the certificate names another host
    "enforce-bad.sts.test": "deferred",  # MTA-STS enforce, the only MX is not listed: no connection
    "cached.sts.test": "sent",  # the policy fetch fails (HTTP 500): opportunistic
    "testing.sts.test": "sent",  # MTA-STS testing, wrong name; its _smtp._tls record is not valid
    "nomatch-only.dane.test": "deferred",  # no _smtp._tls record: no report
    "selfsigned.dane.test": "deferred",  # level verify (a policy row): a self-signed certificate
    "notlsa.dane.test": "deferred",  # level dane-only (a policy row), and no TLSA records
}
POLICY_ROWS = """\
[[delivery.policy]]
destination = "selfsigned.dane.test"
level = "verify"
[[delivery.policy]]
destination = "notlsa.dane.test"
level = "dane-only"
"""


# --- the HTTPS sink --------------------------------------------------------------------------------


@dataclass
class Upload:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ReportSink(BackgroundServer):
    """HTTP/1.1 over TLS on SINK: takes POSTs; the first POST to FLAKY_PATH gets a 503."""

    context: ssl.SSLContext
    port: int
    uploads: list[Upload] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._session, SINK, self.port, ssl=self.context)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            fields = (ln.partition(":") for ln in head[1:] if ln)
            headers = {k.strip().lower(): v.strip() for k, _, v in fields}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method != "POST":
                status = 405
            elif path == FLAKY_PATH and FLAKY_PATH not in self.refused:
                self.refused.append(path)
                status = 503
            else:
                self.uploads.append(Upload(path, headers, body))
                status = 200
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


# --- the receiving mailbox --------------------------------------------------------------------------


class ReportMailbox(MailwardServer):
    """A mailward whose local domain is REPORT_DOMAIN, delivering to state/mail/<box>/ (Maildir)."""

    def config_text(self) -> str:
        text = super().config_text()
        assert 'local_domains = ["example.test"]' in text
        return text.replace('local_domains = ["example.test"]', f'local_domains = ["{REPORT_DOMAIN}"]')

    @property
    def maildir(self) -> Path:
        return self.state_dir / "mail" / REPORT_BOX

    def delivered(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


# --- the world ---------------------------------------------------------------------------------------


@dataclass
class World:
    lab: DnsLab
    sender: MailwardServer
    mailbox: ReportMailbox
    sink: ReportSink
    day: str
    lines: dict[str, dict[str, str]]
    tallies: list[TlsRptTally]  # the day's counts before any report was sent
    tallies_after: list[TlsRptTally]  # and after the reports were delivered
    results: dict[str, str]  # what send_day said per domain
    again: dict[str, str]  # a second send_day for the same day
    mails: dict[str, Any]  # report mails by domain, parsed
    posts: dict[str, list[Upload]]  # uploads of the day's reports, by policy domain
    yesterday: list[Upload]  # uploads the server's own daily run made

    def report(self, domain: str, how: str) -> dict[str, Any]:
        if how == "mailto":
            return json.loads(gzip.decompress(self.mails[domain].get_payload()[1].get_content()))
        (upload,) = self.posts[domain]
        return json.loads(gzip.decompress(upload.body))


def read_tallies(sender: MailwardServer, day: str) -> list[TlsRptTally]:
    tallies, _ = QueueFile(sender.queue_path).tlsrpt(day, None)
    return sorted(tallies, key=repr)


def seed_yesterday(sender: MailwardServer, day: str) -> str:
    """Counts for the day before `day`, which the restarted server's daily run must report."""
    yesterday = (dt.date.fromisoformat(day) - dt.timedelta(days=1)).isoformat()

    async def seed() -> None:
        queue = await SqliteQueue.open(sender.queue_path)
        try:
            await queue.add_tlsrpt_tallies([TlsRptTally(yesterday, DAILY, "no-policy-found", count=7)])
        finally:
            await queue.close()

    asyncio.run(seed())
    return yesterday


def send_reports(sender: MailwardServer, day: str) -> tuple[dict[str, str], dict[str, str]]:
    """The daily run's work for `day`, done by the report sender against the stopped sender's queue
    and the lab's resolver; then once more, which must send nothing."""
    config = load_config(sender.config_path)

    async def run() -> tuple[dict[str, str], dict[str, str]]:
        queue = await SqliteQueue.open(config.queue.path)
        try:
            resolver = DnsResolver(config.dns.resolvers, timeout=config.dns.timeout)
            reports = ReportSender(config, queue, resolver, retry_delays=(0.5, 0.5))
            return await reports.send_day(day), await reports.send_day(day)
        finally:
            await queue.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def world(dns_lab: DnsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    lab, port, certs = dns_lab, dns_lab.smtp_port, dns_lab.dane
    assert certs is not None
    root = tmp_path_factory.mktemp("tlsrpt")
    pki = StsPki(root, "mailward TLS-RPT lab")
    ca_file, mx_cert, mx_key = pki.ca_file, pki.mx_cert, pki.mx_key
    policies = PolicyServer(pki.server_context())
    sink = ReportSink(pki.server_context(SINK_NAME), port)
    clear = Sink(root / "clear", host=CLEAR, port=port)
    servers: list[MailwardServer] = []
    relay = "relay_domains = [" + ", ".join(f'"{d}"' for d in OUTCOMES) + "]\n"
    try:
        try:
            policies.start()
        except PermissionError:
            pytest.skip("port 443 on a loopback address needs root (RFC 8461 §3.3 allows no other port)")
        sink.start()
        clear.start()
        pkix, selfsigned = ((mx_cert, mx_key),), ((certs.selfsigned.cert, certs.selfsigned.key),)
        for name, address, pems in (("pkix", PKIX, pkix), ("selfsigned", EE_SELF, selfsigned)):
            peer = MailwardServer(root / name, mx=port, address=address, extra_toml=relay, certificates=pems)
            servers.append(peer)
            peer.write_config()
            peer.start()
        mailbox = ReportMailbox(root / "mailbox", mx=port, address=MAILBOX, deliver=True)
        servers.append(mailbox)
        mailbox.write_config()
        (mailbox.maildir).mkdir(parents=True)  # a mailbox made by the operator, without a login
        sender = MailwardServer(root / "sender", deliver=True, extra_toml=delivery_toml(
            POLICY_ROWS, relay=tuple(OUTCOMES), port=port, connect_timeout=3, command_timeout=5,
            retry_initial=3600, per_destination=1, slow_start_initial=1)
            + lab.dns_toml + f'[mta_sts]\nca_file = "{ca_file}"\nfetch_timeout = 3\n'
            + f'[tlsrpt]\norganization = "mailward TLS-RPT lab"\nhttps_ca_file = "{ca_file}"\n'
            + "send_hour = 0\n")
        servers.append(sender)
        sender.write_config()
        mailbox.start()
        sender.start()
        rcpts = {f"rcpt@{d}" for d in OUTCOMES}
        submit_mx(sender, SENDER, sorted(rcpts), message("tlsrpt1", sender=SENDER))
        # Two more for one destination: one connection carries them (per_destination = 1), so
        # the report must count one session per connection, not one per message.
        for n in (2, 3):
            submit_mx(sender, SENDER, [f"rcpt@{REUSED}"], message(f"tlsrpt{n}", sender=SENDER))

        def logged() -> dict[str, dict[str, str]]:
            return {d["rcpt"]: d for d in deliveries(sender)}

        wait_until(lambda: rcpts <= set(logged()), timeout=40, what="a result for every destination")
        wait_until(lambda: len([d for d in deliveries(sender) if d["rcpt"] == f"rcpt@{REUSED}"]) == 3,
                   timeout=20, what=f"three deliveries to {REUSED}")
        lines = logged()
        # Stopping flushes the counts still in memory; then the day's reports are made.
        sender.stop()
        day = utc_day(time.time())
        tallies = read_tallies(sender, day)
        results, again = send_reports(sender, day)
        yesterday = seed_yesterday(sender, day)
        sender.start()
        mailto = [d for d, r in rua(port).items() if "mailto:" in r]
        wait_until(lambda: len(mailbox.delivered()) >= len(mailto), timeout=30, what="the mailed reports")
        wait_until(lambda: any(yesterday in json.loads(gzip.decompress(u.body))["report-id"]
                               for u in sink.uploads), timeout=30, what="the daily run's report")
        sender.stop()  # flush any count the reports' own delivery would (wrongly) have made
        mails = {}
        for raw in mailbox.delivered():
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            mails[str(parsed["TLS-Report-Domain"])] = parsed
        posts: dict[str, list[Upload]] = {}
        daily: list[Upload] = []
        for upload in sink.uploads:
            report = json.loads(gzip.decompress(upload.body))
            if report["date-range"]["start-datetime"].startswith(yesterday):
                daily.append(upload)
            else:
                posts.setdefault(report["policies"][0]["policy"]["policy-domain"], []).append(upload)
        yield World(lab, sender, mailbox, sink, day, lines, tallies, read_tallies(sender, day), results,
                    again, mails, posts, daily)
    finally:
        for server in servers:
            server.stop()
        clear.stop()
        sink.stop()
        policies.stop()
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


# --- the deliveries the reports are about --------------------------------------------------------------

@pytest.mark.parametrize("domain", OUTCOMES)
def test_the_day_of_deliveries(world: World, domain: str) -> None:
    assert world.lines[f"rcpt@{domain}"]["status"] == OUTCOMES[domain], world.lines[f"rcpt@{domain}"]


# --- what arrived ------------------------------------------------------------------------------------------

def test_every_report_arrives_where_the_record_says(world: World) -> None:
    port = world.lab.smtp_port
    wanted_mail = {d for d, r in rua(port).items() if "mailto:" in r}
    wanted_post = {d for d, r in rua(port).items() if "https:" in r}
    assert set(world.mails) == wanted_mail
    assert set(world.posts) == wanted_post
    assert all(len(ups) == 1 for ups in world.posts.values()), world.posts
    for domain, ups in world.posts.items():
        (up,) = ups
        assert up.headers["content-type"] == "application/tlsrpt+gzip"
        assert up.path == (FLAKY_PATH if domain == "wildcard.sts.test" else REPORT_PATH)
        assert up.headers["host"] == f"{SINK_NAME}:{port}"
    # the flaky endpoint refused the first try; the retry got through
    assert world.sink.refused == [FLAKY_PATH]
    # an https: URL whose certificate does not match is never posted to, however often it is tried
    result = world.results["tls.unsigned.test"]
    assert f"{untrusted(port)} failed: " in result and "certificate" in result, result
    assert "enforce-ok.sts.test" in world.results and "failed" not in world.results["enforce-ok.sts.test"]
    for domain in (*INVALID, "nomatch-only.dane.test"):
        assert world.results[domain].startswith("no reports wanted"), world.results


@pytest.mark.parametrize("domain", sorted(rua(0)))
def test_reports_validate_against_the_rfc_8460_schema(world: World, domain: str) -> None:
    r = rua(world.lab.smtp_port)[domain]
    for how in ("mailto", "https"):
        if f"{how}:" in r:
            report = world.report(domain, how)
            jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
            assert report["organization-name"] == "mailward TLS-RPT lab"
            assert report["date-range"] == {"start-datetime": f"{world.day}T00:00:00Z",
                                            "end-datetime": f"{world.day}T23:59:59Z"}
            assert {p["policy"]["policy-domain"] for p in report["policies"]} == {domain}


def test_report_mail_follows_rfc_8460_section_5_3(world: World) -> None:
    for domain, msg in world.mails.items():
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        assert msg["TLS-Report-Domain"] == domain
        assert msg["TLS-Report-Submitter"] == "mx.example.test"
        assert msg["TLS-Required"] == "No"
        assert msg["From"] == "postmaster@mx.example.test"
        rid = json.loads(gzip.decompress(msg.get_payload()[1].get_content()))["report-id"]
        assert " ".join(str(msg["Subject"]).split()) == (
            f"Report Domain: {domain} Submitter: mx.example.test Report-ID: <{rid}>")
        attachment = msg.get_payload()[1]
        assert attachment.get_content_type() == "application/tlsrpt+gzip"
        name = attachment.get_filename()
        assert name.startswith(f"mx.example.test!{domain}!") and name.endswith(".json.gz")
        # The receiving mailward says how the report reached it: over STARTTLS, opportunistically.
        assert "with ESMTPS" in str(msg["Received"])


def test_mail_and_https_carry_the_same_report(world: World) -> None:
    for domain in set(world.mails) & set(world.posts):
        assert world.report(domain, "mailto") == world.report(domain, "https")


# --- what the reports say ----------------------------------------------------------------------------------

def _policies(world: World, domain: str) -> dict[tuple[str, tuple[str, ...]], dict[str, Any]]:
    how = "mailto" if domain in world.mails else "https"
    return {(p["policy"]["policy-type"], tuple(p["policy"].get("mx-host", []))): p
            for p in world.report(domain, how)["policies"]}


def _failures(entry: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(f["result-type"], f.get("receiving-mx-hostname", ""), f["failed-session-count"])
            for f in entry.get("failure-details", [])]


def _summary(entry: dict[str, Any]) -> tuple[int, int]:
    s = entry["summary"]
    return s["total-successful-session-count"], s["total-failure-session-count"]


def test_dane_failure_and_success_on_two_mx_hosts(world: World) -> None:
    policies = _policies(world, "fallback.dane.test")
    assert set(policies) == {("tlsa", ("nomatch.dane.test",)), ("tlsa", ("ee-self.dane.test",))}
    failed, passed = policies["tlsa", ("nomatch.dane.test",)], policies["tlsa", ("ee-self.dane.test",)]
    assert _summary(failed) == (0, 1) and _summary(passed) == (1, 0)
    assert failed["policy"]["policy-string"] == [f"3 1 1 {'5A' * 32}"]
    (detail,) = failed["failure-details"]
    assert detail["result-type"] == "validation-failure"
    assert detail["receiving-ip"] == EE_SELF
    assert detail["sending-mta-ip"].startswith("127.")
    assert "no TLSA record matches" in detail["failure-reason-code"]


def test_bogus_tlsa_is_dnssec_invalid(world: World) -> None:
    (entry,) = _policies(world, "bogus.dane.test").values()
    assert entry["policy"]["policy-type"] == "tlsa"
    assert _failures(entry) == [("dnssec-invalid", "bogus-tlsa.dane.test", 1)]
    assert _summary(entry) == (0, 1)


def test_no_starttls_and_opportunistic_tls(world: World) -> None:
    (clear,) = _policies(world, "clear.unsigned.test").values()
    assert clear["policy"] == {"policy-type": "no-policy-found", "policy-domain": "clear.unsigned.test"}
    assert _failures(clear) == [("starttls-not-supported", "mx-clear.unsigned.test", 1)]
    assert clear["failure-details"][0]["receiving-ip"] == CLEAR
    (tls,) = _policies(world, REUSED).values()
    assert tls["policy"]["policy-type"] == "no-policy-found"
    assert _summary(tls) == (1, 0) and "failure-details" not in tls  # three messages, one session
    sent = [d for d in deliveries(world.sender) if d["rcpt"] == f"rcpt@{REUSED}"]
    assert [d["status"] for d in sent] == ["sent"] * 3


def test_mta_sts_success_and_enforce_failure(world: World) -> None:
    (ok,) = _policies(world, "enforce-ok.sts.test").values()
    assert ok["policy"]["policy-type"] == "sts" and ok["policy"]["mx-host"] == ["mx-good.sts.test"]
    assert "mode: enforce" in ok["policy"]["policy-string"]
    assert _summary(ok) == (1, 0)
    (bad,) = _policies(world, "wildcard.sts.test").values()
    assert bad["policy"]["mx-host"] == ["*.sts.test"]
    assert _failures(bad) == [("certificate-host-mismatch", "mx-other.sts.test", 1)]
    assert bad["failure-details"][0]["receiving-ip"] == PKIX


def test_an_mx_host_the_enforced_policy_does_not_list(world: World) -> None:
    (entry,) = _policies(world, "enforce-bad.sts.test").values()
    assert entry["policy"]["policy-type"] == "sts" and entry["policy"]["mx-host"] == ["mx-good.sts.test"]
    assert _failures(entry) == [("validation-failure", "mx-other.sts.test", 1)]


def test_testing_mode_counts_what_enforce_would_refuse(world: World) -> None:
    # No report goes out (the record is not valid), but the count is kept: delivered, yet failed.
    # Its policy lists mx-good.sts.test; the MX is mx-other.sts.test (whose certificate names
    # mx-good too): the first thing enforce would refuse is the host itself.
    (tally,) = [t for t in world.tallies if t.domain == "testing.sts.test"]
    assert (tally.policy_type, tally.result_type, tally.receiving_mx, tally.count) == (
        "sts", "validation-failure", "mx-other.sts.test", 1)
    assert tally.reason_code == "mx-other.sts.test is not listed in the MTA-STS policy"


def test_operator_levels_count_too(world: World) -> None:
    # No report goes out for these (no _smtp._tls records), but the day's counts hold them.
    by_domain = {t.domain: t for t in world.tallies if t.result_type}
    verify, dane_only = by_domain["selfsigned.dane.test"], by_domain["notlsa.dane.test"]
    assert (verify.policy_type, verify.result_type, verify.receiving_mx, verify.receiving_ip) == (
        "no-policy-found", "certificate-not-trusted", "ee-self.dane.test", EE_SELF)
    assert verify.reason_code == "certificate verification failed: self-signed certificate"
    assert (dane_only.policy_type, dane_only.result_type, dane_only.receiving_mx, dane_only.count) == (
        "tlsa", "dane-required", "notlsa-mx.dane.test", 1)


def test_a_failed_policy_fetch_is_reported(world: World) -> None:
    policies = _policies(world, "cached.sts.test")
    fetch = policies["sts", ()]
    assert [f["result-type"] for f in fetch["failure-details"]] == ["sts-policy-fetch-error"]
    assert "HTTP 500" in fetch["failure-details"][0]["failure-reason-code"]
    # Without a policy the mail went opportunistically, and that session is counted too.
    assert _summary(policies["no-policy-found", ()]) == (1, 0)


# --- counted once, sent once ----------------------------------------------------------------------------

def test_reports_are_sent_once_and_their_own_delivery_is_not_counted(world: World) -> None:
    assert world.again == {}
    assert world.tallies_after == world.tallies
    assert REPORT_DOMAIN not in {t.domain for t in world.tallies_after}
    # the sender's log shows the reports leaving through its queue like any other mail
    sent = [d for d in deliveries(world.sender) if d["rcpt"] == f"{REPORT_BOX}@{REPORT_DOMAIN}"]
    assert len(sent) == len(world.mails) and all(d["status"] == "sent" for d in sent)


def test_the_server_sends_the_previous_day_itself(world: World) -> None:
    # `mailward serve` runs the daily sender: started past send_hour, it sent yesterday's report.
    (upload,) = world.yesterday
    report = json.loads(gzip.decompress(upload.body))
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
    (entry,) = report["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": DAILY}
    assert _summary(entry) == (7, 0)
    assert "TLS reports: each UTC day's reports are sent the next day at 00:00 UTC" in world.sender.log()
    assert f"TLS report for {DAILY} (" in world.sender.log()


def test_tlsrpt_show_prints_what_was_sent(world: World) -> None:
    shown = json.loads(world.sender.cli("tlsrpt", "show", "--date", world.day, "--json").stdout)
    by_domain = {s["domain"]: s for s in shown}
    assert set(by_domain) == {t.domain for t in world.tallies}
    for domain, upload in ((d, ups[0]) for d, ups in world.posts.items()):
        assert by_domain[domain]["report"] == json.loads(gzip.decompress(upload.body))
        assert by_domain[domain]["sent"] == by_domain[domain]["report"]["report-id"]
    assert by_domain["testing.sts.test"]["sent"] is None


def test_a_bad_report_ca_file_stops_start_up_with_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    server = MailwardServer(tmp_path / "bad", extra_toml=f'[tlsrpt]\nhttps_ca_file = "{missing}"\n')
    server.write_config()
    with pytest.raises(RuntimeError, match="exited early"):
        server.start()
    log = server.log()
    assert f"tlsrpt.https_ca_file: {missing} cannot be used" in log, log
    assert "Traceback" not in log, log
