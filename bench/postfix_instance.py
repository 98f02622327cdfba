"""A throwaway Postfix instance on loopback, to measure mailward beside it in the same run.

Everything lives in one temporary directory (main.cf, master.cf, queue, data, TLS files, log) and
`postfix -c DIR` drives it, so the system's own Postfix configuration is neither read nor touched.
Accepted mail is fsync'd into the queue before the 250 (as Postfix always does) and then handed
to the discard transport: the durability mailward is compared against, without any delivery.

Three smtpd listeners, all on 127.0.0.1 and none with AUTH:
* `submissions`: implicit TLS (smtpd_tls_wrappermode, as on 465);
* `submission`: STARTTLS required (smtpd_tls_security_level=encrypt, as on 587);
* `plain`: no TLS offered.

    python bench/postfix_instance.py   # start one, print its ports, stop it on Enter
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"
RELAY_DOMAIN = "example.test"
PROCESS_LIMIT = 100
POSTFIX = shutil.which("postfix", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "/usr/sbin/postfix"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixError(RuntimeError):
    pass


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _smtpd(port: int, *options: str, maxproc: int) -> str:
    # chroot off: the instance has no chroot jail, and "n" keeps the comparison free of jail setup.
    lines = [f"{LOOPBACK}:{port} inet n - n - {maxproc} smtpd"]
    lines += [f"  -o {o}" for o in options]
    return "\n".join(lines)


# The daemons the accept-and-discard path needs; chroot off for all (see _smtpd).
_MASTER_SERVICES = """
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    """Use as a context manager: `with PostfixInstance(cert, key) as pf: ... pf.port("plain")`."""

    cert: Path  # PEM chain, leaf first
    key: Path
    process_limit: int = PROCESS_LIMIT
    # Postfix pauses smtpd (up to 1s per message) while deliveries lag behind arrivals; mailward
    # has no delivery to lag, so the accept paths are compared without that brake.
    in_flow_delay: str = "0s"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mailward-bench-postfix-")))
    ports: dict[str, int] = field(default_factory=lambda: {
        "submissions": free_port(), "submission": free_port(), "plain": free_port()})
    running: bool = False

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def log_path(self) -> Path:
        return self.root / "maillog"

    def port(self, name: str) -> int:
        return self.ports[name]

    def main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.root / "data"}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {RELAY_DOMAIN}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard
relay_transport = discard
local_transport = discard
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
default_process_limit = {self.process_limit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = no
in_flow_delay = {self.in_flow_delay}
smtpd_banner = $myhostname ESMTP
smtpd_tls_chain_files = {self.key}, {self.cert}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 0
maillog_file = {self.log_path}
maillog_file_prefixes = {self.root}
"""

    def master_cf(self) -> str:
        limit = self.process_limit
        return "\n".join([
            _smtpd(self.ports["submissions"], "smtpd_tls_wrappermode=yes",
                   "smtpd_tls_security_level=encrypt", maxproc=limit),
            _smtpd(self.ports["submission"], "smtpd_tls_security_level=encrypt", maxproc=limit),
            _smtpd(self.ports["plain"], "smtpd_tls_security_level=none", maxproc=limit),
        ]) + "\n" + _MASTER_SERVICES

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [POSTFIX, "-c", str(self.config_dir), *args]
        # `script` gives postfix(1) a terminal: it reports fatal errors on stderr only to a tty
        # (otherwise to syslog, which a bench machine may not run).
        proc = subprocess.run(["script", "-qec", " ".join(cmd), "/dev/null"], capture_output=True,
                              text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise PostfixError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                               f"\n{self.log_tail()}")
        return proc

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("running a Postfix instance needs root (postfix -c DIR start)")
        self.config_dir.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postfix", "postfix")
        self.queue_dir.mkdir(exist_ok=True)  # root-owned; `postfix check` creates what is inside
        # Postfix refuses a queue or data directory below a path other users can write to.
        self.root.chmod(0o755)
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        self._check_loopback_only()
        self._postfix("check")
        self._postfix("start")
        self.running = True
        self._wait_listening()

    def _check_loopback_only(self) -> None:
        text = (self.config_dir / "master.cf").read_text()
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == "inet" and not fields[0].startswith(LOOPBACK + ":"):
                raise PostfixError(f"refusing a non-loopback listener: {line}")

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending and time.monotonic() < deadline:
            for port in list(pending):
                with socket.socket() as s:
                    s.settimeout(0.5)
                    if s.connect_ex((LOOPBACK, port)) == 0:
                        pending.discard(port)
            if pending:
                time.sleep(0.05)
        if pending:
            raise PostfixError(f"Postfix did not listen on {sorted(pending)} within {timeout}s\n"
                               f"{self.log_tail()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queued(self) -> int:
        """Messages still in the queue (not yet discarded)."""
        total = 0
        for q in QUEUES:
            for _, _, files in os.walk(self.queue_dir / q):
                total += len(files)
        return total

    def wait_empty(self, timeout: float = 120.0) -> bool:
        """Wait until every accepted message has been discarded, so the next run starts level."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.1)
        return False

    def delivered(self, expect: int | None = None, timeout: float = 10.0) -> int:
        """Messages the discard transport has dropped so far, from the log; with `expect`, wait
        (the log daemon writes asynchronously) until that many are logged or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                n = self.log_path.read_bytes().count(b"status=sent")
            except OSError:
                n = 0
            if expect is None or n >= expect or time.monotonic() > deadline:
                return n
            time.sleep(0.1)

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                self._postfix("stop")
            except (PostfixError, subprocess.TimeoutExpired):
                pid = self.master_pid()
                if pid is not None:
                    os.kill(pid, 9)
            self._wait_master_gone()

    def _wait_master_gone(self, timeout: float = 15.0) -> None:
        pid = self.master_pid()
        deadline = time.monotonic() + timeout
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> PostfixInstance:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from mailward.tls import demo_ca_path, make_demo_certificate

    tls_dir = Path(tempfile.mkdtemp(prefix="mailward-bench-tls-"))
    try:
        pair = make_demo_certificate(tls_dir, "localhost")
        with PostfixInstance(pair.cert, pair.key) as pf:
            print(f"Postfix in {pf.root}: " + ", ".join(f"{k} {LOOPBACK}:{v}" for k, v in pf.ports.items()))
            print(f"CA: {demo_ca_path(tls_dir)}; press Enter to stop")
            input()
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
