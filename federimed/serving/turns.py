"""The doctors' line in front of a chat server's engine, first come first served, each waiting doctor told how
many are ahead. With `max_together` > 1, answers waiting when the engine frees up are decoded together
(`Engine.stream_together`), up to that many. A doctor who presses stop or closes the tab (the consumer is
cancelled or closed) leaves the line at once, or has their answer stopped at the next decoding step while
the others go on.

Greedy answers decoded together are the ones each gets alone (tests/test_fast_path.py); a sampled answer
(temperature > 0) is decoded on its own, in its turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, field

from federimed.serving.backend import Engine

OnWait = Callable[[int], Awaitable[None]]
"""Told how many doctors are ahead, each time that number changes while waiting, and 0 when the turn comes
(only to a doctor who was told a place)."""
DEFAULT_TOGETHER = 8
"""Up to 8 answers decoded together by default, chosen by measurement (bench/results/load.json, 2-core
Intel Xeon): against one at a time, 20 doctors were served in 56 s instead of 70, with first tokens at
20.6 s median and 31.9 s 95th percentile instead of 32.9 and 34.7; each doctor's answer streams at about
9 tokens/s instead of 30 (10 doctors: 95th percentile 20.7 s against 16.6, the one level where it lost)."""


@dataclass(eq=False)
class _Request:
    engine: Engine
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False
    cancelled: bool = False


class AnswerLine:
    """Shares engines between the chats of one server (one event loop)."""

    def __init__(self, max_together: int = DEFAULT_TOGETHER) -> None:
        self.max_together = max_together
        self._pending: list[_Request] = []
        self._running: list[_Request] = []
        self._changed = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Doctors in line, those being answered included."""
        return len(self._pending) + len(self._running)

    async def stream(
        self, engine: Engine, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
        on_wait: OnWait | None = None,
    ) -> AsyncIterator[str]:  # fmt: skip
        """The pieces of one answer, once its turn comes (telling `on_wait` the place in line until then)."""
        request = _Request(engine, list(prompt_ids), max_new_tokens, temperature)
        self._pending.append(request)
        if self._worker is None:
            self._worker = asyncio.create_task(self._work())
        try:
            told = None
            while not request.started:
                changed = self._changed
                ahead = len(self._running) + self._pending.index(request)
                if on_wait is not None and ahead != told and ahead > 0:
                    told = ahead
                    await on_wait(ahead)
                await changed.wait()  # at once if the line moved meanwhile
            if on_wait is not None and told is not None:
                await on_wait(0)  # this doctor's turn has come
            while (item := await request.pieces.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)
                self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _next_batch(self) -> list[_Request]:
        """The first request in line, with the greedy ones right behind it on the same engine (a sampled one
        alone): nobody is answered before someone who came first."""
        batch = [self._pending[0]]
        if batch[0].temperature > 0:
            return batch
        for request in self._pending[1 : self.max_together]:
            if request.engine is not batch[0].engine or request.temperature > 0:
                break
            batch.append(request)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._next_batch()
                for request in batch:
                    self._pending.remove(request)
                    request.started = True
                self._running = batch
                self._notify()
                await loop.run_in_executor(None, _decode, loop, batch)
                self._running = []
                self._notify()
        finally:
            self._worker = None


def _decode(loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
    """Run one batch on its engine (a worker thread), handing each piece to its doctor's queue."""

    def hand(request: _Request, item: str | BaseException | None) -> None:
        loop.call_soon_threadsafe(request.pieces.put_nowait, item)

    engine = batch[0].engine
    try:
        if batch[0].temperature > 0:
            (request,) = batch
            if not request.cancelled:
                pieces = engine.stream(request.prompt_ids, max_new_tokens=request.max_new_tokens, temperature=request.temperature)
                with closing(pieces):
                    for piece in pieces:
                        if request.cancelled:
                            break
                        hand(request, piece)
            hand(request, None)
            return
        together = engine.stream_together(
            [r.prompt_ids for r in batch], max_new_tokens=[r.max_new_tokens for r in batch],
            stopped=lambda seq: batch[seq].cancelled,
        )  # fmt: skip
        with closing(together):
            for seq, piece in together:
                hand(batch[seq], piece)
    except BaseException as exc:  # noqa: BLE001 - handed to every doctor of the batch, raised in their task
        for request in batch:
            hand(request, exc)
