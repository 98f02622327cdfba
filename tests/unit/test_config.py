"""The one Config: defaults, a full file, one-sentence errors, path lookup, demo, describe()."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from mailward import config as config_module
from mailward.config import (
    AliasConfig,
    AuthConfig,
    CertificateConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    DnsConfig,
    ListenerConfig,
    LocalConfig,
    LogConfig,
    MetricsConfig,
    MtaStsConfig,
    PolicyConfig,
    QueueConfig,
    RouteConfig,
    SmarthostConfig,
    TlsConfig,
    TlsRptConfig,
    check_files,
    config_from_dict,
    demo_config,
    describe,
    load_config,
)

CERTS = {"certificates": [{"cert": "/etc/tls/fullchain.pem", "key": "/etc/tls/privkey.pem"}]}
SRC = "/etc/mailward.toml"


@pytest.fixture(autouse=True)
def _fixed_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "MX.Example.ORG")
    monkeypatch.delenv("MAILWARD_CONFIG", raising=False)


def load(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    return config_from_dict(data, SRC, base_dir=base_dir or Path("/etc"))


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(data)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------------

def test_defaults() -> None:
    cfg = load({"tls": CERTS})
    assert cfg.hostname == "mx.example.org"  # from getfqdn, lower-cased
    assert cfg.state_dir == Path("/var/lib/mailward")
    assert cfg.user is None  # started as root, mailward then refuses to run until one is set
    assert cfg.local_domains == () and cfg.relay_domains == ()
    assert [(lc.kind, lc.address, lc.port) for lc in cfg.listeners] == [
        ("mx", "0.0.0.0", 25), ("mx", "::", 25),
        ("submissions", "0.0.0.0", 465), ("submissions", "::", 465),
        ("submission", "0.0.0.0", 587), ("submission", "::", 587),
    ]
    mx, sub = cfg.listeners[0], cfg.listeners[4]
    assert (mx.max_connections_per_ip, sub.max_connections_per_ip) == (20, 10)
    assert mx == ListenerConfig(
        kind="mx", address="0.0.0.0", port=25, max_connections=1000, max_connections_per_ip=20,
        command_timeout=300.0, data_timeout=600.0, handshake_timeout=30.0, max_message_size=52428800,
        max_recipients=1000, bare_line_endings="reject", name="mx-25")
    assert sub.name == "submission-587"
    assert cfg.tls == TlsConfig(min_version="TLSv1.2", certificates=(
        CertificateConfig(cert=Path("/etc/tls/fullchain.pem"), key=Path("/etc/tls/privkey.pem")),))
    assert cfg.auth == AuthConfig(users_file=Path("/var/lib/mailward/users"), mechanisms=("PLAIN", "LOGIN"),
                                  max_failures_per_ip=10, max_failures_per_user=5, lockout_seconds=900.0,
                                  verified_cache_seconds=300.0, failure_delay=0.5, max_failure_delay=8.0)
    assert cfg.queue == QueueConfig(url=None, path=Path("/var/lib/mailward/queue/queue.db"))
    assert cfg.log == LogConfig(level="info", format="human")


def test_mx_only_runs_without_certificates() -> None:
    cfg = load({"listener": [{"kind": "mx"}]})
    assert cfg.tls.certificates == () and cfg.listeners[0].port == 25


def test_zero_listeners_are_allowed() -> None:
    assert load({"listener": []}).listeners == ()


def test_config_is_frozen_with_tuples() -> None:
    cfg = load({"tls": CERTS, "local_domains": ["example.org"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hostname = "other"  # type: ignore[misc]
    assert isinstance(cfg.local_domains, tuple) and isinstance(cfg.listeners, tuple)


def test_domains_are_lower_case_a_labels() -> None:
    cfg = load({"listener": [], "hostname": "Mail.Bücher.example.",
                "local_domains": ["Bücher.Example", "EXAMPLE.org"],
                "relay_domains": ["xn--mnchen-3ya.example"]})
    assert cfg.hostname == "mail.xn--bcher-kva.example"
    assert cfg.local_domains == ("xn--bcher-kva.example", "example.org")
    assert cfg.relay_domains == ("xn--mnchen-3ya.example",)


def test_addresses_are_normalised() -> None:
    cfg = load({"listener": [{"kind": "mx", "address": "[::1]"}, {"kind": "mx", "address": "127.0.0.1"},
                             {"kind": "mx", "address": "0:0::0", "port": 2525}]})
    assert [lc.address for lc in cfg.listeners] == ["::1", "127.0.0.1", "::"]


def test_a_postgresql_url_selects_the_shared_queue(tmp_path: Path) -> None:
    for url in ("postgresql://mail:pw@db.example:5433/mailward", "postgres://db/mail",
                "postgresql:///mailward?host=/run/postgresql"):
        cfg = load({"listener": [], "queue": {"url": url}}, base_dir=tmp_path)
        assert cfg.queue.postgres_url == url
        assert cfg.queue.path == cfg.state_dir / "queue" / "queue.db"  # unused; never derived from the url
    embedded = load({"listener": [], "queue": {"url": "sqlite:///q.db"}}, base_dir=tmp_path)
    assert embedded.queue.postgres_url is None


def test_sqlite_url_gives_the_queue_path(tmp_path: Path) -> None:
    cfg = load({"listener": [], "queue": {"url": "sqlite:///q/mail.db"}}, base_dir=tmp_path)
    assert cfg.queue.path == tmp_path / "q" / "mail.db"
    assert load({"listener": [], "queue": {"url": "sqlite:////srv/q.db"}}).queue.path == Path("/srv/q.db")


# --- a full file ----------------------------------------------------------------------------------

FULL = """\
hostname = "mx1.example.net"
state_dir = "state"
user = "mailward"
local_domains = ["example.net", "example.com"]
relay_domains = ["partner.example"]

