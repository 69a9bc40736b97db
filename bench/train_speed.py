"""Tokens per second of `train_local` on its own (no Flower), with the default settings.

Run: `.venv/bin/python bench/train_speed.py [--steps N] [--batch-size B] [--seq-len L]`.
Writes bench/results/train_speed.json. Every synthetic dialogue fills `seq_len` tokens (its case text is
cut to fit) with a short answer, as real case dialogues near the limit do; tokens counts non-padding tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from federimed.config import LoraSettings, ModelSettings, TrainSettings
from federimed.model import add_lora, load_base
from federimed.training import Example, encode_dialogues, train_local

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
_CASE = "A {age}-year-old patient with {finding}, blood pressure 150/95 mmHg, HbA1c 7.9 %, BMI 31. "
_FINDINGS = ("essential hypertension", "type 2 diabetes", "hyperlipidemia", "acute bronchitis", "COPD")
_ANSWERS = ("lisinopril 10 MG Oral Tablet", "metformin hydrochloride 500 MG", "simvastatin 20 MG", "amoxicillin")


def synthetic_examples(tokenizer, count: int, seq_len: int) -> list[Example]:
    """`count` dialogues that each fill `seq_len` tokens, with short answers."""
    dialogues = [
        {
            "id": f"bench-{i}",
            "patient": f"bench-{i}",
            "messages": [
                {"role": "system", "content": "You are a clinical decision-support assistant."},
                {"role": "user", "content": "".join(_CASE.format(age=40 + (i + j) % 45, finding=_FINDINGS[(i + j) % 5])
                                                    for j in range(seq_len // 16)) + "What do you start?"},
                {"role": "assistant", "content": f"Start {_ANSWERS[i % len(_ANSWERS)]}."},
            ],
        }
        for i in range(count)
    ]
    return encode_dialogues(tokenizer, dialogues, seq_len)


def measure_tokens_per_s(
    settings: TrainSettings | None = None,
    *,
    steps: int = 3,
    warmup_steps: int = 1,
    model_settings: ModelSettings | None = None,
    lora: LoraSettings | None = None,
) -> dict:
    """Train `warmup_steps` untimed, then `steps` timed steps of `train_local`; return the measurement."""
    settings = settings or TrainSettings()
    model, tokenizer = load_base(model_settings or ModelSettings())
    model = add_lora(model, lora or LoraSettings(), seed=settings.seed)
    examples = synthetic_examples(tokenizer, 4 * settings.batch_size, settings.seq_len)
    if warmup_steps:
        train_local(model, tokenizer, examples, settings, steps=warmup_steps)
    result = train_local(model, tokenizer, examples, settings, steps=steps, start_step=warmup_steps)
    device = next(model.parameters()).device
    return {
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds_per_step": round(result.seconds / result.steps, 3),
        "steps": result.steps,
        "tokens": result.tokens,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "lora_r": (lora or LoraSettings()).r,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "machine": platform.machine(),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=TrainSettings().batch_size)
    parser.add_argument("--seq-len", type=int, default=TrainSettings().seq_len)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    result = measure_tokens_per_s(TrainSettings(batch_size=args.batch_size, seq_len=args.seq_len), steps=args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
