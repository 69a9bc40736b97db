"""llama.cpp's prompt and decode speed on this CPU for every GGUF the product serves, with llama.cpp's extra
weight buffer types on (its default) and off, side by side; and which of the two the product takes here.

Usage: .venv/bin/python -m bench.llama_cpu [--rounds 3] [--prompt-tokens 200] [--decode-tokens 48]

Each measurement runs in a child process, so a configuration that crashes llama.cpp (the AMX kernels
on Intel CPUs with AMX, see federimed/cpu.py) is recorded with its signal instead of ending the
run. The configurations take turns, round after round, so that the load of a shared machine falls on
all of them alike; each figure is the median over rounds. No adapter, no FederiMed engine: llama.cpp
reading one prompt (one batch) and decoding greedily one token at a time, as the chat does; 2 threads
on 2 cores and flash attention, as the engine runs it. Writes bench/results/llama_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from federimed.config import ModelSettings
from federimed.cpu import extra_buffers_safe, this_cpu
from federimed.serving.gguf_lora import served_base, shipped_base
from federimed.serving.llama_cpp_engine import cpu_threads

RESULTS = Path(__file__).resolve().parent / "results" / "llama_cpu.json"
TEXT = (
    "Patient: 64-year-old female. New diagnosis: essential hypertension. Recent findings: blood pressure "
    "158/97 mmHg, body mass index 31, fasting glucose 6.1 mmol/L, LDL cholesterol 4.2 mmol/L. "
)


def measure(gguf: str, extra_buffers: bool, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
    """Prompt tokens/s (the prompt read as one batch, from an empty cache) and greedy decode tokens/s, after a
    short warm-up (first-call allocations)."""
    import llama_cpp

    from federimed.serving.llama_runtime import load_llama

    threads = cpu_threads()
    llm = load_llama(
        gguf, extra_buffers=extra_buffers, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
        flash_attn=True, verbose=False,
    )  # fmt: skip
    ids = llm.tokenize((TEXT * (prompt_tokens // 20)).encode(), add_bos=False)[:prompt_tokens]
    assert len(ids) == prompt_tokens
    rates: dict[str, float] = {}
    for prompt, steps in ((ids[:16], 2), (ids, decode_tokens)):  # a warm-up, then the figures kept
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        rates["prompt_tokens_per_s"] = len(prompt) / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(steps):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(logits.argmax())])
        rates["decode_tokens_per_s"] = steps / (time.perf_counter() - started)
    llm.close()
    return rates


def in_child(gguf: Path, extra_buffers: bool, prompt_tokens: int, decode_tokens: int) -> dict[str, float | str]:
    """`measure` in a child process: its figures, or {"crashed": signal name}."""
    command = [sys.executable, "-m", "bench.llama_cpu", "--child", str(gguf), "on" if extra_buffers else "off",
               "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens)]  # fmt: skip
    child = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if child.returncode < 0:
        return {"crashed": signal.Signals(-child.returncode).name}
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--child", nargs=2, metavar=("GGUF", "on|off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "on", args.prompt_tokens, args.decode_tokens)))
        return

    settings = ModelSettings()
    files = {
        "shipped_q4_1": shipped_base(settings)[0],
        "served_q8_0": served_base(settings, "q8_0"),
        "served_f16": served_base(settings, "f16"),
    }
    choice = extra_buffers_safe(this_cpu().flags)
    runs: dict[tuple[str, bool], list[dict]] = {(name, on): [] for name in files for on in (True, False)}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for (name, on), rows in runs.items():
            if rows and "crashed" in rows[0]:
                continue  # crashed once: it crashes every time
            rows.append(in_child(files[name], on, args.prompt_tokens, args.decode_tokens))
    results: dict[str, dict] = {name: {} for name in files}
    for (name, on), rows in runs.items():
        label = "extra_buffers_on (llama.cpp default)" if on else "extra_buffers_off"
        if "crashed" in rows[0]:
            results[name][label] = rows[0]
        else:
            results[name][label] = {key: round(statistics.median(r[key] for r in rows), 1) for key in rows[0]}
        results[name][label]["product_choice"] = on == choice

    import llama_cpp

    picked = "extra_buffers_on (llama.cpp default)" if choice else "extra_buffers_off"
    report = {
        "benchmark": "llama_cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": this_cpu().summary(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "llama_cpp_threads": cpu_threads(),
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_build": llama_cpp.llama_print_system_info().decode().strip(),
            "load_avg_1_5_15m_before": [round(v, 2) for v in load_before],
            "load_avg_1_5_15m_after": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {"rounds": args.rounds, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens},
        "product_extra_buffers": choice,
        "results": results,
        "product_path": {
            "prompt_tokens_per_s_f16_copy": results["served_f16"][picked].get("prompt_tokens_per_s"),
            "greedy_decode_tokens_per_s_f16_copy": results["served_f16"][picked].get("decode_tokens_per_s"),
            "sampled_decode_tokens_per_s_q8_0_copy": results["served_q8_0"][picked].get("decode_tokens_per_s"),
        },
        "plain_llama_cpp_shipped_gguf": results["shipped_q4_1"][picked],
        "note": "medians over rounds; the product path reads prompts with the F16 copy, decodes greedy answers "
        "(the chat's, ask's, evaluation's) with it too and sampled chat answers with the Q8_0 copy (without "
        "adapter here: bench/chat.py measures it end to end)",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
