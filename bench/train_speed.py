"""Tokens per second and peak memory of `train_local` on its own (no Flower), per training configuration.

Run: `.venv/bin/python bench/train_speed.py [--steps N] [--batch-size B] [--seq-len L] [--rounds R] [--data DIR]`.
Writes bench/results/train_speed.json. Configurations: the arithmetic (fp32, or bf16 autocast), the dtype
the frozen base weights are held in (float32 or bfloat16), activation checkpointing off or on, and the
attention kernel (`TrainSettings.attention`: eager, or "+sdpa" torch's fused one; the product's "auto" is
eager for bf16 and sdpa for fp32 on a CPU), the micro-batch ("+micro-N": each step's batch accumulated in
passes of N dialogues, `TrainSettings.micro_batch_size`), the padding ("+pad-N": each batch to a multiple of N
tokens; otherwise the product's choice, `TrainSettings.padding`: 32 with checkpointing, else 1, the longest
dialogue) and the malloc ("+jemalloc", "+tcmalloc": preloaded,
`federimed.memory.with_allocator`; skipped where not installed; glibc's otherwise). Each configuration runs
in its own child process, so that its peak resident memory is its own: what one hospital's training process
needs. "+fixed-heap" fixes glibc's mmap threshold (`federimed.memory.return_freed_memory`, which
checkpointing does under glibc's malloc); each run records the malloc it ran with. Every synthetic dialogue fills `seq_len` tokens (its case text is cut
to fit) with a short answer, as the longest real case dialogues do; tokens counts non-padding tokens. The
configurations take turns, `--rounds` times, so that a noisy shared machine slows them alike; the median
of each is reported, with the CPU's model and flags and each run's first loss (the same batch: the
configurations must agree on it). `--data DIR` trains on the real dialogues of DIR/*/train.jsonl instead
(the demo's hospitals: shorter and of mixed lengths, batched by length as `train_local` does) and writes
bench/results/train_speed_real.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
REAL = Path(__file__).parent / "results" / "train_speed_real.json"
_CASE = "A {age}-year-old patient with {finding}, blood pressure 150/95 mmHg, HbA1c 7.9 %, BMI 31. "
_FINDINGS = ("essential hypertension", "type 2 diabetes", "hyperlipidemia", "acute bronchitis", "COPD")
_ANSWERS = ("lisinopril 10 MG Oral Tablet", "metformin hydrochloride 500 MG", "simvastatin 20 MG", "amoxicillin")


class Config(NamedTuple):
    precision: str
    base_weights: str = "float32"
    checkpointing: bool = False
    fixed_heap: bool = False
    attention: str = "eager"
    micro_batch: int = 0
    allocator: str = "system"
    pad_to_multiple_of: int = 0


CONFIGS = {
    "fp32": Config("fp32"),
    "bf16": Config("bf16"),
    "fp32+sdpa": Config("fp32", attention="sdpa"),
    "bf16+sdpa": Config("bf16", attention="sdpa"),
    "bf16+fixed-heap": Config("bf16", fixed_heap=True),
    "bf16+bf16-weights": Config("bf16", "bfloat16"),
    "bf16+jemalloc": Config("bf16", allocator="jemalloc"),
    "bf16+tcmalloc": Config("bf16", allocator="tcmalloc"),
    "bf16+bf16-weights+jemalloc": Config("bf16", "bfloat16", allocator="jemalloc"),
    "bf16+bf16-weights+micro-2": Config("bf16", "bfloat16", micro_batch=2),
    "bf16+bf16-weights+micro-1": Config("bf16", "bfloat16", micro_batch=1),
    "bf16+bf16-weights+micro-1+jemalloc": Config("bf16", "bfloat16", micro_batch=1, allocator="jemalloc"),
    "bf16+bf16-weights+micro-1+tcmalloc": Config("bf16", "bfloat16", micro_batch=1, allocator="tcmalloc"),
    "fp32+checkpointing": Config("fp32", checkpointing=True, fixed_heap=True),
    "bf16+checkpointing": Config("bf16", checkpointing=True, fixed_heap=True),
    "bf16+checkpointing+tcmalloc": Config("bf16", checkpointing=True, allocator="tcmalloc"),
    "bf16+bf16-weights+checkpointing+tcmalloc": Config("bf16", "bfloat16", checkpointing=True, allocator="tcmalloc"),
    "bf16+bf16-weights+checkpointing": Config("bf16", "bfloat16", checkpointing=True, fixed_heap=True),
    "bf16+tcmalloc+pad-32": Config("bf16", allocator="tcmalloc", pad_to_multiple_of=32),
    "bf16+bf16-weights+checkpointing+tcmalloc+pad-1": Config(
        "bf16", "bfloat16", checkpointing=True, allocator="tcmalloc", pad_to_multiple_of=1
    ),
}


def synthetic_examples(tokenizer, count: int, seq_len: int):
    """`count` dialogues that each fill `seq_len` tokens, with short answers."""
    from federimed.training import encode_dialogues

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


def real_examples(tokenizer, data: Path, seq_len: int):
    """Every training dialogue of the hospitals under `data`."""
    from federimed.training import encode_dialogues, load_dialogues

    dialogues = [d for path in sorted(data.glob("*/train.jsonl")) for d in load_dialogues(path)]
    if not dialogues:
        raise SystemExit(f"no */train.jsonl under {data}")
    return encode_dialogues(tokenizer, dialogues, seq_len)


def child(config: str, steps: int, batch_size: int, seq_len: int, data: Path | None) -> dict:
    """One configuration in this process: a warm-up step, then `steps` timed steps."""
    from federimed.config import LoraSettings, ModelSettings, TrainSettings
    from federimed.memory import peak_rss_mb, preloaded_allocator, return_freed_memory
    from federimed.model import add_lora, load_base
    from federimed.training import train_local

    chosen = CONFIGS[config]
    if chosen.fixed_heap:
        return_freed_memory()
    model, tokenizer = load_base(ModelSettings(dtype=chosen.base_weights))
    model = add_lora(model, LoraSettings(), seed=0)
    settings = TrainSettings(batch_size=batch_size, seq_len=seq_len, precision=chosen.precision,
                             checkpointing=chosen.checkpointing, attention=chosen.attention,
                             micro_batch_size=chosen.micro_batch, pad_to_multiple_of=chosen.pad_to_multiple_of)
    examples = real_examples(tokenizer, data, seq_len) if data else synthetic_examples(tokenizer, 4 * batch_size, seq_len)
    first = train_local(model, tokenizer, examples, settings, steps=1)
    result = train_local(model, tokenizer, examples, settings, steps=steps, start_step=1, total_steps=steps + 1)
    return {"tokens_per_s": result.tokens_per_s, "seconds_per_step": result.seconds / steps,
            "first_loss": first.loss, "peak_rss_mb": peak_rss_mb(), "malloc": preloaded_allocator() or "glibc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="times each configuration takes its turn")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help="train on DIR/*/train.jsonl instead of synthetic dialogues")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON file [default: {RESULTS.name}, or {REAL.name} with --data]")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.seq_len, args.data)))
        return
    out_path = args.out or (REAL if args.data else RESULTS)

    import torch

    from federimed.cpu import this_cpu
    from federimed.memory import allocator_library, with_allocator

    configs = [c for c in args.configs.split(",")
               if CONFIGS[c].allocator == "system" or allocator_library(CONFIGS[c].allocator)]
    if skipped := set(args.configs.split(",")) - set(configs):
        print(f"skipped (allocator not installed): {', '.join(sorted(skipped))}", flush=True)
    samples: dict[str, list[dict]] = {c: [] for c in configs}
    for round_number in range(args.rounds):
        for config in configs:
            argv = [sys.executable, __file__, "--child", config, "--steps", str(args.steps),
                    "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            argv += ["--data", str(args.data)] if args.data else []
            env = with_allocator(os.environ, CONFIGS[config].allocator)
            out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
            samples[config].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_number + 1} {config}: {samples[config][-1]}", flush=True)
    result = {
        "configurations": {
            name: {
                **CONFIGS[name]._asdict(),
                "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in runs), 1),
                "seconds_per_step": round(statistics.median(s["seconds_per_step"] for s in runs), 3),
                "peak_rss_mb": max(s["peak_rss_mb"] for s in runs),
                "first_loss": round(runs[0]["first_loss"], 4),
                "runs_tokens_per_s": [round(s["tokens_per_s"], 1) for s in runs],
                "malloc": sorted({s["malloc"] for s in runs}),
            }
            for name, runs in samples.items()
        },
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dialogues": f"real: {args.data}/*/train.jsonl" if args.data else "synthetic, each filling seq_len",
        "cpu": this_cpu().summary(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_after": round(os.getloadavg()[0], 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["configurations"], indent=2))


if __name__ == "__main__":
    main()
