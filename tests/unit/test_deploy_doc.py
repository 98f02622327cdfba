"""The configuration docs/deploy.md tells operators to write is one mailward accepts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mailward.config import config_from_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_configuration_metrics_and_the_postgresql_queue_load() -> None:
    main, metrics, queue = toml_blocks()
    cfg = config_from_dict(tomllib.loads(main), str(DOC))
    assert cfg.user == "mailward" and cfg.state_dir == Path("/var/lib/mailward")
    assert cfg.dns.resolvers == ("127.0.0.1",)  # the loopback Unbound that DNSSEC status needs
    assert [(lc.kind, lc.port) for lc in cfg.listeners][::2] == [("mx", 25), ("submissions", 465),
                                                                   ("submission", 587)]
    # Where the certbot hook installs the copies the dropped user can read.
    assert cfg.tls.certificates[0].key == Path("/etc/mailward/tls/mail.example.org/privkey.pem")
    watched = config_from_dict(tomllib.loads(main + metrics), str(DOC))
    assert watched.metrics.enabled and (watched.metrics.address, watched.metrics.port) == ("127.0.0.1", 9425)
    moved = config_from_dict(tomllib.loads(main + queue), str(DOC))
    assert moved.queue.postgres_url == "postgresql://mailward@/mailward?host=/run/postgresql"
