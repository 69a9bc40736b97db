"""`federimed audit-model`: plant canaries, retrain a run's federation on them, measure their exposure."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from federimed.commands import fail

console = Console()
AUDIT_DIR = "audit"
"""Audits of RUN live in RUNS_DIR/RUN/audit/<stamp>/ (their federations in its own runs/, never runs/latest)."""


def _copies(text: str) -> list[int]:
    try:
        copies = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(f"--copies must be comma-separated whole numbers, not {text!r}") from None
    if not copies or any(k < 1 for k in copies):
        raise fail(f"--copies needs at least one number of copies, each ≥ 1 (got {text!r})")
    return copies


def _audit_run(runs_dir: Path, run: str):
    """The run to audit, with a clear error when it is missing or is itself an audit run."""
    from federimed.checkpoints import CheckpointError, RunDir

    path = runs_dir / run
    if not (path / "run.json").is_file():
        found = sorted(p.parent.name for p in runs_dir.glob("*/run.json")) if runs_dir.is_dir() else []
        raise fail(f"run {run!r} not found: {path / 'run.json'} does not exist "
                   f"(runs in {runs_dir}: {', '.join(found) or 'none'})")
    target = RunDir(path)
    try:
        info = target.info()
        settings = target.settings()
    except (CheckpointError, KeyError, ValueError) as err:
        raise fail(f"run {run!r}: cannot read its settings from {path / 'run.json'}: {err}") from None
    if "audit" in info:
        raise fail(f"run {run!r} is itself an audit run; audit the run it was made for")
    return target, info, settings


def _server_options(settings, hospitals: int, runs_dir: Path, dp: dict[str, float] | None):
    """ServerOptions of one audit federation: every hospital in every round, DP when `dp` is given; both
    average with fedavg (what DP needs), so that the audit compares DP with no DP, not two aggregators."""
    from pydantic import ValidationError

    from federimed.fl.settings import ServerOptions

    extra = {"dp": True} | dp if dp is not None else {}
    try:
        return ServerOptions(settings=settings, hospitals=hospitals, min_hospitals=hospitals, runs_dir=runs_dir,
                             aggregator="fedavg", **extra)
    except ValidationError as err:
        raise fail(f"invalid audit federation options: {err}") from None


def _mark_audit_run(run_dir: Path, marker: dict[str, Any]) -> None:
    """Record in run.json that this run is an audit run (never to be served)."""
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) | {"audit": marker}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def _epsilon(run_dir: Path) -> float | None:
    """ε the DP accountant recorded in the run's run.json (None without DP)."""
    value = json.loads((run_dir / "run.json").read_text()).get("epsilon")
    return float(value) if isinstance(value, (int, float)) else None


