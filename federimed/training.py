"""Dialogues → tokenised examples (loss on assistant turns only) and the one local LoRA training loop.

The same `train_local` runs inside each federated client and in the centralized / local-only baselines.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import PreTrainedTokenizerBase

from federimed.config import TrainSettings
from federimed.cpu import this_cpu
from federimed.memory import return_freed_memory
from federimed.precision import autocast_dtype, training_autocast
from federimed.progress import ProgressLines

log = logging.getLogger(__name__)

IGNORE = -100
GROUP_BATCHES = 16
"""Length grouping: batches are formed by length within groups of this many batches of a pass."""
ROLES = ("system", "user", "assistant")


class DialogueError(ValueError):
    """A dialogue file or line does not follow the dialogue contract."""


@dataclass(frozen=True)
class Example:
    """One tokenised dialogue: labels are IGNORE everywhere except the assistant turns."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    truncated: int = 0
    """How many tokens were cut from the start of the user turn to fit `seq_len`."""

    @property
    def first_label(self) -> int:
        """Index of the first labelled token."""
        return int((self.labels != IGNORE).nonzero()[0])

    @property
    def labelled(self) -> int:
        """How many tokens carry a label and follow a token to predict them from (what `batch_loss` averages)."""
        return int((self.labels[1:] != IGNORE).sum())


@dataclass(frozen=True)
class TrainResult:
    """What one call of `train_local` did."""

    loss: float
    """Mean training loss over the steps (assistant tokens only)."""
    steps: int
    examples_seen: int
    tokens: int
    """Non-padding tokens fed through the model."""
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def load_dialogues(path: Path) -> list[dict]:
    """Read a dialogue JSONL file: {"id", "patient", "messages": [system, user, assistant, ...]} per line."""
    dialogues = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                dialogue = json.loads(line)
                _check_dialogue(dialogue)
            except (json.JSONDecodeError, DialogueError) as err:
                raise DialogueError(f"{path}, line {number}: {err}") from None
            dialogues.append(dialogue)
    return dialogues


def _check_dialogue(dialogue: object) -> None:
    if not isinstance(dialogue, dict):
        raise DialogueError("expected a JSON object")
    for key in ("id", "patient"):
        if not isinstance(dialogue.get(key), str):
            raise DialogueError(f"{key!r} must be a string")
    messages = dialogue.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise DialogueError("'messages' must be a list of at least a user and an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DialogueError(f"message {i} needs a role among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise DialogueError(f"message {i} ({message['role']}) has no text content")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise DialogueError("'messages' must hold a user turn and end with an assistant turn")


def encode_dialogues(
    tokenizer: PreTrainedTokenizerBase, dialogues: Sequence[dict], seq_len: int
) -> list[Example]:
    """Tokenise dialogues with the chat template; only assistant tokens carry labels.

    Too long a dialogue loses tokens from the start of its first user turn (counted in `Example.truncated`).
    A dialogue whose answer cannot fit even with an empty user turn is left out with a warning naming it.
    """
    examples, too_long = [], []
    for position, dialogue in enumerate(dialogues):
        example = _encode(tokenizer, dialogue["messages"], seq_len)
        if example is None:
            too_long.append(f"#{position} ({dialogue.get('id', '?')})")
        else:
            examples.append(example)
    truncated = sum(1 for e in examples if e.truncated)
    if truncated:
        log.info("%d of %d dialogues had their user turn shortened to fit %d tokens", truncated, len(examples), seq_len)
    if too_long:
        log.warning(
            "left out %d dialogue(s) whose answer does not fit seq_len=%d even without the case text: %s",
            len(too_long), seq_len, ", ".join(too_long),
        )
    return examples


def _encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict], seq_len: int) -> Example | None:
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    original = None
    while True:
        ids, labels, user_offsets = _tokenise(tokenizer, messages, user)
        original = len(user_offsets) if original is None else original
        excess = len(ids) - seq_len
        if excess <= 0:
            return Example(torch.tensor(ids), torch.tensor(labels), original - len(user_offsets))
        if excess >= len(user_offsets):
            return None
        content = messages[user]["content"]
        messages[user] = {"role": "user", "content": content[max(user_offsets[excess], 1) :].lstrip()}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenise(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], user: int
) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels (each answer and the token that closes its turn), and the character offsets
    (within the user content) of the user-turn tokens."""
    text = _render(tokenizer, messages)
    answers = []  # character spans of assistant contents
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], True)
            if not text.startswith(prompt) or not text.startswith(_render(tokenizer, messages[: i + 1])):
                raise DialogueError("the tokenizer's chat template does not render dialogue prefixes stably")
            start = text.index(message["content"], len(prompt))
            answers.append((start, start + len(message["content"])))
    user_start = text.index(messages[user]["content"], len(_render(tokenizer, messages[:user])) if user else 0)
    user_end = user_start + len(messages[user]["content"])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, user_offsets = encoded["input_ids"], [], []
    ends_turn = False  # the token right after an answer (its end-of-turn marker) is labelled too
    for token, (start, _) in zip(ids, encoded["offset_mapping"]):
        in_answer = any(a <= start < b for a, b in answers)
        labels.append(token if in_answer or ends_turn else IGNORE)
        ends_turn = in_answer
        if user_start <= start < user_end:
            user_offsets.append(start - user_start)
    return ids, labels, user_offsets


def lr_at(step: int, total_steps: int, settings: TrainSettings) -> float:
    """Learning rate at global `step` (0-based): linear warm-up, then cosine decay to lr * lr_min_ratio."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    decay_steps = max(total_steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / decay_steps, 1.0)
    floor = settings.lr * settings.lr_min_ratio
    return floor + 0.5 * (settings.lr - floor) * (1 + math.cos(math.pi * progress))


