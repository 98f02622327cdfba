"""Started as root: bind ports below 1024, give state_dir to `user`, drop root for good, still reload.

Each test that drops privileges creates a throwaway system account and removes it afterwards, so
these run only as root (as `make test` does on the project's machines).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mailward_server import PASSWORD, USER, MailwardServer

from mailward.tls import demo_ca_path, make_demo_certificate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "contrib" / "certbot" / "mailward-reload"
MAILWARD = Path(sys.executable).parent / "mailward"
# A loopback address of its own, so the real 25/465/587 can be used if nothing else holds them.
ADDRESS = "127.0.0.77"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("mailward: ") and lines[0].endswith("."), lines[0]
    return lines[0]


def privileged_port(preferred: int, taken: set[int]) -> int:
    """`preferred` on ADDRESS if nothing holds it, else a free port below 1024."""
    for port in (preferred, *range(900, 1000)):
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((ADDRESS, port))
            except OSError:
                continue
        taken.add(port)
        return port
    pytest.skip(f"no free port below 1024 on {ADDRESS}")


@pytest.fixture
def account() -> Iterator[pwd.struct_passwd]:
    """A system account and group of its own, removed again afterwards."""
    name = f"mwtest-{secrets.token_hex(4)}"
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("useradd is not installed")
    subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        # Fails while a process still runs as the account, which would then be a leak to report.
        removed = subprocess.run(["userdel", name], check=False, capture_output=True, text=True)
        assert removed.returncode == 0, removed.stderr


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path: that lies in a directory only root may enter, and the dropped
    # server must reach its state_dir and the installed certificates.
    path = Path(tempfile.mkdtemp(prefix="mailward-priv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def issue(workdir: Path, live: Path, name: str) -> tuple[Path, bytes]:
    """Put a fresh certificate for `name` into a certbot-like live/ directory, readable by root only.

    Returns the CA that signed it and the leaf in DER.
    """
    fresh = workdir / f"ca-{name}-{secrets.token_hex(3)}"
    pair = make_demo_certificate(fresh, name)
    live.mkdir(mode=0o700, parents=True, exist_ok=True)
    for src, dst in ((pair.cert, live / "fullchain.pem"), (pair.key, live / "privkey.pem")):
        tmp = dst.with_name(dst.name + ".new")
        shutil.copyfile(src, tmp)
        tmp.chmod(0o600)
        os.replace(tmp, dst)
    leaf = x509.load_pem_x509_certificates(pair.cert.read_bytes())[0]
    return demo_ca_path(fresh), leaf.public_bytes(Encoding.DER)


def deploy_hook(live: Path, tls_dir: Path, group: str,
                server: MailwardServer) -> subprocess.CompletedProcess[str]:
    """Run contrib/certbot/mailward-reload as certbot would after a renewal."""
    env = dict(os.environ, RENEWED_LINEAGE=str(live), MAILWARD_TLS_DIR=str(tls_dir), MAILWARD_GROUP=group,
               MAILWARD_CONFIG=str(server.config_path), MAILWARD=str(MAILWARD))
    return subprocess.run(["sh", str(HOOK)], env=env, capture_output=True, text=True, timeout=60)


def served_leaf(port: int, ca: Path, name: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((ADDRESS, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (ln.partition(":") for ln in lines)}


def notifications(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    """Datagrams received on the notify socket up to and including one containing `until`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(message)
        if until in message:
            return got
    raise AssertionError(f"{until!r} not notified within {timeout}s; got {got}")


def owners(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_uid, st.st_gid)
    return out