def register(app: typer.Typer) -> None:
    """Add `audit-model` to the root app."""

    @app.command("audit-model")
    def audit_model(
        run: Annotated[str, typer.Option(help="The run whose settings and hospitals the audit reproduces.")],
        runs_dir: Annotated[Path, typer.Option(help="Where RUN lives.", resolve_path=True)] = Path("runs"),
        data: Annotated[Path, typer.Option(help="Ingested data directory holding RUN's hospitals (only read).", resolve_path=True)] = (
            Path("data/hospitals")),
        hospital: Annotated[str | None, typer.Option(
            help="Hospital whose training data gets the canaries (default: RUN's first).")] = None,
        copies: Annotated[str, typer.Option(help="How often each planted canary repeats, comma-separated.")] = "1,4,16",
        per_level: Annotated[int, typer.Option(min=1, help="Canaries planted per number of copies.")] = 2,
        controls: Annotated[int, typer.Option(min=1, help="Canaries made the same way but never planted.")] = 3,
        alternatives: Annotated[int, typer.Option(
            min=1, help="Random same-format secrets each canary is ranked among (max exposure log2(N+1)).")] = 63,
        rounds: Annotated[int | None, typer.Option(min=1, help="Override RUN's rounds (cheaper audit).")] = None,
        local_steps: Annotated[int | None, typer.Option(min=1, help="Override RUN's local steps.")] = None,
        dp: Annotated[bool, typer.Option(help="Also train and audit a federation with differential privacy.")] = True,
        dp_noise_multiplier: Annotated[float, typer.Option(help="DP noise multiplier σ (> 0).")] = 1.0,
        dp_clip: Annotated[float, typer.Option(help="DP clipping norm of each hospital's update (> 0).")] = 1.0,
        dp_delta: Annotated[float, typer.Option(help="DP δ at which ε is reported (0 < δ < 1).")] = 1e-5,
        seed: Annotated[int, typer.Option(help="Seed of canaries and alternatives.")] = 0,
        score_batch: Annotated[int, typer.Option(min=1, help="Alternatives scored per forward pass.")] = 32,
    ) -> None:
        """Memorisation audit: plant canary patients in one hospital's data, retrain RUN's federation, measure exposure.

        Canaries are fake patients with rare combinations of conditions whose answer names a secret pair of
        rare drugs. They go into a COPY of one hospital's training data (planted 1, 4, 16 … times; controls
        never); the real data are only read. The audit federations (without and with DP) train on loopback
        with RUN's settings into RUNS_DIR/RUN/audit/<stamp>/runs, never runs/latest, so the chat never serves
        them. Each canary's exposure (Carlini et al., The Secret Sharer) is measured in the base model and in
        both audit models; report.md and report.json land in RUNS_DIR/RUN/audit/<stamp>/.
        """
        from federimed.commands.train import federate_with_progress
        from federimed.fl.hospitals import HospitalDataError, ingested_hospitals
        from federimed.memorisation.canaries import (
            CanaryError,
            hospital_dialogues,
            make_canaries,
            plant,
        )
        from federimed.memorisation.report import (
            build_report,
            exposure_table,
            write_report,
        )

        started = time.perf_counter()
        levels = _copies(copies)
        audited, info, settings = _audit_run(runs_dir, run)
        settings = settings.model_copy(update={"rounds": rounds or settings.rounds})
        if local_steps:
            settings = settings.model_copy(update={"train": settings.train.model_copy(update={"local_steps": local_steps, "epochs": 0})})
        try:
            hospitals = ingested_hospitals(data, sorted(info["hospitals"]))
        except HospitalDataError as err:
            raise fail(f"run {run!r} trained on {', '.join(sorted(info['hospitals']))}: {err}") from None
        target = hospital or hospitals[0].name
        if target not in [h.name for h in hospitals]:
            raise fail(f"--hospital {target!r} is not one of run {run!r}'s hospitals: "
                       f"{', '.join(h.name for h in hospitals)}")
        dp_settings = {"dp_noise_multiplier": dp_noise_multiplier, "dp_clip": dp_clip, "dp_delta": dp_delta}
        folder = audited.path / AUDIT_DIR / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        federations = {"no-dp": _server_options(settings, len(hospitals), (folder / "runs").resolve(), None)}
        if dp:
            federations["dp"] = _server_options(settings, len(hospitals), (folder / "runs").resolve(), dp_settings)
        try:
            canaries = make_canaries(hospital_dialogues(hospitals), copies=levels, per_level=per_level,
                                     controls=controls, seed=seed)
            canaries.alternatives(canaries.canaries[0], alternatives)  # enough distinct secrets?
        except CanaryError as err:
            raise fail(str(err)) from None
        folder.mkdir(parents=True)
        canaries.save(folder / "canaries.json")
        console.print(f"auditing run [bold]{run}[/]: {len(canaries.planted)} canaries planted in [bold]{target}[/] "
                      f"({', '.join(f'{k}×' for k in levels)}), {len(canaries.controls)} controls → {folder}")
        seconds: dict[str, float] = {}
        trained: dict[str, Path] = {}
        work = folder / ".data"  # a copy of the hospitals' dialogues, deleted after training
        try:
            copies_dirs = plant(canaries, hospitals, target, work)
            for name, options in federations.items():
                console.rule(f"audit federation {name}")
                tick = time.perf_counter()
                trained[name] = federate_with_progress(copies_dirs, options)
                _mark_audit_run(trained[name], {"of_run": run, "model": name, "canaries_in": target,
                                                "canaries": str(folder / "canaries.json")})
                seconds[f"train {name}"] = time.perf_counter() - tick
        finally:
            shutil.rmtree(work, ignore_errors=True)
        tick = time.perf_counter()
        results = _score(settings, canaries, trained, alternatives, score_batch)
        seconds["score"] = time.perf_counter() - tick
        seconds["total"] = time.perf_counter() - started
        notes = {"base": "base model, no adapter"} | {
            name: f"run {path.name}" + (f", ε = {eps:.3g} at δ = {dp_delta:g}" if (eps := _epsilon(path)) else "")
            + (f", noise ×{dp_noise_multiplier:g}, clip {dp_clip:g}" if name == "dp" else "")
            for name, path in trained.items()
        }
        meta = {
            "run": run, "audit": folder.name, "hospital": target, "hospitals": [h.name for h in hospitals],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": settings.model_dump(mode="json"),
            "settings_summary": f"{settings.rounds} rounds × "
                                + (f"{settings.train.epochs:g} passes" if settings.train.epochs
                                   else f"{settings.train.local_steps} steps")
                                + f", batch "
                                f"{settings.train.batch_size}, lr {settings.train.lr:g}",
            "dp": dp_settings | {"epsilon": _epsilon(trained["dp"])} if "dp" in trained else None,
            "audit_runs": {name: str(path) for name, path in trained.items()},
            "model_notes": notes, "seconds": seconds,
        }
        report = build_report(meta, canaries, results)
        json_path, md_path = write_report(report, folder)
        console.print(exposure_table(report))
        for name, summary in report["models"].items():
            console.print(f"[bold]{name}[/] ({notes[name]}): {summary['verdict']}", soft_wrap=True)
        console.print(f"wall time {seconds['total']:.0f} s ("
                      + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total") + ")")
        console.print(f"[green]report:[/] {md_path} and {json_path}")


