"""mailward on a shared PostgreSQL queue: accept and delivery throughput with 1, 2 and 3 nodes.

One throwaway PostgreSQL server (the tests' own, tests/postgres_server.py: initdb in a temporary
directory, unix socket only, fsync on) holds the queue; every node is a real `mailward serve`
with `queue.url` pointing at it, all on this machine's loopback.

* accept: the load generator (bench/loadgen.py) sends 2 KB messages over plain SMTP on port 25,
  10 per connection, from the same total number of clients split evenly over the nodes, with
  delivery off; every 250 means committed with synchronous_commit on. The same load against one
  node on the embedded SQLite queue gives the single-node comparison.
* delivery: the queue is filled and held, k nodes start with delivery on, everything is released
  at once (one UPDATE and a NOTIFY), and the time until smtp-sink has every message is measured;
  afterwards the queue must be empty. One node on SQLite, filled and restarted with delivery on,
  gives the single-node comparison.

The scaling factor is k nodes' messages/s over one node's. On a two-core machine the nodes, the
database and the load generator share the same cores, so the factor shows what a second node
costs or gains here, not what separate machines would give.

    python bench/postgres.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import loadgen
import psycopg
from loadgen import LoadRun, LoadSpec
from outbound import Sink
from postfix_instance import LOOPBACK
from server import MailwardProcess, raise_nofile

from mailward.tls import make_demo_certificate

NODES = (1, 2, 3)
CLIENTS = 30  # load generator clients in all, split over the nodes
PER_CONNECTION = 10
SIZE = 2048
ACCEPT, QUICK_ACCEPT = 6000, 900  # messages per accept row
DELIVER, QUICK_DELIVER = 6000, 900  # messages per delivery row

NOTES = """\
PostgreSQL: one local server (unix socket, fsync and synchronous_commit on), k mailward nodes on the
same two cores. accept: plain SMTP on 25, 2 KB, 10 msgs/conn, 30 clients split over the nodes,
delivery off; the SQLite row is one node on the embedded queue under the same load. delivery: a
held, pre-filled queue released at once to k nodes delivering to one smtp-sink (plaintext, one
route, per_destination 20 across all nodes); timed until the sink has every message; the SQLite
row is one node filled, then restarted with delivery on and timed from its deliverer's start.
Scaling = k nodes / 1 node on PostgreSQL."""


@dataclass
class Figure:
    label: str
    messages: int
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class Database:
    """A PostgreSQL server with one migrated database per row."""

    def __init__(self) -> None:
        from postgres_server import PG_BIN, start_pg_server

        if not (PG_BIN / "initdb").exists():
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.server = start_pg_server()

    def fresh(self) -> str:
        return self.server.database()

    def sql(self, url: str, statement: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement.encode())

    def close(self) -> None:
        self.server.stop()


def node(cert: Path, key: Path, url: str | None, *, deliver: bool, sink_port: int) -> MailwardProcess:
    queue = f'[queue]\nurl = "{url}"\n' if url else ""
    return MailwardProcess(cert, key, extra_toml=queue, delivery_enabled=deliver, parked_port=sink_port,
                           log_level="warning")


def accept(cert: Path, key: Path, url: str | None, nodes: int, messages: int, sink_port: int) -> Figure:
    procs = [node(cert, key, url, deliver=False, sink_port=sink_port) for _ in range(nodes)]
    runs: list[LoadRun] = []
    label = f"accept, {nodes} node{'s' if nodes > 1 else ''} on {'PostgreSQL' if url else 'SQLite'}"
    try:
        for p in procs:
            p.start()
        for p in procs:
            spec = LoadSpec(host=LOOPBACK, port=p.ports["mx"], mode="plain", messages=messages // nodes,
                            size=SIZE, concurrency=CLIENTS // nodes, per_connection=PER_CONNECTION,
                            warmup=20)
            run = LoadRun(spec)
            run.start()
            runs.append(run)
        results = [r.go() for r in runs]
        ok = sum(r.ok for r in results)
        seconds = max(r.finished for r in results) - min(r.started for r in results)
        figure = Figure(label, ok, seconds)
        failed = sum(r.failed for r in results)
        if failed:
            figure.problems.append(f"{label}: {failed} messages refused or failed")
        warm = sum(r.warmup_ok for r in results)
        stored = _count(url) if url is not None else procs[0].queued()[0]
        if stored != ok + warm:
            figure.problems.append(f"{label}: {ok + warm} acknowledged but {stored} in the queue")
        return figure
    finally:
        for r in runs:
            r.stop()
        for p in procs:
            p.cleanup()


def _count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM message").fetchone()
    return int(row[0]) if row else 0


def deliver(cert: Path, key: Path, db: Database, nodes: int, messages: int, sink: Sink) -> Figure:
    url = db.fresh()
    label = f"delivery, {nodes} node{'s' if nodes > 1 else ''} on PostgreSQL"
    filler = node(cert, key, url, deliver=False, sink_port=sink.port)
    try:
        filler.start()
        spec = LoadSpec(host=LOOPBACK, port=filler.ports["mx"], mode="plain", messages=messages, size=SIZE,
                        concurrency=CLIENTS, per_connection=PER_CONNECTION)
        loaded = loadgen.run(spec).ok
    finally:
        filler.cleanup()
    db.sql(url, "UPDATE message SET held = true, hold_reason = 'bench'")
    procs = [node(cert, key, url, deliver=True, sink_port=sink.port) for _ in range(nodes)]
    try:
        for p in procs:
            p.start()
        time.sleep(1.0)  # every deliverer idle and listening
        base = sink.messages
        t0 = time.time()
        db.sql(url, "UPDATE message SET held = false, hold_reason = NULL")
        db.sql(url, "SELECT pg_notify('mailward_work', 'bench')")
        t1 = sink.wait_for(base + loaded, 300)
        figure = Figure(label, loaded, (t1 or time.time()) - t0)
        if t1 is None:
            figure.problems.append(f"{label}: the sink got {sink.messages - base} of {loaded} in 300s")
        deadline = time.monotonic() + 60
        while _count(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left := _count(url):
            figure.problems.append(f"{label}: {left} messages still queued after delivery")
        return figure
    finally:
        for p in procs:
            p.cleanup()


def deliver_sqlite(cert: Path, key: Path, messages: int, sink: Sink) -> Figure:
    """One node on the embedded queue: filled with delivery off, then restarted with it on and
    timed from the moment its deliverer starts (the pid file's mtime), as bench/outbound.py does."""
    label = "delivery, 1 node on SQLite"
    mw = node(cert, key, None, deliver=False, sink_port=sink.port)
    try:
        mw.start()
        spec = LoadSpec(host=LOOPBACK, port=mw.ports["mx"], mode="plain", messages=messages, size=SIZE,
                        concurrency=CLIENTS, per_connection=PER_CONNECTION)
        loaded = loadgen.run(spec).ok
        mw.stop()
        mw.delivery_enabled = True
        base = sink.messages
        mw.start()
        t0 = (mw.root / "state" / "mailward.pid").stat().st_mtime
        t1 = sink.wait_for(base + loaded, 300)
        figure = Figure(label, loaded, (t1 or time.time()) - t0)
        if t1 is None:
            figure.problems.append(f"{label}: the sink got {sink.messages - base} of {loaded} in 300s")
        deadline = time.monotonic() + 60
        while mw.queued()[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        if left := mw.queued()[0]:
            figure.problems.append(f"{label}: {left} messages still queued after delivery")
        return figure
    finally:
        mw.cleanup()


@dataclass
class Results:
    sqlite_accept: Figure
    sqlite_delivery: Figure
    accept: list[Figure]
    delivery: list[Figure]

    @property
    def problems(self) -> list[str]:
        figures = (self.sqlite_accept, self.sqlite_delivery, *self.accept, *self.delivery)
        return [p for f in figures for p in f.problems]

    def rows(self) -> list[tuple[Figure, float | None, str]]:
        """Each figure with its ratio and what the ratio compares: one PostgreSQL node to one
        SQLite node, k PostgreSQL nodes to one (the scaling factor)."""
        out: list[tuple[Figure, float | None, str]] = []
        for sqlite, figures in ((self.sqlite_accept, self.accept), (self.sqlite_delivery, self.delivery)):
            out.append((sqlite, None, ""))
            for f in figures:
                base = sqlite if f is figures[0] else figures[0]
                ratio = f.msgs_per_s / base.msgs_per_s if base.msgs_per_s else None
                out.append((f, ratio, "x SQLite, 1 node" if base is sqlite else "scaling x 1 node"))
        return out


def measure(quick: bool = False, nodes: tuple[int, ...] = NODES, verbose: bool = True) -> Results:
    raise_nofile()
    accept_n = QUICK_ACCEPT if quick else ACCEPT
    deliver_n = QUICK_DELIVER if quick else DELIVER
    tls_dir = Path(tempfile.mkdtemp(prefix="mailward-bench-pg-"))
    pair = make_demo_certificate(tls_dir, "localhost")
    db = Database()
    sink = Sink()
    try:
        def say(f: Figure) -> Figure:
            if verbose:
                print(f"{f.label}: {f.messages} in {f.seconds:.2f}s = {f.msgs_per_s:,.0f} msgs/s", flush=True)
                for p in f.problems:
                    print(f"  PROBLEM: {p}", flush=True)
            return f

        sqlite = say(accept(pair.cert, pair.key, None, 1, accept_n, sink.port))
        accepted = [say(accept(pair.cert, pair.key, db.fresh(), k, accept_n, sink.port)) for k in nodes]
        sqlite_delivered = say(deliver_sqlite(pair.cert, pair.key, deliver_n, sink))
        delivered = [say(deliver(pair.cert, pair.key, db, k, deliver_n, sink)) for k in nodes]
        return Results(sqlite, sqlite_delivered, accepted, delivered)
    finally:
        sink.stop()
        db.close()
        shutil.rmtree(tls_dir, ignore_errors=True)


def format_table(r: Results) -> str:
    lines = [f"{'case':<38} {'msgs':>6} {'msg/s':>8}  ratio"]
    for f, ratio, what in r.rows():
        vs = f"{ratio:.2f} {what}" if ratio is not None else ""
        lines.append(f"{f.label:<38} {f.messages:>6} {f.msgs_per_s:>8,.0f}  {vs}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages: a check that it runs")
    args = parser.parse_args(argv)
    results = measure(args.quick)
    print()
    print(format_table(results))
    print()
    print(NOTES)
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
