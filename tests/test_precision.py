"""Training arithmetic: the precision is chosen from the CPU's flags at run time; bf16 autocast gives
fp32's loss and gradients within bf16 rounding, and the CPU's attention kernel gives the fused one's."""

from __future__ import annotations

import pytest
import torch
from gradient_support import adapter_and_batch, loss_and_grads

from federimed.config import TrainSettings
from federimed.cpu import this_cpu
from federimed.precision import autocast_dtype
from federimed.training import attention_kernel

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AMX_XEON = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
COOPER_LAKE = frozenset({"avx2", "avx512f", "avx512_bf16"})
EPYC_ZEN3 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(
    ("precision", "device", "flags", "expected"),
    [
        ("auto", CPU, AMX_XEON, torch.bfloat16),
        ("auto", CPU, COOPER_LAKE, torch.bfloat16),
        ("auto", CPU, EPYC_ZEN3, None),  # bf16 would be emulated: slower
        ("auto", CPU, None, None),  # flags unknown: never assume
        ("fp32", CPU, AMX_XEON, None),
        ("bf16", CPU, EPYC_ZEN3, torch.bfloat16),  # asked for explicitly
        ("auto", CUDA, AMX_XEON, None),  # the model itself is loaded in bf16 on CUDA
    ],
)
def test_precision_follows_the_cpu_flags(precision, device, flags, expected) -> None:
    assert autocast_dtype(precision, device, flags) == expected


@pytest.mark.parametrize(
    ("precision", "attention", "device", "flags", "expected"),
    [
        ("auto", "auto", CPU, AMX_XEON, "eager"),  # bf16 on a CPU: plain products beat the fused kernel
        ("auto", "auto", CPU, EPYC_ZEN3, None),  # fp32: the model's own kernel, as fast and smaller
        ("fp32", "auto", CPU, AMX_XEON, None),
        ("bf16", "auto", CPU, EPYC_ZEN3, "eager"),
        ("auto", "auto", CUDA, AMX_XEON, None),
        ("auto", "sdpa", CPU, AMX_XEON, "sdpa"),  # asked for explicitly
    ],
)
def test_attention_kernel_follows_the_training_precision(precision, attention, device, flags, expected) -> None:
    assert attention_kernel(TrainSettings(precision=precision, attention=attention), device, flags) == expected


def test_unknown_precisions_are_refused() -> None:
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", CPU, AMX_XEON)
    with pytest.raises(ValueError, match="precision"):
        TrainSettings(precision="fp16")


def test_bf16_loss_and_gradients_match_fp32(base) -> None:
    peft, batch = adapter_and_batch(base)

    def with_autocast(dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            return loss_and_grads(peft, batch)

    fp32_loss, fp32_grads = with_autocast(None)
    bf16_loss, bf16_grads = with_autocast(torch.bfloat16)
    peft.zero_grad(set_to_none=True)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.01), (fp32_loss, bf16_loss)
    cosine = torch.nn.functional.cosine_similarity(fp32_grads, bf16_grads, dim=0).item()
    assert cosine > 0.97, cosine  # measured 0.98 on an AMX Xeon: bf16 keeps 8 bits of mantissa
    print(f"CPU {this_cpu().model}: fp32 loss {fp32_loss:.4f}, bf16 {bf16_loss:.4f}, gradient cosine {cosine:.4f}")


def test_eager_attention_gives_the_fused_kernels_loss_and_gradients(base) -> None:
    """bf16 training on a CPU attends with plain matrix products ("eager"): on a padded batch they must
    give what torch's fused kernel gives, to fp32 rounding."""
    peft, batch = adapter_and_batch(base)
    assert not batch["attention_mask"].all()  # padded rows: the mask is used
    before = peft.config._attn_implementation
    try:
        results = {}
        for kernel in ("sdpa", "eager"):
            peft.set_attn_implementation(kernel)
            results[kernel] = loss_and_grads(peft, batch)
    finally:
        peft.set_attn_implementation(before)
        peft.zero_grad(set_to_none=True)
    (fused_loss, fused_grads), (eager_loss, eager_grads) = results.values()
    assert eager_loss == pytest.approx(fused_loss, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(fused_grads, eager_grads, dim=0).item() > 0.9999
