"""First come, first served access to the one engine of a chat server, with each waiting doctor's place in
line. A doctor whose answer ends, who presses stop or who closes the tab (the task is cancelled) leaves the
line at once, and everyone behind moves up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

OnWait = Callable[[int], Awaitable[None]]
"""Told how many doctors are ahead, each time that number changes while waiting."""


class TurnQueue:
    """A FIFO line in front of the engine (one event loop, the chat server's)."""

    def __init__(self) -> None:
        self._line: list[object] = []
        self._changed = asyncio.Condition()

    @property
    def waiting(self) -> int:
        """Doctors in line, the one being answered included."""
        return len(self._line)

    @asynccontextmanager
    async def turn(self, on_wait: OnWait | None = None) -> AsyncIterator[None]:
        """Wait for this doctor's turn (telling `on_wait` the place in line), then hold the engine."""
        ticket = object()
        self._line.append(ticket)
        try:
            async with self._changed:
                told = None
                while (ahead := self._line.index(ticket)) > 0:
                    if on_wait is not None and ahead != told:
                        told = ahead
                        await on_wait(ahead)
                    await self._changed.wait()
            yield
        finally:
            self._line.remove(ticket)
            async with self._changed:
                self._changed.notify_all()
