from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnssec import TOOLS, DnsLab, start_dnssec
from mailward_server import MailwardServer

MakeServer = Callable[..., MailwardServer]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


def require_tool(name: str) -> str:
    """The tool's path; skip (with the fix) only when it is genuinely not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; run 'bash scripts/install-debs.sh' (part of make test)")
    return path


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """A factory for servers with extra configuration; each is stopped and its log checked."""
    servers: list[MailwardServer] = []

    def make(*, start: bool = True, **options: object) -> MailwardServer:
        srv = MailwardServer(tmp_path / f"server{len(servers)}", **options)  # type: ignore[arg-type]
        srv.write_config()
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    for srv in servers:
        srv.stop()
    for srv in servers:
        # An unexpected exception costs a session only, so it would pass unnoticed without this.
        assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture
def server(make_server: MakeServer) -> MailwardServer:
    return make_server()


@pytest.fixture(scope="session")
def dns_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    """NSD and a validating Unbound on loopback with zones signed at set-up (dnssec.py), once a session."""
    for tool in TOOLS:
        require_tool(tool)
    lab = start_dnssec(tmp_path_factory.mktemp("dnssec"))
    yield lab
    lab.stop()
