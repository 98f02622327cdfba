"""Fuzz the MTA-STS parsers (RFC 8461 §3.1, §3.2) with arbitrary bytes.

Input layout: the first byte picks the target (even: the policy body, odd: TXT records split at
NUL bytes); the rest is the input. Policy bodies come from an attacker's HTTPS server and TXT
records from DNS, so both must turn every input into a value or a PolicyError, nothing else.

Invariants: parse_policy either raises PolicyError (result type sts-policy-invalid) or returns a
policy whose mode is one of three, whose max_age is within the RFC's limit, that lists at least
one mx pattern unless its mode is none, and that parses again to itself from its own text;
every accepted mx pattern matches itself with the wildcard label filled in. parse_txt never
raises and returns an id of 1 to 32 letters and digits.

Run: python fuzz/fuzz_mtasts.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mailward"]):
    from mailward.delivery.mtasts import MAX_AGE_LIMIT, RESULT_INVALID, PolicyError, parse_policy, parse_txt
    from mailward.delivery.policy import sts_matches


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    target, body = data[0], data[1:]
    if target % 2:
        found = parse_txt(body.split(b"\0"))
        if found is not None:
            assert 1 <= len(found.id) <= 32 and found.id.isascii() and found.id.isalnum(), found
        return
    try:
        policy = parse_policy(body)
    except PolicyError as exc:
        assert exc.result_type == RESULT_INVALID, exc
        return
    assert policy.mode in ("enforce", "testing", "none"), policy
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT, policy
    assert policy.mx or policy.mode == "none", policy
    assert parse_policy(policy.text.encode()) == policy
    for pattern in policy.mx:
        host = "x" + pattern[1:] if pattern.startswith("*.") else pattern
        assert sts_matches(pattern, host), (pattern, host)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
