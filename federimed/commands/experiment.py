"""`federimed experiment`: the evaluators' comparison, in one command.

Three training hospitals and an external one that never trains are synthesised and ingested once (the
split follows a recorded seed). For each training seed, the federated model, the centralized and three
local-only baselines (the same gradient work) and a DP-federated model (ε ≤ the target at δ) are trained,
then scored on the same held-out cases of the training hospitals and of the external hospital, without
retrieval. The seeds are pooled into paired differences (`federimed.evaluation.experiment`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from federimed.checkpoints import finished_runs, round_metrics
from federimed.commands.stages import Stage, StageFailed, recorded_seconds, run_stages, training_dialogues
from federimed.evaluation.experiment import ExperimentError, all_pairs, loss_per_round, plot_summary, pool_seeds

console = Console()
HOSPITALS = 3
"""Training hospitals; the synthesised hospital after them is the external one."""


@dataclass(frozen=True)
class Size:
    """Sizes of one experiment."""

    patients: int  # per hospital, the external one included
    heldout_share: float
    seeds: tuple[int, ...]
    rounds: int
    budget: tuple[str, str]  # `federimed train` option of the budget: passes (--epochs) or fixed steps
    batch_size: int
    max_cases: int  # held-out cases scored per hospital
    answer_tokens: int
    dp_epsilon: float
    dp_delta: float


SIZES = {
    # ≥ 300 pooled held-out cases (about 5.5 decisions per patient), 3 seeds, the CLI's recipe (8 passes).
    "default": Size(patients=50, heldout_share=0.5, seeds=(0, 1, 2), rounds=8, budget=("--epochs", "8"),
                    batch_size=4, max_cases=1000, answer_tokens=48, dp_epsilon=10.0, dp_delta=1e-5),
    "quick": Size(patients=4, heldout_share=0.5, seeds=(0, 1), rounds=1, budget=("--local-steps", "1"),
                  batch_size=2, max_cases=3, answer_tokens=32, dp_epsilon=10.0, dp_delta=1e-5),
}


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def synthea(self) -> Path:
        return self.root / "synthea"

    @property
    def hospitals(self) -> Path:
        return self.root / "hospitals"

    @property
    def external(self) -> Path:
        return self.root / "external"

    def runs(self, seed: int, dp: bool = False) -> Path:
        return self.root / "runs" / (f"seed-{seed}-dp" if dp else f"seed-{seed}")

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def state(self) -> Path:
        return self.root / ".stages"


def hospital_names(size: Size, data_seed: int) -> tuple[list[str], str]:
    """The training hospitals' names and the external hospital's."""
    from ingest.synth import plan

    specs = plan(HOSPITALS + 1, size.patients, data_seed)
    return [s.hospital for s in specs[:HOSPITALS]], specs[HOSPITALS].hospital


def training_stages(paths: ExperimentPaths, size: Size, data_seed: int, split_seed: int, noise: float) -> list[Stage]:
    """Synthesise and ingest the hospitals, then train every model of every seed. The DP model's noise
    multiplier is rounded up, so that its ε stays within the target. Each training stage's work is its
    training dialogues: the runs with all the data start first and the hospitals alone (which together do as
    much work as one of them) last, the largest first, so that two lanes stay busy."""
    training, external = hospital_names(size, data_seed)
    stages = [Stage("synthesise", ["synth", "--out", str(paths.synthea), "--hospitals", str(HOSPITALS + 1),
                                   "--patients", str(size.patients), "--seed", str(data_seed), "--force"],
                    produced=lambda: (paths.synthea / "synth.json").is_file())]
    for name in [*training, external]:
        out = paths.external if name == external else paths.hospitals
        stages.append(Stage(f"ingest {name}", ["ingest", str(paths.synthea / name / "fhir"), "--hospital", name,
                                               "--out", str(out), "--heldout-share", str(size.heldout_share),
                                               "--seed", str(split_seed)],
                            [paths.synthea / name], after=["synthesise"],
                            produced=lambda out=out, name=name: (out / name / "manifest.json").is_file()))
    ingested = [f"ingest {name}" for name in training]
    for seed in size.seeds:
        common = ["--data", str(paths.hospitals), "--rounds", str(size.rounds), *size.budget,
                  "--batch-size", str(size.batch_size), "--seed", str(seed)]
        runs, dp_runs = paths.runs(seed), paths.runs(seed, dp=True)
        jobs = [("federated", runs, "federated", None, []),
                ("centralized", runs, "centralized", set(training), ["--mode", "centralized"])]
        jobs.append(("federated DP", dp_runs, "federated", None,
                     ["--dp", "--noise-multiplier", str(math.ceil(noise * 1e4) / 1e4), "--delta", str(size.dp_delta)]))
        jobs += [(f"local {h}", runs, "local-only", {h}, ["--mode", "local", "--hospital", h]) for h in training]
        for job, where, mode, trained_on, args in jobs:
            stages.append(Stage(f"{job} seed {seed}", ["train", *common, "--runs-dir", str(where), *args],
                                [paths.hospitals], after=ingested,
                                produced=lambda where=where, mode=mode, on=trained_on: bool(finished_runs(where, mode, on)),
                                work=lambda on=trained_on or training: training_dialogues(paths.hospitals, on)))
    return stages


def _federated_run(runs: Path) -> Path:
    """The newest federated run under `runs`."""
    found = finished_runs(runs, "federated")
    if not found:
        raise ExperimentError(f"no federated run in {runs}")
    return found[-1]


def evaluation_stages(paths: ExperimentPaths, size: Size, external: str) -> list[Stage]:
    """Score every seed's models on the same cases, without retrieval, and on the external hospital; and
    its DP-federated model on the same held-out cases. The base model (no seed changes its greedy answers)
    and the federated model's rounds are scored with the first seed only. They run one after another: a
    stage's share of the cores is fixed when it starts, so a large evaluation beside the small DP one would
    keep its share (half the cores with two lanes) after the DP one ended."""
    stages = []
    for seed in size.seeds:
        for dp in (False, True):
            runs = paths.runs(seed, dp)
            run = _federated_run(runs)
            args = ["evaluate", "--run", str(run), "--data", str(paths.hospitals), "--runs-dir", str(runs),
                    "--retrieval", "off", "--max-cases", str(size.max_cases), "--max-new-tokens", str(size.answer_tokens)]
            if dp:
                args += ["--compare", "federated", "--no-rounds"]
            else:
                args += ["--external", str(paths.external / external)]
                if seed != size.seeds[0]:  # the base model and the rounds: scored with the first seed only
                    args += ["--compare", "local,federated,centralized", "--no-rounds"]
            stages.append(Stage(f"evaluate seed {seed}{' DP' if dp else ''}", args, [runs, paths.hospitals, paths.external],
                                produced=lambda run=run: (run / "eval" / "report.json").is_file()))
    return stages


def _loss_curves(paths: ExperimentPaths, size: Size) -> dict[str, list[list[float | None]]]:
    """Held-out loss after each round of every trained model, one list per seed (found as `evaluate` finds
    the models it scores; the DP model as "federated-dp")."""
    from federimed.checkpoints import RunDir
    from federimed.evaluation.compare import find_contenders

    curves: dict[str, list[list[float | None]]] = {}
    for seed in size.seeds:
        for dp in (False, True):
            contenders, _ = find_contenders(RunDir(_federated_run(paths.runs(seed, dp))),
                                            ["federated"] if dp else ["federated", "centralized", "local"])
            for contender in contenders:
                rounds = {m["round"]: m.get("heldout_loss") for m in round_metrics(contender.adapter.parent)}
                losses = [rounds.get(r) for r in range(1, max(rounds, default=0) + 1)]
                curves.setdefault("federated-dp" if dp else contender.label, []).append(losses)
    return curves


def _spent_epsilon(paths: ExperimentPaths, size: Size) -> float:
    """The largest ε the seeds' DP runs report after their last round."""
    return max(round_metrics(_federated_run(paths.runs(seed, dp=True)))[-1]["epsilon"] for seed in size.seeds)


