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
from rich.table import Table

from federimed.commands.stages import Stage, StageFailed, run_stages

console = Console()


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo profile."""

    patients: int
    rounds: int
    local_steps: int
    batch_size: int
    seq_len: int
    max_cases: int  # held-out cases evaluated per hospital
    heldout_max: int  # held-out dialogues per hospital scored at each checkpoint
    answer_tokens: int  # longest generated answer in the evaluation


PROFILES = {
    # Sized for a 2-core CPU (README "Demo timings").
    "default": Profile(patients=20, rounds=2, local_steps=5, batch_size=4, seq_len=256, max_cases=10, heldout_max=24,
                       answer_tokens=48),
    "quick": Profile(patients=4, rounds=1, local_steps=1, batch_size=2, seq_len=256, max_cases=2, heldout_max=4,
                     answer_tokens=32),
}


def _runs_of(runs: Path, mode: str, hospitals: set[str] | None = None) -> list[Path]:
    """Run folders under `runs` of `mode` (trained on exactly `hospitals`, when given), oldest first."""
    found = []
    for path in runs.glob("*/run.json"):
        info = json.loads(path.read_text())
        if info["mode"] == mode and info.get("rounds_completed") and (hospitals is None or set(info["hospitals"]) == hospitals):
            found.append((info["created"], path.parent))
    return [p for _, p in sorted(found)]


def _newest_federated_run(runs: Path) -> Path:
    """The most recently created federated run under `runs`."""
    federated = _runs_of(runs, "federated")
    if not federated:
        console.print(f"[red]demo stopped: no federated run under {runs}[/]")
        raise typer.Exit(1)
    return federated[-1]


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
        workdir: Annotated[Path, typer.Option(help="Where data/ and runs/ go.")] = Path("."),
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
        from federimed.checkpoints import latest_round, point_latest
        from ingest.synth import plan

        profile = PROFILES["quick" if quick else "default"]
        data, runs = workdir / "data", workdir / "runs"
        if quick:  # the smoke run keeps its own data and runs, apart from the default demo's
            data, runs = data / "quick", runs / "quick"
        synth_dir, hospitals_dir = data / "synthea", data / "hospitals"
        state_dir = data / ".demo"
        state_dir.mkdir(parents=True, exist_ok=True)
        hospital_names = [spec.hospital for spec in plan(3, profile.patients, seed)]
        audits = [f"audit {name}" for name in hospital_names]
        stages = [
            Stage("synthesise", ["synth", "--out", str(synth_dir), "--hospitals", "3", "--patients",
                                 str(profile.patients), "--seed", str(seed), "--force"],
                  produced=lambda: (synth_dir / "synth.json").is_file()),
            Stage("guideline index", ["index", "--out", str(data / "guideline-index")], always=True),
            Stage("ingest", ["ingest-federation", str(synth_dir), "--out", str(hospitals_dir)], [synth_dir],
                  after=["synthesise"],
                  produced=lambda: all((hospitals_dir / h / "manifest.json").is_file() for h in hospital_names)),
        ]
        stages += [
            Stage(audit, ["audit", str(hospitals_dir / name), "--source", str(synth_dir / name / "fhir")],
                  [hospitals_dir / name], after=["ingest"], always=True)
            for audit, name in zip(audits, hospital_names)
        ]
        train_args = ["--data", str(hospitals_dir), "--runs-dir", str(runs), "--rounds", str(profile.rounds),
                      "--local-steps", str(profile.local_steps), "--batch-size", str(profile.batch_size),
                      "--seq-len", str(profile.seq_len), "--heldout-max", str(profile.heldout_max)]
        # Training waits for clean audits. The federated run, the longest, starts first.
        everyone = set(hospital_names)
        stages.append(Stage("federated training", ["train", *train_args], [hospitals_dir], after=audits,
                            produced=lambda: bool(_runs_of(runs, "federated"))))
        stages.append(Stage("centralized baseline", ["train", "--mode", "centralized", *train_args], [hospitals_dir],
                            after=audits, produced=lambda: bool(_runs_of(runs, "centralized", everyone))))
        stages += [
            Stage(f"local-only baseline {name}", ["train", "--mode", "local", "--hospital", name, *train_args],
                  [hospitals_dir], after=audits, produced=lambda name=name: bool(_runs_of(runs, "local-only", {name})))
            for name in hospital_names
        ]
        console.print(f"Stage logs: {state_dir / 'logs'}; up to {lanes} stages run at once.")
        try:
            timings = run_stages(stages, state_dir, lanes, console)
            federated = _newest_federated_run(runs)
            point_latest(runs, latest_round(federated)[1])  # the chat serves the federated model, whichever run ended last
            evaluation = Stage("evaluation", ["evaluate", "--run", str(federated), "--data", str(hospitals_dir),
                                              "--runs-dir", str(runs), "--index-dir", str(data / "guideline-index"),
                                              "--max-cases", str(profile.max_cases),
                                              "--max-new-tokens", str(profile.answer_tokens)],
                               [federated, hospitals_dir],
                               produced=lambda: (federated / "eval" / "report.json").is_file())
            timings |= run_stages([evaluation], state_dir, 1, console)
        except StageFailed as exc:
            console.print(f"[red]demo stopped: {exc}[/]")
            raise typer.Exit(exc.code) from None
        from federimed.evaluation.report import rich_table

        console.print(rich_table(json.loads((federated / "eval" / "report.json").read_text())))
        table = Table(title="Demo stages")
        table.add_column("stage")
        table.add_column("wall time", justify="right")
        for name, seconds in timings.items():
            table.add_row(name, "skipped (up to date)" if seconds is None else f"{seconds:.0f} s")
        console.print(table)
        user, password = _demo_login(state_dir, data / "users.db")
        console.print(f"Demo login: user [bold]{user}[/], password [bold]{password}[/]")
        if chat:
            console.print(f"Starting the chat on http://127.0.0.1:{port} (Ctrl+C to stop)")
            subprocess.run(
                [sys.executable, "-m", "federimed.cli", "chat", "--port", str(port), "--runs-dir", str(runs),
                 "--index-dir", str(data / "guideline-index"), "--db", str(data / "users.db")],
                check=False,
            )
