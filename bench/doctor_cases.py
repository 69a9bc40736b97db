"""Doctor-style free-text cases: how often the answer names a drug a guideline accepts.

For every labelled case in tests/data/doctor_cases*.jsonl, each model (the base model and the federated
model that runs/latest names) answers the case as typed (scrubbed only) and as parsed into the trained
format (`federimed.free_text`), with and without guideline retrieval, greedy, `--max-tokens` tokens. An
answer counts as acceptable when it proposes (`federimed.safety.proposed_drugs`) at least one drug of the
case's "acceptable" list; answers proposing a drug the safety check flags are counted too. Writes
bench/results/doctor_cases.json with the share per model × input × retrieval, a 95 % bootstrap interval,
the paired difference parsed − typed, the CPU it ran on and the time taken.

    .venv/bin/python bench/doctor_cases.py [--runs-dir runs] [--index-dir data/guideline-index] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def interval(hits: list[int], rounds: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of a mean of 0/1 (or differences)."""
    values = np.asarray(hits, dtype=float)
    means = np.random.default_rng(seed).choice(values, (rounds, len(values))).mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 3), round(float(np.percentile(means, 97.5)), 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--index-dir", type=Path, default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cases", default="doctor_cases*.jsonl", help="which files of tests/data (a glob)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "doctor_cases.json")
    args = parser.parse_args()

    from federimed.assistant import Assistant
    from federimed.cpu import this_cpu
    from federimed.safety import check, proposed_drugs

    cases = [json.loads(line) for path in sorted((REPO / "tests" / "data").glob(args.cases))
             for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
    started = time.perf_counter()
    results, hits = {}, {}
    for model in ("base", "latest"):
        for retrieval in (False, True):
            assistant = Assistant(adapter=model, runs_dir=args.runs_dir, index_dir=args.index_dir, retrieval=retrieval)
            if model == "latest" and assistant.version.adapter_dir is None:
                sys.exit(f"no trained model under {args.runs_dir}: run the demo or `federimed train` first")
            for form in ("typed", "parsed"):
                name = assistant.version.mode or "base"
                key = f"{name} · {form} · retrieval {'on' if retrieval else 'off'}"
                accepted, flagged = [], 0
                for n, case in enumerate(cases, 1):
                    typed = assistant.case_text(case["text"])
                    text = assistant.understand(typed).text if form == "parsed" else typed
                    prepared = assistant.prepare_text(text)
                    answer = "".join(assistant.generate(prepared, max_new_tokens=args.max_tokens))
                    accepted.append(int(bool(set(proposed_drugs(answer)) & set(case["acceptable"]))))
                    flagged += bool(check(text, answer))
                    print(f"\r{key}: {n}/{len(cases)}", end="", flush=True)
                print()
                hits[key] = accepted
                results[key] = {"acceptable": round(float(np.mean(accepted)), 3), "interval": interval(accepted),
                                "flagged_by_safety_check": flagged}
    paired = {}
    for key, values in hits.items():
        if " · typed · " in key:
            parsed = hits[key.replace(" · typed · ", " · parsed · ")]
            diff = [p - t for p, t in zip(parsed, values, strict=True)]
            paired[key.replace(" · typed", "")] = {"parsed_minus_typed": round(float(np.mean(diff)), 3),
                                                    "interval": interval(diff)}
    out = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cases": len(cases),
        "max_new_tokens": args.max_tokens,
        "results": results,
        "paired": paired,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu": this_cpu().summary(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
