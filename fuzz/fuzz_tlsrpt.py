"""Fuzz the TLS-RPT record parser (RFC 8460 §3) with arbitrary bytes.

Input layout: the first byte picks the target (even: one record as text, odd: the TXT records of
`_smtp._tls.<domain>` split at NUL bytes); the rest is the input. Records come from DNS, which any
domain owner writes, so every input must become a record or a TlsRptRecordError, nothing else.

Invariants: an accepted record has at least one rua URI, none empty or holding whitespace, a
comma or an exclamation mark (§3: those must be encoded), each starting with a scheme; written
back as "v=TLSRPTv1; rua=..." it parses to itself; its mailto addresses come from its mailto URIs.

Run: python fuzz/fuzz_tlsrpt.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import re
import sys

import atheris

with atheris.instrument_imports(include=["mailward"]):
    from mailward.reports.tlsrpt import TlsRptRecordError, parse_tlsrpt_record, select_tlsrpt_record

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    target, body = data[0], data[1:]
    try:
        if target % 2:
            record = select_tlsrpt_record(body.split(b"\0"))
        else:
            record = parse_tlsrpt_record(body.decode("utf-8", "replace"))
    except TlsRptRecordError:
        return
    assert record.rua, record
    for uri in record.rua:
        assert uri and _SCHEME.match(uri), uri
        assert not any(c.isspace() or c in ",!" for c in uri), uri
    assert parse_tlsrpt_record("v=TLSRPTv1; rua=" + ",".join(record.rua)) == record
    assert len(record.mailto) == sum(u[:7].lower() == "mailto:" for u in record.rua), record


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
