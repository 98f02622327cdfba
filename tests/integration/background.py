"""A test peer's asyncio server on its own thread and event loop, so synchronous tests (and the
mailward processes they start) can talk to it while they wait.

A peer subclasses `BackgroundServer` as a dataclass and says in `_listen` where and how it
listens; `_closing` may end sessions a client keeps open (mailward parks idle connections).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Self


@dataclass
class BackgroundServer:
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop, kw_only=True, repr=False)
    _server: asyncio.Server | None = field(default=None, kw_only=True, repr=False)
    _thread: threading.Thread | None = field(default=None, kw_only=True, repr=False)

    async def _listen(self) -> asyncio.Server:
        raise NotImplementedError

    async def _closing(self) -> None:
        """Called once the server stopped listening, before it waits for its sessions to end."""

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def serve() -> None:
            self._server = await self._listen()

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(5)
        return self

    def stop(self) -> None:
        """Stop listening and end the thread; also after a `start` that failed to listen."""
        if self._thread is None:
            self._loop.close()
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            await self._closing()
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