def test_binds_low_ports_as_root_then_serves_and_reloads_as_the_user(
        account: pwd.struct_passwd, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uid, gid, group = account.pw_uid, account.pw_gid, account.pw_name  # --user-group: same name
    taken: set[int] = set()
    server = MailwardServer(workdir / "server", user=account.pw_name, address=ADDRESS,
                            mx=privileged_port(25, taken), submission=privileged_port(587, taken),
                            submissions=privileged_port(465, taken))
    # certbot's layout: live/<name>/ readable by root only.
    live = workdir / "letsencrypt" / "live" / "mx.example.test"
    (workdir / "letsencrypt").mkdir(mode=0o700)
    ca, _ = issue(workdir, live, "localhost")
    server.certificates = ((live / "fullchain.pem", live / "privkey.pem"),)
    server.write_config()  # `mailward user add` runs as root: the users file starts out root's

    # Files only root could read are found at start-up, not at the first renewal's reload.
    p = server.cli("serve", check=False)
    assert p.returncode == 2, p
    line = one_sentence(p.stderr)
    assert "tls.certificates[0]" in line and "not readable by this user" in line, line

    # The deploy hook installs copies the user's group can read; nothing runs yet to reload.
    tls_dir = workdir / "etc-mailward-tls"
    p = deploy_hook(live, tls_dir, group, server)
    assert p.returncode == 1 and "no running mailward found" in p.stderr, p
    installed = tls_dir / "mx.example.test"
    for name in ("fullchain.pem", "privkey.pem"):
        st = (installed / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640), name
    server.certificates = ((installed / "fullchain.pem", installed / "privkey.pem"),)
    server.config_path.write_text(server.config_text())

    # Planted in state_dir: a root file to be handed over, and links that must not redirect it.
    state = server.state_dir
    (state / "leftover").write_text("made by root\n")
    outside = workdir / "outside"
    outside.write_text("root's\n")
    (state / "symlink").symlink_to(outside)
    os.link(outside, state / "hardlink")

    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify_path.chmod(0o777)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    with notify, contextlib.ExitStack() as cleanup:
        cleanup.callback(server.stop)
        server.start()
        assert any("READY=1" in m for m in notifications(notify, "READY=1"))
        status = proc_status(server.pid)
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
        assert status["Groups"].split() == [str(gid)], status["Groups"]
        for cap in ("CapPrm", "CapEff", "CapAmb"):
            assert int(status[cap], 16) == 0, (cap, status[cap])
        log = server.log_since_start()
        assert f"privileges dropped: running as {account.pw_name} (uid {uid}, gid {gid}" in log, log

        # A message over implicit TLS on the privileged port is on disk, in files the user owns.
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False  # the certificate names localhost; the address is 127.0.0.77
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = USER, "bob@example.org", "privileges"
        msg.set_content("sent to a server that is no longer root\n")
        with smtplib.SMTP_SSL(ADDRESS, server.submissions, context=ctx, timeout=20) as smtp:
            smtp.login(USER, PASSWORD)
            assert smtp.mail(USER)[0] == 250
            assert smtp.rcpt("bob@example.org")[0] == 250
            code, text = smtp.data(msg.as_bytes(policy=SMTP))
        assert code == 250 and b"queued as" in text, (code, text)
        [(_, body)] = server.messages()
        assert b"sent to a server that is no longer root" in body
        found = owners(state)
        for name in (".", "queue", "queue/queue.db", "users", "mailward.pid", "mailward.sock", "leftover",
                     "symlink"):
            if name != "symlink":
                assert found[name] == (uid, gid), (name, found)
        assert found["symlink"] == (0, 0) and outside.stat().st_uid == 0  # neither link was followed
        assert (state / "hardlink").stat().st_uid == 0
        assert (state / "mailward.sock").stat().st_mode & 0o777 == 0o660

        # certbot renews: the hook installs the new pair and reloads; the user re-reads the copies.
        new_ca, new_leaf = issue(workdir, live, "mail.example.test")
        p = deploy_hook(live, tls_dir, group, server)
        assert p.returncode == 0 and "reload signal sent" in p.stdout, p
        server.wait_for_log("TLS certificates reloaded: localhost, mail.example.test")
        assert served_leaf(server.submissions, new_ca, "mail.example.test") == new_leaf
        reloaded = notifications(notify, "READY=1")
        assert any("RELOADING=1" in m for m in reloaded), reloaded

        assert server.stop() == 0
        assert any("STOPPING=1" in m for m in notifications(notify, "STOPPING=1"))
    assert "Traceback" not in server.log(), server.log()


def test_a_missing_account_is_one_sentence_and_exit_2(workdir: Path) -> None:
    server = MailwardServer(workdir / "server", user=f"mwtest-absent-{secrets.token_hex(3)}")
    server.write_config()
    p = server.cli("serve", check=False)
    assert p.returncode == 2, p
    line = one_sentence(p.stderr)
    assert f"user: no account named {server.user} exists on this system; create it with useradd" in line


def test_root_without_user_is_refused(workdir: Path) -> None:
    server = MailwardServer(workdir / "server", user=None)
    server.write_config()
    p = server.cli("serve", check=False)
    assert p.returncode == 2, p
    line = one_sentence(p.stderr)
    assert line == ('mailward: mailward was started as root and the configuration sets no user to run as; '
                    'add user = "mailward" (an unprivileged account of its own) to it, or start mailward as '
                    'that account.')
    assert not (server.state_dir / "queue").exists()  # refused before anything was made


def test_the_demo_still_runs_as_root(workdir: Path) -> None:
    for port in (2525, 2465, 2587):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} of the demo is in use")
    with subprocess.Popen([sys.executable, "-m", "mailward.cli", "serve", "--demo", "--state-dir",
                           str(workdir / "var")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          cwd=workdir, text=True) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "Stop with Ctrl-C" in line:
                    break
            assert proc.poll() is None, "".join(lines)
            assert proc_status(proc.pid)["Uid"].split() == ["0"] * 4
            assert "the demo runs as root" in "".join(lines)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