[[listener]]
kind = "mx"
address = "192.0.2.10"
port = 25
max_connections = 500
max_connections_per_ip = 5
command_timeout = 120
data_timeout = 240.5
handshake_timeout = 15
max_message_size = 10485760
max_recipients = 200
bare_line_endings = "normalize"
name = "public-mx"

[[listener]]
kind = "submissions"
address = "2001:db8::10"

[tls]
min_version = "TLSv1.3"

[[tls.certificates]]
cert = "tls/ecdsa/fullchain.pem"
key = "tls/ecdsa/privkey.pem"

[[tls.certificates]]
cert = "/etc/letsencrypt/live/mx1/fullchain.pem"
key = "/etc/letsencrypt/live/mx1/privkey.pem"

[auth]
users_file = "/etc/mailward/users"
mechanisms = ["PLAIN"]
max_failures_per_ip = 3
max_failures_per_user = 4
lockout_seconds = 60
verified_cache_seconds = 0
failure_delay = 0.25
max_failure_delay = 2

[queue]
path = "spool/queue.db"

[log]
level = "debug"
format = "json"

[metrics]
enabled = true
address = "::1"
port = 9100
allow_remote = false

[delivery]
enabled = false
concurrency = 50
per_destination = 10
slow_start_initial = 3
connect_timeout = 20
command_timeout = 120
data_timeout = 300
retry_initial = 60
retry_max = 3600
max_lifetime = 86400
delay_warning = 0
dead_host_seconds = 120
lease_seconds = 300
helo_name = "out.example.net"
port = 2525
security = "dane-only"
may_retry_plaintext = true

[[delivery.route]]
domain = ".partner.example"
next_hop = "[192.0.2.25]:2526"
security = "verify"
ca_file = "tls/partner-ca.pem"
requiretls = "encrypt"

[[delivery.policy]]
destination = "[SMTP.example.org]:587"
level = "secure"
ca_file = "tls/relay-ca.pem"
requiretls = "opportunistic"

[delivery.smarthost]
host = "smtp.example.org"
tls = "starttls"
username = "relay"
password_file = "relay-password"

[dns]
resolvers = ["127.0.0.1", "[::1]:5353"]
timeout = 2

[mta_sts]
enabled = false
ca_file = "tls/sts-ca.pem"
fetch_timeout = 5

[tlsrpt]
enabled = false
organization = "Example Net"
contact = "tls-reports@example.net"
sender = "noreply@mx1.example.net"
send_hour = 3
https_ca_file = "tls/report-ca.pem"
https_timeout = 10

[local]
maildir = "/srv/mail"
lmtp = "unix:/run/dovecot/lmtp"
catch_all = "postmaster"