def _score(settings, canaries, trained: dict[str, Path], alternatives: int, batch_size: int):
    """Exposure and greedy answers of every canary in the base model and in each trained audit model."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from safetensors.torch import load_file

    from federimed.checkpoints import ADAPTER_WEIGHTS, latest_round
    from federimed.memorisation.exposure import greedy_answers, measure, reproduces
    from federimed.model import add_lora, load_adapter_state, load_base

    base, tokenizer = load_base(settings.model)
    model = add_lora(base, settings.lora, seed=settings.train.seed)
    results = {}
    with Progress(TextColumn("[bold]scoring[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("canaries", total=len(canaries.canaries) * (1 + len(trained)))
        for name in ("base", *trained):
            progress.update(task, description=name)
            if name == "base":
                with model.disable_adapter():
                    exposures = measure(model, tokenizer, canaries, alternatives, settings.train.seq_len, batch_size,
                                        on_canary=lambda _: progress.advance(task))
                    answers = greedy_answers(model, tokenizer, canaries.canaries)
            else:
                load_adapter_state(model, load_file(latest_round(trained[name])[1] / ADAPTER_WEIGHTS))
                exposures = measure(model, tokenizer, canaries, alternatives, settings.train.seq_len, batch_size,
                                    on_canary=lambda _: progress.advance(task))
                answers = greedy_answers(model, tokenizer, canaries.canaries)
            hits = [reproduces(a, c.secret) for a, c in zip(answers, canaries.canaries)]
            results[name] = (exposures, answers, hits)
    return results
