"""A throwaway Postfix instance on loopback, to measure mailward beside it in the same run.

Everything lives in one temporary directory (main.cf, master.cf, queue, data, TLS files, log) and
`postfix -c DIR` drives it, so the system's own Postfix configuration is neither read nor touched.
Accepted mail is fsync'd into the queue before the 250 (as Postfix always does) and then handed
to the discard transport: the durability mailward is compared against, without any delivery.
With `relay_port`, mail for example.test goes out instead, by Postfix's smtp client in plaintext
to [127.0.0.1]:relay_port, and the `plain` listener puts what it accepts on hold, so a queue can
be filled first and then released all at once (`release_held`).

Four smtpd listeners, all on 127.0.0.1:
* `submissions`: implicit TLS (smtpd_tls_wrappermode, as on 465), AUTH required;
* `submission`: STARTTLS required (smtpd_tls_security_level=encrypt, as on 587), AUTH required;
* `mx`: STARTTLS offered, no AUTH (as on 25);
* `plain`: no TLS offered, no AUTH.

AUTH is Cyrus SASL (PLAIN and LOGIN) against a sasldb made with saslpasswd2 (Debian package
sasl2-bin), the login owning its address as sender (reject_sender_login_mismatch), like mailward's
submission listeners. Without a `sasl_user` the submission listeners take mail without AUTH.

    python bench/postfix_instance.py   # start one, print its ports, stop it on Enter
"""

from __future__ import annotations

import ipaddress
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
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
POSTFIX = shutil.which("postfix", path=SBIN_PATH) or "/usr/sbin/postfix"
SASLPASSWD = shutil.which("saslpasswd2", path=SBIN_PATH)
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixError(RuntimeError):
    pass


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sasl_available() -> bool:
    """Whether Postfix can be given AUTH here: saslpasswd2 and Cyrus's sasldb plugin installed."""
    plugins = list(Path("/usr/lib").glob("*/sasl2/libsasldb.so*")) + list(Path("/usr/lib/sasl2").glob(
        "libsasldb.so*"))
    return SASLPASSWD is not None and bool(plugins)


