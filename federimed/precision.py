"""The arithmetic of local training, chosen at run time from the CPU's flags (never assumed).

On a CPU with bf16 matrix units (Intel AMX, or AVX512-BF16), torch's bf16 matrix products run several
times faster than fp32 ones; elsewhere bf16 is emulated and slower. "auto" therefore trains under bf16
autocast only where the CPU has them: the weights, the optimizer state and the loss stay fp32, and only
the matrix products (linear layers, attention) run in bf16. On CUDA the model is already loaded in
bf16 where that is the default (`federimed.model.placement`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from federimed.cpu import this_cpu

PRECISIONS = ("auto", "fp32", "bf16")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""CPU flags of native bf16 matrix arithmetic."""


def autocast_dtype(precision: str, device: torch.device, flags: frozenset[str] | None) -> torch.dtype | None:
    """The dtype training runs its matrix products in under autocast (None: as the weights are)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type != "cpu":
        return None
    if precision == "bf16" or flags is not None and flags & BF16_FLAGS:
        return torch.bfloat16
    return None


def training_autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of `precision` on `device`, for this machine's CPU."""
    dtype = autocast_dtype(precision, device, this_cpu().flags)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
