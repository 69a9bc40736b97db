"""Memory of a training process: the malloc it runs with, glibc's heap settings, and its peak.

glibc's malloc serves a large block (a batch's activations) with its own mmap, returned to the system
when freed, but after the first such free it raises that threshold (up to 32 MiB on 64-bit), so later
activations come from the heap, where freed memory stays resident and fragments as batch shapes change:
the general hospital's ClientApp held 4.9 GB after one pass. Fixing the threshold at its initial 128 KiB
(`return_freed_memory`) gives every large block back, but every batch then faults in fresh pages: a third
of the speed. A preloaded tcmalloc (`with_allocator`, for training stages and SuperNodes) reuses freed
blocks without that growth: 3.6 GB for the same pass, 11 % faster (README 'Memory per hospital').
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt parameter number (glibc malloc.h)."""
MMAP_THRESHOLD_BYTES = 128 * 1024


@cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process (once); False where the C library is not glibc, or
    where another malloc was preloaded (`with_allocator`), which glibc's settings do not reach."""
    if not sys.platform.startswith("linux"):
        return False
    if preloaded := preloaded_allocator():
        log.debug("malloc is %s: glibc's mmap threshold does not apply", preloaded)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the heap may keep freed activations")
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


ALLOCATORS = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}
"""malloc replacements a training process may preload (name: library), in order of preference."""
ALLOCATOR_VARIABLE = "FEDERIMED_ALLOCATOR"


def preloaded_allocator() -> str | None:
    """The name of the allocator of ALLOCATORS this process runs with, or None (glibc's malloc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name, library in ALLOCATORS.items() if f"lib{library}." in maps), None)


@cache
def allocator_library(name: str) -> str | None:
    """The shared library of allocator `name` (a key of ALLOCATORS) installed here, or None."""
    return ctypes.util.find_library(ALLOCATORS[name])


def with_allocator(env: Mapping[str, str], allocator: str | None = None) -> dict[str, str]:
    """`env` for a training child process, with a malloc that does not hoard freed activations preloaded.

    `allocator` (default: `$FEDERIMED_ALLOCATOR`, else "auto"): "auto" takes the first of ALLOCATORS that is
    installed (Debian libtcmalloc-minimal4, libjemalloc2), "system" keeps glibc's. An LD_PRELOAD in `env` is
    kept, unless `allocator` is given here: then the caller (a benchmark, a test) asks for exactly that malloc.
    """
    if allocator:
        env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    allocator = allocator or env.get(ALLOCATOR_VARIABLE, "auto")
    if not sys.platform.startswith("linux"):
        return dict(env)
    if allocator not in ("auto", "system", *ALLOCATORS):
        log.warning("%s=%r is none of auto, system, %s: taking auto",
                    ALLOCATOR_VARIABLE, allocator, ", ".join(ALLOCATORS))
        allocator = "auto"
    names = {"auto": list(ALLOCATORS), "system": []}.get(allocator, [allocator])
    library = next((lib for name in names if (lib := allocator_library(name))), None)
    if allocator not in ("auto", "system") and library is None:
        log.warning("%s=%s: the library is not installed; training keeps glibc's malloc",
                    ALLOCATOR_VARIABLE, allocator)
    if library is None or env.get("LD_PRELOAD"):
        return dict(env)
    return dict(env) | {"LD_PRELOAD": library}
