"""An engine in its own process: a crash in native code (a llama.cpp segfault) ends one answer with a clear
error instead of the chat server and every doctor's session in it.

`GuardedEngine` starts a child process (spawned, so no native state is shared) that loads the real engine
and answers one request at a time over a pipe: the pieces of a streamed answer (or of several answers
decoded together) as they come, or the ids of a greedy batch. The parent holds only the tokenizer (sent
back by the child once loaded), so it builds prompts as before. A consumer that stops early sets a stop
flag the child checks between pieces; an answer of several that is no longer wanted sets its own flag. If
the child dies, the request in flight raises `EngineCrashed` naming the signal, and the next request
starts a fresh child.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from federimed.serving.backend import Engine, OnBatch, Piece, Stopped

START_TIMEOUT_S = 600.0
"""How long a child may take to load the engine (a first load exports and converts GGUF copies)."""
MAX_TOGETHER = 32
"""Most answers one `stream_together` request decodes together."""


class EngineCrashed(RuntimeError):
    """The engine process died while answering."""


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies, even by SIGKILL (elsewhere a no-op:
    the child then ends at its next send)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _serve(loader: Callable[[], Engine], conn: Any, stop: Any, stops: Any) -> None:
    """The child: load the engine, then answer requests until the pipe closes."""
    _die_with_parent()
    engine = loader()
    conn.send(("ready", (engine.name, engine.tokenizer, engine.context_length)))
    while True:
        try:
            kind, kwargs = conn.recv()
        except EOFError:
            return
        try:
            if kind == "stream":
                for piece in engine.stream(**kwargs):
                    if stop.is_set():
                        break
                    conn.send(("piece", piece))
                conn.send(("done", None))
            elif kind == "together":
                for piece in engine.stream_together(**kwargs, stopped=lambda seq: stop.is_set() or bool(stops[seq])):
                    conn.send(("piece", piece))
                conn.send(("done", None))
            else:
                conn.send(("done", engine.greedy(**kwargs)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class GuardedEngine:
    """The `Engine` that `loader()` returns, run in a child process (see the module docstring)."""

    def __init__(self, loader: Callable[[], Engine]) -> None:
        self._loader = loader
        self._context = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self._conn, child = self._context.Pipe()
        self._stop = self._context.Event()
        self._stops = self._context.Array("b", MAX_TOGETHER, lock=False)
        self._process = self._context.Process(
            target=_serve, args=(self._loader, child, self._stop, self._stops), daemon=True
        )
        self._process.start()
        child.close()
        kind, value = self._receive(START_TIMEOUT_S, "loading the model")
        if kind != "ready":
            raise RuntimeError(f"the engine process could not load the model: {value}")
        inner, self.tokenizer, self.context_length = value
        self.name = f"{inner} (own process)"

    def _receive(self, timeout: float, doing: str, on_poll: Callable[[], None] = lambda: None) -> tuple[str, Any]:
        """The child's next message (`on_poll` is called every 0.1 s meanwhile); `EngineCrashed` if it dies first."""
        waited = 0.0
        while not self._conn.poll(0.1):
            on_poll()
            waited += 0.1
            if not self._process.is_alive() or waited > timeout:
                break
        else:
            try:
                return self._conn.recv()
            except EOFError:
                pass
        self._process.join(5)
        code = self._process.exitcode
        if code is None:
            self._process.kill()
            raise EngineCrashed(f"the engine process did not answer within {timeout:.0f} s while {doing}; restarted")
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise EngineCrashed(f"the engine process died ({why}) while {doing}; this answer is lost, the next one "
                            "starts a fresh engine")

    def _ensure_running(self) -> None:
        if not self._process.is_alive():
            self._start()

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Text pieces of one answer, from the child as it writes them."""
        yield from self._pieces("stream", {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens,
                                           "temperature": temperature})  # fmt: skip

    def stream_together(
        self, prompts: Sequence[list[int]], *, max_new_tokens: Sequence[int], stopped: Stopped
    ) -> Iterator[Piece]:
        """Pieces of several greedy answers from the child; an answer `stopped` names is stopped there."""
        if len(prompts) > MAX_TOGETHER:
            raise ValueError(f"at most {MAX_TOGETHER} answers together, got {len(prompts)}")

        def forward_stops() -> None:
            for seq in range(len(prompts)):
                if not self._stops[seq] and stopped(seq):
                    self._stops[seq] = 1

        kwargs = {"prompts": [list(p) for p in prompts], "max_new_tokens": list(max_new_tokens)}
        yield from self._pieces("together", kwargs, forward_stops)

    def _pieces(self, request: str, kwargs: dict[str, Any], on_message: Callable[[], None] = lambda: None) -> Iterator[Any]:
        """Send one streaming request and yield the child's pieces until it is done (`on_message` is called
        before each message is awaited and while it is)."""
        with self._lock:
            self._ensure_running()
            self._stop.clear()
            self._stops[:] = bytes(MAX_TOGETHER)
            self._conn.send((request, kwargs))
            kind = "piece"  # of the child's last message
            try:
                while kind == "piece":
                    on_message()
                    kind, value = self._receive(START_TIMEOUT_S, "answering", on_message)
                    if kind == "piece":
                        yield value
            except EngineCrashed:
                kind = "crashed"  # nothing left to stop
                raise
            finally:
                if kind == "piece":  # the consumer stopped: stop the child and drain what it still sends
                    self._stop.set()
                    while self._receive(START_TIMEOUT_S, "stopping")[0] == "piece":
                        pass
        if kind == "error":
            raise RuntimeError(value)

    def greedy(
        self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8, on_batch: OnBatch | None = None
    ) -> list[list[int]]:
        """The greedy answer ids of every prompt, computed in the child (`on_batch` hears once, at the end)."""
        with self._lock:
            self._ensure_running()
            self._conn.send(("greedy", {"prompts": [list(p) for p in prompts], "max_new_tokens": max_new_tokens,
                                        "batch_size": batch_size}))
            kind, value = self._receive(START_TIMEOUT_S, "answering a batch")
        if kind == "error":
            raise RuntimeError(value)
        if on_batch is not None:
            on_batch(len(prompts))
        return value

    def close(self) -> None:
        """Stop the child process."""
        self._conn.close()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