[[local.alias]]
name = "postmaster"
targets = ["alice", "bob@example.org"]
"""


def test_full_file_loads_every_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "mailward.toml").write_text(FULL)
    monkeypatch.chdir(tmp_path)  # relative paths must follow the file, not the working directory
    cfg = load_config(etc / "mailward.toml")
    assert cfg == Config(
        hostname="mx1.example.net",
        state_dir=etc / "state",
        user="mailward",
        local_domains=("example.net", "example.com"),
        relay_domains=("partner.example",),
        listeners=(
            ListenerConfig(kind="mx", address="192.0.2.10", port=25, max_connections=500,
                           max_connections_per_ip=5, command_timeout=120.0, data_timeout=240.5,
                           handshake_timeout=15.0, max_message_size=10485760, max_recipients=200,
                           bare_line_endings="normalize", name="public-mx"),
            ListenerConfig(kind="submissions", address="2001:db8::10", port=465, max_connections=1000,
                           max_connections_per_ip=10, command_timeout=300.0, data_timeout=600.0,
                           handshake_timeout=30.0, max_message_size=52428800, max_recipients=1000,
                           bare_line_endings="reject", name="submissions-465"),
        ),
        tls=TlsConfig(min_version="TLSv1.3", certificates=(
            CertificateConfig(cert=etc / "tls/ecdsa/fullchain.pem", key=etc / "tls/ecdsa/privkey.pem"),
            CertificateConfig(cert=Path("/etc/letsencrypt/live/mx1/fullchain.pem"),
                              key=Path("/etc/letsencrypt/live/mx1/privkey.pem")),
        )),
        auth=AuthConfig(users_file=Path("/etc/mailward/users"), mechanisms=("PLAIN",), max_failures_per_ip=3,
                        max_failures_per_user=4, lockout_seconds=60.0, verified_cache_seconds=0.0,
                        failure_delay=0.25, max_failure_delay=2.0),
        queue=QueueConfig(url=None, path=etc / "spool/queue.db"),
        log=LogConfig(level="debug", format="json"),
        metrics=MetricsConfig(enabled=True, address="::1", port=9100, allow_remote=False),
        delivery=DeliveryConfig(
            enabled=False, concurrency=50, per_destination=10, slow_start_initial=3, connect_timeout=20.0,
            command_timeout=120.0, data_timeout=300.0, retry_initial=60.0, retry_max=3600.0,
            max_lifetime=86400.0, delay_warning=0.0, dead_host_seconds=120.0, lease_seconds=300.0,
            helo_name="out.example.net", port=2525, security="dane-only", may_retry_plaintext=True,
            routes=(RouteConfig(domain=".partner.example", next_hop="[192.0.2.25]:2526", security="verify",
                                ca_file=etc / "tls/partner-ca.pem", requiretls="encrypt"),),
            policies=(PolicyConfig(destination="[smtp.example.org]:587", level="secure",
                                   ca_file=etc / "tls/relay-ca.pem", requiretls="opportunistic"),),
            smarthost=SmarthostConfig(host="smtp.example.org", tls="starttls", port=587, username="relay",
                                      password_file=etc / "relay-password", ca_file=None)),
        dns=DnsConfig(resolvers=("127.0.0.1", "[::1]:5353"), timeout=2.0),
        mta_sts=MtaStsConfig(enabled=False, ca_file=etc / "tls/sts-ca.pem", fetch_timeout=5.0),
        local=LocalConfig(maildir=Path("/srv/mail"), lmtp="unix:/run/dovecot/lmtp",
                          aliases=(AliasConfig(name="postmaster", targets=("alice", "bob@example.org")),),
                          catch_all="postmaster"),
        tlsrpt=TlsRptConfig(enabled=False, organization="Example Net", contact="tls-reports@example.net",
                            sender="noreply@mx1.example.net", send_hour=3,
                            https_ca_file=etc / "tls/report-ca.pem", https_timeout=10.0),
    )


def test_relative_paths_follow_a_relative_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "m.toml").write_text('state_dir = "var"\nlistener = []\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("conf/m.toml"))
    assert cfg.state_dir.is_absolute() and cfg.state_dir == tmp_path / "conf" / "var"
    assert cfg.auth.users_file == tmp_path / "conf" / "var" / "users"


# --- errors: one sentence naming the key ----------------------------------------------------------

L = {"tls": CERTS}  # so the default submission listeners are satisfied


def lst(**fields: Any) -> dict[str, Any]:
    return {"listener": [{"kind": "mx", **fields}]}


ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"listener": [{"kind": "mx"}, {"kind": "mx", "port": "abc"}]},
     "listener[1].port must be an integer between 1 and 65535, got 'abc'."),
    (lst(port="25"), "listener[0].port must be an integer between 1 and 65535, got '25'."),
    (lst(port=True), "listener[0].port must be an integer between 1 and 65535, got true."),
    (lst(port=0), "listener[0].port must be an integer between 1 and 65535, got 0."),
    (lst(port=65536), "listener[0].port must be an integer between 1 and 65535, got 65536."),
    (lst(port=25.0), "listener[0].port must be an integer between 1 and 65535, got 25.0."),
    (lst(max_connections=0), "listener[0].max_connections must be an integer of at least 1, got 0."),
    (lst(max_connections_per_ip=False), "listener[0].max_connections_per_ip must be an integer"),
    (lst(max_message_size=10), "listener[0].max_message_size must be an integer of at least 1024"),
    (lst(command_timeout="5m"),
     "listener[0].command_timeout must be a number of seconds between 1 and 3600, got '5m'."),
    (lst(data_timeout=0), "listener[0].data_timeout must be a number of seconds between 1 and 3600"),
    (lst(handshake_timeout=True), "listener[0].handshake_timeout must be a number of seconds"),
    (lst(handshake_timeout=float("inf")), "listener[0].handshake_timeout must be a number of seconds"),
    (lst(bare_line_endings="strip"),
     "listener[0].bare_line_endings must be one of 'reject', 'normalize', got 'strip'."),
    (lst(address="256.1.1.1"), "listener[0].address must be an IPv4 or IPv6 address"),
    (lst(address="localhost"), "listener[0].address must be an IPv4 or IPv6 address"),
    (lst(address=0), "listener[0].address must be an IPv4 or IPv6 address such as 0.0.0.0 or ::, got 0."),
    (lst(name="mx 25"), "listener[0].name must be up to 64 letters, digits"),
    (lst(name=""), "listener[0].name must be"),
    ({"listener": [{"kind": "smtps"}]},
     "listener[0].kind must be one of 'mx', 'submission', 'submissions', got 'smtps'."),
    ({"listener": [{"kind": "Submision"}]},
     "listener[0].kind must be one of 'mx', 'submission', 'submissions', got 'Submision'; did you mean "
     "'submission'?"),
    ({"listener": [{"port": 25}]},
     "listener[0].kind is missing; set it to one of 'mx', 'submission', 'submissions'."),
    ({"listener": {"kind": "mx"}},
     "listener must be an array of tables; write [[listener]] instead of [listener]."),
    ({"listener": [5]}, "listener[0] must be a table, got 5."),
    ({"listener": [{"kind": "mx", "port": 2525}, {"kind": "mx", "address": "0.0.0.0", "port": 2525}]},
     "listener[1] (0.0.0.0:2525) clashes with listener[0] (0.0.0.0:2525); give one of them another address "
     "or port."),
    ({"listener": [{"kind": "mx", "address": "0.0.0.0"}, {"kind": "mx", "address": "192.0.2.1"}]},
     "listener[1] (192.0.2.1:25) clashes with listener[0] (0.0.0.0:25)"),
    ({"listener": [{"kind": "mx"}, {"kind": "submissions"}]},
     "listener[1] (submissions) needs tls.certificates; add [[tls.certificates]] cert=... key=... or run "
     "mailward serve --demo."),
    ({}, "the default listeners include submission (587) and submissions (465), which need tls.certificates"),
    ({**L, "hostname": "bad_host"}, "hostname must be a DNS name such as mail.example.org, got 'bad_host'."),
    ({**L, "hostname": "-x.example"}, "hostname must be a DNS name"),
    ({**L, "hostname": "192.0.2.1"}, "hostname must be a DNS name"),
    ({**L, "hostname": "a" * 64 + ".example"}, "hostname must be a DNS name"),
    ({**L, "hostname": 7}, "hostname must be a DNS name such as mail.example.org, got 7."),
    ({**L, "local_domains": "example.org"},
     'local_domains must be an array, got \'example.org\'; write local_domains = ["example.org"].'),
    ({**L, "local_domains": ["example.org", "exa mple.org"]}, "local_domains[1] must be a domain name"),
    ({**L, "local_domains": ["a..example"]}, "local_domains[0] must be a domain name"),
    ({**L, "relay_domains": ["xn--zz.example"]}, "relay_domains[0] must be a domain name"),
    ({**L, "local_domains": ["example.org"], "relay_domains": ["Example.org"]},
     "relay_domains[0] 'example.org' is also in local_domains; list each domain in only one of them."),
    ({**L, "state_dir": ""}, "state_dir must be a file path string, got ''."),
    ({**L, "state_dir": 5}, "state_dir must be a file path string, got 5."),
    ({"tls": 5}, "tls must be a table, got 5."),
    ({"tls": {"certificates": [{"cert": "/c.pem"}]}},
     "tls.certificates[0].key is missing; add it: PEM private key"),
    ({"tls": {**CERTS, "min_version": "TLSv1.1"}},
     "tls.min_version must be one of 'TLSv1.2', 'TLSv1.3', got 'TLSv1.1'."),
    ({**L, "auth": {"mechanisms": ["CRAM-MD5"]}},
     "auth.mechanisms[0] must be one of 'PLAIN', 'LOGIN', got 'CRAM-MD5'"),
    ({**L, "auth": {"mechanisms": []}}, "auth.mechanisms must be a non-empty array, got []."),
    ({**L, "auth": {"mechanisms": "PLAIN"}}, "auth.mechanisms must be an array, got 'PLAIN'"),
    ({**L, "auth": {"max_failures_per_ip": -1}},
     "auth.max_failures_per_ip must be an integer of at least 1, got -1."),
    ({**L, "auth": {"lockout_seconds": 0}},
     "auth.lockout_seconds must be a number of seconds between 1 and 86400"),
    ({**L, "auth": {"users_file": 5}}, "auth.users_file must be a file path string, got 5."),
    ({**L, "queue": {"url": "mysql://db"}},
     "queue.url must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE, got 'mysql://db'."),
    ({**L, "queue": {"url": "sqlite:///a.db", "path": "/b.db"}},
     "queue.url and queue.path name different queue files; keep only one of them."),
    ({**L, "auth": {"lockout_seconds": 0}},
     "auth.lockout_seconds must be a number of seconds between 1 and 86400, got 0."),
    ({**L, "log": {"level": "INFO"}},
     "log.level must be one of 'debug', 'info', 'warning', 'error', got 'INFO'; did you mean 'info'?"),
    ({**L, "log": {"format": "xml"}}, "log.format must be one of 'human', 'json', got 'xml'."),
    ({**L, "listner": []}, "unknown key 'listner' in /etc/mailward.toml; did you mean 'listener'?"),
    (lst(prot=25), "unknown key 'listener[0].prot' in /etc/mailward.toml; did you mean 'port'?"),
    ({**L, "queue": {"zzz": 1}},
     "unknown key 'queue.zzz' in /etc/mailward.toml; remove it (keys allowed here: url, path)."),
    ({"tls": {"certificates": [{"cert": "/c", "key": "/k", "chain": "/x"}]}},
     "unknown key 'tls.certificates[0].chain' in /etc/mailward.toml"),
    # delivery, dns, local
    ({**L, "delivery": {"enabled": "no"}}, "delivery.enabled must be true or false, got 'no'."),
    ({**L, "delivery": {"per_destination": 200, "concurrency": 100}},
     "delivery.per_destination (200) exceeds delivery.concurrency (100); lower per_destination or raise "
     "concurrency."),
    ({**L, "delivery": {"slow_start_initial": 30}},
     "delivery.slow_start_initial (30) exceeds delivery.per_destination (20); lower it."),
    ({**L, "delivery": {"retry_initial": 7200, "retry_max": 3600}},
     "delivery.retry_initial (7200) exceeds delivery.retry_max (3600); lower retry_initial or raise "
     "retry_max."),
    ({**L, "delivery": {"route": {"domain": "a.example", "next_hop": "[192.0.2.1]"}}},
     "delivery.route must be an array of tables; write [[delivery.route]] instead of [delivery.route]."),
    ({**L, "delivery": {"route": [{"domain": "a.example", "next_hop": "[192.0.2.1]:0"}]}},
     "delivery.route[0].next_hop must be [IP]:port, [IP], host:port, [host] or host, got '[192.0.2.1]:0'."),
    ({**L, "delivery": {"route": [{"domain": "..a.example", "next_hop": "b.example"}]}},
     "delivery.route[0].domain must be a domain such as example.org, or .example.org for its subdomains"),
    ({**L, "delivery": {"route": [{"domain": "a.example", "next_hop": "b.example",
                                   "security": "dane_only"}]}},
     "delivery.route[0].security must be one of 'none', 'may', 'encrypt', 'dane', 'dane-only', 'verify', "
     "'secure', got 'dane_only'; did you mean 'dane-only'?"),
    ({**L, "delivery": {"security": "opportunistic"}},
     "delivery.security must be one of 'none', 'may', 'encrypt', 'dane', 'dane-only', 'verify', 'secure', "
     "got 'opportunistic'."),
    ({**L, "delivery": {"may_retry_plaintext": "yes"}},
     "delivery.may_retry_plaintext must be true or false, got 'yes'."),
    ({**L, "delivery": {"policy": {"destination": "a.example", "level": "verify"}}},
     "delivery.policy must be an array of tables; write [[delivery.policy]] instead of [delivery.policy]."),
    ({**L, "delivery": {"policy": [{"destination": "a.example", "level": "may", "requiretls": "never"}]}},
     "delivery.policy[0].requiretls must be one of 'enforce', 'encrypt', 'opportunistic', got 'never'."),
    ({**L, "delivery": {"policy": [{"destination": "a.example", "level": "Verify"}]}},
     "delivery.policy[0].level must be one of 'none', 'may', 'encrypt', 'dane', 'dane-only', 'verify', "
     "'secure', got 'Verify'; did you mean 'verify'?"),
    ({**L, "delivery": {"policy": [{"destination": "a.example"}]}},
     "delivery.policy[0].level is missing; set it to one of 'none', 'may', 'encrypt', 'dane', 'dane-only', "
     "'verify', 'secure'."),
    ({**L, "delivery": {"policy": [{"destination": "smtp.example.org:587", "level": "verify"}]}},
     "delivery.policy[0].destination must be a domain such as example.org, .example.org for its subdomains, "
     "or [host]:port for a relay, got 'smtp.example.org:587'."),
    ({**L, "delivery": {"policy": [{"destination": "*.example.org", "level": "verify"}]}},
     "delivery.policy[0].destination must be a domain such as example.org, .example.org for its subdomains, "
     "or [host]:port for a relay, got '*.example.org'."),
    ({**L, "delivery": {"policy": [{"destination": "a.example", "level": "verify"},
                                   {"destination": "A.Example.", "level": "may"}]}},
     "delivery.policy[1] repeats the destination 'a.example' of delivery.policy[0]; keep one row per "
     "destination."),
    ({**L, "delivery": {"policy": [{"destination": "a.example", "level": "encrypt",
                                    "ca_file": "/etc/ca.pem"}]}},
     "delivery.policy[0].ca_file applies only to levels verify and secure, and the row's level is 'encrypt'; "
     "remove ca_file or change the level."),
    ({**L, "delivery": {"route": [{"domain": ".a.example", "next_hop": "[192.0.2.1]"}],
                        "policy": [{"destination": ".sub.a.example", "level": "verify"}]}},
     "delivery.policy[0] ('.sub.a.example') never applies because delivery.route[0] routes that domain; set "
     "security on that route instead."),
    ({**L, "delivery": {"route": [{"domain": "a.example", "next_hop": "[192.0.2.1]:2525"}],
                        "policy": [{"destination": "[192.0.2.1]:2525", "level": "verify"}]}},
     "delivery.policy[0] ('[192.0.2.1]:2525') names the next hop of delivery.route[0]; set security on that "
     "route instead."),
    ({**L, "local_domains": ["example.com"], "delivery": {"policy": [{"destination": "example.com",
                                                                      "level": "verify"}]}},
     "delivery.policy[0] ('example.com') never applies because example.com is in local_domains, whose mail "
     "stays here; remove the row."),
    ({**L, "delivery": {"policy": [{"destination": "[smtp.example.org]", "level": "verify"}]}},
     "delivery.policy[0] ('[smtp.example.org]') names a relay, but no delivery.smarthost is set; name a "
     "recipient domain, or remove the row."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org"},
                        "policy": [{"destination": "[smtp.example.org]:587", "level": "verify"}]}},
     "delivery.policy[0] ('[smtp.example.org]:587') names no relay: delivery.smarthost is "
     "[smtp.example.org]:465; fix the host or port, or remove the row."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org"},
                        "policy": [{"destination": "example.org", "level": "verify"}]}},
     "delivery.policy[0] ('example.org') never applies because delivery.smarthost relays all mail that is "
     "not local or routed; name the smarthost as [host]:port instead."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org", "username": "u", "password_file": "/p"},
                        "policy": [{"destination": "[smtp.example.org]", "level": "encrypt"}]}},
     "delivery.policy[0] sets level 'encrypt' for the smarthost, but it logs in with AUTH, which needs "
     "verified TLS; use verify or secure."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org"},
                        "policy": [{"destination": "[smtp.example.org]", "level": "none"}]}},
     "delivery.policy[0] sets level 'none' for a smarthost with tls = \"implicit\", which is TLS from the "
     "first byte; use tls = \"starttls\" or another level."),
    ({**L, "delivery": {"route": [{"domain": "a.example", "next_hop": "b.example"},
                                  {"domain": "A.example", "next_hop": "c.example"}]}},
     "delivery.route[1] repeats the domain 'a.example' of delivery.route[0]; keep one route per domain."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org", "username": "u"}}},
     "delivery.smarthost needs both username and password_file for AUTH, or neither; set the missing one."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org:465"}}},
     "delivery.smarthost.host must not carry a port; set delivery.smarthost.port."),
    ({**L, "delivery": {"smarthost": {"host": "smtp.example.org", "tls": "none"}}},
     "delivery.smarthost.tls must be one of 'implicit', 'starttls', got 'none'."),
    ({**L, "dns": {"resolvers": ["ns.example.org"]}},
     "dns.resolvers[0] must be an IP address, optionally with a port, such as 127.0.0.1 or [::1]:53, got "
     "'ns.example.org'."),
    ({**L, "local": {"lmtp": "unix:run/lmtp"}},
     "local.lmtp: 'unix:run/lmtp' must name an absolute socket path, e.g. unix:/run/dovecot/lmtp."),
    ({**L, "local": {"lmtp": "dovecot"}},
     "local.lmtp must be unix:/path/to/socket or host:port, got 'dovecot'."),
    ({**L, "local": {"alias": [{"name": "postmaster@example.org", "targets": ["a"]}]}},
     "local.alias[0].name must be the local part of an address, such as postmaster"),
    ({**L, "local": {"alias": [{"name": "postmaster", "targets": []}]}},
     "local.alias[0].targets must be a non-empty array, got []."),
    ({**L, "user": "Mail Ward"}, "user must be a system account name such as mailward, got 'Mail Ward'."),
    ({**L, "user": 110}, "user must be a system account name such as mailward, got 110."),
    ({**L, "user": ""}, "user must be a system account name such as mailward, got ''."),
]


@pytest.mark.parametrize(("data", "expected"), ERRORS, ids=[e[1][:60] for e in ERRORS])
def test_errors_are_one_sentence_naming_the_key(data: dict[str, Any], expected: str) -> None:
    message = error(data)
    if expected.endswith((".", "?")):
        assert message == expected
    else:
        assert message.startswith(expected)
    assert "\n" not in message
    assert message.endswith((".", "?"))


def test_invalid_derived_default_says_to_set_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "build_host")
    message = error({"listener": []})
    assert message == ("hostname is not set and its default 'build_host' (this system's name from "
                       "socket.getfqdn()) is not valid; set hostname in /etc/mailward.toml.")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mailward.toml"
    path.write_text('hostname = "a.example"\n\nlistener = [\n  {kind = "mx" port = 25},\n]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert re.fullmatch(rf"{re.escape(str(path))} line 4, column \d+: .+; fix the TOML syntax\.", message)
    assert "(at line" not in message


def test_toml_error_at_end_of_document(tmp_path: Path) -> None:
    path = tmp_path / "mailward.toml"
    path.write_text('hostname = "a.example')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path} at the end of the file: Unterminated string; fix the TOML syntax."


def test_unreadable_config_files(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'hostname = "caf\xe9.example"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(bad byte at offset 15\); save it as UTF-8\.$"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"is a directory; pass the TOML file inside it\.$"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"missing\.toml does not exist; check the --config path\.$"):
        load_config(tmp_path / "missing.toml")


# --- where the file comes from --------------------------------------------------------------------

def test_env_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "from-env.toml"
    path.write_text('hostname = "env.example"\nlistener = []\n')
    monkeypatch.setenv("MAILWARD_CONFIG", str(path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mailward.toml").write_text('hostname = "cwd.example"\nlistener = []\n')
    assert load_config(None).hostname == "env.example"


def test_explicit_path_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "explicit.toml"
    path.write_text('hostname = "explicit.example"\nlistener = []\n')
    monkeypatch.setenv("MAILWARD_CONFIG", str(tmp_path / "nope.toml"))
    assert load_config(path).hostname == "explicit.example"


def test_working_directory_file_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mailward.toml").write_text('hostname = "cwd.example"\nlistener = []\n')
    assert load_config(None).hostname == "cwd.example"


def test_no_file_found_says_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None)
    message = str(info.value)
    assert "$MAILWARD_CONFIG is not set" in message and "./mailward.toml does not exist" in message
    assert "--config FILE" in message and "mailward serve --demo" in message and "\n" not in message


def test_env_file_missing_is_not_silently_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mailward.toml").write_text("listener = []\n")
    monkeypatch.setenv("MAILWARD_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"^\$MAILWARD_CONFIG names .*gone\.toml, which does not exist; "):
        load_config(None)


# --- demo -----------------------------------------------------------------------------------------

def test_demo_config(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path)
    assert cfg.hostname == "localhost"
    assert cfg.state_dir == tmp_path
    assert [(lc.kind, lc.address, lc.port) for lc in cfg.listeners] == [
        ("mx", "127.0.0.1", 2525), ("submissions", "127.0.0.1", 2465), ("submission", "127.0.0.1", 2587)]
    assert cfg.tls.certificates == (CertificateConfig(cert=tmp_path / "tls" / "cert.pem",
                                                      key=tmp_path / "tls" / "key.pem"),)
    assert cfg.local_domains == ("localhost", "mailward.test")
    assert cfg.auth.users_file == tmp_path / "users"
    assert cfg.queue.path == tmp_path / "queue" / "queue.db"


def test_demo_config_makes_a_relative_var_dir_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert demo_config(Path("var")).state_dir == tmp_path / "var"


def test_demo_writes_its_configuration_for_the_operator_tools(tmp_path: Path) -> None:
    from mailward.service import prepare_demo

    var = tmp_path / "va\"r dir"  # a path that needs quoting in TOML
    config, _ = prepare_demo(var)
    assert load_config(var / "mailward.toml") == config == demo_config(var)


# --- check_files ----------------------------------------------------------------------------------

def files_config(tmp_path: Path, **extra: Any) -> Config:
    tls = tmp_path / "tls"
    tls.mkdir(exist_ok=True)
    for name in ("fullchain.pem", "privkey.pem"):
        (tls / name).write_text("PEM\n")
    certs = [{"cert": "tls/fullchain.pem", "key": "tls/privkey.pem"}]
    data: dict[str, Any] = {"state_dir": "state", "listener": [{"kind": "submissions", "port": 2465}],
                            "tls": {"certificates": certs}}
    data.update(extra)
    return config_from_dict(data, "t.toml", base_dir=tmp_path)


def test_check_files_accepts_and_creates_state_dir(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    check_files(cfg)
    assert (tmp_path / "state").is_dir()


def test_check_files_missing_certificate(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    (tmp_path / "tls" / "fullchain.pem").unlink()
    with pytest.raises(ConfigError) as info:
        check_files(cfg)
    assert str(info.value) == (f"tls.certificates[0].cert: file {tmp_path}/tls/fullchain.pem does not exist; "
                               "point it at a PEM certificate chain (certbot's fullchain.pem works).")


def test_check_files_key_is_a_directory(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    (tmp_path / "tls" / "privkey.pem").unlink()
    (tmp_path / "tls" / "privkey.pem").mkdir()
    with pytest.raises(ConfigError, match=r"^tls\.certificates\[0\]\.key: .* is a directory; point it at "):
        check_files(cfg)


def test_check_files_refuses_non_regular_files(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    (tmp_path / "tls" / "privkey.pem").unlink()
    os.mkfifo(tmp_path / "tls" / "privkey.pem")
    with pytest.raises(ConfigError, match=r"^tls\.certificates\[0\]\.key: .* is not a regular file; "):
        check_files(cfg)


def test_check_files_unreadable_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = files_config(tmp_path)
    real_open = os.open

    def refuse_key(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith("privkey.pem"):  # chmod alone proves nothing when the tests run as root
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    with monkeypatch.context() as m, pytest.raises(
            ConfigError, match=r"^tls\.certificates\[0\]\.key: file .* is not readable by this user; "):
        m.setattr(config_module.os, "open", refuse_key)
        check_files(cfg)


def test_check_files_state_dir_is_a_file(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    (tmp_path / "state").write_text("")
    with pytest.raises(ConfigError, match=r"^state_dir: .* exists but is not a directory; point state_dir "):
        check_files(cfg)


def test_check_files_state_dir_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    cfg = files_config(tmp_path, state_dir="blocker/state")
    with pytest.raises(ConfigError, match=r"^state_dir: directory .* cannot be created \(.*\); create it "):
        check_files(cfg)


def test_check_files_users_file_directory(tmp_path: Path) -> None:
    cfg = files_config(tmp_path, auth={"users_file": "nowhere/users"})
    with pytest.raises(ConfigError) as info:
        check_files(cfg)
    assert str(info.value) == (f"auth.users_file: directory {tmp_path}/nowhere does not exist; create it or "
                               "point users_file into an existing directory.")


# --- describe(): the reference, derived from the one declaration ----------------------------------

def declared_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key as `table.key`, walked from the dataclass declarations themselves."""
    keys = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        name = f.metadata["mailward.setting"].toml_name or f.name
        full = f"{prefix}.{name}" if prefix else name
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # an optional table
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
        if dataclasses.is_dataclass(item) and isinstance(item, type):
            keys.append(full)
            keys += declared_keys(item, full)
        else:
            keys.append(full)
    return keys


