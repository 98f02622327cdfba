"""TLS-RPT: record parsing, the tally, and the report JSON (RFC 8460)."""

from __future__ import annotations

import pytest

from mailward.reports.tlsrpt import (
    TlsRptRecord,
    TlsRptRecordError,
    parse_tlsrpt_record,
    select_tlsrpt_record,
)

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
