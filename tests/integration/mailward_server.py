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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mailward exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"mailward did not listen on port {port} within {timeout}s")


@dataclass
class MailwardServer:
    root: Path
    mx: int = field(default_factory=free_port)
    submission: int = field(default_factory=free_port)
    submissions: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    extra_toml: str = ""

    @property
    def config_path(self) -> Path:
        return self.root / "mailward.toml"

    @property
    def ca(self) -> Path:
        return demo_ca_path(self.root / "tls")

    @property
    def queue_path(self) -> Path:
        return self.root / "state" / "queue" / "queue.db"

    @property
    def log_path(self) -> Path:
        return self.root / "mailward.log"

    def write_config(self) -> None:
        pair = make_demo_certificate(self.root / "tls", "localhost")
        (self.root / "state").mkdir(exist_ok=True)
        self.config_path.write_text(f"""
hostname = "mx.example.test"
state_dir = "state"
local_domains = ["example.test"]
{self.extra_toml}

[[listener]]
kind = "mx"
address = "127.0.0.1"
port = {self.mx}

[[listener]]
kind = "submission"
address = "127.0.0.1"
port = {self.submission}

[[listener]]
kind = "submissions"
address = "127.0.0.1"
port = {self.submissions}

[[tls.certificates]]
cert = "{pair.cert}"
key = "{pair.key}"

[log]
level = "debug"
""")
        self.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailward.cli", *args, "--config", str(self.config_path)],
            input=stdin, capture_output=True, text=True, check=True, timeout=60,
        )

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailward.cli", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
        )
        for port in (self.mx, self.submission, self.submissions):
            wait_for_port(port, self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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
