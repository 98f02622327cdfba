"""250 means on disk: SIGKILL the server under load, restart it on the same state, count the ids.

Twenty clients submit over 465 with AUTH, each message carrying a unique id; an id is recorded
only once its 250 arrived. After every kill all recorded ids must be in the queue with intact
bodies (the queue's reader checks length and digest), and nothing torn may be there.
"""

from __future__ import annotations

import os
import random
import smtplib
import threading
import time
import uuid
from collections import Counter

from crashload import body_for
from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import verifying_context

from conftest import MakeServer

CLIENTS = 20
ROUNDS = 3


class Submitters:
    def __init__(self, server: MailwardServer, round_no: int) -> None:
        self.server = server
        self.round_no = round_no
        self.stop = threading.Event()
        self.acked: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                        for i in range(CLIENTS)]

    def client(self, n: int) -> None:
        ctx = verifying_context(self.server.ca)
        seq = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP_SSL("localhost", self.server.submissions, context=ctx, timeout=10) as smtp:
                    smtp.login(USER, PASSWORD)
                    while not self.stop.is_set():
                        msg_id = f"r{self.round_no}-c{n}-{seq}-{uuid.uuid4().hex[:8]}"
                        seq += 1
                        smtp.sendmail(USER, ["bob@example.org"], body_for(msg_id))
                        with self.lock:  # sendmail returned: the 250 to the final dot arrived
                            self.acked.append(msg_id)
            except (smtplib.SMTPException, OSError):
                self.stop.wait(0.05)  # the server is gone; retry until told to stop

    def __enter__(self) -> Submitters:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)
        assert not any(t.is_alive() for t in self.threads), "a submitter hung"


def test_sigkill_never_loses_an_acknowledged_message(make_server: MakeServer) -> None:
    # All clients come from 127.0.0.1; the default of 10 per address would refuse half of them.
    server = make_server(listener_toml={"submissions": f"max_connections_per_ip = {2 * CLIENTS}"})
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"random seed {seed}")
    acked: list[str] = []
    for round_no in range(ROUNDS):
        if round_no:
            server.start()
        with Submitters(server, round_no) as subs:
            # Let the load build up first, then kill at an arbitrary moment.
            deadline = time.monotonic() + 5
            while len(subs.acked) < CLIENTS and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.2, 1.5))
            server.kill()
            with subs.lock:
                round_acked = list(subs.acked)
        print(f"round {round_no}: {len(round_acked)} messages acknowledged before SIGKILL")
        assert round_acked, f"round {round_no}: no message was acknowledged; the server log:\n{server.log()}"
        acked += round_acked

    # The server must come back on the crashed state and work normally.
    server.start()
    with smtplib.SMTP_SSL("localhost", server.submissions, context=verifying_context(server.ca),
                          timeout=10) as smtp:
        smtp.login(USER, PASSWORD)
        smtp.sendmail(USER, ["bob@example.org"], body_for("after-the-crashes"))
    assert server.stop() == 0
    assert "refused connection" not in server.log(), "fewer clients ran at once than intended"

    stored = server.messages()  # raises CorruptMessage for any torn or altered body
    ids = Counter()
    for msg, body in stored:
        subject = body.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        ids[subject] += 1
        assert body.endswith(body_for(subject)), f"{subject}: body not intact"
        assert msg.size == len(body)
        assert msg.envelope.sender == USER and msg.envelope.auth_user == USER
        assert [r.recipient.address for r in msg.recipients] == ["bob@example.org"]
    assert ids["after-the-crashes"] == 1
    duplicated = [i for i, n in ids.items() if n > 1]
    assert not duplicated, f"stored more than once: {duplicated[:5]}"
    lost = [i for i in acked if i not in ids]
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]} (seed {seed})"
    unacked = len(ids) - len(acked) - 1
    print(f"{len(acked)} acknowledged, all stored; {unacked} stored whose 250 the kill cut off")
    assert unacked >= 0
    spool = server.queue_path.with_name(server.queue_path.name + "-tmp")
    assert list(spool.iterdir()) == [], "spool files of cut-off transactions were left behind"
    assert len(acked) == len(set(acked))
