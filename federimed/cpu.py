"""The CPU this process runs on, read at run time (never from the machine llama.cpp was built on), and
what llama.cpp may use on it.

llama.cpp built on (or for) an Intel CPU with AMX stores weights that its AMX kernels take in "AMX"
buffers, one of its extra weight buffer types (the others repack weights for AVX2/AVX-512 or ARM
kernels). Its AMX matrix product (llama.cpp as vendored in llama-cpp-python 0.3.36) kills the process
whenever a quantised model reads more than one token at a time: SIGILL at `tileloadd` on a worker
thread here, SIGSEGV on another AMX machine. So where the CPU has AMX the extra buffer types stay off;
elsewhere the repacking they do is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
"""The flags benchmarks record: those that pick llama.cpp's CPU kernels."""
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset[str] | None
    """The kernel's feature flags of the first core; None when they cannot be read (not Linux)."""

    def summary(self) -> dict[str, object]:
        """Model name and which of `REPORTED_FLAGS` it has, for benchmark results."""
        flags = self.flags or frozenset()
        known = self.flags is not None
        return {"model": self.model, "flags": {f: f in flags for f in REPORTED_FLAGS} if known else "unknown"}


def parse_cpuinfo(text: str) -> Cpu:
    """The model name and flags of the first processor in /proc/cpuinfo's `text` (x86 "flags", ARM "Features")."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break  # the first processor's block ends
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags", fields.get("features"))
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or "unknown"
    return Cpu(model, frozenset(flags.split()) if flags is not None else None)


@cache
def this_cpu() -> Cpu:
    """This machine's CPU, read once."""
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return Cpu("unknown", None)


def extra_buffers_safe(flags: frozenset[str] | None) -> bool:
    """Whether llama.cpp may put weights in its extra buffer types on a CPU with `flags`: not where it has
    AMX (see the module docstring), nor where the flags are unknown."""
    return flags is not None and not flags & AMX_FLAGS
