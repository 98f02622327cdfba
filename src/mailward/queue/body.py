"""What both queue backends share about message bodies: the transaction that collects one as it
arrives, and the verified reader `open_body` hands out.

For the reader, a backend says how to load chunk `seq`, whether the message still exists, and how to hold a
corrupt message; this class owns the rule that matters: the last chunk is handed out only after
the whole body matched its recorded length and sha256, so a consumer that streams the body onward
never receives all of a damaged message. It gets CorruptMessage instead and must abandon the
transfer (never send the final dot).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from types import TracebackType
from typing import IO, NoReturn, Self

from mailward.queue import Envelope, MessageNotFound, QueueError, Recipient, new_queue_id

__all__ = ["ReceivingTransaction", "VerifiedBodyReader"]


class VerifiedBodyReader(AsyncIterator[bytes], ABC):
    def __init__(self, id: str, size: int, digest: str, chunks: int) -> None:
        self.id = id
        self.size = size
        self.digest = digest
        self._chunks = chunks
        self._next = 0
        self._ahead: bytes | None = None
        self._hash = hashlib.sha256()
        self._received = 0
        self._done = False

    @abstractmethod
    async def _load(self, seq: int) -> bytes | None:
        """Chunk `seq`, already passed through `_count`; None if it is not stored."""

    @abstractmethod
    async def _exists(self) -> bool:
        """Whether the message is still queued (a missing chunk of a deleted one is no damage)."""

    @abstractmethod
    async def _corrupt(self, detail: str) -> NoReturn:
        """Hold the message for the operator and raise CorruptMessage."""

    def _count(self, data: bytes) -> None:
        self._hash.update(data)
        self._received += len(data)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._ahead is None and self._next < self._chunks:
            self._ahead = await self._fetch()
        if self._next < self._chunks:
            out, self._ahead = self._ahead, await self._fetch()
            assert out is not None
            return out
        self._done = True
        last, self._ahead = self._ahead, None
        if self._received != self.size or self._hash.hexdigest() != self.digest:
            await self._corrupt(
                f"body does not match its digest ({self._received} of {self.size} bytes read)")
        if last is None:
            raise StopAsyncIteration
        return last

    async def read(self) -> bytes:
        """The whole (verified) body; for small messages and tools, not for the delivery path."""
        return b"".join([chunk async for chunk in self])

    async def _fetch(self) -> bytes:
        seq = self._next
        self._next += 1
        data = await self._load(seq)
        if data is None:
            self._done = True
            if not await self._exists():
                raise MessageNotFound(self.id)
            await self._corrupt(f"body chunk {seq} of {self._chunks} is missing")
        return data


class ReceivingTransaction(ABC):
    """What both backends' transactions share while a message arrives: its id, the recipients
    (an exact duplicate address is kept once), and the body in memory, or in an unnamed spool
    file once it outgrows `spool_threshold`, with its running length and sha256.

    A backend adds `commit` and `abort`, and says where a spool file lives and what a failed
    spool write becomes; `_forget` drops the transaction from its queue's list of live ones.
    """

    def __init__(self, envelope: Envelope, spool_threshold: int) -> None:
        self._envelope = envelope
        self._id = new_queue_id()
        self._spool_threshold = spool_threshold
        self._recipients: list[Recipient] = []
        self._addresses: set[str] = set()
        self._buffer = bytearray()
        self._spool: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._state = "open"  # open | committing | committed | failed | aborted

    @property
    def id(self) -> str:
        return self._id

    @property
    def envelope(self) -> Envelope:
        return self._envelope

    @property
    def size(self) -> int:
        return self._size

    @abstractmethod
    def _new_spool(self) -> IO[bytes]:
        """An empty, unnamed file for a body too large to keep in memory."""

    @abstractmethod
    def _spool_error(self, exc: OSError) -> QueueError:
        """The QueueError a failed spool write becomes (the server answers 451 to any)."""

    @abstractmethod
    def _forget(self) -> None:
        """Drop this transaction from the queue's live ones."""

    @abstractmethod
    async def abort(self) -> None: ...

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"transaction {self._id} is {self._state}")

    async def add_rcpt(self, recipient: Recipient) -> None:
        self._require_open()
        if recipient.address not in self._addresses:
            self._addresses.add(recipient.address)
            self._recipients.append(recipient)

    async def write_body(self, chunk: bytes) -> None:
        self._require_open()
        if not chunk:
            return
        # Written from the event loop on purpose: an unsynced write lands in the page cache in
        # microseconds, less than a hop to a thread would cost for every chunk.
        try:
            if self._spool is None and len(self._buffer) + len(chunk) > self._spool_threshold:
                self._spool = self._new_spool()
                self._spool.write(self._buffer)
                self._buffer = bytearray()
            if self._spool is not None:
                self._spool.write(chunk)
            else:
                self._buffer += chunk
        except OSError as exc:
            self._fail()
            raise self._spool_error(exc) from exc
        self._hash.update(chunk)
        self._size += len(chunk)

    def _release_body(self) -> None:
        self._buffer = bytearray()
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _fail(self, state: str = "failed") -> None:
        self._state = state
        self._release_body()
        self._forget()

    def _shutdown(self) -> None:
        # The queue is closing: an open transaction can no longer commit.
        if self._state == "open":
            self._fail("aborted")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._state != "committed":
            await self.abort()
