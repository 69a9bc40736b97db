"""Training precision: chosen from the CPU's flags at run time; bf16 autocast gives fp32's loss and
gradients within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
from gradient_support import adapter_and_batch, loss_and_grads

from federimed.config import TrainSettings
from federimed.cpu import this_cpu
from federimed.precision import autocast_dtype

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
