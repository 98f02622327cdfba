"""testssl.sh's verdict on 465 (implicit TLS) and 587 (STARTTLS): versions and cipher categories.

Each port is scanned once (the scans run side by side, they take most of this suite's time).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailward_server import KINDS, MailwardServer

from conftest import require_tool

NOT_OFFERED = ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "cipherlist_NULL", "cipherlist_aNULL",
               "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA",
               "cipherlist_AVERAGE"]  # AVERAGE is testssl's "obsolete CBC ciphers" category
OFFERED = ["TLS1_2", "TLS1_3", "cipherlist_STRONG", "PFS"]
# testssl keeps some probe connections open until the server closes them; with the defaults
# (30 s handshake, 300 s command timeout) a scan would mostly wait.
FAST_TIMEOUTS = "handshake_timeout = 2\ncommand_timeout = 3\n"

Findings = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Findings]]:
    testssl = require_tool("testssl")
    root = tmp_path_factory.mktemp("testssl")
    server = MailwardServer(root / "server", listener_toml=dict.fromkeys(KINDS, FAST_TIMEOUTS))
    server.write_config()
    server.start()
    try:
        targets = {"465": ([], server.submissions), "587": (["--starttls", "smtp"], server.submission)}
        procs = {}
        for name, (extra, port) in targets.items():
            out = root / f"testssl-{name}.json"
            cmd = [testssl, "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
                   "--openssl", "/usr/bin/openssl", "--connect-timeout", "10", "--openssl-timeout", "10",
                   "--jsonfile", str(out), *extra, "--protocols", "--std", "--fs", f"127.0.0.1:{port}"]
            log = (root / f"testssl-{name}.txt").open("w")
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log)
        results: dict[str, Findings] = {}
        for name, (proc, out, log) in procs.items():
            try:
                proc.wait(timeout=240)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
                log.close()
            text = Path(log.name).read_text()
            assert out.exists(), f"testssl wrote no JSON for {name}:\n{text}"
            results[name] = {f["id"]: f for f in json.loads(out.read_text())}
        yield results
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("port", ["465", "587"])
def test_only_tls12_and_tls13_with_strong_ciphers(scans: dict[str, Findings], port: str) -> None:
    findings = scans[port]
    assert "scanTime" in findings, "the scan did not complete"
    problems = [f for f in findings.values() if f["id"] == "scanProblem" or f["severity"] == "FATAL"]
    assert not problems, problems
    for fid in NOT_OFFERED:
        assert findings[fid]["finding"].startswith("not offered"), findings[fid]
    for fid in OFFERED:
        assert findings[fid]["finding"].startswith("offered"), findings[fid]
    bad = [f for f in findings.values() if f["severity"] in ("MEDIUM", "HIGH", "CRITICAL")]
    assert not bad, bad


def test_starttls_scan_really_spoke_smtp(scans: dict[str, Findings]) -> None:
    assert scans["587"]["service"]["finding"] == "smtp"
