"""Exposure of canaries in a model (Carlini et al., "The Secret Sharer", 2019) and greedy regurgitation.

A canary's secret is ranked by the log-likelihood of its answer among N alternatives of the same
format: exposure = log2(N + 1) − log2(rank). A model that never saw the canary ranks it anywhere
(expected exposure about 1 bit); one that memorised it ranks it first (log2(N + 1) bits).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from federimed.memorisation.canaries import Canary, CanarySet
from federimed.training import IGNORE, encode_dialogues


def rank(secret: float, alternatives: Sequence[float]) -> int:
    """1 + how many alternatives the model finds strictly likelier than the secret."""
    return 1 + sum(1 for a in alternatives if a > secret)


def exposure(secret: float, alternatives: Sequence[float]) -> float:
    """log2(N + 1) − log2(rank) bits, for a secret's log-likelihood among N alternatives' log-likelihoods."""
    if not alternatives:
        raise ValueError("exposure needs at least one alternative")
    return math.log2(len(alternatives) + 1) - math.log2(rank(secret, alternatives))


@dataclass(frozen=True)
class Exposure:
    """One canary's exposure in one model."""

    canary: str
    copies: int
    rank: int
    alternatives: int
    exposure: float
    log_likelihood: float
    """Log-likelihood (nats) of the canary's answer, secret included."""


@torch.no_grad()
def answer_log_likelihoods(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dialogues: Sequence[dict], seq_len: int,
    batch_size: int = 16,
) -> list[float]:
    """Log-likelihood (nats) of each dialogue's assistant answer given its prompt.

    Made for many dialogues that share one prompt (a canary and its alternatives): their longest common
    token prefix runs through the model once, and only the differing tails run, in batches, on its cache.
    """
    examples = encode_dialogues(tokenizer, dialogues, seq_len)
    if len(examples) != len(dialogues):
        raise ValueError(f"{len(dialogues) - len(examples)} dialogue(s) do not fit seq_len={seq_len}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shared = min(_common_prefix([e.input_ids for e in examples]), min(e.first_label for e in examples)) - 1
    was_training = model.training
    model.eval()
    prefix = None
    if shared > 0:
        prefix = model(input_ids=examples[0].input_ids[None, :shared].to(device), use_cache=True,
                       logits_to_keep=1).past_key_values
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    scores = [0.0] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        tails = [examples[i] for i in chunk]
        width = max(len(e.input_ids) for e in tails) - shared
        ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
        labels = torch.full((len(tails), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(tails), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for row, example in enumerate(tails):
            n = len(example.input_ids) - shared
            ids[row, :n], labels[row, :n], mask[row, shared : shared + n] = (
                example.input_ids[shared:], example.labels[shared:], 1)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(tails))
        positions = torch.arange(shared, shared + width).expand(len(tails), -1)
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            past_key_values=cache, use_cache=cache is not None,
        ).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:].to(device), ignore_index=IGNORE, reduction="none")
        for i, total in zip(chunk, (-nll.sum(dim=1)).tolist()):
            scores[i] = total
    model.train(was_training)
    return scores


def _common_prefix(sequences: Sequence[torch.Tensor]) -> int:
    """Length of the longest token prefix all `sequences` share."""
    first, length = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        differs = (first[:length] != other[:length]).nonzero()
        length = int(differs[0]) if len(differs) else length
    return length


def measure(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, canaries: CanarySet, alternatives: int, seq_len: int,
    batch_size: int = 16, on_canary: Callable[[Exposure], None] | None = None,
) -> list[Exposure]:
    """Exposure of every canary (planted and control) among `alternatives` same-format secrets;
    `on_canary` sees each result as it is ready."""
    results = []
    for canary in canaries.canaries:
        dialogues = [canary.dialogue(), *(canary.dialogue(alt) for alt in canaries.alternatives(canary, alternatives))]
        secret, *others = answer_log_likelihoods(model, tokenizer, dialogues, seq_len, batch_size)
        results.append(Exposure(canary.id, canary.copies, rank(secret, others), alternatives,
                                exposure(secret, others), secret))
        if on_canary is not None:
            on_canary(results[-1])
    return results


@torch.no_grad()
def greedy_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, canaries: Sequence[Canary], max_new_tokens: int = 24
) -> list[str]:
    """What the model answers, greedily, to each canary's prompt (one left-padded batch)."""
    texts = [tokenizer.apply_chat_template(c.prompt(), tokenize=False, add_generation_prompt=True) for c in canaries]
    device = next(model.parameters()).device
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    was_training = model.training
    model.eval()
    output = model.generate(
        **encoded.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def reproduces(answer: str, secret: Sequence[str]) -> bool:
    """Whether a generated answer names the secret's drugs in the secret's order."""
    text = answer.lower()
    positions = [text.find(drug.lower()) for drug in secret]
    return all(p >= 0 for p in positions) and positions == sorted(positions)
