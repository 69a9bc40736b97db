"""Chat and evaluation speed of the generation engines, and how closely the fast one follows the reference.

Usage: .venv/bin/python -m bench.chat [--model latest] [--runs-dir runs] [--data data/hospitals]
                                      [--cases 30] [--max-tokens 96] [--chat-prompts 6]   (from the repo root)

In one run, on the same prompts:
- chat: time to first token (counting everything a doctor waits for after sending: de-identification,
  retrieval, prompt tokenisation, the first decoding step) and decode tokens/s, with retrieval, for the
  reference path (transformers + adapter), the product's path (llama.cpp with the adapter exported to
  GGUF, greedy: an F16 copy of the base reads the prompt and decodes, as the chat's line decodes answers
  together and as evaluation does) and plain llama.cpp (llama-cpp-python's
  own `create_completion`, no adapter, no FederiMed engine) on the shipped Q4_1 base GGUF and on the
  Q8_0 copy; the goal is fast ≥ 0.7 × plain (shipped GGUF) in decode tokens/s. Every llama.cpp model,
  plain ones included, is opened with the extra weight buffer types this CPU allows (off on Intel CPUs
  with AMX, where llama.cpp's AMX kernels crash on quantised batches: federimed/cpu.py);
- agreement on held-out cases (greedy), for the base model and the adapter: exact-token agreement and
  drug-F1 between the reference's recommended drugs and llama.cpp's (batched, F16 copy of the base: the
  evaluation's and the chat's greedy answers);
- evaluation throughput (held-out cases per minute): transformers batched (before) vs llama.cpp (after).
Writes bench/results/chat.json, with the CPU's model and flags and the machine's load average (the
machine may be shared). bench/llama_cpu.py compares llama.cpp's buffer choices on the bare GGUFs.
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
from typing import Any

import torch

from federimed.assistant import Assistant
from federimed.chat_ui import STARTERS
from federimed.evaluation.compare import vocabulary
from federimed.evaluation.metrics import set_scores
from federimed.evaluation.runner import HeldoutCase, load_heldout
from federimed.model import resolve_base
from federimed.serving.backend import Engine, answer_text, prompt_ids
from federimed.cpu import extra_buffers_safe, this_cpu
from federimed.serving.gguf_lora import SERVED_FILE, served_base
from federimed.serving.llama_cpp_engine import cpu_threads
from federimed.serving.llama_runtime import load_llama
from federimed.serving.select import load_engine

RESULTS = Path(__file__).resolve().parent / "results" / "chat.json"


def measure_assistant(assistant: Assistant, case: str, max_tokens: int) -> dict[str, float]:
    """One answer with retrieval: seconds to the first piece (from the raw case) and decode tokens/s."""
    tokenizer = assistant.model().tokenizer
    started = time.perf_counter()
    prepared = assistant.prepare(case, retrieval=True)
    first = None
    pieces = []
    for piece in assistant.generate(prepared, max_new_tokens=max_tokens):
        first = first or time.perf_counter()
        pieces.append(piece)
    done = time.perf_counter()
    tokens = len(tokenizer("".join(pieces), add_special_tokens=False)["input_ids"])
    return _timing(started, first, done, tokens)


def measure_plain(llm: Any, assistant: Assistant, case: str, max_tokens: int) -> dict[str, float]:
    """The same prompt text through llama-cpp-python's own API on the base GGUF (its own tokenizer)."""
    tokenizer = assistant.model().tokenizer
    started = time.perf_counter()
    prepared = assistant.prepare(case, retrieval=True)
    text = tokenizer.apply_chat_template(prepared.messages, add_generation_prompt=True, tokenize=False)
    first = None
    pieces = []
    for chunk in llm.create_completion(text, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=True):
        first = first or time.perf_counter()
        pieces.append(chunk["choices"][0]["text"])
    done = time.perf_counter()
    tokens = len(llm.tokenize("".join(pieces).encode(), add_bos=False, special=False))
    return _timing(started, first, done, tokens)


