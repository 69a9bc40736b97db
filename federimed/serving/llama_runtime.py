"""How FederiMed opens llama.cpp models (llama-cpp-python, version pinned in constraints.txt): extra
weight buffer types chosen for this CPU at run time (`federimed.cpu`), llama.cpp's log routed
to Python logging.

llama-cpp-python's `Llama` does not expose llama.cpp's `use_extra_bufts`: its `__init__` fills the
model parameters from `llama_model_default_params()` and loads the model at once. `load_llama` swaps
that function for the duration of the constructor (the one patch of llama-cpp-python, under a lock) and
checks afterwards that the model was loaded with the value asked for.

llama-cpp-python's own log callback maps ggml's log levels as they were before ggml added DEBUG (level 1),
so with `verbose=False` it still prints every warning, such as the 210 lines "lora for 'blk.N…' cannot
use buft 'AMX', fallback to CPU" of each adapter load. Ours sends whole lines to the logger
"federimed.llama_cpp": errors as errors, warnings as warnings except such harmless fallbacks, the rest
at DEBUG.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator
from functools import cache
from typing import Any

from federimed.cpu import extra_buffers_safe, this_cpu

log = logging.getLogger("federimed.llama_cpp")

_LOADING = threading.Lock()
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
"""ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message)."""
_HARMLESS = ("cannot use buft",)
"""Warnings that only say llama.cpp chose a slower buffer for some tensors: logged at DEBUG."""


def load_llama(model_path: str, *, extra_buffers: bool | None = None, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model_path, **kwargs)` with llama.cpp's extra weight buffer types on or off
    (None: on where this CPU allows them, `federimed.cpu.extra_buffers_safe`)."""
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    wanted = extra_buffers_safe(this_cpu().flags) if extra_buffers is None else extra_buffers
    route_llama_log()
    defaults = bindings.llama_model_default_params

    def with_choice() -> Any:
        params = defaults()
        params.use_extra_bufts = wanted
        return params

    with _LOADING, _swapped(bindings, "llama_model_default_params", with_choice):
        llm = Llama(model_path=model_path, **kwargs)
    if llm.model_params.use_extra_bufts != wanted:
        llm.close()
        raise RuntimeError(
            "llama-cpp-python no longer takes its model parameters from llama_model_default_params(): "
            "federimed.serving.llama_runtime cannot choose llama.cpp's weight buffers (see constraints.txt)"
        )
    return llm


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@cache
def route_llama_log() -> Any:
    """Send llama.cpp's log to the logger "federimed.llama_cpp" from now on (see the module docstring).
    Returns the callback, which the cache keeps alive: llama.cpp holds only its C pointer."""
    import llama_cpp.llama_cpp as bindings

    pending: list[str] = []
    level = [logging.DEBUG]

    @bindings.llama_log_callback
    def callback(ggml_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if ggml_level != 5:
            level[0] = _GGML_LEVELS.get(ggml_level, logging.DEBUG)
        pending.append(text.decode("utf-8", errors="replace"))
        if pending[-1].endswith("\n"):
            line = "".join(pending).strip()
            pending.clear()
            if line:
                log.log(logging.DEBUG if any(h in line for h in _HARMLESS) else level[0], "%s", line)

    bindings.llama_log_set(callback, ctypes.c_void_p(0))
    return callback
