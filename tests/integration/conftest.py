from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mailward_server import MailwardServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MailwardServer]:
    srv = MailwardServer(tmp_path)
    srv.write_config()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
