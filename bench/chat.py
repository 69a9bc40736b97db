"""Chat latency: time to first token and generation speed for a typical case, with and without retrieval.

Usage: .venv/bin/python -m bench.chat [--model latest] [--max-tokens 96] [--repeats 3]   (from the repo root)
Writes bench/results/chat.json. The model is loaded (and warmed up) once before timing; time to first
token counts everything a doctor waits for after sending: de-identification, retrieval, prompt
tokenisation and the first decoding step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from federimed.assistant import Assistant
from federimed.chat_ui import STARTERS

RESULTS = Path(__file__).resolve().parent / "results" / "chat.json"


def measure(assistant: Assistant, case: str, retrieval: bool, max_tokens: int) -> dict[str, float]:
    """One answer: seconds to prepare and to the first piece, generated tokens and tokens per second."""
    _, tokenizer = assistant.model()
    started = time.perf_counter()
    prepared = assistant.prepare(case, retrieval=retrieval)
    prepared_at = time.perf_counter()
    first = None
    pieces = []
    for piece in assistant.generate(prepared, max_new_tokens=max_tokens):
        first = first or time.perf_counter()
        pieces.append(piece)
    done = time.perf_counter()
    tokens = len(tokenizer("".join(pieces), add_special_tokens=False)["input_ids"])
    prompt_tokens = len(tokenizer.apply_chat_template(prepared.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return {
        "prepare_s": prepared_at - started,
        "ttft_s": (first or done) - started,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": tokens / (done - (first or done)) if first and done > first else 0.0,
        "total_s": done - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="latest", help="latest, base, RUN or RUN/round-N")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    case = STARTERS["Hypertension"]
    assistant = Assistant(adapter=args.model, runs_dir=args.runs_dir)
    load_started = time.perf_counter()
    assistant.model()
    assistant.index()
    load_s = time.perf_counter() - load_started
    measure(assistant, case, True, 8)  # warm-up: first-call allocations, embedding model

    before = os.getloadavg()[0]  # the machine may be shared: report how busy it was
    results = {}
    for retrieval in (False, True):
        runs = [measure(assistant, case, retrieval, args.max_tokens) for _ in range(args.repeats)]
        results["with_retrieval" if retrieval else "without_retrieval"] = {
            key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]
        } | {"repeats": len(runs)}
    report = {
        "benchmark": "chat",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(assistant.model()[0].device),
            "torch": torch.__version__,
            "load_avg_1m_before_after": [round(before, 2), round(os.getloadavg()[0], 2)],
        },
        "model": assistant.version.describe(),
        "notice": assistant.notice,
        "case": "Hypertension starter (snapshot format)",
        "max_new_tokens": args.max_tokens,
        "decoding": "greedy",
        "load_s": round(load_s, 2),
        "results": results,
        "note": "medians over repeats; ttft_s includes de-identification, retrieval and tokenisation",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
