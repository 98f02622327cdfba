"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory, unix socket only.

The Debian package (`postgresql`, installed by scripts/install-debs.sh) provides the binaries; the
server runs as the `postgres` user when the tests run as root (initdb refuses root), listens on no
TCP address at all (``listen_addresses = ''``) and keeps its socket in its own directory. It starts
once per test session; each test gets a database of its own with `PgServer.database()`.

Import the `pg_server` fixture into a test module to use it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def _newest_bin() -> Path:
    # Debian keeps each major version apart; any recent one will do (Debian 12 ships 15).
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _newest_bin()
PASSWORD_USER = "pwuser"  # a role that must log in with a password, to test refusals
PASSWORD = "secret-for-loopback-tests"


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PgServer:
    root: Path
    user: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """A libpq URL with the socket directory as `host`, the form the config accepts."""
        login = f"{user or self.user}" + (f":{password}" if password else "")
        return f"postgresql://{login}@/{dbname}?host={self.socket_dir}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement.encode())

    def database(self, *, migrated: bool = True) -> str:
        """A new empty database, with the queue schema unless `migrated` is false; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        url = self.url(name)
        if migrated:
            # In a thread of its own: callers may be inside an event loop already.
            with ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, _migrate(url)).result()
        return url

    def stop(self) -> None:
        subprocess.run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


async def _migrate(url: str) -> None:
    from mailward.queue.postgres import connect
    from mailward.queue.postgres_schema import migrate

    conn = await connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def start_pg_server() -> PgServer:
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL is not installed; run 'bash scripts/install-debs.sh' (part of make test)")
    # Not under pytest's temporary directory: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="mailward-pg-"))
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PgServer(root, user)
    try:
        subprocess.run([*_as_postgres(), str(PG_BIN / "initdb"), "-D", str(server.data), "-U", user,
                        "-E", "UTF8", "--locale=C", "--no-sync", "--auth=trust"],
                       capture_output=True, check=True, timeout=120)
        # The password role first: pg_hba.conf takes the first line that matches.
        (server.data / "pg_hba.conf").write_text(
            f"local all {PASSWORD_USER} scram-sha-256\nlocal all all trust\n")
        subprocess.run(
            [*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-l", str(root / "server.log"),
             "-w", "-t", "60", "-o",
             f"-c listen_addresses='' -k {root} -c max_connections=300 -c shared_buffers=64MB", "start"],
            capture_output=True, check=True, timeout=90)
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{log}") from exc
    server.sql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
    return server


_shared: PgServer | None = None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole session, whichever test modules import this fixture."""
    global _shared
    if _shared is not None:
        yield _shared
        return
    _shared = start_pg_server()
    try:
        yield _shared
    finally:
        _shared.stop()
        _shared = None
