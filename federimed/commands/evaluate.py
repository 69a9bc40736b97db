"""`federimed evaluate` and `federimed report`: score models on held-out cases and show the comparison."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from federimed.progress import ProgressLines

console = Console()
err = Console(stderr=True)


def _run_dir(run: str, runs_dir: Path, *, federated: bool = False):
    """The run that `run` names ("latest", an id under `runs_dir`, a run folder or one of its rounds)."""
    from federimed.checkpoints import CheckpointError, RunDir, resolve_checkpoint

    path = Path(run)
    if not (path / "run.json").is_file():
        try:
            path = resolve_checkpoint(run, runs_dir).parent
        except CheckpointError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    if not (path / "run.json").is_file():
        err.print(f"[red]error:[/] {run!r} is not a training run (no run.json in {path})")
        raise typer.Exit(1)
    mode = RunDir(path).info()["mode"]
    if federated and mode != "federated":
        err.print(f"[red]error:[/] {run!r} is a {mode} run; --run takes the federated run (baselines are found beside it)")
        raise typer.Exit(1)
    return RunDir(path)


def evaluate(
    run: Annotated[str, typer.Option("--run", help="The federated run to evaluate: an id under --runs-dir, a path, or latest.")] = "latest",
    data: Annotated[Path, typer.Option("--data", help="Ingested data directory of the run's hospitals.", resolve_path=True)] = Path("data/hospitals"),
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where the runs live.", resolve_path=True)] = Path("runs"),
    retrieval: Annotated[str, typer.Option("--retrieval", help="on | off | both.")] = "both",
    compare: Annotated[str, typer.Option("--compare", help="Models: any of base,local,federated,centralized.")] = "base,local,federated,centralized",
    external: Annotated[Optional[Path], typer.Option("--external", help="An ingested hospital that took no part in training.", resolve_path=True)] = None,
    index_dir: Annotated[Optional[Path], typer.Option("--index-dir", help="Guideline index [default: data/guideline-index].", resolve_path=True)] = None,
    max_cases: Annotated[int, typer.Option("--max-cases", min=1, help="At most this many held-out cases per hospital.")] = 1000,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=8, help="Answer length.")] = 48,
    rounds: Annotated[bool, typer.Option("--rounds/--no-rounds", help="Also score the global adapter after its rounds.")] = True,
    round_points: Annotated[int, typer.Option("--round-points", min=1, help="Score at most this many rounds, evenly spaced, the last included (each costs a full evaluation).")] = 4,
    min_cell: Annotated[int, typer.Option("--min-cell", min=1, help="Counting baselines are also scored with diagnoses of fewer training patients than this suppressed (CMS rule: 11).")] = 11,
) -> None:
    """Score models on every held-out case: drug precision/recall/F1, procedure and care-plan recall,
    ROUGE-L, held-out loss, with 95 % bootstrap CIs; writes RUN/eval/report.{md,json} and plots."""
    from federimed.checkpoints import CheckpointError, latest_round
    from federimed.cohort import latest_artefact, stale_for
    from federimed.evaluation.compare import (
        evaluate_contenders,
        f1_per_round,
        find_contenders,
        score_with_counts,
        vocabulary,
    )
    from federimed.evaluation.counting import count_baselines
    from federimed.evaluation.report import build_report, rich_paired, rich_table, write_report
    from federimed.evaluation.runner import load_heldout

    modes = {"on": [True], "off": [False], "both": [False, True]}
    if retrieval not in modes:
        raise typer.BadParameter("--retrieval must be on, off or both")
    federated = _run_dir(run, runs_dir, federated=True)
    hospitals = sorted(federated.info()["hospitals"])
    run_settings = federated.settings()
    settings = run_settings.model
    try:
        contenders, missing = find_contenders(federated, [k.strip() for k in compare.split(",") if k.strip()])
        cases = [c for h in hospitals for c in load_heldout(data, [h])[:max_cases]]
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    for note in missing:
        err.print(f"[yellow]not evaluated:[/] {note}")
    vocab = vocabulary([data] + ([external.parent] if external else []))
    options = dict(settings=settings, index_dir=index_dir, max_new_tokens=max_new_tokens, seq_len=run_settings.train.seq_len)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("answering held-out cases", total=1)

        def reporter(what: str) -> Callable[[str, int, int], None]:
            """Progress of one phase, on the bar and (when output is a log file, where no bar is drawn) as lines."""
            lines = None if console.is_terminal else ProgressLines(what)

            def progress(label: str, done: int, total: int) -> None:
                bar.update(task, description=f"{what} ({label})", completed=done, total=total)
                if lines:
                    lines(done, total, label)
            return progress

        scores = evaluate_contenders(contenders, cases, vocab, retrieval=modes[retrieval],
                                     progress=reporter("answered held-out cases"), **options)
        external_scores = []
        if external:
            ext_cases = load_heldout(external.parent, [external.name])[:max_cases]
            external_scores = evaluate_contenders(contenders, ext_cases, vocab, retrieval=[False],
                                                  progress=reporter(f"answered {external.name}'s cases"), **options)
        artefact = latest_artefact(runs_dir)
        if artefact is not None and (why := stale_for(artefact, data, hospitals)):
            err.print(f"[yellow]cohort counts not given as context:[/] the newest artefact in {runs_dir} is stale: {why} "
                      "(run `federimed cohort`)")
            artefact = None
        federated_model = next((c for c in contenders if c.kind == "federated"), None)
        if artefact is not None and federated_model is not None:  # cohort counts as context, like retrieval
            bar.update(task, description="answering held-out cases (federated + cohort counts)")
            scores.append(score_with_counts(federated_model, cases, vocab, artefact, settings=settings,
                                            max_new_tokens=max_new_tokens))
        plain = {s.model: s.summary()["drug_f1"]["mean"] for s in scores if not s.retrieval}
        known = {0: plain["base"]} if "base" in plain else {}  # round 0: the global adapter starts from the base
        if "federated" in plain:
            known[latest_round(federated.path)[0]] = plain["federated"]
        per_round = f1_per_round(federated, cases, vocab, settings, known, round_points, reporter("scored rounds"),
                                 max_new_tokens=max_new_tokens) if rounds else []
    try:
        counts = count_baselines(data, hospitals, cases, vocab, min_cell)
    except FileNotFoundError as exc:
        err.print(f"[yellow]counting baselines not scored:[/] {exc}")
        counts = []
    report = build_report(federated.id, scores, cases, rounds=per_round, external=external_scores, counts=counts,
                          missing=missing)
    path = write_report(report, federated.path / "eval")
    console.print(rich_table(report))
    console.print(rich_paired(report))
    console.print(f"[green]report:[/] {path}")


def report(
    run: Annotated[str, typer.Argument(help="Run id under --runs-dir, a path, or latest.")] = "latest",
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where the runs live.", resolve_path=True)] = Path("runs"),
) -> None:
    """Print the comparison table of a run's evaluation report."""
    from federimed.evaluation.report import rich_paired, rich_table

    path = _run_dir(run, runs_dir).path / "eval" / "report.json"
    if not path.is_file():
        err.print(f"[red]error:[/] no evaluation report at {path}: run `federimed evaluate --run {run}` first")
        raise typer.Exit(1)
    saved = json.loads(path.read_text())
    console.print(rich_table(saved))
    console.print(rich_paired(saved))
    console.print(f"Full report: {path.with_suffix('.md')}")


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
    app.command()(report)
