"""The chat's line in front of the engine: answers waiting when the engine frees up are decoded together,
first come first served, each waiting doctor told their place; a doctor who leaves (answer done, stop, tab
closed) frees the line at once, and one who stops mid-answer stops only their own answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence

from federimed.serving.backend import Piece, Stopped
from federimed.serving.turns import AnswerLine


class RecordingEngine:
    """Answers prompt [n] with the pieces "n.0", "n.1", … (max_new_tokens of them), one step per piece of
    every answer in the batch; records each batch; holds a batch while `hold` is clear."""

    name, tokenizer, context_length = "recording", None, 64

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.ended_at: dict[int, int] = {}  # prompt → the step at which its answer ended

    def stream_together(self, prompts: Sequence[list[int]], *, max_new_tokens: Sequence[int], stopped: Stopped) -> Iterator[Piece]:
        self.batches.append([p[0] for p in prompts])
        self.hold.wait(5)
        live = set(range(len(prompts)))
        for step in range(max(max_new_tokens)):
            time.sleep(0.005)  # a decoding step
            for seq in sorted(live):
                if stopped(seq) or step >= max_new_tokens[seq]:
                    live.discard(seq)
                    self.ended_at[prompts[seq][0]] = step
                    yield seq, None
                    continue
                yield seq, f"{prompts[seq][0]}.{step}"
        for seq in sorted(live):
            self.ended_at[prompts[seq][0]] = max(max_new_tokens)
            yield seq, None

    def stream(self, prompt_ids, *, max_new_tokens, temperature):
        self.batches.append([prompt_ids[0]])
        yield from (f"{prompt_ids[0]}.{i}" for i in range(max_new_tokens))


def test_answers_waiting_together_are_decoded_together_in_order_and_told_their_place() -> None:
    engine = RecordingEngine()

    async def scenario() -> tuple[dict[int, str], dict[int, list[int]]]:
        line, answers, told = AnswerLine(max_together=2), {}, {}
        engine.hold.clear()  # the first doctor's answer holds the engine while the others arrive

        async def doctor(n: int) -> None:
            async def on_wait(ahead: int) -> None:
                told.setdefault(n, []).append(ahead)

            answers[n] = "|".join([p async for p in line.stream(engine, [n], max_new_tokens=2, on_wait=on_wait)])

        first = asyncio.create_task(doctor(0))
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(doctor(n)) for n in (1, 2, 3)]
        await asyncio.sleep(0.05)
        engine.hold.set()
        await asyncio.gather(first, *others)
        assert line.waiting == 0
        return answers, told

    answers, told = asyncio.run(scenario())
    assert answers == {n: f"{n}.0|{n}.1" for n in range(4)}
    assert engine.batches == [[0], [1, 2], [3]]  # at most 2 together, first come first served
    assert told == {1: [1, 0], 2: [2, 0], 3: [3, 2, 0]}  # 0: the turn has come


def test_with_max_together_1_doctors_are_answered_one_at_a_time_in_order() -> None:
    engine = RecordingEngine()

    async def scenario() -> None:
        line = AnswerLine(max_together=1)
        engine.hold.clear()
        doctors = [asyncio.create_task(_collect(line, engine, n)) for n in range(3)]
        await asyncio.sleep(0.05)
        engine.hold.set()
        assert await asyncio.gather(*doctors) == ["0.0", "1.0", "2.0"]

    asyncio.run(scenario())
    assert engine.batches == [[0], [1], [2]]


async def _collect(line: AnswerLine, engine: RecordingEngine, n: int) -> str:
    return "".join([p async for p in line.stream(engine, [n], max_new_tokens=1)])


def test_a_doctor_who_leaves_frees_the_line_and_a_stop_ends_only_their_answer() -> None:
    engine = RecordingEngine()

    async def scenario() -> tuple[dict[int, list[str]], list[list[int]]]:
        line, got = AnswerLine(max_together=8), {0: [], 1: [], 2: []}
        engine.hold.clear()

        async def doctor(n: int, stop_after: int | None = None) -> None:
            async for piece in line.stream(engine, [n], max_new_tokens=50):
                got[n].append(piece)
                if len(got[n]) == stop_after:
                    return  # presses stop: the consumer ends

        first = asyncio.create_task(doctor(0))
        await asyncio.sleep(0.05)
        leaving = asyncio.create_task(doctor(9))  # waits, then closes the tab
        stopping, last = asyncio.create_task(doctor(1, stop_after=3)), asyncio.create_task(doctor(2))
        await asyncio.sleep(0.05)
        assert line.waiting == 4
        leaving.cancel()
        await asyncio.sleep(0.05)
        assert line.waiting == 3
        engine.hold.set()
        await asyncio.wait_for(asyncio.gather(first, stopping, last), 5)
        return got, engine.batches

    got, batches = asyncio.run(scenario())
    assert batches == [[0], [1, 2]]  # the doctor who left was never answered
    assert got[1] == ["1.0", "1.1", "1.2"] and len(got[2]) == 50  # the stop ended one answer, not the other
    assert engine.ended_at[1] < 10 and engine.ended_at[2] == 50, engine.ended_at  # the engine saw the stop


def test_an_engine_error_reaches_every_doctor_of_its_batch_and_the_line_goes_on() -> None:
    class Failing(RecordingEngine):
        def stream_together(self, prompts, *, max_new_tokens, stopped):
            if prompts[0][0] == 666:
                raise RuntimeError("engine died")
            yield from super().stream_together(prompts, max_new_tokens=max_new_tokens, stopped=stopped)

    engine = Failing()

    async def scenario() -> list[str]:
        line = AnswerLine(max_together=8)

        async def doctor(n: int) -> str:
            try:
                return "".join([p async for p in line.stream(engine, [n], max_new_tokens=1)])
            except RuntimeError as exc:
                return str(exc)

        together = list(await asyncio.gather(doctor(666), doctor(1)))  # waiting together: one batch
        return together + [await doctor(2)]

    assert asyncio.run(scenario()) == ["engine died", "engine died", "2.0"]
