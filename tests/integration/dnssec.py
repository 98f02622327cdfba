"""Real DNSSEC on loopback for tests: NSD serves zones signed at set-up, Unbound validates them.

`start_dnssec(root)` generates keys with ldns-keygen, signs with ldns-signzone, starts NSD (the
authoritative server) and Unbound (the validating resolver, with the signed zones' keys as trust
anchors), waits until both answer and returns a `DnsLab`. Both run in the foreground as children of
the test process (and die with it); `DnsLab.stop()` ends them. Nothing leaves loopback: Unbound
knows only stub zones served by NSD, and NSD answers REFUSED for anything else.

Zones (a declarative set, built once per session):

* ``secure.test`` is signed and anchored: answers carry AD.
* ``insecure.test`` is unsigned: answers come without AD.
* ``bogus.test`` is signed with signatures that expired in 2020: Unbound answers SERVFAIL.
* ``dane.test`` (signed, anchored) and ``unsigned.test``: DANE destinations whose TLSA records name
  certificates made at set-up (dane_lab.py), one signature broken on purpose.
* ``sts.test`` (unsigned): MTA-STS destinations with their ``_mta-sts`` TXT records and
  ``mta-sts`` hosts (sts_lab.py); ``dane.test`` also gets one, beside a failing TLSA record.

Mail hosts live on distinct loopback addresses with one shared SMTP port (`smtp_port`, the
`[delivery] port` of a test's mailward): LIVE where a test runs its SMTP peer, DEAD where nothing
listens (connection refused), SILENT where a socket accepts and never says a word (the lab holds it);
the DANE peers' addresses are in dane_lab.py.

Tools that only use the system resolver (Postfix's posttls-finger) need a resolver on port 53:
when that port can be bound (as root), Unbound also listens on port 53 of a loopback address of
its own (`DnsLab.system_resolver`; chosen at random, so test sessions running side by side do
not meet), and `DnsLab.resolv_conf` is a resolv.conf naming it, with the AD bit trusted (glibc
strips it unless `options trust-ad`).
"""

from __future__ import annotations

import ctypes
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
from dane_lab import (
    ADDRESSES,
    BROKEN_TLSA_HOST,
    SIGNED,
    UNSIGNED,
    DaneCerts,
    break_signature,
    make_certificates,
    signed_zone,
    unsigned_zone,
)
from sts_lab import ADDRESSES as STS_ADDRESSES
from sts_lab import ZONE as STS_ZONE
from sts_lab import dane_zone_records, sts_zone
from tlsrpt_lab import ADDRESSES as TLSRPT_ADDRESSES
from tlsrpt_lab import dane_zone_records as tlsrpt_dane_records
from tlsrpt_lab import sts_zone_records as tlsrpt_sts_records
from tlsrpt_lab import unsigned_zone_records as tlsrpt_unsigned_records

RESOLVER_IP = "127.0.53.1"
NSD_IP = "127.0.53.2"
LIVE = "127.0.53.10"
DEAD = "127.0.53.11"
SILENT = "127.0.53.12"
TOOLS = ("nsd", "unbound", "ldns-keygen", "ldns-signzone")  # Debian: nsd, unbound, ldnsutils

# A DANE-EE SHA-256 association (any 32 bytes do for lookups).
TLSA_DATA = bytes(range(32))

SECURE_ZONE = f"""\
$ORIGIN secure.test.
$TTL 300
@               SOA   ns hostmaster 1 3600 600 86400 300
@               NS    ns
ns              A     {NSD_IP}
live            A     {LIVE}
dead            A     {DEAD}
silent          A     {SILENT}
dual            A     {LIVE}
dual            AAAA  ::1
; MX fall-through: the preferred host refuses connections
fall            MX    10 dead
fall            MX    20 live
; RFC 7505 Null MX
nullmx          MX    0 .
; no MX: the domain's own address (implicit MX)
implicit        A     {LIVE}
; the MX host is an alias (CNAME) of another host
alias           MX    10 mx-alias
mx-alias        CNAME live
; the preferred host accepts connections and never answers
slow            MX    10 silent
slow            MX    20 live
; neither MX nor address records
nomail          TXT   "v=spf1 -all"
; an MX host whose zone is bogus, then a good one
mixed           MX    10 mx.bogus.test.
mixed           MX    20 live
; only a bogus MX host
badhost         MX    10 mx.bogus.test.
; an alias leading out of the signed zone
outward         CNAME mx.insecure.test.
; DANE: TLSA for live, reached directly or through the mx-alias CNAME
_25._tcp.live   TLSA  3 1 1 {TLSA_DATA.hex()}
"""