def _smtpd(address: str, port: int, *options: str, maxproc: int) -> str:
    # chroot off: the instance has no chroot jail, and "n" keeps the comparison free of jail setup.
    lines = [f"{address}:{port} inet n - n - {maxproc} smtpd"]
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
smtp      unix  -       -       n       -       -       smtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    """Use as a context manager: `with PostfixInstance(cert, key) as pf: ... pf.port("plain")`."""

    cert: Path  # PEM chain, leaf first
    key: Path
    sasl_user: tuple[str, str] | None = None  # (user@realm, password) AUTH requires on submission
    relay_port: int | None = None  # deliver to [127.0.0.1]:relay_port instead of discarding
    process_limit: int = PROCESS_LIMIT
    # Postfix pauses smtpd (up to 1s per message) while deliveries lag behind arrivals; mailward
    # has no delivery to lag, so the accept paths are compared without that brake.
    in_flow_delay: str = "0s"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mailward-bench-postfix-")))
    # Tests run it as a real peer that lacks a feature (REQUIRETLS), on a lab address of their own.
    address: str = LOOPBACK
    relay_domains: tuple[str, ...] = (RELAY_DOMAIN,)
    ports: dict[str, int] = field(default_factory=lambda: {
        "submissions": free_port(), "submission": free_port(), "mx": free_port(), "plain": free_port()})
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

    @property
    def sasldb(self) -> Path:
        return self.root / "sasldb2"

    def _delivery_cf(self) -> str:
        if self.relay_port is None:
            return "default_transport = discard\nrelay_transport = discard\n"
        # Plaintext like the mailward route it is compared with (smtp-sink has no TLS); the next hop
        # is an address literal, so no DNS either.
        return f"""\
default_transport = smtp
relay_transport = smtp
transport_maps = inline:{{ {RELAY_DOMAIN}=smtp:[{LOOPBACK}]:{self.relay_port} }}
smtp_tls_security_level = none
smtp_dns_support_level = disabled
"""

    def _sasl_cf(self) -> str:
        if self.sasl_user is None:
            return ""
        user = self.sasl_user[0]
        return f"""\
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {self.config_dir / "sasl"}
smtpd_tls_auth_only = yes
smtpd_sasl_authenticated_header = no
smtpd_sender_login_maps = inline:{{ {user}={user} }}
"""

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
inet_interfaces = {"loopback-only" if self.address != LOOPBACK else LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {", ".join(self.relay_domains)}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
{self._delivery_cf()}local_transport = discard
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
{self._sasl_cf()}"""

    def master_cf(self) -> str:
        limit = self.process_limit
        # As mailward's submission listeners: nothing before AUTH, then only the login's own sender.
        auth = ("smtpd_sasl_auth_enable=yes", "smtpd_client_restrictions=permit_sasl_authenticated,reject",
                "smtpd_sender_restrictions=reject_sender_login_mismatch",
                "smtpd_relay_restrictions=permit_sasl_authenticated,reject") if self.sasl_user else ()
        # Filling the queue for an outbound run: everything accepted waits on hold until released.
        hold = ("smtpd_client_restrictions=check_client_access,static:HOLD",) if self.relay_port else ()
        return "\n".join([
            _smtpd(self.address, self.ports["submissions"], "smtpd_tls_wrappermode=yes",
                   "smtpd_tls_security_level=encrypt", *auth, maxproc=limit),
            _smtpd(self.address, self.ports["submission"], "smtpd_tls_security_level=encrypt", *auth,
                   maxproc=limit),
            _smtpd(self.address, self.ports["mx"], "smtpd_tls_security_level=may", maxproc=limit),
            _smtpd(self.address, self.ports["plain"], "smtpd_tls_security_level=none", *hold, maxproc=limit),
        ]) + "\n" + _MASTER_SERVICES

    def _write_sasl(self) -> None:
        if self.sasl_user is None:
            return
        if SASLPASSWD is None:
            raise PostfixError("AUTH for Postfix needs saslpasswd2: apt-get install sasl2-bin")
        user, password = self.sasl_user
        name, _, realm = user.partition("@")
        # sasldb keeps the secret as given: Cyrus's auxprop compares it directly on each AUTH.
        subprocess.run([SASLPASSWD, "-p", "-c", "-f", str(self.sasldb), "-u", realm, name],
                       input=password, text=True, check=True, capture_output=True, timeout=30)
        shutil.chown(self.sasldb, "root", "postfix")
        self.sasldb.chmod(0o640)  # smtpd reads it as the postfix user
        # Debian's Postfix reads it from $config_directory/sasl whatever cyrus_sasl_config_path says.
        (self.config_dir / "sasl").mkdir(exist_ok=True)
        (self.config_dir / "sasl" / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {self.sasldb}\n")

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
        self._write_sasl()
        self._check_loopback_only()
        self._postfix("check")
        self._postfix("start")
        self.running = True
        self._wait_listening()

    def _check_loopback_only(self) -> None:
        text = (self.config_dir / "master.cf").read_text()
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == "inet" and not ipaddress.ip_address(
                    fields[0].rpartition(":")[0]).is_loopback:
                raise PostfixError(f"refusing a non-loopback listener: {line}")

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending and time.monotonic() < deadline:
            for port in list(pending):
                with socket.socket() as s:
                    s.settimeout(0.5)
                    if s.connect_ex((self.address, port)) == 0:
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

    def queued(self, queues: tuple[str, ...] = QUEUES) -> int:
        """Messages still in the queue (not yet discarded or delivered)."""
        total = 0
        for q in queues:
            for _, _, files in os.walk(self.queue_dir / q):
                total += len(files)
        return total

    def held(self) -> int:
        return self.queued(("hold",))

    def wait_held(self, expect: int, timeout: float = 60.0) -> int:
        """Wait until `expect` messages are on hold (cleanup finishes each after its 250)."""
        deadline = time.monotonic() + timeout
        while (n := self.held()) < expect and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    def release_held(self) -> None:
        """Everything on hold back to the deferred queue, then a flush makes qmgr take it at once."""
        self._tool("postsuper", "-H", "ALL")
        self._tool("postqueue", "-f")

    def _tool(self, name: str, *args: str) -> None:
        binary = shutil.which(name, path=SBIN_PATH) or f"/usr/sbin/{name}"
        proc = subprocess.run([binary, "-c", str(self.config_dir), *args], capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise PostfixError(f"{name} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")

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
