"""`mailward queue` beside a running server: list what swaks and sendmail submitted; hold, release, delete."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from conftest import MakeServer, require_tool
from local_submit import PARKED, ok, parked_toml, sendmail, socket_path
from mailward_server import MailwardServer

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
