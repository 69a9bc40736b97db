"""The chat's engine runs in its own process: a native crash ends one answer with a clear error, the next
answer starts a fresh engine, and the guarded llama.cpp engine answers exactly as the direct one."""

from __future__ import annotations

from functools import partial

import pytest
from chat_support import CRASH, SLOW, CrashingEngine

from federimed.serving.guarded import EngineCrashed, GuardedEngine
from federimed.serving.select import llama_cpp_problem


def test_a_crash_in_the_engine_ends_one_answer_and_the_next_one_works() -> None:
    engine = GuardedEngine(CrashingEngine)
    try:
        assert list(engine.stream([1, 2], max_new_tokens=3, temperature=0.0)) == ["a", "b", "c"]
        first = engine._process.pid
        with pytest.raises(EngineCrashed, match=r"died \(signal SIGSEGV\) while answering"):
            list(engine.stream([1, CRASH], max_new_tokens=3, temperature=0.0))
        assert list(engine.stream([1, 2], max_new_tokens=2, temperature=0.0)) == ["a", "b"]
        assert engine._process.pid != first  # a fresh engine process
        assert engine.greedy([[1], [2]], max_new_tokens=2) == [[1, 1], [1, 1]]
    finally:
        engine.close()


def test_a_consumer_that_stops_early_leaves_the_engine_ready() -> None:
    engine = GuardedEngine(CrashingEngine)
    try:
        stream = engine.stream([1], max_new_tokens=3, temperature=0.0)
        assert next(stream) == "a"
        stream.close()
        assert list(engine.stream([1], max_new_tokens=3, temperature=0.0)) == ["a", "b", "c"]
    finally:
        engine.close()


def test_answers_together_come_back_piece_by_piece_and_a_stop_reaches_the_child() -> None:
    engine = GuardedEngine(CrashingEngine)
    try:
        pieces = list(engine.stream_together([[1], [2]], max_new_tokens=[2, 3], stopped=lambda seq: False))
        assert pieces == [(0, "a"), (0, "b"), (0, None), (1, "a"), (1, "b"), (1, "c"), (1, None)]
        stopped: set[int] = set()
        got = []
        for seq, piece in engine.stream_together([[SLOW], [2]], max_new_tokens=[3, 3], stopped=lambda seq: seq in stopped):
            got.append((seq, piece))
            stopped.add(0)  # the first doctor presses stop after their first piece
        assert got[0] == (0, "a") and (1, "c") in got and (0, "b") not in got
        with pytest.raises(EngineCrashed, match="while answering"):
            list(engine.stream_together([[1], [CRASH]], max_new_tokens=[1, 1], stopped=lambda seq: False))
        assert list(engine.stream_together([[1]], max_new_tokens=[1], stopped=lambda seq: False)) == [(0, "a"), (0, None)]
    finally:
        engine.close()


@pytest.mark.skipif(llama_cpp_problem() is not None, reason="llama.cpp is not installed")
def test_the_guarded_llama_cpp_engine_answers_as_the_direct_one() -> None:
    from federimed.config import ModelSettings
    from federimed.serving.backend import prompt_ids
    from federimed.serving.select import load_engine

    direct = load_engine(ModelSettings(), None, "llama.cpp")
    guarded = GuardedEngine(partial(load_engine, ModelSettings(), None, "llama.cpp"))
    try:
        ids = prompt_ids(direct.tokenizer, [{"role": "user", "content": "Patient: 58-year-old male\n"
                                             "New diagnosis: Essential hypertension\nQuestion: What treatment?"}])
        assert prompt_ids(guarded.tokenizer, [{"role": "user", "content": "x"}]) == prompt_ids(
            direct.tokenizer, [{"role": "user", "content": "x"}])
        assert guarded.context_length == direct.context_length and guarded.name == "llama.cpp (own process)"
        assert "".join(guarded.stream(ids, max_new_tokens=24, temperature=0.0)) == "".join(
            direct.stream(ids, max_new_tokens=24, temperature=0.0))
    finally:
        guarded.close()


def test_the_engine_process_ends_with_its_parent(tmp_path) -> None:
    """A chat server killed outright (SIGKILL) while its engine is busy leaves no engine process behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = ("import sys; sys.path.insert(0, sys.argv[1]); from chat_support import CrashingEngine; "
              "from federimed.serving.guarded import GuardedEngine; e = GuardedEngine(CrashingEngine); "
              "import threading; threading.Thread(target=lambda: list(e.stream([777], max_new_tokens=1, "
              "temperature=0.0)), daemon=True).start(); print(e._process.pid, flush=True); "
              "import time; time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent)], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"engine process {child} outlived its parent")