def _reports(paths: ExperimentPaths, size: Size, dp: bool) -> dict[int, dict]:
    return {seed: json.loads((_federated_run(paths.runs(seed, dp)) / "eval" / "report.json").read_text())
            for seed in size.seeds}


def _interval(row: dict) -> str:
    return "–" if row["low"] is None else f"[{row['low']:+.3f}, {row['high']:+.3f}]"


def _markdown(summary: dict) -> str:
    lines = [f"# FederiMed experiment: {summary['cases']} held-out cases, seeds {summary['seeds']}", "",
             "| model | drug-F1 mean | sd over seeds | per seed |", "|---|---:|---:|---|"]
    models = summary["models"] | summary.get("dp", {}).get("models", {})
    for name, m in models.items():
        sd = "–" if m["sd"] is None else f"{m['sd']:.3f}"
        lines.append(f"| {name} | {m['mean']:.3f} | {sd} | {', '.join(f'{v:.3f}' for v in m['per_seed'])} |")
    lines += ["", "| paired difference (seeds averaged per case) | mean | 95 % interval | cases |", "|---|---:|---|---:|"]
    for row in all_pairs(summary):
        lines.append(f"| {row['comparison']} | {row['mean']:+.3f} | {_interval(row)} | {row['n']} |")
    lines += ["", "## Goals", ""] + [f"- {goal}: {value}" for goal, value in summary["goals"].items()]
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment(
        quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes: a smoke run of every stage.")] = False,
        workdir: Annotated[Path, typer.Option(help="Where its data, runs and report go.", resolve_path=True)] = Path("experiment"),
        seeds: Annotated[str | None, typer.Option(help="Comma-separated training seeds [default: 0,1,2].")] = None,
        patients: Annotated[int | None, typer.Option(min=2, help="Patients per hospital [default: 50].")] = None,
        data_seed: Annotated[int, typer.Option(help="Seed of the synthetic hospitals.")] = 7,
        split_seed: Annotated[int, typer.Option(help="Seed of the train / held-out split (recorded by ingest).")] = 13,
        lanes: Annotated[int, typer.Option(min=1, help="Training stages run at once (evaluations run one at a time, each on every core).")] = max(2, os.cpu_count() or 1),
    ) -> None:
        """Base, local-only, federated, centralized and DP-federated models, several seeds, the same held-out
        cases and an external hospital: paired differences with 95 % intervals, written to WORKDIR/report."""
        from federimed.fl.dp import noise_for_epsilon

        size = SIZES["quick" if quick else "default"]
        overrides = {"seeds": tuple(int(s) for s in seeds.split(",")) if seeds else size.seeds,
                     "patients": patients or size.patients}
        size = replace(size, **overrides)
        paths = ExperimentPaths(workdir)
        noise = noise_for_epsilon(size.dp_epsilon, size.rounds, delta=size.dp_delta, hospitals=HOSPITALS)
        console.print(f"Experiment in {workdir}: {HOSPITALS} training hospitals + 1 external, {size.patients} patients "
                      f"each, seeds {list(size.seeds)}; DP model at ε ≤ {size.dp_epsilon:g} (σ = {noise:.3f}). "
                      f"Stage logs: {paths.state / 'logs'}")
        started = time.perf_counter()
        try:
            training = training_stages(paths, size, data_seed, split_seed, noise)
            run_stages(training, paths.state, lanes, console)
            evaluation = evaluation_stages(paths, size, hospital_names(size, data_seed)[1])
            run_stages(evaluation, paths.state, 1, console)  # one at a time, each on every core (evaluation_stages)
            summary = pool_seeds(_reports(paths, size, False), _reports(paths, size, True), _spent_epsilon(paths, size))
            summary["heldout_loss_per_round"] = loss_per_round(_loss_curves(paths, size))
        except StageFailed as exc:
            console.print(f"[red]experiment stopped: {exc}[/]")
            raise typer.Exit(exc.code) from None
        except ExperimentError as exc:
            console.print(f"[red]experiment cannot pool its seeds: {exc}[/]")
            raise typer.Exit(1) from None
        summary |= {"size": size.__dict__ | {"seeds": list(size.seeds)}, "dp_noise_multiplier": noise,
                    "stage_seconds": recorded_seconds([*training, *evaluation], paths.state),
                    "seconds": time.perf_counter() - started}
        paths.report.mkdir(parents=True, exist_ok=True)
        (paths.report / "experiment.json").write_text(json.dumps(summary, indent=2) + "\n")
        (paths.report / "experiment.md").write_text(_markdown(summary))
        plot = plot_summary(summary, paths.report / "experiment.png")
        table = Table(title=f"{summary['cases']} held-out cases, seeds {summary['seeds']}")
        for column in ("comparison", "mean", "95 % interval"):
            table.add_column(column)
        for row in all_pairs(summary):
            table.add_row(row["comparison"], f"{row['mean']:+.3f}", _interval(row))
        console.print(table)
        for goal, value in summary["goals"].items():
            console.print(f"{goal}: [bold]{value}[/]")
        console.print(f"[green]report:[/] {paths.report / 'experiment.md'} (plot {plot})")
