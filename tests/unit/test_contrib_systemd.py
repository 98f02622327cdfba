"""contrib/systemd/mailward.service agrees with what the service does, and systemd accepts it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailward.delivery import STOP_GRACE
from mailward.service import DRAIN_SECONDS

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "mailward.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_stop_timeout_outlasts_the_drain() -> None:
    # Sessions drain, then delivery attempts get their grace, each with 5 s to close what is left.
    [timeout] = settings()["TimeoutStopSec"]
    assert int(timeout) > DRAIN_SECONDS + 5 + STOP_GRACE + 5
    assert settings()["KillSignal"] == ["SIGTERM"]


def test_the_start_up_as_root_has_what_it_needs_and_no_more() -> None:
    s = settings()
    assert s["Type"] == ["notify"]  # service.sd_notify sends READY=1
    assert set(s["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_BIND_SERVICE", "CAP_DAC_OVERRIDE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"}
    assert "User" not in s  # mailward binds as root and drops to `user` itself
    assert s["ExecStart"] == ["/usr/local/bin/mailward serve --config /etc/mailward/mailward.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["RestartPreventExitStatus"] == ["2"]  # a start-up mistake: retrying cannot fix it


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists; point it at this checkout's entry point.
    unit = tmp_path / "mailward.service"
    entry = Path(sys.executable).parent / "mailward"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mailward", str(entry)))
    p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip(), p
