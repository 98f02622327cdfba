"""Disk full during DATA: the queue's directory on a small tmpfs the test mounts and fills.

While the filesystem is full every message gets either 250 (the commit found room, e.g. in WAL
space SQLite already owns; then it must be delivered intact) or a 4xx reply, never a closed
connection or a 5xx; a refused message never reaches the next hop, not even in part; the queue
holds nothing torn and leaves no spool files behind. When space returns the same process accepts
and delivers again, without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from crashload import body_for
from hostile import RecordProperty
from mailward_server import MailwardServer, free_port
from test_delivery import Sink, deliveries, delivery_toml, queue_count, route, wait_until

from conftest import MakeServer

SIZE = "4m"  # the whole filesystem; the empty queue takes well under half of it
DOMAIN = "sink.test"


@contextlib.contextmanager
def small_filesystem(path: Path) -> Iterator[Path]:
    """A size-limited tmpfs mounted at `path` (root only), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem with one file; returns it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    st = os.statvfs(directory)
    assert st.f_bavail == 0, "the filesystem still has room"
    return filler


def submit(server: MailwardServer, msg_id: str, big: bool) -> int:
    """Send one message on 25; the reply code to the final dot (or to whatever came first)."""
    body = body_for(msg_id, 1 if big else None)  # big: 5,000 lines
    with smtplib.SMTP("127.0.0.1", server.mx, timeout=20) as smtp:
        smtp.ehlo("client.test")
        code, _ = smtp.mail("sender@client.test")
        if code != 250:
            return code
        code, _ = smtp.rcpt(f"{msg_id}@{DOMAIN}")
        if code != 250:
            return code
        code, _ = smtp.data(body)
        # The session goes on after a refusal: the server read the whole body, not cut it short.
        assert smtp.noop()[0] == 250, f"{msg_id}: the session ended after {code}"
        return code


def sink_ids(sink: Sink) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for m in sink.messages():
        for rcpt in m.rcpts:
            out.setdefault(rcpt.strip("<>").split("@")[0], []).append(m.body)
    return out


def test_disk_full_during_data_answers_4xx_and_recovers(make_server: MakeServer, tmp_path: Path,
                                                         record_property: RecordProperty) -> None:
    sink = Sink(tmp_path / "sink").start()
    server = make_server(start=False, deliver=True, extra_toml=delivery_toml(
        route(DOMAIN, f"[127.0.0.1]:{sink.port}"), relay=(DOMAIN,), retry_initial=1))
    try:
        with small_filesystem(server.queue_path.parent) as queue_dir:
            server.start()
            try:
                _exercise(server, sink, queue_dir, record_property)
            finally:
                server.stop()
    finally:
        sink.stop()


def _exercise(server: MailwardServer, sink: Sink, queue_dir: Path,
              record_property: RecordProperty) -> None:
    assert submit(server, "before-full", big=False) == 250
    wait_until(lambda: "before-full" in sink_ids(sink), what="delivery before the disk fills")

    filler = fill(queue_dir)
    replies: dict[str, int] = {}
    big = {"before-full": False, "after-full-" + "x" * 40: True, "after-full-small": False}
    # Small bodies wait in memory and meet the full disk at commit; big ones are spooled to a
    # file beside the queue while they arrive, and meet it in the middle of DATA.
    for n in range(12):
        msg_id = f"full-{n}-{uuid.uuid4().hex}"  # long: 5,000 lines of it outgrow the spool threshold
        big[msg_id] = n % 2 == 1
        replies[msg_id] = submit(server, msg_id, big=big[msg_id])
    refused = {i for i, code in replies.items() if code != 250}
    accepted = set(replies) - refused
    assert refused, f"nothing was refused with the disk full: {replies}"
    assert all(400 <= replies[i] < 500 for i in refused), f"not a temporary refusal: {replies}"

    # Space returns: the same process takes mail again and delivers it, and what it accepted.
    filler.unlink()
    assert submit(server, "after-full-" + "x" * 40, big=True) == 250
    assert submit(server, "after-full-small", big=False) == 250
    expected = accepted | set(big) - set(replies)
    wait_until(lambda: expected <= set(sink_ids(sink)), timeout=30, what="delivery once space returned")
    wait_until(lambda: queue_count(server) == 0, timeout=30, what="an empty queue")

    delivered = sink_ids(sink)
    half_written = sorted(refused & set(delivered))
    for msg_id, copies in delivered.items():
        want = body_for(msg_id, 1 if big[msg_id] else None).replace(b"\r\n", b"\n")
        for body in copies:
            assert body.replace(b"\r\n", b"\n").rstrip(b"\n").endswith(want.rstrip(b"\n")), msg_id
    spool = server.queue_path.with_name(server.queue_path.name + "-tmp")
    assert list(spool.iterdir()) == [], "spool files of refused messages were left behind"
    log = server.log()
    record_property("fault", ("disk full during DATA: 4xx, nothing half-written delivered",
                              len(replies), len(refused) + len(accepted) - len(half_written)))
    record_property("fault_note", f"disk full: {len(refused)} of {len(replies)} messages refused with "
                                  f"{sorted({replies[i] for i in refused})}, {len(accepted)} accepted and "
                                  f"delivered; 0 half-written delivered; accepting again once space returned")
    assert not half_written, f"refused but delivered: {half_written}"
    assert "queue storage is full" in log
    assert "session failed" not in log  # a refusal, not a crash of the session


def test_delivery_while_the_disk_is_full_waits_and_recovers(make_server: MakeServer, tmp_path: Path,
                                                            record_property: RecordProperty) -> None:
    """Mail queued before the disk filled is delivered when its next hop comes back while the disk
    is still full, or after space returns; never bounced, never lost, and the process keeps going."""
    port = free_port()
    server = make_server(start=False, deliver=True, extra_toml=delivery_toml(
        route(DOMAIN, f"[127.0.0.1]:{port}"), relay=(DOMAIN,), retry_initial=1, retry_max=2,
        dead_host_seconds=0, lease_seconds=5))
    sink = Sink(tmp_path / "sink", port=port)
    with small_filesystem(server.queue_path.parent) as queue_dir:
        server.start()
        try:
            assert submit(server, "queued-early", big=False) == 250
            # Nothing listens yet: the message is deferred and retried every second or two.
            wait_until(lambda: any(d["status"] == "deferred" for d in deliveries(server)), what="a deferral")
            filler = fill(queue_dir)
            sink.start()  # the next hop is back while the disk is full
            time.sleep(4)
            during = len(sink_ids(sink).get("queued-early", []))
            filler.unlink()
            wait_until(lambda: queue_count(server) == 0, timeout=30, what="an empty queue")
            copies = len(sink_ids(sink).get("queued-early", []))
        finally:
            server.stop()
            sink.stop()
    statuses = {d["status"] for d in deliveries(server)}
    record_property("fault_note", f"delivery with the disk full: {during} cop{'y' if during == 1 else 'ies'} "
                                  f"sent while full, {copies} in all once space returned; never bounced")
    record_property("fault", ("disk full during delivery: retried, not bounced", 1,
                              int(copies >= 1 and "bounced" not in statuses)))
    assert copies >= 1 and "bounced" not in statuses, statuses
