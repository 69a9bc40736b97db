"""`federimed demo`: the whole story on one machine, each stage skipped when its outputs are up to date."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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


PROFILES = {
    # Sized for a 2-core CPU: the default took 38.5 min there (federated rounds ~3.5 min, evaluation 13 min).
    "default": Profile(patients=20, rounds=2, local_steps=5, batch_size=4, seq_len=256, max_cases=10),
    "quick": Profile(patients=4, rounds=2, local_steps=2, batch_size=4, seq_len=256, max_cases=4),
}


@dataclass(frozen=True)
class Stage:
    """One demo step: a `federimed` command line, the files whose content decides if it must rerun,
    and a check that its output is still there."""

    name: str
    args: list[str]
    inputs: Sequence[Path] = ()
    always: bool = False
    produced: Callable[[], bool] = lambda: True

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.args).encode())
        for path in sorted(self.inputs):
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file() and not file.name.startswith("."):
                    digest.update(f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
        return digest.hexdigest()


def _run(stage: Stage, state_dir: Path) -> float | None:
    """Run `stage` unless its stamp matches; return its wall time (None when skipped)."""
    stamp = state_dir / f"{stage.name}.json"
    fingerprint = stage.fingerprint()
    up_to_date = stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == fingerprint
    if not stage.always and up_to_date and stage.produced():
        console.print(f"[dim]✓ {stage.name}: up to date, skipped[/]")
        return None
    console.rule(f"[bold]{stage.name}[/]  federimed {' '.join(stage.args)}")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "federimed.cli", *stage.args], check=False)
    if result.returncode != 0:
        console.print(f"[red]demo stopped: stage {stage.name!r} failed (exit {result.returncode})[/]")
        raise typer.Exit(result.returncode)
    stamp.write_text(json.dumps({"fingerprint": stage.fingerprint(), "finished": time.time()}))
    return time.perf_counter() - started


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
    ) -> None:
        """Run the whole story: synthesise 3 hospitals, ingest and audit them, build the guideline index,
        train the baselines and the federated adapter, evaluate and report, then start the chat with a
        printed demo login."""
        from ingest.synth import plan

        profile = PROFILES["quick" if quick else "default"]
        data, runs = workdir / "data", workdir / "runs"
        if quick:  # the smoke run keeps its own data and runs, apart from the default demo's
            data, runs = data / "quick", runs / "quick"
        synth_dir, hospitals_dir = data / "synthea", data / "hospitals"
        state_dir = data / ".demo"
        state_dir.mkdir(parents=True, exist_ok=True)
        hospital_names = [spec.hospital for spec in plan(3, profile.patients, seed)]
        stages = [
            Stage("synthesise", ["synth", "--out", str(synth_dir), "--hospitals", "3", "--patients",
                                 str(profile.patients), "--seed", str(seed), "--force"],
                  produced=lambda: (synth_dir / "synth.json").is_file()),
            Stage("ingest", ["ingest-federation", str(synth_dir), "--out", str(hospitals_dir)], [synth_dir],
                  produced=lambda: all((hospitals_dir / h / "manifest.json").is_file() for h in hospital_names)),
        ]
        stages += [
            Stage(f"audit {name}", ["audit", str(hospitals_dir / name), "--source", str(synth_dir / name / "fhir")],
                  [hospitals_dir / name], always=True)
            for name in hospital_names
        ]
        train_args = ["--data", str(hospitals_dir), "--runs-dir", str(runs), "--rounds", str(profile.rounds),
                      "--local-steps", str(profile.local_steps), "--batch-size", str(profile.batch_size),
                      "--seq-len", str(profile.seq_len)]
        stages.append(Stage("guideline index", ["index", "--out", str(data / "guideline-index")], always=True))
        # Baselines first, the federated run last: runs/latest then points at the federated model for the chat.
        everyone = set(hospital_names)
        stages.append(Stage("centralized baseline", ["train", "--mode", "centralized", *train_args], [hospitals_dir],
                            produced=lambda: bool(_runs_of(runs, "centralized", everyone))))
        stages += [
            Stage(f"local-only baseline {name}", ["train", "--mode", "local", "--hospital", name, *train_args],
                  [hospitals_dir], produced=lambda name=name: bool(_runs_of(runs, "local-only", {name})))
            for name in hospital_names
        ]
        stages.append(Stage("federated training", ["train", *train_args], [hospitals_dir],
                            produced=lambda: bool(_runs_of(runs, "federated"))))
        timings: dict[str, float | None] = {}
        for stage in stages:
            timings[stage.name] = _run(stage, state_dir)
        federated = _newest_federated_run(runs)
        evaluation = Stage("evaluation", ["evaluate", "--run", str(federated), "--data", str(hospitals_dir),
                                          "--runs-dir", str(runs), "--index-dir", str(data / "guideline-index"),
                                          "--max-cases", str(profile.max_cases)],
                           [federated, hospitals_dir], produced=lambda: (federated / "eval" / "report.json").is_file())
        timings[evaluation.name] = _run(evaluation, state_dir)
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
