"""Crash durability: every id a committer saw survives SIGKILL, and nothing partial is visible.

A child process commits from many concurrent tasks and prints each id only after commit()
returned; the test kills it at a random moment, reopens the queue and checks every printed id.
This proves commit ordering and atomicity against a process crash; power loss additionally
relies on the synchronous=FULL setting, which test_queue_sqlite checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailward.queue import CorruptMessage
from mailward.queue.sqlite import SqliteQueue

CHILD = r"""
import asyncio, hashlib, sys, time
from mailward.queue import Envelope, Recipient
from mailward.queue.sqlite import SqliteQueue

async def main(path):
    # Small chunks and threshold so that bodies span several rows and some spool to a file.
    queue = await SqliteQueue.open(path, chunk_size=4096, spool_threshold=8192)
    envelope = Envelope(sender="load@example.org", client_ip="192.0.2.7", client_helo="load",
                        listener="mx", received_at=time.time())

    async def committer(worker):
        i = 0
        while True:
            body = f"worker {worker} message {i}\r\n".encode() * (1 + (worker * 7 + i * 13) % 700)
            txn = await queue.begin(envelope)
            await txn.add_rcpt(Recipient(f"w{worker}@example.net"))
            await txn.add_rcpt(Recipient("all@example.net"))
            for start in range(0, len(body), 3000):
                await txn.write_body(body[start:start + 3000])
            message_id = await txn.commit()
            sys.stdout.write(f"{message_id} {hashlib.sha256(body).hexdigest()} {len(body)}\n")
            sys.stdout.flush()
            i += 1

    print("ready", flush=True)
    await asyncio.gather(*(committer(w) for w in range(24)))

asyncio.run(main(sys.argv[1]))
"""


def _run_and_kill(script: Path, db: Path, rng: random.Random) -> list[tuple[str, str, int]]:
    child = subprocess.Popen(
        [sys.executable, str(script), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        lines = [child.stdout.readline() for _ in range(rng.randint(1, 300))]
        time.sleep(rng.uniform(0, 0.02))
    finally:
        child.send_signal(signal.SIGKILL)
        rest, errors = child.communicate()
    assert child.returncode == -signal.SIGKILL, errors
    lines.extend(rest.splitlines(keepends=True))
    committed = []
    for line in lines:
        if line.endswith("\n"):  # a line cut by the kill was never a promise
            message_id, digest, size = line.split()
            committed.append((message_id, digest, int(size)))
    return committed


def test_printed_ids_survive_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "committer.py"
    script.write_text(CHILD)
    db = tmp_path / "queue.db"
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    promised: list[tuple[str, str, int]] = []
    for _ in range(5):
        promised += _run_and_kill(script, db, rng)
        assert list((tmp_path / "queue.db-tmp").iterdir()) == [], "spool files must not outlive the process"
    assert len(promised) >= 5, f"seed {seed}"

    async def verify() -> None:
        async with await SqliteQueue.open(db) as queue:
            assert list((tmp_path / "queue.db-tmp").iterdir()) == []
            for message_id, digest, size in promised:
                message = await queue.get(message_id)
                assert message is not None, f"committed {message_id} lost (seed {seed})"
                assert (message.digest, message.size) == (digest, size)
                reader = await queue.open_body(message_id)
                assert hashlib.sha256(await reader.read()).hexdigest() == digest
            # Nothing partial: every stored message, printed or not, is whole and verifies.
            total = await queue.count()
            listed = await queue.list(limit=total + 1)
            assert len(listed) == total >= len(promised)
            for message in listed:
                assert len(message.recipients) == 2
                try:
                    await (await queue.open_body(message.id)).read()
                except CorruptMessage:  # pragma: no cover - the failure being tested for
                    raise AssertionError(f"partial message {message.id} visible (seed {seed})") from None

    asyncio.run(verify())
    assert os.path.exists(db)
