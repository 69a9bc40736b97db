"""Hospitals sharing one machine: do their rounds go faster side by side or one after another?

    .venv/bin/python bench/client_concurrency.py [--data data/hospitals] [--passes 0.25] [--repeats 2]

Each hospital trains as a Flower ClientApp does in one round: a fresh process loads the model, then runs
`--passes` of a pass over its own training data (the steps `RunSettings.steps_per_round` gives it).
"side by side": all hospitals start at once, each limited to its share of the cores (what
`federimed train` does on loopback); "one after another": each in turn with every core. The two take
turns `--repeats` times; the median wall time of each is reported with the CPU, and the faster is named.
Writes bench/results/client_concurrency.json.
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

RESULTS = Path(__file__).parent / "results" / "client_concurrency.json"


def child(folder: Path, passes: float) -> dict:
    """One hospital's round in this process: load, encode, train."""
    from federimed.config import RunSettings, TrainSettings
    from federimed.memory import peak_rss_mb
    from federimed.model import add_lora, load_base
    from federimed.training import encode_dialogues, load_dialogues, train_local

    settings = RunSettings(rounds=1, train=TrainSettings(epochs=passes))
    base, tokenizer = load_base(settings.model)
    model = add_lora(base, settings.lora)
    examples = encode_dialogues(tokenizer, load_dialogues(folder / "train.jsonl"), settings.train.seq_len)
    steps = settings.steps_per_round(len(examples))
    result = train_local(model, tokenizer, examples, settings.train, steps=steps)
    return {"steps": steps, "train_seconds": result.seconds, "peak_rss_mb": peak_rss_mb()}


def _start(folder: Path, passes: float, threads: int) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = [sys.executable, __file__, "--child", str(folder), "--passes", str(passes)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _finish(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode:
        raise SystemExit(f"a hospital's training failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def side_by_side(folders: list[Path], passes: float, cores: int) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    processes = [_start(f, passes, max(1, cores // len(folders))) for f in folders]
    rows = [_finish(p) for p in processes]
    return time.perf_counter() - started, rows


def one_after_another(folders: list[Path], passes: float, cores: int) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    rows = [_finish(_start(f, passes, cores)) for f in folders]
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/hospitals"))
    parser.add_argument("--passes", type=float, default=0.25, help="share of a pass each hospital trains")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.passes)))
        return

    from federimed.baselines import hospital_names
    from federimed.cpu import this_cpu

    folders = [args.data / name for name in hospital_names(args.data)]
    cores = os.cpu_count() or 1
    walls: dict[str, list[float]] = {"side_by_side": [], "one_after_another": []}
    detail: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, run in (("side_by_side", side_by_side), ("one_after_another", one_after_another)):
            wall, rows = run(folders, args.passes, cores)
            walls[name].append(wall)
            detail[name] = [{"hospital": f.name} | row for f, row in zip(folders, rows)]
            print(f"{name}: {wall:.0f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in walls.items()}
    result = {
        "wall_seconds": {name: round(value, 1) for name, value in medians.items()},
        "runs": {name: [round(v, 1) for v in values] for name, values in walls.items()},
        "faster": min(medians, key=medians.get),
        "hospitals": detail,
        "passes": args.passes,
        "cpu": this_cpu().summary(),
        "cores": cores,
        "load_average_1m_after": round(os.getloadavg()[0], 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_seconds", "faster")}, indent=2))


if __name__ == "__main__":
    main()