INSECURE_ZONE = f"""\
$ORIGIN insecure.test.
$TTL 300
@               SOA   ns hostmaster 1 3600 600 86400 300
@               NS    ns
ns              A     {NSD_IP}
@               MX    10 mx
mx              A     {LIVE}
_25._tcp.mx     TLSA  3 1 1 {TLSA_DATA.hex()}
"""

BOGUS_ZONE = f"""\
$ORIGIN bogus.test.
$TTL 300
@               SOA   ns hostmaster 1 3600 600 86400 300
@               NS    ns
ns              A     {NSD_IP}
@               MX    10 mx
mx              A     {LIVE}
"""


@dataclass
class DnsLab:
    """The running NSD + Unbound pair and the addresses tests use."""

    root: Path
    resolver_port: int
    nsd_port: int
    smtp_port: int
    dane: DaneCerts | None = None
    system_resolver: str | None = None  # Unbound's address with port 53, if it could have one
    resolv_conf: Path | None = None  # for tools that only use the system resolver; None: not available
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    silent: socket.socket | None = None

    @property
    def resolver(self) -> str:
        """The `dns.resolvers` entry for mailward."""
        return f"{RESOLVER_IP}:{self.resolver_port}"

    @property
    def dns_toml(self) -> str:
        return f'[dns]\nresolvers = ["{self.resolver}"]\ntimeout = 3\n'

    def query(self, name: str, rdtype: str, timeout: float = 3.0) -> dns.message.Message:
        """Ask Unbound directly, with DO and AD set."""
        q = dns.message.make_query(name, rdtype, want_dnssec=True)
        q.flags |= dns.flags.AD
        return dns.query.udp(q, RESOLVER_IP, port=self.resolver_port, timeout=timeout)

    def log(self) -> str:
        paths = sorted([*self.root.glob("*.log"), *self.root.glob("*.out")])
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in paths)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
        if self.silent is not None:
            self.silent.close()
            self.silent = None


def start_dnssec(root: Path) -> DnsLab:
    root.mkdir(parents=True, exist_ok=True)
    lab = DnsLab(root, resolver_port=_free_port(RESOLVER_IP, socket.SOCK_DGRAM),
                 nsd_port=_free_port(NSD_IP, socket.SOCK_DGRAM),
                 smtp_port=_shared_port(LIVE, DEAD, SILENT, *ADDRESSES, *STS_ADDRESSES, *TLSRPT_ADDRESSES))
    lab.dane = make_certificates(root / "dane")
    anchors = [_signed(root, "secure.test", SECURE_ZONE),
               _signed(root, "bogus.test", BOGUS_ZONE, dates=("-i", "20200101", "-e", "20200201")),
               _signed(root, SIGNED, signed_zone(lab.smtp_port, lab.dane, NSD_IP) + dane_zone_records()
                       + tlsrpt_dane_records(lab.smtp_port),
                       broken=(f"_{lab.smtp_port}._tcp.{BROKEN_TLSA_HOST}", "TLSA"))]
    (root / "insecure.test.zone").write_text(INSECURE_ZONE)
    (root / f"{UNSIGNED}.zone").write_text(unsigned_zone(lab.smtp_port, NSD_IP)
                                           + tlsrpt_unsigned_records(lab.smtp_port))
    (root / f"{STS_ZONE}.zone").write_text(sts_zone(NSD_IP) + tlsrpt_sts_records(lab.smtp_port))
    lab.system_resolver = _port53_address()
    if lab.system_resolver is not None:
        lab.resolv_conf = root / "resolv.conf"
        lab.resolv_conf.write_text(f"nameserver {lab.system_resolver}\noptions trust-ad edns0\n")
    try:
        silent = socket.socket()
        silent.bind((SILENT, lab.smtp_port))
        silent.listen(64)  # the kernel completes handshakes; nobody ever speaks
        lab.silent = silent
        (root / "nsd.conf").write_text(_nsd_conf(root, lab.nsd_port))
        lab.procs.append(_spawn("nsd", root))
        _wait_for(lambda: _answers(NSD_IP, lab.nsd_port, "secure.test.", "SOA"), lab, "NSD")
        (root / "unbound.conf").write_text(_unbound_conf(root, lab, anchors))
        lab.procs.append(_spawn("unbound", root))
        _wait_for(lambda: bool(lab.query("live.secure.test.", "A", 0.25).flags & dns.flags.AD), lab,
                  "Unbound")
    except BaseException:
        lab.stop()
        raise
    return lab


# --- set-up parts -----------------------------------------------------------------------------------

