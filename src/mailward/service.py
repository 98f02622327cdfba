"""The mailward process: validate, bind, run the listeners, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import secrets
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailward import __version__
from mailward.auth import AuthThrottle, UserStore, UserStoreError
from mailward.config import Config, ConfigError, ListenerConfig, check_files, demo_config, demo_toml
from mailward.delivery import Deliverer, build_deliverer
from mailward.delivery.local import LocalRecipients
from mailward.inbound import InboundServices, Listener, LocalListener, LocalSocketError, local_socket_path
from mailward.metrics import JsonFormatter, Metrics, MetricsEndpoint, QueueSize, emit
from mailward.queue import QueueError
from mailward.queue.sqlite import SqliteQueue
from mailward.reports.tlsrpt import ReportResolver, ReportSender
from mailward.tls import CertificateError, CertPair, ServerTls, demo_ca_path, make_demo_certificate

if TYPE_CHECKING:
    from mailward.queue.postgres import PostgresQueue

log = logging.getLogger("mailward")

DRAIN_SECONDS = 30.0
DEMO_USER = "demo@mailward.test"


class StartupError(Exception):
    """Something the operator must fix before mailward can start; the message says what and how."""


# --- started as root: bind, give state_dir to the user, drop root for good -------------------------
#
# No part of mailward stays root: there is no privileged helper to ask later. So everything root is
# needed for happens before the drop (binding ports below 1024, creating and handing over state_dir),
# and everything the running server reads again later must be readable by the user: a SIGHUP reload
# re-reads the certificate files as that user, which is why start-up checks them after the drop.


@dataclass(frozen=True, slots=True)
class Account:
    """The unprivileged account mailward continues as once its listeners are bound."""

    name: str
    uid: int
    gid: int


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def process_account(config: Config, *, demo: bool = False) -> Account | None:
    """The account to drop to, or None to stay as started; refuses to run as root without `user`."""
    euid = os.geteuid()
    if euid != 0:
        me = _name_of(euid)
        if config.user is not None and config.user != me:
            log.warning("user = %s applies only when mailward is started as root; running as %s (uid %d)",
                        config.user, me, euid)
        else:
            log.info("running as %s (uid %d): not started as root, so there is nothing to drop", me, euid)
        return None
    if config.user is None:
        if demo:
            # The demo binds only ports above 1024 and keeps its state in the checkout, so it stays
            # the invoking user rather than needing an account that `make run` cannot assume exists.
            log.warning("the demo runs as root, the invoking user; a real configuration must set user")
            return None
        raise StartupError(
            "mailward was started as root and the configuration sets no user to run as; add "
            "user = \"mailward\" (an unprivileged account of its own) to it, or start mailward as that "
            "account.")
    try:
        pw = pwd.getpwnam(config.user)
    except KeyError:
        raise StartupError(
            f"user: no account named {config.user} exists on this system; create it with useradd --system "
            f"--user-group --no-create-home --home-dir {config.state_dir} --shell /usr/sbin/nologin "
            f"{config.user}, or name an existing account.") from None
    if pw.pw_uid == 0:
        log.warning("user = %s is root: mailward keeps every privilege; prefer an account of its own",
                    config.user)
        return None
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


def hand_over_state(config: Config, account: Account) -> None:
    """Give state_dir and what is in it to the account, so files made by root's tools stay writable.

    Walked by directory descriptor without following symbolic links, and files with more than one
    link are left alone, so nothing planted in state_dir can redirect a chown outside it. The message
    files in Maildirs (cur, new, tmp) are not visited: mailward only ever adds to those directories.
    A state_dir that is itself a symbolic link (set up by root) is followed once, here.
    """
    state = config.state_dir
    root = state.resolve()
    if len(root.parts) < 3:  # "/", "/var", "/srv": shared with the rest of the system
        raise StartupError(
            f"state_dir: {state} is too close to the root of the file system to be given to user "
            f"{account.name}; point state_dir at a directory of mailward's own such as /var/lib/mailward.")
    maildir = config.local.maildir.resolve()
    uid, gid = account.uid, account.gid
    changed = 0
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
                changed += 1
        finally:
            os.close(fd)
        for top, dirs, files, top_fd in os.fwalk(root, follow_symlinks=False):
            in_maildir = maildir in Path(top).parents  # a Maildir or a folder inside one
            for name in [*dirs, *files]:
                st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) or (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1):
                    continue
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.chown(name, uid, gid, dir_fd=top_fd, follow_symlinks=False)
                    changed += 1
            if in_maildir:
                dirs[:] = [d for d in dirs if d not in ("cur", "new", "tmp")]
    except OSError as exc:
        raise StartupError(
            f"state_dir: {exc.filename or state} cannot be given to user {account.name} ({exc.strerror}); "
            "put state_dir on a file system where root may change owners.") from None
    if changed:
        log.info("state_dir %s: %d entries given to %s:%s", state, changed, account.name, _group_name(gid))


def bind_listeners(config: Config) -> list[socket.socket]:
    """A bound socket per configured listener, in order; done first, as ports below 1024 need root."""
    bound: list[socket.socket] = []
    try:
        for i, lc in enumerate(config.listeners):
            bound.append(_bind(i, lc))
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _bind(i: int, lc: ListenerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in lc.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As asyncio's create_server would: restartable at once, and "::" leaves IPv4 to "0.0.0.0".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((lc.address, lc.port))
    except OSError as exc:
        sock.close()
        raise bind_failure(exc, f"listener[{i}] ({lc.kind})", lc.address, lc.port) from None
    return sock


def bind_failure(exc: OSError, what: str, address: str, port: int, *, port_key: str = "the port",
                 address_key: str = "the address") -> StartupError:
    """The one sentence for a socket that cannot listen: what, where, why and how to fix it."""
    why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        hint = f"stop the other server or change {port_key}"
    elif exc.errno == errno.EACCES and port < 1024:
        hint = "ports below 1024 need mailward to be started as root, with user set"
    else:
        hint = f"check {address_key} and that mailward may bind it"
    return StartupError(f"{what} cannot listen on {address}:{port}: {why}; {hint}.")


def drop_privileges(account: Account) -> None:
    """Become the account for good: groups, then gid, then uid; then prove root cannot come back."""
    uid, gid = account.uid, account.gid
    try:
        os.initgroups(account.name, gid)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise StartupError(
            f"user: cannot switch to {account.name} ({exc.strerror}); start mailward as root with the "
            "capabilities CAP_SETUID and CAP_SETGID.") from None
    for regain in (os.setuid, os.setgid):
        try:
            regain(0)
        except PermissionError:
            continue
        # Reached only where the switch was ignored (a broken sandbox); never serve mail like that.
        raise StartupError(f"user: after switching to {account.name} mailward could become root again; run "
                           "it on a system where setuid() drops privileges.")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or _capabilities():
        raise StartupError(f"user: switching to {account.name} left privileges behind; run mailward without "
                           "ambient capabilities or SECBIT_KEEP_CAPS.")
    log.info("privileges dropped: running as %s (uid %d, gid %d, groups %s)", account.name, uid, gid,
             ",".join(_group_name(g) for g in os.getgroups()) or "none")


def _capabilities() -> int:
    """Any capability still permitted, effective or ambient, from /proc; 0 where /proc is absent."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = 0
    for line in status.splitlines():
        if line.startswith(("CapPrm:", "CapEff:", "CapAmb:")):
            found |= int(line.split()[1], 16)
    return found


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) where start-up, reloads and shutdown are; a no-op outside it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not address.startswith(("/", "@")):
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), target)


