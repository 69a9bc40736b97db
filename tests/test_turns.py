"""The chat's line in front of the engine: first come, first served, each waiting doctor told their place,
and a doctor who leaves (answer done, stop, tab closed) frees the line at once."""

from __future__ import annotations

import asyncio

from federimed.serving.turns import TurnQueue


def test_doctors_are_answered_in_order_and_told_their_place() -> None:
    async def scenario() -> tuple[list[str], dict[str, list[int]]]:
        line, order, told = TurnQueue(), [], {}

        async def doctor(name: str) -> None:
            async def on_wait(ahead: int) -> None:
                told.setdefault(name, []).append(ahead)

            async with line.turn(on_wait):
                order.append(name)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(doctor(n) for n in ("a", "b", "c", "d")))
        assert line.waiting == 0
        return order, told

    order, told = asyncio.run(scenario())
    assert order == ["a", "b", "c", "d"]
    assert told == {"b": [1], "c": [2, 1], "d": [3, 2, 1]}


def test_a_doctor_who_leaves_frees_the_line_at_once() -> None:
    async def scenario() -> list[str]:
        line, order = TurnQueue(), []
        release = asyncio.Event()

        async def doctor(name: str, hold: asyncio.Event | None = None) -> None:
            async with line.turn():
                order.append(name)
                if hold is not None:
                    await hold.wait()

        first = asyncio.create_task(doctor("a", release))
        await asyncio.sleep(0)
        leaving = asyncio.create_task(doctor("b", asyncio.Event()))  # waits, then closes the tab
        last = asyncio.create_task(doctor("c"))
        await asyncio.sleep(0.01)
        assert line.waiting == 3
        leaving.cancel()
        await asyncio.sleep(0.01)
        assert line.waiting == 2
        first.cancel()  # the doctor being answered presses stop
        await asyncio.wait_for(last, 1)
        assert first.cancelled() and leaving.cancelled()
        return order

    assert asyncio.run(scenario()) == ["a", "c"]
