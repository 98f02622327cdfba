"""Start a real mailward process on loopback for integration tests and talk to its queue."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailward.queue import StoredMessage
from mailward.queue.sqlite import SqliteQueue
from mailward.tls import demo_ca_path, make_demo_certificate

USER = "alice@example.test"
PASSWORD = "correct horse battery"
KINDS = ("mx", "submission", "submissions")
# Started as root, mailward refuses to run without `user`; the harness keeps running it as whoever
# runs the tests by saying so (test_privileges.py covers the drop to an account of its own).
RUN_AS = "root" if os.geteuid() == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MailwardServer:
    root: Path
    mx: int = field(default_factory=free_port)
    submission: int = field(default_factory=free_port)
    submissions: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Top-level TOML (keys or whole tables such as [auth]) placed before the listeners.
    extra_toml: str = ""
    # Extra `key = value` lines for the [[listener]] table of one kind ("mx", "submission", ...).
    listener_toml: dict[str, str] = field(default_factory=dict)
    log_level: str = "debug"
    # Off by default so tests of what was accepted see it still queued; delivery tests turn it on
    # (and may then write their own [delivery] table in extra_toml).
    deliver: bool = False
    # Where every listener binds: DANE peers each take their own loopback address.
    address: str = "127.0.0.1"
    # (chain, key) files for [[tls.certificates]], the first the default; empty: the demo pair.
    certificates: tuple[tuple[Path, Path], ...] = ()
    # The top-level `user` key; None leaves it out.
    user: str | None = RUN_AS
    _log_offset: int = 0

    @property
    def config_path(self) -> Path:
        return self.root / "mailward.toml"

    @property
    def ca(self) -> Path:
        return demo_ca_path(self.root / "tls")

    @property
    def cert(self) -> Path:
        return self.root / "tls" / "cert.pem"

    @property
    def key(self) -> Path:
        return self.root / "tls" / "key.pem"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def queue_path(self) -> Path:
        return self.state_dir / "queue" / "queue.db"

    @property
    def users_path(self) -> Path:
        return self.state_dir / "users"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "mailward.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "mailward.log"

    def port(self, kind: str) -> int:
        return int(getattr(self, kind))

    def config_text(self) -> str:
        certificates = "".join(f'\n[[tls.certificates]]\ncert = "{cert}"\nkey = "{key}"\n'
                               for cert, key in self.certificates or ((self.cert, self.key),))
        listeners = "".join(
            f"""
[[listener]]
kind = "{kind}"
address = "{self.address}"
port = {self.port(kind)}
{self.listener_toml.get(kind, "")}
"""
            for kind in KINDS
        )
        return f"""
hostname = "mx.example.test"
state_dir = "state"
{f'user = "{self.user}"' if self.user else ""}
local_domains = ["example.test"]
{self.extra_toml}
{listeners}{certificates}
[log]
level = "{self.log_level}"
{"" if self.deliver else "[delivery]" + chr(10) + "enabled = false" + chr(10)}{self._dns_toml()}"""

    def _dns_toml(self) -> str:
        # Tests must never query a resolver off loopback: without a [dns] table of the test's own,
        # lookups go to a loopback port where nothing answers (and so defer).
        if "[dns]" in self.extra_toml:
            return ""
        return '[dns]\nresolvers = ["127.0.0.1:9"]\ntimeout = 1\n'

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        make_demo_certificate(self.root / "tls", "localhost")
        self.state_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self.config_text())
        self.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")

    def cli(self, *args: str, stdin: str | None = None, check: bool = True,
            config: Path | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "mailward.cli", *args, "--config", str(config or self.config_path)],
            input=stdin, capture_output=True, text=True, check=False, timeout=60, cwd=self.root,
        )
        if check and done.returncode != 0:
            # What mailward said is the whole story of a failed command: keep it in the report.
            raise AssertionError(f"mailward {' '.join(args)} exited with {done.returncode}:\n"
                                 f"{done.stderr}{done.stdout}")
        return done

    def start(self, timeout: float = 20.0) -> None:
        """Start `mailward serve` and wait until it wrote its pid file, i.e. every listener is bound.

        Waiting on the pid file rather than probing the ports keeps probe connections out of
        tests that count connections.
        """
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailward.cli", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"mailward exited early with status {code}:\n{self.log()}")
            try:
                if int(self.pid_path.read_text().strip()) == self.proc.pid:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"mailward did not start within {timeout}s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash or the OOM killer would end it."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        """The log written by the current (or last) run only."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_since_start()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log_since_start()}")

    def messages(self) -> list[tuple[StoredMessage, bytes]]:
        """Every stored message with its verified body (read with the queue's own reader)."""
        async def read() -> list[tuple[StoredMessage, bytes]]:
            q = await SqliteQueue.open(self.queue_path)
            try:
                out = []
                for m in await q.list(limit=100_000):
                    body = b"".join([chunk async for chunk in await q.open_body(m.id)])
                    out.append((m, body))
                return out
            finally:
                await q.close()
        return asyncio.run(read())
