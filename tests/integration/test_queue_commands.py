"""`mailward queue` beside a running server: list what swaks and sendmail submitted; hold, release,
delete; retry and flush, which the server acts on at once instead of after its backoff."""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

import pytest
from local_submit import PARKED, ok, parked_toml, sendmail, socket_path
from mailward_server import MailwardServer, free_port
from test_delivery import PickyServer, deliveries, delivery_toml, message, route, submit_mx, wait_until

from conftest import MakeServer, require_tool
from mailward.sendmail import login_name


@pytest.fixture
def server(make_server: MakeServer) -> MailwardServer:
    return make_server(extra_toml=parked_toml())


def queue(server: MailwardServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return server.cli("queue", *args, check=check)


def queue_json(server: MailwardServer, *args: str) -> list[dict[str, Any]]:
    data = json.loads(queue(server, *args, "--json").stdout)
    assert isinstance(data, list)
    return data


def swaks(*args: str) -> None:
    subprocess.run([require_tool("swaks"), "--silent", "2", *args], check=True, capture_output=True,
                   timeout=60)


def test_list_json_after_swaks_and_sendmail(server: MailwardServer) -> None:
    swaks("--socket", str(socket_path(server)), "--from", "cron@example.org", "--to", f"a@{PARKED}")
    swaks("--server", f"127.0.0.1:{server.mx}", "--from", "peer@example.net",
          "--to", f"b@{PARKED},c@{PARKED}")  # swaks takes several recipients comma-separated
    ok(sendmail(server, "-t", "-i", stdin=f"To: d@{PARKED}\nBcc: e@{PARKED}\nSubject: s\n\nx\n".encode()))

    data = queue_json(server, "list")
    assert [m["sender"] for m in data] == ["cron@example.org", "peer@example.net",
                                           f"{login_name()}@mx.example.test"]
    assert [[r["address"] for r in m["recipients"]] for m in data] == [
        [f"a@{PARKED}"], [f"b@{PARKED}", f"c@{PARKED}"], [f"d@{PARKED}", f"e@{PARKED}"]]
    for m in data:
        assert set(m) == {"id", "size", "created_at", "sender", "held", "hold_reason", "recipients"}
        assert m["held"] is False and m["size"] > 0
        for r in m["recipients"]:
            # A Deliverer may already have tried (and been refused by) the parked route.
            assert r["status"] in ("queued", "deferred") and r["tls"] is None

    listing = queue(server, "list").stdout.splitlines()
    assert listing[0].split()[:5] == ["ID", "SIZE", "AGE", "SENDER", "RECIPIENT"]
    assert listing[-1].startswith("3 messages, 5 recipients, oldest ")

    [local, mx] = queue_json(server, "show", data[2]["id"], data[1]["id"])
    assert (local["envelope"]["listener"], local["envelope"]["client_ip"]) == ("local", "local")
    assert (mx["envelope"]["listener"], mx["envelope"]["client_ip"]) == ("mx", "127.0.0.1")
    assert ["Subject", "s"] in local["headers"] and not any(h[0].lower() == "bcc" for h in local["headers"])
    shown = queue(server, "show", data[2]["id"]).stdout
    assert "Received from: local (EHLO mx.example.test) on listener local" in shown


def test_hold_release_delete_while_the_server_runs(server: MailwardServer) -> None:
    spool = server.queue_path.with_name(server.queue_path.name + "-tmp") / "in-progress"
    spool.write_bytes(b"stands for a body being received")  # the tool must never clear this directory
    ok(sendmail(server, f"a@{PARKED}"))
    ok(sendmail(server, f"b@{PARKED}"))
    first, second = (m["id"] for m in queue_json(server, "list"))

    [m] = queue_json(server, "hold", first)
    assert m["held"] and m["hold_reason"] == "operator" and m["recipients"][0]["status"] == "held"
    assert any(line.startswith(first + "!") for line in queue(server, "list").stdout.splitlines())
    assert [m["held"] for m in queue_json(server, "list")] == [True, False]

    assert queue(server, "release", first).stdout == f"{first}: released\n"
    assert [m["held"] for m in queue_json(server, "list")] == [False, False]

    assert queue(server, "delete", first, second).stdout == f"{first}: deleted\n{second}: deleted\n"
    assert queue(server, "list").stdout == "Mail queue is empty\n"
    gone = queue(server, "hold", first, check=False)
    assert gone.returncode == 1 and "is not in the queue" in gone.stderr

    ok(sendmail(server, f"c@{PARKED}"))  # the server carried on undisturbed
    assert [m["recipients"][0]["address"] for m in queue_json(server, "list")] == [f"c@{PARKED}"]
    assert spool.read_bytes() == b"stands for a body being received"


def test_queue_commands_explain_a_missing_queue(make_server: MakeServer) -> None:
    never_started = make_server(start=False)
    result = queue(never_started, "list", check=False)
    assert result.returncode == 2
    assert result.stderr == (f"mailward: there is no queue at {never_started.queue_path}; check queue.path "
                             "in the configuration (--config), or start the server once to create it.\n")
    assert not never_started.queue_path.exists()


def sent_within(server: MailwardServer, rcpt: str, seconds: float) -> dict[str, str]:
    """The delivery line of `rcpt`, which must be logged within `seconds` (not after the backoff)."""
    wait_until(lambda: any(d["rcpt"] == rcpt and d["status"] == "sent" for d in deliveries(server)),
               timeout=seconds, what=f"delivery to {rcpt}")
    [line] = [d for d in deliveries(server) if d["rcpt"] == rcpt and d["status"] == "sent"]
    return line


def test_retry_and_flush_make_the_running_server_deliver_now(make_server: MakeServer) -> None:
    closed = free_port()  # nothing listens there: that recipient stays deferred throughout
    with PickyServer() as busy:  # answers soft-* with 450 4.2.1 and offers no STARTTLS
        sender = make_server(deliver=True, extra_toml=delivery_toml(
            route("far.test", f"[127.0.0.1]:{busy.port}"), route("nowhere.test", f"[127.0.0.1]:{closed}"),
            relay=("far.test", "nowhere.test")))
        submit_mx(sender, "sender@back.test", ["soft-a@far.test", "z@nowhere.test"], message("r1"))
        submit_mx(sender, "sender@back.test", ["soft-b@far.test"], message("r2"))

        def attempted() -> bool:
            return all(r["attempts"] for m in queue_json(sender, "list") for r in m["recipients"])

        wait_until(attempted, what="the first attempts")
    first, second = queue_json(sender, "list")
    soft_a, nowhere = first["recipients"]
    assert soft_a["status"] == "deferred" and soft_a["reason"].startswith("450 4.2.1 ")
    assert soft_a["tls"] == {"protocol": None, "cipher": None, "verified": False, "policy": "may",
                             "failure": "STARTTLS not offered", "trust": None, "dane": None}
    assert nowhere["status"] == "deferred" and "4.4.1 connect to" in nowhere["reason"]
    assert nowhere["tls"] is None  # no host answered: there is no TLS to speak of
    assert soft_a["next_attempt_at"] - time.time() > 200  # the backoff would wait minutes

    # The peer now takes the mail, over STARTTLS: a second mailward on the same port.
    receiver = make_server(mx=busy.port, extra_toml='relay_domains = ["far.test"]\n')
    retried = queue(sender, "retry", first["id"])
    assert (retried.stdout, retried.stderr) == (f"{first['id']}: due now\n", "")
    # The server polls for others' changes every second; the bound leaves room for a loaded machine.
    sent_within(sender, "soft-a@far.test", 5)
    [m] = [m for m in queue_json(sender, "list") if m["id"] == first["id"]]
    soft_a = m["recipients"][0]
    assert soft_a["status"] == "delivered" and soft_a["reason"].startswith("250 ") and soft_a["attempts"] == 2
    tls = soft_a["tls"]
    assert re.fullmatch(r"TLSv1\.[23]", tls["protocol"]) and tls["cipher"]
    assert (tls["verified"], tls["policy"], tls["failure"], tls["trust"]) == (False, "may", None, "Untrusted")
    shown = queue(sender, "show", first["id"]).stdout
    assert f"Untrusted {tls['protocol']}/{tls['cipher']} at level may" in shown
    [later] = [m for m in queue_json(sender, "list") if m["id"] == second["id"]]
    assert later["recipients"][0]["attempts"] == 1  # a retry of one message leaves the others be

    flushed = queue(sender, "flush")
    assert (flushed.stdout, flushed.stderr) == ("2 messages due now\n", "")
    line = sent_within(sender, "soft-b@far.test", 5)
    assert line["tls"] == f"Untrusted {tls['protocol']}/{tls['cipher']}"
    assert second["id"] not in [m["id"] for m in queue_json(sender, "list")]  # done: it left the queue
    assert sorted(r["address"] for m in queue_json(receiver, "list") for r in m["recipients"]) == [
        "soft-a@far.test", "soft-b@far.test"]

    sender.stop()
    flushed = queue(sender, "flush")  # z@nowhere.test is still deferred
    assert flushed.stdout == "1 message due now\n"
    assert flushed.stderr == (f"mailward: no running mailward found ({sender.pid_path} is missing or "
                              "stale); the change is stored and takes effect when it starts.\n")