def described_keys(text: str) -> list[str]:
    keys, table = [], ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[\[?([\w.]+)\]\]?  # .+", line):
            table = header[1]
            keys.append(table)
        elif entry := re.fullmatch(r"(?:# )?(\w+) = .+?  # (.+)", line):
            assert entry[2].strip(), line
            keys.append(f"{table}.{entry[1]}" if table else entry[1])
        else:
            assert line == "" or line.startswith("# mailward"), line
    return keys


def test_every_schema_field_has_a_doc() -> None:
    for cls in (Config, ListenerConfig, TlsConfig, CertificateConfig, AuthConfig, QueueConfig, LogConfig,
                DeliveryConfig, RouteConfig, PolicyConfig, SmarthostConfig, DnsConfig, MtaStsConfig,
                LocalConfig, AliasConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["mailward.setting"].doc, f"{cls.__name__}.{f.name}"


def test_describe_lists_every_declared_key_exactly_once() -> None:
    cfg = load({"listener": [{"kind": "submissions"}], "tls": CERTS,
                "delivery": {"route": [{"domain": "example.net", "next_hop": "[192.0.2.1]:25"}],
                             "smarthost": {"host": "smtp.example.org"},
                             "policy": [{"destination": "[smtp.example.org]", "level": "encrypt"}]},
                "local": {"alias": [{"name": "postmaster", "targets": ["alice"]}]}})
    keys = described_keys(describe(cfg))
    assert sorted(keys) == sorted(declared_keys())
    assert len(keys) == len(set(keys))


def test_describe_shows_docs_and_defaults() -> None:
    text = describe(load({"listener": [{"kind": "mx", "port": 2525}]}))
    assert '\nport = 2525  # TCP port (default: 25 for mx, 587 for submission, 465 for submissions)\n' in text
    assert "\n# url = (not set)  # " in text
    assert '\ncertificates = []  # ' in text
    assert '\nlevel = "info"  # least severe log level written (default: "info")\n' in text


@pytest.mark.parametrize("data", [
    {"tls": CERTS},
    {"listener": [], "queue": {"url": "sqlite:///q.db"}, "state_dir": "odd \"dir\"\\\u007f\t"},
    {"listener": [{"kind": "mx", "data_timeout": 2.5}], "local_domains": ["bücher.example"]},
])
def test_describe_output_loads_back_to_the_same_config(data: dict[str, Any]) -> None:
    cfg = load(data)
    assert load(tomllib.loads(describe(cfg))) == cfg


def test_describe_of_the_full_example_round_trips(tmp_path: Path) -> None:
    (tmp_path / "mailward.toml").write_text(FULL)
    cfg = load_config(tmp_path / "mailward.toml")
    assert config_from_dict(tomllib.loads(describe(cfg)), "x") == cfg
