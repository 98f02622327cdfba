"""Helpers for tests that submit through the local socket: run `sendmail` as a program would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailward_server import MailwardServer

PARKED = "parked.test"


def parked_toml() -> str:
    """Top-level TOML that lets the mx listener accept the test domain too (for swaks over TCP).

    The harness keeps delivery off unless a test asks for it, so what a test submits stays queued.
    """
    return f'relay_domains = ["{PARKED}"]\n'


def socket_path(server: MailwardServer) -> Path:
    return server.state_dir / "mailward.sock"


def sendmail(server: MailwardServer | None, *args: str, stdin: bytes = b"Subject: test\n\nhello\n",
             env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the command as a program would: no terminal, the configuration named by the environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MAILWARD_CONFIG", "MAILWARD_SOCKET")}
    if server is not None:
        clean["MAILWARD_CONFIG"] = str(server.config_path)
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "mailward.sendmail", *args], input=stdin,
                          capture_output=True, env=clean, cwd=cwd or (server.root if server else None),
                          timeout=60)


def ok(result: subprocess.CompletedProcess[bytes]) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result
