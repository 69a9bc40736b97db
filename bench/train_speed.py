"""Tokens per second of `train_local` on its own (no Flower), per training precision, side by side.

Run: `.venv/bin/python bench/train_speed.py [--steps N] [--batch-size B] [--seq-len L] [--rounds R]`.
Writes bench/results/train_speed.json. Every synthetic dialogue fills `seq_len` tokens (its case text is
cut to fit) with a short answer, as real case dialogues near the limit do; tokens counts non-padding
tokens. The precisions take turns, `--rounds` times, on one model, so that a noisy shared machine slows
them alike; the median of each is reported, with the CPU's model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from federimed.config import LoraSettings, ModelSettings, TrainSettings
from federimed.model import add_lora, load_base
from federimed.precision import autocast_dtype
from federimed.cpu import this_cpu
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


def compare_precisions(
    settings: TrainSettings, precisions: list[str], *, steps: int, rounds: int, warmup_steps: int = 1
) -> dict:
    """Train `steps` timed steps per precision per round, precisions taking turns; medians per precision."""
    model, tokenizer = load_base(ModelSettings())
    model = add_lora(model, LoraSettings(), seed=settings.seed)
    examples = synthetic_examples(tokenizer, 4 * settings.batch_size, settings.seq_len)
    per_precision = {p: settings.model_copy(update={"precision": p}) for p in precisions}
    for chosen in per_precision.values():
        train_local(model, tokenizer, examples, chosen, steps=warmup_steps)
    samples: dict[str, list[dict]] = {p: [] for p in precisions}
    for _ in range(rounds):
        for precision, chosen in per_precision.items():
            result = train_local(model, tokenizer, examples, chosen, steps=steps)
            samples[precision].append({"tokens_per_s": result.tokens_per_s, "seconds_per_step": result.seconds / steps,
                                       "loss": result.loss})
    cpu = this_cpu()
    device = next(model.parameters()).device
    return {
        "precisions": {
            p: {
                "autocast": str(autocast_dtype(p, device, cpu.flags)).removeprefix("torch."),
                "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in runs), 1),
                "seconds_per_step": round(statistics.median(s["seconds_per_step"] for s in runs), 3),
                "runs": [round(s["tokens_per_s"], 1) for s in runs],
            }
            for p, runs in samples.items()
        },
        "steps_per_run": steps,
        "rounds": rounds,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": str(device),
        "cpu": cpu.summary(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_after": round(os.getloadavg()[0], 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per precision and round")
    parser.add_argument("--rounds", type=int, default=3, help="times each precision takes its turn")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=TrainSettings().seq_len)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON file")
    args = parser.parse_args()
    settings = TrainSettings(batch_size=args.batch_size, seq_len=args.seq_len)
    result = compare_precisions(settings, ["fp32", "bf16"], steps=args.steps, rounds=args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