def collate(
    examples: Sequence[Example], pad_id: int, device: torch.device, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Left-pad a batch to its longest example rounded up to `pad_to_multiple_of`, so every answer ends at
    the last position and batches take few distinct shapes.

    Returns input_ids, attention_mask, position_ids, labels and `keep`: how many final positions hold
    all the predictions that carry a label (logits are computed only for those; also rounded up).
    """
    width = _round_up(max(len(e.input_ids) for e in examples), pad_to_multiple_of)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    keep = 1
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, width - n :] = example.input_ids
        labels[row, width - n :] = example.labels
        mask[row, width - n :] = 1
        keep = max(keep, n - example.first_label + 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    keep = _round_up(keep, pad_to_multiple_of)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()} | {"keep": min(keep, width)}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over labelled tokens, and how many there were.

    Logits come only for the last `keep` positions: the vocabulary projection dominates the cost of a
    small model, and only answer tokens need it.
    """
    keep = batch["keep"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
    ).logits
    targets = batch["labels"][:, -keep + 1 :] if keep > 1 else batch["labels"][:, :0]
    logits = logits[:, :-1]
    count = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE)
    return loss, count


def accumulate_gradients(
    model: nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device, micro_batch_size: int,
    autocast: AbstractContextManager, pad_to_multiple_of: int = 1,
) -> tuple[float, int]:
    """Backpropagate the batch's mean token loss in passes of `micro_batch_size` examples (0: one pass).

    Each pass's loss is weighted by its share of the batch's labelled tokens, so the accumulated gradient is
    the whole batch's (with LoRA dropout, in expectation: the masks are drawn pass by pass); only one pass's
    activations are alive at a time. Returns the batch's loss and its non-padding tokens.
    """
    size = micro_batch_size or len(examples)
    total = sum(e.labelled for e in examples)
    loss_sum, tokens = torch.zeros((), device=device), 0
    for start in range(0, len(examples), size):
        batch = collate(examples[start : start + size], pad_id, device, pad_to_multiple_of)
        with autocast:
            loss, count = batch_loss(model, batch)
        weight = count / total
        (loss * weight).backward()
        loss_sum += loss.detach().float() * weight
        tokens += int(batch["attention_mask"].sum())
    return loss_sum.item(), tokens


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices, one shuffled pass over the data after another.

    Each pass is cut into groups of `GROUP_BATCHES` batches; within a group, dialogues of similar length
    share a batch, and the pass's batches come in shuffled order. On the demo's general hospital this cut
    the padded tokens from 22 % of the real ones (random batches of 4) to 2 %.
    """
    span = batch_size * GROUP_BATCHES
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=lambda i: lengths[i])
            batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        for chosen in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[chosen]


def train_local(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    examples: Sequence[Example],
    settings: TrainSettings,
    *,
    steps: int | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
    progress: bool = False,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model` for `steps` AdamW steps on `examples`.

    The learning rate follows one cosine schedule over `total_steps` global steps, of which this call runs
    `start_step` … `start_step + steps - 1`: a federated client in round R of N passes
    `start_step=(R-1)*local_steps, total_steps=N*local_steps`. Sampling and dropout are seeded from
    `settings.seed` and `start_step`, so a fixed seed gives the same adapter on CPU. A fresh optimizer is
    made per call (as in each federated round). `proximal_mu` > 0 adds FedProx's μ/2 ‖w − w₀‖² to the loss,
    w₀ being the trainable weights this call starts from (the global adapter of a federated round).
    """
    if not examples:
        raise ValueError("train_local needs at least one example")
    if not proximal_mu >= 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    steps = settings.local_steps if steps is None else steps
    total_steps = start_step + steps if total_steps is None else total_steps
    if steps < 1 or total_steps < start_step + steps:
        raise ValueError(f"cannot run steps {start_step}..{start_step + steps - 1} of a {total_steps}-step schedule")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with add_lora first")
    device = params[0].device
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    anchors = [p.detach().clone() for p in params] if proximal_mu else []
    seed = settings.seed * 1_000_003 + start_step
    sampler = length_grouped_batches(
        [len(e.input_ids) for e in examples], settings.batch_size, torch.Generator().manual_seed(seed)
    )
    losses, seen, tokens = [], 0, 0
    if settings.checkpointing:  # the low-memory mode: keep neither activations nor freed heap memory
        return_freed_memory()
    autocast = training_autocast(settings.precision, device)
    set_checkpointing(model, settings.checkpointing)
    model.train()
    started = time.perf_counter()
    kernel = attention_kernel(settings, device, this_cpu().flags)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), attention_for(
        model, kernel
    ), _bar(progress, start_step, steps, total_steps) as bar:
        torch.manual_seed(seed)
        for step in range(start_step, start_step + steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, settings)
            chosen = [examples[i] for i in next(sampler)]
            loss, batch_tokens = accumulate_gradients(
                model, chosen, pad_id, device, settings.micro_batch_size, autocast, settings.padding
            )
            if anchors:
                add_proximal_gradient(params, anchors, proximal_mu)
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            seen += len(chosen)
            tokens += batch_tokens
            bar(f"loss {losses[-1]:.3f}")
    return TrainResult(sum(losses) / len(losses), steps, seen, tokens, time.perf_counter() - started)


