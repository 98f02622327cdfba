"""Three mailward nodes share one PostgreSQL queue: any node accepts, any node delivers.

One node is SIGKILLed while mail pours into all three. Every message acknowledged with 250 (by any
node, the dead one included) must reach the sink; a message may arrive twice only when the dead
node delivered it and died before recording it, never because two live nodes held it at once.
A second test shows `delivery.per_destination` holding across the nodes, not per node.

The sink is a small SMTP server in the test process that notes, for every transaction, the
Subject (unique per message), the EHLO name (which node sent it) and when, and how many
transactions were open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from background import BackgroundServer
from hostile import RecordProperty
from mailward_server import PASSWORD, USER, MailwardServer, free_port
from smtp_peer import verifying_context

from conftest import MakeServer
from mailward.queue.postgres import PostgresQueue
from postgres_server import PgServer, pg_server  # noqa: F401 - the fixture


@dataclass
class Delivery:
    subject: str
    helo: str
    at: float


@dataclass
class RecordingSink(BackgroundServer):
    """Accepts everything, slowly enough (`delay` per message) that deliveries overlap."""

    delay: float = 0.02
    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    open_transactions: int = 0
    most_at_once: int = 0
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._session, "127.0.0.1", self.port)

    async def _closing(self) -> None:
        # Nodes may still hold connections open (parked for reuse): close them from this side.
        for writer in list(self._writers):
            writer.close()
        await asyncio.sleep(0.1)

    def subjects(self) -> Counter[str]:
        with self._lock:
            return Counter(d.subject for d in self.deliveries)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        helo, in_transaction = "", False
        self._writers.add(writer)
        writer.write(b"220 sink.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    helo = line[5:].strip().decode()
                    writer.write(b"250-sink.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    in_transaction = True
                    with self._lock:
                        self.open_transactions += 1
                        self.most_at_once = max(self.most_at_once, self.open_transactions)
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    subject = ""
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        if not subject and data.startswith(b"Subject: "):
                            subject = data[9:].strip().decode()
                    await asyncio.sleep(self.delay)
                    with self._lock:
                        self.deliveries.append(Delivery(subject, helo, time.time()))
                        self.open_transactions -= 1
                    in_transaction = False
                    writer.write(b"250 2.0.0 stored\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:  # RCPT, RSET, NOOP
                    if verb == b"RSET" and in_transaction:
                        with self._lock:
                            self.open_transactions -= 1
                        in_transaction = False
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if in_transaction:
                with self._lock:
                    self.open_transactions -= 1
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
def recording_sink() -> Iterator[RecordingSink]:
    sink = RecordingSink().start()
    yield sink
    sink.stop()


def node_toml(url: str, sink: RecordingSink, name: str, per_destination: int) -> str:
    return f"""[queue]
