"""The training curve: held-out loss and drug-F1 against passes over the data, per training mode.

    .venv/bin/python bench/training_curve.py [--data data/hospitals] [--passes 8] [--f1-at 1,2,4,8] [--reuse]

Each mode trains once with `federimed train --epochs P --rounds P` (one pass over every hospital's data
per round, so checkpoint N has made N passes; the cosine schedule spans all P): federated (Flower on
loopback), centralized (the same gradient work on the pooled data) and local-only for every hospital
(its own steps inside the federation). The modes run one after another, so that each has the machine to
itself. Every checkpoint's held-out loss (each hospital's held-out sample) comes from its metrics; drug-F1
is scored at the `--f1-at` checkpoints on every held-out case (greedy, no retrieval), beside the counting
baselines (the most frequent drug set per diagnosis, pooled and per hospital) on the same cases.
Writes bench/results/training.json and training.png: the curve, seconds per pass, tokens/s, the training
precision, the CPU with its flags, and each site's peak resident memory; the results of
bench/train_speed.py (tokens/s and memory per precision and configuration) and bench/client_concurrency.py
are copied in when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "training.json"


def finished_run(runs_dir: Path, mode: str, hospitals: set[str], passes: int) -> Path | None:
    """The newest run under `runs_dir` of `mode` on exactly `hospitals` that made `passes` passes in as many
    rounds, all of them done (`--reuse`: the demo's runs are such runs)."""
    found = []
    for info_file in runs_dir.glob("*/run.json"):
        info = json.loads(info_file.read_text())
        train = info["settings"]["train"]
        if (info["mode"], set(info["hospitals"]), info.get("rounds_completed"), info["settings"]["rounds"],
                train.get("epochs")) == (mode, hospitals, passes, passes, passes):
            found.append((info["created"], info_file.parent))
    return max(found)[1] if found else None


def train(mode: str, hospital: str | None, args: argparse.Namespace, log_dir: Path) -> Path:
    """Train one model with the CLI (or, with `--reuse`, take a finished run of it); its run folder. A run
    stopped part-way (an earlier sitting) continues from its last round."""
    trained_on = {hospital} if hospital else set(args.hospitals)
    kind = "local-only" if mode == "local" else mode
    if args.reuse and (run := finished_run(args.runs_dir, kind, trained_on, args.passes)):
        print(f"reusing {run} for {mode} {hospital or ''}", flush=True)
        return run
    argv = [sys.executable, "-m", "federimed.cli", "train", "--mode", mode, "--data", str(args.data),
            "--runs-dir", str(args.runs_dir), "--rounds", str(args.passes), "--epochs", str(args.passes),
            "--batch-size", str(args.batch_size), "--precision", args.precision, "--continue-unfinished"]
    argv += ["--hospital", hospital] if hospital else []
    log = log_dir / f"{mode}{'-' + hospital if hospital else ''}.log"
    print(f"training {mode} {hospital or ''} (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("a") as out:  # a continued run adds to its earlier sitting's log
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        raise SystemExit(f"{mode} training failed (exit {code}); see {log}")
    run = finished_run(args.runs_dir, kind, trained_on, args.passes)  # the newest: the one just trained
    if run is None:
        raise SystemExit(f"{mode} training ended without a finished {args.passes}-round run in {args.runs_dir}; see {log}")
    print(f"  done in {time.perf_counter() - started:.0f} s: {run}", flush=True)
    return run


def checkpoints(run: Path) -> list[dict]:
    """Per checkpoint: passes, held-out loss, training seconds and tokens, and the largest peak memory of a site."""
    from federimed.checkpoints import round_metrics

    rows = []
    for metrics in round_metrics(run):
        sites = metrics.get("hospitals", {}).values()
        seconds = metrics["seconds"] if "steps" in metrics else max(h["seconds"] for h in sites)
        tokens = metrics["tokens"] if "steps" in metrics else sum(h["tokens"] for h in sites)
        rss = metrics.get("peak_rss_mb") or max((h.get("peak_rss_mb", 0.0) for h in sites), default=0.0)
        rows.append({"passes": int(metrics["round"]), "heldout_loss": metrics["heldout_loss"],
                     "train_loss": metrics["train_loss"], "train_seconds": seconds, "tokens": tokens,
                     "peak_rss_mb": rss})
    return rows


def drug_f1(run: Path, passes: int, cases, vocab, max_new_tokens: int) -> dict:
    """Mean drug-F1 (95 % bootstrap interval) of checkpoint `passes` of `run` on `cases`, no retrieval."""
    from federimed.checkpoints import RunDir
    from federimed.evaluation.runner import score_model
    from federimed.serving.select import load_engine

    settings = RunDir(run).settings().model
    engine = load_engine(settings, run / f"round-{passes}", purpose="evaluation")
    summary = score_model(f"{run.name}@{passes}", engine, cases, vocab, max_new_tokens=max_new_tokens).summary()
    return summary["drug_f1"]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, f1_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, model in report["models"].items():
        rows = model["checkpoints"]
        loss_ax.plot([r["passes"] for r in rows], [r["heldout_loss"] for r in rows], marker="o", label=name)
        scored = [r for r in rows if "drug_f1" in r]
        f1_ax.errorbar([r["passes"] for r in scored], [r["drug_f1"]["mean"] for r in scored],
                       yerr=[[r["drug_f1"]["mean"] - r["drug_f1"]["low"] for r in scored],
                             [r["drug_f1"]["high"] - r["drug_f1"]["mean"] for r in scored]],
                       marker="o", capsize=3, label=name)
    for label, score in report["counting"].items():
        if label == "counts:pooled":
            f1_ax.axhline(score["mean"], color="black", linestyle="--", label="pooled counts (floor)")
    loss_ax.set(xlabel="passes over the data", ylabel="held-out loss (answer tokens)", xscale="log", title="held-out loss")
    f1_ax.set(xlabel="passes over the data", ylabel="drug-F1 (95 % CI)", xscale="log", title="drug-F1, no retrieval")
    for ax in (loss_ax, f1_ax):
        ax.set_xticks([r["passes"] for r in next(iter(report["models"].values()))["checkpoints"]])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
    f1_ax.legend(fontsize=7)
    fig.suptitle(f"{report['machine']['cpu']['model']}, {report['machine']['cores']} cores, "
                 f"precision {report['precision']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/hospitals"), help="ingested hospitals (the demo's)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/training-curve"))
    parser.add_argument("--passes", type=int, default=8, help="passes over the data (= rounds = checkpoints)")
    parser.add_argument("--f1-at", default="1,2,4,8", help="checkpoints (passes) whose drug-F1 is scored")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--modes", default="centralized,local,federated")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--reuse", action="store_true",
                        help="take finished runs of the same budget from --runs-dir (e.g. the demo's) instead of training")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.data, args.runs_dir = args.data.resolve(), args.runs_dir.resolve()
    args.runs_dir.mkdir(parents=True, exist_ok=True)

    from federimed.baselines import hospital_names
    from federimed.cpu import this_cpu
    from federimed.evaluation.compare import vocabulary
    from federimed.evaluation.counting import count_baselines
    from federimed.evaluation.runner import load_heldout
    from federimed.precision import autocast_dtype
    import torch

    hospitals = args.hospitals = hospital_names(args.data)
    runs: dict[str, Path] = {}
    for mode in args.modes.split(","):
        if mode == "local":
            for hospital in hospitals:
                runs[f"local-only {hospital}"] = train("local", hospital, args, args.runs_dir)
        else:
            runs[mode] = train(mode, None, args, args.runs_dir)
    cases = load_heldout(args.data, hospitals)
    vocab = vocabulary([args.data])
    f1_at = [int(p) for p in args.f1_at.split(",") if int(p) <= args.passes]
    models = {}
    for name, run in runs.items():
        rows = checkpoints(run)
        for row in rows:
            if row["passes"] in f1_at:
                row["drug_f1"] = drug_f1(run, row["passes"], cases, vocab, args.max_new_tokens)
                print(f"{name} after {row['passes']} passes: drug-F1 {row['drug_f1']['mean']:.3f}, held-out loss "
                      f"{row['heldout_loss']:.3f}", flush=True)
        seconds = sum(r["train_seconds"] for r in rows)
        models[name] = {"run": run.name, "checkpoints": rows, "seconds_per_pass": round(seconds / len(rows), 1),
                        "tokens_per_s": round(sum(r["tokens"] for r in rows) / seconds, 1),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    counting = {s.model: s.summary()["drug_f1"] for s in count_baselines(args.data, hospitals, cases, vocab, 1)}
    dtype = autocast_dtype(args.precision, torch.device("cpu"), this_cpu().flags)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": this_cpu().summary(), "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "precision": "bf16 autocast" if dtype == torch.bfloat16 else "fp32",
        "data": {"hospitals": hospitals, "heldout_cases": len(cases)},
        "settings": {"passes": args.passes, "batch_size": args.batch_size, "f1_at": f1_at},
        "models": models,
        "counting": counting,
    }
    for name in ("train_speed", "client_concurrency"):  # tokens/s and memory per configuration, clients' schedule
        if (measured := RESULTS.parent / f"{name}.json").is_file():
            report[name] = json.loads(measured.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