def add_proximal_gradient(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> None:
    """Add the gradient of FedProx's μ/2 Σ ‖w − w₀‖², μ (w − w₀), to each parameter's gradient."""
    for param, anchor in zip(params, anchors, strict=True):
        if param.grad is not None:
            param.grad.add_(param.detach() - anchor, alpha=mu)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation checkpointing of the (wrapped) transformers model on or off."""
    if not getattr(model, "supports_gradient_checkpointing", False) or model.is_activation_checkpointing == on:
        return
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


def attention_kernel(settings: TrainSettings, device: torch.device, flags: frozenset[str] | None) -> str | None:
    """The attention kernel `settings` train with on `device` (None: the model's own).

    "auto" is "eager" where a CPU trains in bf16: for dialogues this short, plain bf16 matrix products beat
    torch's fused CPU attention, whose backward pass took a quarter of a step. On the demo's dialogues, 297
    against 254 tokens/s, for 340 MB more memory; in fp32 neither was faster (223 against 227), so fp32
    keeps the model's own (bench/train_speed.py, 2-core Intel Xeon with AMX).
    """
    if settings.attention != "auto":
        return settings.attention
    bf16_cpu = device.type == "cpu" and autocast_dtype(settings.precision, device, flags) == torch.bfloat16
    return "eager" if bf16_cpu else None


@contextmanager
def attention_for(model: nn.Module, kernel: str | None) -> Iterator[None]:
    """Within the block, `model` attends with `kernel` (None: as it is)."""
    before = getattr(model.config, "_attn_implementation", None)
    if kernel is None or before in (None, kernel):
        yield
        return
    model.set_attn_implementation(kernel)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextmanager
def _bar(show: bool, start: int, steps: int, total_steps: int) -> Iterator[Callable[[str], None]]:
    """Progress of steps `start` … `start + steps - 1` of a `total_steps` schedule, advanced once per call
    of the yielded function: a transient rich bar on a terminal; elsewhere (output to a log file)
    `ProgressLines`, with the time left for the whole schedule."""
    if not show:
        yield lambda _: None
        return
    console = Console()
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("training", total=steps)
            yield lambda text: bar.update(task, advance=1, description=f"training · {text}")
        return
    lines, done = ProgressLines("training step", start), start

    def line(text: str) -> None:
        nonlocal done
        done += 1
        lines(done, total_steps, text, last=done == start + steps)

    yield line


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int = 8,
    precision: str = "fp32",
    pad_to_multiple_of: int = 1,
) -> tuple[float, int]:
    """Mean loss per assistant token over `examples` (no gradients), and the number of those tokens.

    Training and the federated clients pass their own arithmetic (`precision`): bf16 where the CPU has it
    halved the time of the demo's held-out scoring and moved the loss by 0.002 (3.5862 → 3.5886 on 61
    dialogues)."""
    if not examples:
        raise ValueError("evaluate_loss needs at least one example")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths → little padding
    total, count = 0.0, 0
    for i in range(0, len(ordered), batch_size):
        with training_autocast(precision, device):
            loss, n = batch_loss(model, collate(ordered[i : i + batch_size], 0, device, pad_to_multiple_of))
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count, count