def _signed(root: Path, zone: str, text: str, dates: tuple[str, ...] = (),
            broken: tuple[str, str] | None = None) -> Path:
    """Sign `text` with a new KSK and ZSK; the KSK's DNSKEY file is the trust anchor.

    `dates` are ldns-signzone's -i (inception) and -e (expiration) options; default: now, 4 weeks.
    `broken` names one RRset (owner, type) whose signature is then made invalid.
    """
    def run(*args: str) -> str:
        return subprocess.run([_tool(args[0]), *args[1:]], cwd=root, check=True, capture_output=True,
                              text=True, timeout=30).stdout.strip()

    ksk = run("ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone)
    zsk = run("ldns-keygen", "-a", "ECDSAP256SHA256", zone)
    (root / f"{zone}.zone").write_text(text)
    run("ldns-signzone", *dates, "-f", f"{zone}.zone.signed", f"{zone}.zone", zsk, ksk)
    if broken is not None:
        signed = root / f"{zone}.zone.signed"
        signed.write_text(break_signature(signed.read_text(), *broken))
    return root / f"{ksk}.key"


def _nsd_conf(root: Path, port: int) -> str:
    zones = "".join(f'zone:\n    name: "{z}"\n    zonefile: "{f}"\n'
                    for z, f in (("secure.test", "secure.test.zone.signed"),
                                 ("bogus.test", "bogus.test.zone.signed"),
                                 ("insecure.test", "insecure.test.zone"),
                                 (SIGNED, f"{SIGNED}.zone.signed"),
                                 (UNSIGNED, f"{UNSIGNED}.zone"),
                                 (STS_ZONE, f"{STS_ZONE}.zone")))
    return f"""server:
    ip-address: {NSD_IP}@{port}
    port: {port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{root}"
    database: ""
    zonelistfile: "{root}/zone.list"
    xfrdfile: "{root}/xfrd.state"
    xfrdir: "{root}"
    pidfile: "{root}/nsd.pid"
    logfile: "{root}/nsd.log"
    server-count: 1
    verbosity: 1
    answer-cookie: no
remote-control:
    control-enable: no
{zones}"""


def _unbound_conf(root: Path, lab: DnsLab, anchors: list[Path]) -> str:
    stub = f"{NSD_IP}@{lab.nsd_port}"
    # "." goes to NSD too, which refuses it: nothing is ever asked of the real root servers.
    stubs = "".join(f'stub-zone:\n    name: "{z}"\n    stub-addr: {stub}\n'
                    for z in (".", "secure.test", "insecure.test", "bogus.test", SIGNED, UNSIGNED, STS_ZONE))
    trust = "".join(f'    trust-anchor-file: "{a}"\n' for a in anchors)
    system = f"    interface: {lab.system_resolver}@53\n" if lab.system_resolver is not None else ""
    return f"""server:
    interface: {RESOLVER_IP}@{lab.resolver_port}
{system}    port: {lab.resolver_port}
    outgoing-interface: {RESOLVER_IP}
    access-control: 127.0.0.0/8 allow
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{root}"
    pidfile: "{root}/unbound.pid"
    logfile: "{root}/unbound.log"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    num-threads: 1
    so-reuseport: no
    do-not-query-localhost: no
    qname-minimisation: no
    aggressive-nsec: no
    # RFC 6761 makes "test." an always-NXDOMAIN local zone by default.
    local-zone: "test." nodefault
{trust}remote-control:
    control-enable: no
{stubs}"""


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the server ends with the test process even if that is killed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def _spawn(server: str, root: Path) -> subprocess.Popen[bytes]:
    """`server -d -c root/server.conf`: in the foreground (-d), output in root/server.out."""
    args = [_tool(server), "-d", "-c", str(root / f"{server}.conf")]
    with (root / f"{server}.out").open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)


def _answers(ip: str, port: int, name: str, rdtype: str) -> bool:
    response = dns.query.udp(dns.message.make_query(name, rdtype), ip, port=port, timeout=0.25)
    return response.rcode() == dns.rcode.NOERROR


def _wait_for(ready: Callable[[], bool], lab: DnsLab, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in lab.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{lab.log()}")
        try:
            if ready():
                return
        except (OSError, dns.exception.DNSException):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout}s:\n{lab.log()}")
        time.sleep(0.05)


def _port53_address() -> str | None:
    """A loopback address whose UDP and TCP port 53 can be bound (root only), or None."""
    for _ in range(20):
        ip = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((ip, 53))
        except PermissionError:
            return None
        except OSError:
            continue
        return ip
    return None


def _free_port(ip: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    # NSD and Unbound listen on UDP and TCP: the port must be free for both.
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((ip, 0))
            port = int(s.getsockname()[1])
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind((ip, port))
        except OSError:
            continue
        return port


def _shared_port(*ips: str) -> int:
    """A TCP port free on every one of `ips`."""
    while True:
        port = _free_port(ips[0])
        try:
            for ip in ips[1:]:
                with socket.socket() as s:
                    s.bind((ip, port))
        except OSError:
            continue
        return port

