"""A LoRA model whose every adapter matrix gets a gradient, a fixed batch, and its loss and gradients:
what tests comparing two ways of computing the same step (precision, checkpointing, micro-batches) share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from dialogue_samples import TREATMENTS, dialogues

from federimed.config import LoraSettings
from federimed.training import Example, batch_loss, collate, encode_dialogues


def adapter_and_examples(base) -> tuple[torch.nn.Module, list[Example], int]:
    """The base model wrapped with a seeded LoRA adapter with non-zero lora_B, 4 dialogues of up to 128 tokens
    and the pad id."""
    from federimed.model import add_lora

    model, tokenizer = base
    peft = add_lora(model, LoraSettings(), seed=0)
    with torch.no_grad():  # non-zero lora_B, so that every adapter matrix gets a gradient
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    return peft, encode_dialogues(tokenizer, dialogues(4, list(TREATMENTS)), 128), tokenizer.pad_token_id or 0


def adapter_and_batch(base) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """`adapter_and_examples`'s model and its 4 dialogues as one batch."""
    peft, examples, pad_id = adapter_and_examples(base)
    return peft, collate(examples, pad_id, torch.device("cpu"))


def adapter_grads(peft: torch.nn.Module) -> torch.Tensor:
    """The adapter's gradient, flattened."""
    return torch.cat([p.grad.flatten() for p in peft.parameters() if p.requires_grad])


def loss_and_grads(peft: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The batch's loss and the adapter's gradient, flattened (gradients cleared first)."""
    peft.zero_grad(set_to_none=True)
    loss, _ = batch_loss(peft, batch)
    loss.backward()
    return loss.item(), adapter_grads(peft)


@contextmanager
def forward_passes(peft: torch.nn.Module) -> Iterator[list[int]]:
    """Within the block, the list holds the batch width of each forward pass of `peft`."""
    widths: list[int] = []
    hook = peft.register_forward_hook(lambda _m, _a, kwargs, _o: widths.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    try:
        yield widths
    finally:
        hook.remove()
