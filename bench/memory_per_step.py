"""Resident memory of one training process step by step: does it level off or keep growing?

    .venv/bin/python bench/memory_per_step.py [--data DIR] [--steps 12] [--pad-to-multiple-of 1,32] [--dtype bfloat16]
        [--checkpointing]

For each padding multiple (`TrainSettings.pad_to_multiple_of`; 1 pads a batch to its longest dialogue only),
a child process under tcmalloc (`federimed.memory.with_allocator`) loads the base model, adds LoRA and trains
`--steps` single steps on the real dialogues of DIR/*/train.jsonl (length-grouped batches of 4, as
`train_local` samples them), recording resident memory (VmRSS, of which file-backed) after loading and
after each step, and the peak (VmHWM). Each step is its own `train_local` call (a fresh AdamW each, as in a
federated round of one step), so that memory can be read between steps. Writes
bench/results/memory_per_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory_per_step.json"


def memory() -> dict[str, int]:
    """This process's resident, file-backed resident and peak resident memory, in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) // 1024 for key, name in
            (("rss_mb", "VmRSS"), ("file_mb", "RssFile"), ("peak_mb", "VmHWM"))}


def child(data: Path, steps: int, pad: int, dtype: str, checkpointing: bool) -> dict:
    from federimed.config import LoraSettings, ModelSettings, TrainSettings
    from federimed.memory import preloaded_allocator
    from federimed.model import add_lora, load_base
    from federimed.training import train_local
    from train_speed import real_examples

    model, tokenizer = load_base(ModelSettings(dtype=dtype))
    model = add_lora(model, LoraSettings(), seed=0)
    loaded = memory()
    examples = real_examples(tokenizer, data, 256)
    settings = TrainSettings(batch_size=4, precision="bf16", checkpointing=checkpointing, pad_to_multiple_of=pad)
    per_step = []
    for step in range(steps):
        train_local(model, tokenizer, examples, settings, steps=1, start_step=step, total_steps=steps)
        per_step.append(memory())
    return {"after_loading": loaded, "per_step": per_step, "malloc": preloaded_allocator() or "glibc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/hospitals"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pad-to-multiple-of", default="1,32", help="comma-separated padding multiples")
    parser.add_argument("--dtype", default="bfloat16", help="the frozen base weights' dtype")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.data, args.steps, args.child, args.dtype, args.checkpointing)))
        return

    from federimed.cpu import this_cpu
    from federimed.memory import with_allocator

    runs = {}
    for pad in (int(p) for p in args.pad_to_multiple_of.split(",")):
        argv = [sys.executable, __file__, "--child", str(pad), "--data", str(args.data), "--steps", str(args.steps),
                "--dtype", args.dtype] + (["--checkpointing"] if args.checkpointing else [])
        env = with_allocator(os.environ, "tcmalloc")
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
        runs[f"pad-{pad}"] = result = json.loads(out.strip().splitlines()[-1])
        rss = [s["rss_mb"] for s in result["per_step"]]
        print(f"pad {pad}: resident after each step {rss}, peak {result['per_step'][-1]['peak_mb']} MB", flush=True)
    report = {
        "runs": runs, "steps": args.steps, "dtype": args.dtype, "checkpointing": args.checkpointing,
        "data": str(args.data), "cpu": this_cpu().summary(), "cores": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