url = "{url}"
[delivery]
helo_name = "{name}"
lease_seconds = 10
retry_initial = 2
per_destination = {per_destination}
slow_start_initial = {min(2, per_destination)}
[[delivery.route]]
domain = "sink.test"
next_hop = "[127.0.0.1]:{sink.port}"
security = "none"
"""


def start_nodes(make_server: MakeServer, url: str, sink: RecordingSink, per_destination: int,
                count: int = 3) -> list[MailwardServer]:
    return [make_server(deliver=True, log_level="info",
                        extra_toml=node_toml(url, sink, f"node{i}.example.test", per_destination),
                        listener_toml={"submissions": "max_connections_per_ip = 50"})
            for i in range(count)]


def queued(url: str) -> int:
    async def count() -> int:
        queue = await PostgresQueue.open(url, pool_size=1)
        try:
            return await queue.count()
        finally:
            await queue.close()
    return asyncio.run(count())


class Load:
    """Clients submitting to one node until told to stop (or the node dies); acked subjects only
    once the 250 to the final dot arrived."""

    def __init__(self, node: MailwardServer, name: str, clients: int) -> None:
        self.node, self.name = node, name
        self.acked: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def client(self, n: int) -> None:
        seq = failures = 0
        while not self.stop.is_set() and failures < 20:
            try:
                with smtplib.SMTP_SSL("localhost", self.node.submissions, timeout=10,
                                      context=verifying_context(self.node.ca)) as smtp:
                    smtp.login(USER, PASSWORD)
                    while not self.stop.is_set():
                        subject = f"{self.name}-c{n}-{seq}-{uuid.uuid4().hex[:8]}"
                        seq += 1
                        smtp.sendmail(USER, ["x@sink.test"],
                                      f"From: {USER}\r\nSubject: {subject}\r\n\r\n{subject}\r\n".encode())
                        with self.lock:
                            self.acked.append(subject)
            except (smtplib.SMTPException, OSError):
                failures += 1  # the node is gone (or restarting): stop after a while
                self.stop.wait(0.1)

    def finish(self) -> list[str]:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client hung"
        return self.acked


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s")


def test_three_nodes_deliver_every_acknowledged_message_when_one_is_killed(
        make_server: MakeServer, pg_server: PgServer, recording_sink: RecordingSink,  # noqa: F811
        record_property: RecordProperty) -> None:
    url = pg_server.database()
    nodes = start_nodes(make_server, url, recording_sink, per_destination=10)
    loads = [Load(node, f"n{i}", clients=3) for i, node in enumerate(nodes)]
    time.sleep(4)
    victim = nodes[1]
    victim.kill()
    killed_at = time.time()
    time.sleep(3)
    acked = [s for load in loads for s in load.finish()]
    by_victim = len(loads[1].acked)
    assert by_victim > 0 and len(acked) > by_victim, "every node must have taken mail before the kill"

    # The victim's leases expire (lease_seconds = 10) and the two others deliver what it held.
    wanted = set(acked)
    wait_for(lambda: wanted <= set(recording_sink.subjects()), 120,
             "every acknowledged message must be delivered")
    wait_for(lambda: queued(url) == 0, 60, "the queue must empty")

    counts = recording_sink.subjects()
    deliveries = list(recording_sink.deliveries)
    twice = {s for s, n in counts.items() if n > 1}
    victim_helo = "node1.example.test"
    for subject in twice:
        senders = [d for d in deliveries if d.subject == subject]
        # Only the dead node's unrecorded delivery may be repeated, and only by a live node.
        assert sum(1 for d in senders if d.helo == victim_helo) == 1, senders
        assert all(d.at <= killed_at + 1 for d in senders if d.helo == victim_helo), senders
        assert len(senders) == 2, senders
    assert not any(d.helo == victim_helo and d.at > killed_at + 1 for d in deliveries)
    after_kill = {d.helo for d in deliveries if d.at > killed_at + 1}
    assert after_kill <= {"node0.example.test", "node2.example.test"}
    print(f"\n{len(acked)} acknowledged ({by_victim} by the killed node), {len(counts)} delivered, "
          f"{len(twice)} delivered twice (the killed node's unrecorded deliveries)")
    delivered = sum(1 for s in wanted if counts[s] > 0)
    record_property("fault", ("3 nodes on PostgreSQL, one SIGKILLed: acknowledged messages delivered",
                              len(wanted), delivered))
    record_property("fault_note", f"3 nodes on PostgreSQL, one SIGKILLed: {len(twice)} of {len(counts)} "
                                  "messages delivered twice, each once by the killed node before it died")


def test_per_destination_holds_across_nodes(make_server: MakeServer, pg_server: PgServer,  # noqa: F811
                                            recording_sink: RecordingSink) -> None:
    recording_sink.delay = 0.1
    url = pg_server.database()
    nodes = start_nodes(make_server, url, recording_sink, per_destination=2)
    loads = [Load(node, f"n{i}", clients=2) for i, node in enumerate(nodes)]
    time.sleep(2)
    acked = [s for load in loads for s in load.finish()]
    wait_for(lambda: set(acked) <= set(recording_sink.subjects()), 120, "everything must be delivered")
    helos = {d.helo for d in recording_sink.deliveries}
    assert len(helos) >= 2, helos  # several nodes delivered ...
    # ... yet never more than two transactions at once to the destination, where three nodes
    # with a limit of two each would otherwise open six.
    assert recording_sink.most_at_once == 2
