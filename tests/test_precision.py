"""Training precision: chosen from the CPU's flags at run time; bf16 autocast gives fp32's loss and
gradients within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
from dialogue_samples import TREATMENTS, dialogues

from federimed.config import LoraSettings, TrainSettings
from federimed.precision import autocast_dtype
from federimed.cpu import this_cpu
from federimed.training import batch_loss, collate, encode_dialogues

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
    from federimed.model import add_lora

    model, tokenizer = base
    peft = add_lora(model, LoraSettings(), seed=0)
    with torch.no_grad():  # non-zero lora_B, so that every adapter matrix gets a gradient
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    examples = encode_dialogues(tokenizer, dialogues(4, list(TREATMENTS)), 128)
    batch = collate(examples, tokenizer.pad_token_id or 0, CPU)

    def loss_and_grads(dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
        peft.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss, _ = batch_loss(peft, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in peft.parameters() if p.requires_grad])
        return loss.item(), grads

    fp32_loss, fp32_grads = loss_and_grads(None)
    bf16_loss, bf16_grads = loss_and_grads(torch.bfloat16)
    peft.zero_grad(set_to_none=True)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.01), (fp32_loss, bf16_loss)
    cosine = torch.nn.functional.cosine_similarity(fp32_grads, bf16_grads, dim=0).item()
    assert cosine > 0.97, cosine  # measured 0.98 on an AMX Xeon: bf16 keeps 8 bits of mantissa
    print(f"CPU {this_cpu().model}: fp32 loss {fp32_loss:.4f}, bf16 {bf16_loss:.4f}, gradient cosine {cosine:.4f}")
