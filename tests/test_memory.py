"""Memory of a training process: freed activations go back to the system, a preloaded allocator runs
training, and activation checkpointing and micro-batches trade memory for compute without changing what
is learned."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from gradient_support import adapter_and_batch, adapter_and_examples, adapter_grads, forward_passes, loss_and_grads

from federimed import memory
from federimed.config import TrainSettings
from federimed.memory import allocator_library, with_allocator
from federimed.training import accumulate_gradients, collate, set_checkpointing, train_local

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


def test_micro_batches_accumulate_the_whole_batch_gradient(base) -> None:
    peft, examples, pad_id = adapter_and_examples(base)
    assert len({len(e.input_ids) for e in examples}) > 1  # passes of different widths and padding
    assert len({e.labelled for e in examples}) > 1  # weighting by examples instead of tokens would show
    peft.train()
    whole_loss, whole_grads = loss_and_grads(peft, collate(examples, pad_id, torch.device("cpu")))
    for size, widths in ((1, [1, 1, 1, 1]), (3, [3, 1])):
        peft.zero_grad(set_to_none=True)
        with forward_passes(peft) as passes:
            loss, tokens = accumulate_gradients(peft, examples, pad_id, torch.device("cpu"), size, nullcontext())
        assert passes == widths
        assert loss == pytest.approx(whole_loss, rel=1e-5), size
        torch.testing.assert_close(adapter_grads(peft), whole_grads, rtol=1e-4, atol=1e-6)
        assert tokens == sum(len(e.input_ids) for e in examples)
    peft.zero_grad(set_to_none=True)


def test_train_local_steps_alike_with_micro_batches(base) -> None:
    """`TrainSettings.micro_batch_size` reaches the training loop and leaves the step where it was."""
    peft, examples, _ = adapter_and_examples(base)

    def adapter() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in peft.state_dict().items() if "lora_" in k}

    start = adapter()

    def one_step(micro: int) -> tuple[float, list[int], dict[str, torch.Tensor]]:
        peft.load_state_dict(start, strict=False)
        settings = TrainSettings(batch_size=4, seq_len=128, precision="fp32", micro_batch_size=micro)
        with forward_passes(peft) as passes:
            result = train_local(peft, base[1], examples, settings, steps=1)
        return result.loss, passes, adapter()

    (whole_loss, whole_passes, whole), (micro_loss, micro_passes, micro) = one_step(0), one_step(1)
    peft.load_state_dict(start, strict=False)
    assert (whole_passes, micro_passes) == ([4], [1, 1, 1, 1])
    assert micro_loss == pytest.approx(whole_loss, rel=1e-5)
    assert any(not torch.equal(whole[k], start[k]) for k in start)  # the step moved the adapter
    # Adam's first step is about ±lr per element, so float noise flips the few elements whose gradient is near
    # zero (the gradients themselves agree to 1e-4: the test above); compare the whole update instead.
    whole_update = torch.cat([(whole[k] - start[k]).flatten() for k in start])
    micro_update = torch.cat([(micro[k] - start[k]).flatten() for k in start])
    assert torch.nn.functional.cosine_similarity(whole_update, micro_update, dim=0) > 0.995


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_allocator_choice(monkeypatch, caplog) -> None:
    installed = {"tcmalloc": None, "jemalloc": "libjemalloc.so.2"}
    monkeypatch.setattr(memory, "allocator_library", installed.get)
    assert with_allocator({"PATH": "/bin"}) == {"PATH": "/bin", "LD_PRELOAD": "libjemalloc.so.2"}  # first installed
    assert "LD_PRELOAD" not in with_allocator({"FEDERIMED_ALLOCATOR": "system"})
    assert with_allocator({"LD_PRELOAD": "libmine.so"})["LD_PRELOAD"] == "libmine.so"
    assert with_allocator({"LD_PRELOAD": "libmine.so"}, "jemalloc")["LD_PRELOAD"] == "libjemalloc.so.2"  # asked for
    assert "LD_PRELOAD" not in with_allocator({"LD_PRELOAD": "libmine.so"}, "system")
    with caplog.at_level("WARNING"):
        assert "LD_PRELOAD" not in with_allocator({}, "tcmalloc")  # asked for but not installed: glibc's
        assert with_allocator({"FEDERIMED_ALLOCATOR": "mimalloc"})["LD_PRELOAD"] == "libjemalloc.so.2"
    assert "FEDERIMED_ALLOCATOR=tcmalloc: the library is not installed" in caplog.text
    assert "FEDERIMED_ALLOCATOR='mimalloc' is none of auto, system, tcmalloc, jemalloc" in caplog.text


_TRAIN_STEP = """
import torch
from federimed.memory import preloaded_allocator, return_freed_memory
layer = torch.nn.Linear(576, 1536)
for _ in range(3):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(torch.randn(8, 200, 576)).float().square().mean()
    loss.backward()
print(preloaded_allocator(), return_freed_memory(), loss.item() > 0)
"""


@pytest.mark.parametrize("name", list(memory.ALLOCATORS))
def test_training_runs_under_each_preloaded_allocator(name: str) -> None:
    """Each allocator the product may preload runs torch's training arithmetic in a child process, so a
    crash fails this test instead of a training run."""
    if not sys.platform.startswith("linux") or allocator_library(name) is None:
        pytest.skip(f"{name} is not installed")
    env = with_allocator(os.environ, name)
    done = subprocess.run([sys.executable, "-c", _TRAIN_STEP], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [name, "False", "True"]  # glibc's heap settings no longer apply there
