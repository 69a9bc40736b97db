"""Memory of a training process: freed activations go back to the system, and activation checkpointing
trades memory for compute without changing what is learned."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gradient_support import adapter_and_batch, loss_and_grads

from federimed.training import set_checkpointing

_CHURN = """
import sys, psutil, torch
from federimed.memory import return_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory()
big = torch.empty(4 << 20).fill_(1); del big  # a freed 16 MiB block raises glibc's dynamic threshold
blocks = [torch.empty(2 << 20).fill_(1) for _ in range(100)]  # 100 blocks of 8 MiB
keep = blocks[-1]; del blocks  # the last block pins the top of the heap
print(psutil.Process().memory_info().rss >> 20)
"""


def _resident_after_churn(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_leave_the_process() -> None:
    default, fixed = _resident_after_churn("default"), _resident_after_churn("fixed")
    assert default - fixed > 500, (default, fixed)  # about 800 MiB of freed blocks stay with the default heap


def test_checkpointing_keeps_loss_and_gradients(base) -> None:
    peft, batch = adapter_and_batch(base)
    peft.train()

    def with_checkpointing(on: bool) -> tuple[float, torch.Tensor]:
        set_checkpointing(peft, on)
        return loss_and_grads(peft, batch)

    plain_loss, plain_grads = with_checkpointing(False)
    assert not peft.is_activation_checkpointing
    kept_loss, kept_grads = with_checkpointing(True)
    assert peft.is_activation_checkpointing
    set_checkpointing(peft, False)
    peft.zero_grad(set_to_none=True)
    assert kept_loss == pytest.approx(plain_loss, rel=1e-5)
    torch.testing.assert_close(kept_grads, plain_grads, rtol=1e-4, atol=1e-6)
