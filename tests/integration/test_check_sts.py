"""`mailward check` against the MTA-STS lab (sts_lab.py, test_mtasts_delivery.py's `world`): for every
destination the check's verdict is what the sender's delivery actually did with a real message,
cached policies in the sender's queue included, and MX hosts a policy does not cover are named."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_check_dane import delivery_verdict
from test_mtasts_delivery import CASES, Case, World
from test_mtasts_delivery import world as sts_world  # noqa: F401  (the fixture, under its own name)
from tlsrpt_lab import INVALID, rua


@pytest.fixture(scope="module")
def checks(sts_world: World) -> dict[str, Any]:  # noqa: F811
    out = {}
    for case in CASES:
        result = sts_world.sender.cli("check", case.domain, "--json", check=False)
        assert result.stdout, result.stderr
        out[case.domain] = (result.returncode, json.loads(result.stdout))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.domain for c in CASES])
def test_verdict_is_what_delivery_did(sts_world: World, checks: dict[str, Any], case: Case) -> None:  # noqa: F811
    status, report = checks[case.domain]
    line = sts_world.lines[case.rcpt]
    assert report["verdict"] == delivery_verdict(line), (report["reason"], report["findings"], line)
    assert status == {"secure": 0, "insecure": 1, "defer": 2, "error": 3}[report["verdict"]]


def test_policy_and_pattern_details(checks: dict[str, Any]) -> None:
    _, ok = checks["enforce-ok.sts.test"]
    assert ok["mta_sts"]["policy"]["mode"] == "enforce"
    assert ok["mta_sts"]["policy"]["mx"] == ["mx-good.sts.test"]
    (host,) = ok["mx"]
    assert (host["mta_sts_match"], host["verdict"]) == (True, "Verified")
    assert host["requirement"]["verify"] == "pkix"
    assert host["connections"][0]["pkix"]["trusted"] is True

    _, bad = checks["enforce-bad.sts.test"]
    (host,) = bad["mx"]
    assert (host["mta_sts_match"], host["verdict"]) == (False, "Unreachable")
    assert any("do not cover this MX host" in f["text"] for f in bad["findings"]), bad["findings"]

    _, redirect = checks["redirect.sts.test"]
    assert redirect["mta_sts"]["policy"] is None
    assert redirect["mta_sts"]["failure"] == "sts-policy-fetch-error"

    # The cached enforce policy in the sender's queue still binds, as it did for delivery.
    _, cached = checks["cached.sts.test"]
    assert cached["mta_sts"]["from_cache"] is True and cached["mta_sts"]["policy"]["mode"] == "enforce"


def test_tlsrpt_records(sts_world: World, checks: dict[str, Any]) -> None:  # noqa: F811
    published = rua(sts_world.lab.smtp_port)
    for case in CASES:
        tlsrpt = checks[case.domain][1]["tlsrpt"]
        if case.domain in published:
            assert tlsrpt["rua"] == published[case.domain].split(","), tlsrpt
        elif case.domain in INVALID:
            assert tlsrpt["rua"] == [] and "more than one rua" in tlsrpt["error"], tlsrpt
            assert tlsrpt["records"] == [INVALID[case.domain]]