def _timing(started: float, first: float | None, done: float, tokens: int) -> dict[str, float]:
    decode_s = done - first if first else 0.0
    return {
        "ttft_s": (first or done) - started,
        "tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else 0.0,
        "total_s": done - started,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    medians = {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}
    return medians | {"max_ttft_s": round(max(r["ttft_s"] for r in runs), 4), "prompts": len(runs)}


def greedy_timed(engine: Engine, cases: list[HeldoutCase], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy answer ids of every case and the cases per minute it took."""
    prompts = [prompt_ids(engine.tokenizer, c.messages) for c in cases]
    started = time.perf_counter()
    answers = engine.greedy(prompts, max_new_tokens=max_new_tokens, batch_size=8)
    return answers, len(cases) / (time.perf_counter() - started) * 60


def agreement(reference: list[list[int]], fast: list[list[int]], tokenizer: Any, vocab: Any) -> dict[str, float]:
    """How often the two paths give the same tokens, how long their common prefix is, and drug-F1 between them."""
    exact = [r == f for r, f in zip(reference, fast)]
    prefix = []
    for r, f in zip(reference, fast):
        same = next((i for i, (a, b) in enumerate(zip(r, f)) if a != b), min(len(r), len(f)))
        prefix.append(same / max(len(r), len(f), 1))
    f1 = [
        set_scores(vocab.extract(answer_text(tokenizer, f)), vocab.extract(answer_text(tokenizer, r))).f1
        for r, f in zip(reference, fast)
    ]
    named = sum(bool(vocab.extract(answer_text(tokenizer, r))) for r in reference)
    return {
        "exact_token_agreement": round(sum(exact) / len(exact), 4),
        "mean_common_prefix_share": round(sum(prefix) / len(prefix), 4),
        "drug_f1_between_paths": round(sum(f1) / len(f1), 4),
        "min_drug_f1_between_paths": round(min(f1), 4),
        "reference_answers_naming_a_drug": named,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="latest", help="latest, RUN or RUN/round-N: the adapter under test")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--data", type=Path, default=Path("data/hospitals"), help="ingested hospitals (held-out cases)")
    parser.add_argument("--index-dir", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=30, help="held-out cases for agreement and throughput")
    parser.add_argument("--chat-prompts", type=int, default=6, help="chat prompts (held-out cases + a starter)")
    parser.add_argument("--max-tokens", type=int, default=96, help="chat answer length")
    parser.add_argument("--eval-tokens", type=int, default=48, help="evaluation answer length (as `evaluate`)")
    args = parser.parse_args()
    hospitals = sorted(p.name for p in args.data.iterdir() if (p / "heldout.jsonl").is_file())
    pool = load_heldout(args.data, hospitals)
    cases = [pool[i * len(pool) // args.cases] for i in range(min(args.cases, len(pool)))]  # spread over hospitals
    chat_cases = [STARTERS["Hypertension"], *(c.case_text for c in cases[: args.chat_prompts - 1])]
    vocab = vocabulary([args.data])
    load_before = os.getloadavg()

    reference = Assistant(adapter=args.model, runs_dir=args.runs_dir, index_dir=args.index_dir, engine="transformers")
    fast = Assistant(adapter=args.model, runs_dir=args.runs_dir, index_dir=args.index_dir, engine="llama.cpp")
    if reference.version.adapter_dir is None:
        raise SystemExit(f"no checkpoint {args.model!r} in {args.runs_dir}: the fast path must be measured with an adapter")
    loads = {}
    for name, assistant in (("reference", reference), ("fast", fast)):
        started = time.perf_counter()
        assistant.model()
        loads[name] = round(time.perf_counter() - started, 2)
    fast.index()
    plain = {
        name: load_llama(str(path), n_ctx=fast.model().context_length, n_threads=cpu_threads(), verbose=False)
        for name, path in (("plain_llama_cpp_base_gguf", resolve_base(fast.settings)),
                           ("plain_llama_cpp_served_q8_0", served_base(fast.settings, "q8_0")))
    }  # fmt: skip
    for assistant in (reference, fast):  # warm-up: first-call allocations, the embedding model
        measure_assistant(assistant, chat_cases[0], 4)
    for llm in plain.values():
        measure_plain(llm, fast, chat_cases[0], 4)

    chat = {
        "reference_transformers": median_of([measure_assistant(reference, c, args.max_tokens) for c in chat_cases]),
        "fast_llama_cpp_with_adapter": median_of([measure_assistant(fast, c, args.max_tokens) for c in chat_cases]),
    }
    for name, llm in plain.items():
        chat[name] = median_of([measure_plain(llm, fast, c, args.max_tokens) for c in chat_cases])
        llm.close()
    prompt_tokens = [len(prompt_ids(fast.model().tokenizer, fast.prepare(c, retrieval=True).messages)) for c in chat_cases]
    ratio = chat["fast_llama_cpp_with_adapter"]["decode_tokens_per_s"] / chat["plain_llama_cpp_base_gguf"]["decode_tokens_per_s"]

    agreement_rows, throughput = {}, {}
    for label, adapter in (("base", None), ("adapter", reference.version.adapter_dir)):
        ref_engine = reference.model() if adapter else load_engine(reference.settings, None, "transformers")
        ref_ids, ref_rate = greedy_timed(ref_engine, cases, args.eval_tokens)
        agreement_rows[label] = {"cases": len(cases)}
        throughput[label] = {"before_transformers_batched_8_cases_per_min": round(ref_rate, 2)}
        evaluation = load_engine(fast.settings, adapter, "llama.cpp", purpose="evaluation")
        fast_ids, fast_rate = greedy_timed(evaluation, cases, args.eval_tokens)
        evaluation.close()
        agreement_rows[label]["evaluation_and_chat_f16"] = agreement(ref_ids, fast_ids, ref_engine.tokenizer, vocab)
        throughput[label] |= {
            "after_llama_cpp_cases_per_min": round(fast_rate, 2), "speed_up": round(fast_rate / ref_rate, 2),
        }  # fmt: skip

    report = {
        "benchmark": "chat",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu": this_cpu().summary(),
            "llama_cpp_extra_buffers": extra_buffers_safe(this_cpu().flags),
            "cpus": os.cpu_count(),
            "llama_cpp_threads": cpu_threads(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_avg_1_5_15m_before": [round(v, 2) for v in load_before],
            "load_avg_1_5_15m_after": [round(v, 2) for v in os.getloadavg()],
        },
        "model": reference.version.describe(),
        "served_adapter": str(fast.version.adapter_dir / SERVED_FILE),
        "decoding": "greedy",
        "load_s": loads,
        "chat": {
            "prompts": "Hypertension starter + held-out case snapshots, with retrieval (k=3)",
            "max_new_tokens": args.max_tokens,
            "medians": chat,
            "prompt_tokens_min_median_max": [min(prompt_tokens), statistics.median(prompt_tokens), max(prompt_tokens)],
            "fast_over_plain_decode_ratio": round(ratio, 3),
            "goal": "fast_over_plain_decode_ratio >= 0.7; fast ttft_s < 1",
        },
        "agreement_fast_vs_reference": agreement_rows,
        "evaluation_throughput": throughput | {"max_new_tokens": args.eval_tokens, "retrieval": False},
        "note": "medians over prompts; ttft_s includes de-identification, retrieval and tokenisation; "
        "the reference runs the de-quantised fp32 weights; llama.cpp reads prompts and decodes greedy answers "
        "with an F16 copy of the Q4_1 GGUF (a Q8_0 copy decodes sampled chat answers only)",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