async def open_queue(cfg: Config) -> SqliteQueue | PostgresQueue:
    """The configured queue: shared on PostgreSQL when queue.url names it, else the embedded SQLite."""
    url = cfg.queue.postgres_url
    if url is None:
        try:
            return await SqliteQueue.open(cfg.queue.path)
        except (QueueError, OSError) as exc:
            raise StartupError(
                f"the queue at {cfg.queue.path} cannot be opened ({exc}); check that the directory "
                "exists and is writable by mailward.") from None
    try:
        from mailward.queue.postgres import PostgresQueue
    except ImportError:
        raise StartupError("queue.url names a PostgreSQL queue, but its driver (psycopg) is not installed; "
                           "install it with pip install 'mailward[postgres]'.") from None
    try:
        return await PostgresQueue.open(url)
    except QueueError as exc:
        raise StartupError(str(exc)) from None


def configure_logging(level: str, fmt: str) -> None:
    """Every record to stderr: human text, or one JSON object per line (events add their fields)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


DEMO_CONFIG_FILE = "mailward.toml"


def prepare_demo(var_dir: Path) -> tuple[Config, str]:
    """The embedded default of `make run`: demo certificate, demo user, state under var/."""
    var_dir.mkdir(parents=True, exist_ok=True)
    make_demo_certificate(var_dir / "tls", "localhost")
    config = demo_config(var_dir)
    # The same settings as a file, so the operator tools can be pointed at the running demo.
    (var_dir / DEMO_CONFIG_FILE).write_text(demo_toml(var_dir))
    users = UserStore(config.auth.users_file)
    cred_file = var_dir / "demo-credentials"
    password = None
    if cred_file.exists() and users.get(DEMO_USER) is not None:
        name, _, password = cred_file.read_text().strip().partition(":")
        if name != DEMO_USER or users.verify(DEMO_USER, password) is None:
            password = None
    if password is None:
        password = secrets.token_urlsafe(12)
        if users.get(DEMO_USER) is None:
            users.add(DEMO_USER, password)
        else:
            users.set_password(DEMO_USER, password)
        fd = os.open(cred_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{DEMO_USER}:{password}\n")
    return config, password


def demo_banner(config: Config, password: str) -> str:
    state = config.state_dir
    ca = demo_ca_path(state / "tls")
    lines = [f"mailward {__version__} is running on its embedded default (state in {state}/):"]
    for lc in config.listeners:
        lines.append(f"  {lc.kind:<12} {lc.address}:{lc.port}")
    if config.metrics.enabled:
        lines.append(f"  {'metrics':<12} http://{config.metrics.address}:{config.metrics.port}/metrics")
    lines += [
        f"Demo user: {DEMO_USER} (password in {state}/demo-credentials)",
        "Send a message over implicit TLS with AUTH:",
        f"  swaks --server 127.0.0.1:2465 --tls-on-connect --auth PLAIN --auth-user {DEMO_USER} "
        f"--auth-password '{password}' --from {DEMO_USER} --to you@localhost",
        "or to the MX listener:",
        "  swaks --server 127.0.0.1:2525 --tls --to postmaster@mailward.test",
        f"Mail to any name at localhost or mailward.test lands in {state}/mail/demo/new at once;",
        "mail to other domains is delivered to their MX hosts.",
        f"Queue and sendmail: mailward queue list -c {state / DEMO_CONFIG_FILE}  (or export "
        f"MAILWARD_CONFIG={state / DEMO_CONFIG_FILE})",
        f"The demo CA certificate is {ca}. Stop with Ctrl-C.",
    ]
    return "\n".join(lines)


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: list[Listener] = []
        self.tls: ServerTls | None = None
        self.queue: SqliteQueue | PostgresQueue | None = None
        self.deliverer: Deliverer | None = None
        self.delivery_task: asyncio.Task[None] | None = None
        self.tlsrpt_task: asyncio.Task[None] | None = None
        self.metrics: Metrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.stopping = asyncio.Event()
        self.sockets: list[socket.socket] = []  # bound by prepare(), one per listener, in order

    def prepare(self, *, demo: bool = False) -> None:
        """What needs root, before the event loop: state_dir, the listening sockets, then the drop.

        Started as root, everything after this runs as `user`; started as anyone else, it only binds.
        """
        cfg = self.config
        account = process_account(cfg, demo=demo)
        try:
            check_files(cfg)  # creates state_dir, as root when started so
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        if account is not None:
            hand_over_state(cfg, account)
        self.sockets = bind_listeners(cfg)
        if account is not None:
            try:
                drop_privileges(account)
            except StartupError:
                self.close_sockets()
                raise

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    async def start(self) -> None:
        cfg = self.config
        try:
            check_files(cfg)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        if cfg.tls.certificates:
            try:
                self.tls = ServerTls([CertPair(c.cert, c.key) for c in cfg.tls.certificates],
                                     min_version=cfg.tls.min_version)
            except CertificateError as exc:
                raise StartupError(str(exc)) from None
        try:
            users = UserStore(cfg.auth.users_file, verified_ttl=cfg.auth.verified_cache_seconds)
            users.list()
        except UserStoreError as exc:
            raise StartupError(str(exc)) from None
        self.queue = await open_queue(cfg)
        try:
            self.deliverer = build_deliverer(cfg, self.queue)
        except ConfigError as exc:
            await self.stop()
            raise StartupError(str(exc)) from None
        throttle = AuthThrottle(ip_limit=cfg.auth.max_failures_per_ip,
                                user_limit=cfg.auth.max_failures_per_user,
                                lockout=float(cfg.auth.lockout_seconds),
                                first_delay=float(cfg.auth.failure_delay),
                                max_delay=float(cfg.auth.max_failure_delay))
        services = InboundServices(cfg, self.queue, self.tls, users, throttle,
                                   local_refusal=LocalRecipients.from_config(cfg).refusal)
        if cfg.metrics.enabled:
            await self._start_metrics()
        for i, lc in enumerate(cfg.listeners):
            listener = Listener(lc, services, sock=self.sockets.pop(0) if self.sockets else None)
            try:
                await listener.start()
            except OSError as exc:
                await self.stop()
                raise bind_failure(exc, f"listener[{i}] ({lc.kind})", lc.address, lc.port) from None
            self.listeners.append(listener)
            log.info("listening: %s on %s:%d", lc.kind, lc.address, lc.port)
        # Always present, never configured: local programs submit through it (mailward sendmail).
        local = LocalListener(local_socket_path(cfg.state_dir), services)
        try:
            await local.start()
        except LocalSocketError as exc:
            await self.stop()
            raise StartupError(str(exc)) from None
        self.listeners.append(local)
        log.info("listening: local on %s", local.path)
        self.delivery_task = asyncio.get_running_loop().create_task(self.deliverer.run())
        if cfg.tlsrpt.enabled:
            # The daily TLS reports (RFC 8460): queued as mail here, delivered by the Deliverer.
            resolver = self.deliverer.resolver
            txt = resolver if isinstance(resolver, ReportResolver) else None
            try:
                sender = ReportSender(cfg, self.queue, txt)
            except ConfigError as exc:
                await self.stop()
                raise StartupError(str(exc)) from None
            self.tlsrpt_task = asyncio.get_running_loop().create_task(sender.run())

    async def _start_metrics(self) -> None:
        mc = self.config.metrics
        self.metrics = Metrics()
        self.metrics.attach()
        endpoint = MetricsEndpoint(self.metrics, mc.address, mc.port, self._refresh_queue_gauges)
        try:
            await endpoint.start()
        except OSError as exc:
            await self.stop()
            raise bind_failure(exc, "the metrics endpoint", mc.address, mc.port, port_key="metrics.port",
                               address_key="metrics.address") from None
        self.metrics_endpoint = endpoint
        log.info("listening: metrics on http://%s/metrics",
                 f"[{mc.address}]:{mc.port}" if ":" in mc.address else f"{mc.address}:{mc.port}")

    async def _refresh_queue_gauges(self) -> None:
        queue = self.queue
        if queue is not None:
            emit(QueueSize(messages=await queue.count(), oldest_age=await queue.oldest_age(time.time())))

    def reload(self) -> None:
        """SIGHUP: new certificates for new connections; open ones keep theirs."""
        if self.tls is None:
            return
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.tls.reload()
            log.info("TLS certificates reloaded: %s", ", ".join(self.tls.names()))
        except CertificateError as exc:
            log.error("TLS reload failed, keeping the previous certificates: %s", exc)
        sd_notify("READY=1")

    async def stop(self) -> None:
        self.close_sockets()  # those a failed start never handed to a listener
        for listener in self.listeners:
            listener.stop_accepting()
        await asyncio.gather(*(lst.drain(DRAIN_SECONDS) for lst in self.listeners))
        self.listeners.clear()
        if self.tlsrpt_task is not None:
            self.tlsrpt_task.cancel()  # an upload waiting for its retry is abandoned
            with contextlib.suppress(asyncio.CancelledError):
                await self.tlsrpt_task
            self.tlsrpt_task = None
        if self.deliverer is not None:
            # Attempts in flight finish (bounded) and leases are released before the queue closes.
            await self.deliverer.stop()
            if self.delivery_task is not None:
                await self.delivery_task
            self.deliverer = self.delivery_task = None
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.stop()
            self.metrics_endpoint = None
        if self.metrics is not None:
            self.metrics.detach()
            self.metrics = None

    async def run(self, banner: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        await self.start()
        pid_file = self.config.state_dir / "mailward.pid"
        pid_file.write_text(f"{os.getpid()}\n")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if banner:
            print(banner, flush=True)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        try:
            await self.stopping.wait()
            sd_notify("STOPPING=1")
            log.info("shutting down: no new connections, finishing transactions in flight")
        finally:
            await self.stop()
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()


def run_service(config: Config, banner: str | None = None, *, demo: bool = False) -> int:
    """Serve until SIGTERM; 2 when start-up fails. `demo` lets `serve --demo` run as root unchanged."""
    configure_logging(config.log.level, config.log.format)
    service = Service(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        service.prepare(demo=demo)
        runner(service.run(banner))
    except StartupError as exc:
        print(f"mailward: {exc}", file=sys.stderr)
        return 2
    return 0


def send_reload(config: Config) -> int:
    pid_file = config.state_dir / "mailward.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        print(f"mailward: no running mailward found ({pid_file} missing or stale); start it with "
              "mailward serve.", file=sys.stderr)
        return 1
    print(f"reload signal sent to mailward (pid {pid})")
    return 0
