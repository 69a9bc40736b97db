"""Memory of a training process: optionally keep glibc from hoarding freed activations; report the peak.

glibc's malloc serves a large block (a batch's activations) with its own mmap, returned to the system
when freed, but after the first such free it raises that threshold (up to 32 MiB on 64-bit), so later
activations come from the heap, where freed memory stays resident and fragments as batch shapes change:
a LoRA training process on the 2-core Intel Xeon grew from 2.9 GB to 4.9 GB resident over a run. Fixing
the threshold at its initial 128 KiB (`mallopt(M_MMAP_THRESHOLD)`, which also turns off the dynamic
raise) gives every large block back when it is freed: 1.1 GB resident between steps instead of 2.9 GB.
But every batch then maps and faults in fresh pages: training ran at 193 against 519 tokens/s
(bench/results/train_speed.json), so only the low-memory mode (`TrainSettings.checkpointing`) does it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys
from functools import cache

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt parameter number (glibc malloc.h)."""
MMAP_THRESHOLD_BYTES = 128 * 1024


@cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process (once); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
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
