"""The mailward process: validate, bind, run the listeners, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mailward import __version__
from mailward.auth import AuthThrottle, UserStore, UserStoreError
from mailward.config import Config, ConfigError, check_files, demo_config, demo_toml
from mailward.delivery import Deliverer, build_deliverer
from mailward.delivery.local import LocalRecipients
from mailward.inbound import InboundServices, Listener, LocalListener, LocalSocketError, local_socket_path
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
    if fmt == "json":
        pattern = ('{"time":"%(asctime)s","logger":"%(name)s","level":"%(levelname)s",'
                   '"message":%(message)r}')
    else:
        pattern = "%(asctime)s %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=pattern, stream=sys.stderr,
                        force=True)


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
        self.stopping = asyncio.Event()

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
        for i, lc in enumerate(cfg.listeners):
            listener = Listener(lc, services)
            try:
                await listener.start()
            except OSError as exc:
                await self.stop()
                why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                hint = ("stop the other server or change the port" if exc.errno == errno.EADDRINUSE
                        else "check the address and that mailward may bind it")
                raise StartupError(
                    f"listener[{i}] ({lc.kind}) cannot listen on {lc.address}:{lc.port}: {why}; "
                    f"{hint}.") from None
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

    def reload(self) -> None:
        """SIGHUP: new certificates for new connections; open ones keep theirs."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
            log.info("TLS certificates reloaded: %s", ", ".join(self.tls.names()))
        except CertificateError as exc:
            log.error("TLS reload failed, keeping the previous certificates: %s", exc)

    async def stop(self) -> None:
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
        try:
            await self.stopping.wait()
            log.info("shutting down: no new connections, finishing transactions in flight")
        finally:
            await self.stop()
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()


def run_service(config: Config, banner: str | None = None) -> int:
    configure_logging(config.log.level, config.log.format)
    service = Service(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
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
