"""Pipeline stages of `federimed demo`: `federimed` command lines run as child processes, several at once
when their inputs are ready, each skipped when a stamp shows its inputs unchanged since it last ran."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from federimed.memory import with_allocator

POLL_S = 0.5
STOP_GRACE_S = 60.0
"""How long a stage stopped with SIGINT (which lets `federimed train` stop its Flower processes) may take."""
CONTINUE = ("--continue-unfinished",)
"""What a training stage adds to its command line: a stage stopped part-way (Ctrl+C, a machine switched off)
continues its run from the last saved round when it runs again, instead of starting over."""


def training_dialogues(data_dir: Path, hospitals: Iterable[str]) -> int:
    """Training dialogues of ingested hospitals: a training stage's `work` (0 before ingest has written them)."""
    paths = [data_dir / name / "train.jsonl" for name in hospitals]
    return sum(sum(1 for line in p.open(encoding="utf-8") if line.strip()) for p in paths if p.is_file())


class StageFailed(RuntimeError):
    """A stage exited with an error; `code` is its exit status."""

    def __init__(self, name: str, code: int, log: Path) -> None:
        super().__init__(f"stage {name!r} failed (exit {code}); its output is in {log}")
        self.code = code


@dataclass(frozen=True)
class Stage:
    """One step: a `federimed` command line, the stages it waits for, the files whose content decides
    if it must rerun, and a check that its output is still there."""

    name: str
    args: list[str]
    inputs: Sequence[Path] = ()
    after: Sequence[str] = ()
    always: bool = False
    produced: Callable[[], bool] = lambda: True
    program: Sequence[str] = (sys.executable, "-m", "federimed.cli")
    work: Callable[[], float] = lambda: 0.0
    """How long the stage will take, in any unit shared by the stages (asked when it is ready to start):
    among ready stages the longest starts first, so that a long one does not start last and run alone."""

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.args).encode())
        for path in sorted(self.inputs):
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file() and not file.name.startswith("."):
                    digest.update(f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
        return digest.hexdigest()

    @property
    def trains(self) -> bool:
        """A `federimed train` stage: it runs with the training malloc (`federimed.memory.with_allocator`)."""
        return self.args[:1] == ["train"]

    def stamp(self, state_dir: Path) -> Path:
        """Where the fingerprint of the stage's last successful run is kept."""
        return state_dir / f"{self.name}.json"

    def up_to_date(self, state_dir: Path) -> bool:
        stamp = self.stamp(state_dir)
        return (
            not self.always
            and stamp.is_file()
            and json.loads(stamp.read_text())["fingerprint"] == self.fingerprint()
            and self.produced()
        )

    def arguments(self) -> list[str]:
        """`args`, and for a training stage `CONTINUE` (left out of the fingerprint: it does not change what the
        stage produces)."""
        return [*self.args, *(CONTINUE if self.trains else ())]

    def command(self) -> list[str]:
        return [*self.program, *self.arguments()]


@dataclass
class _Running:
    stage: Stage
    process: subprocess.Popen
    started: float
    log: IO[str]
    task: int


def log_path(state_dir: Path, name: str) -> Path:
    """Where a stage's output goes: `<state_dir>/logs/<name>.log`."""
    return state_dir / "logs" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.log"


def run_stages(stages: Sequence[Stage], state_dir: Path, lanes: int, console: Console) -> dict[str, float | None]:
    """Run `stages`, up to `lanes` at once, each as soon as the stages it waits for are done; of the stages
    ready at once the one with the most `work` starts first (earlier in the list on a tie). Output goes to
    one log per stage; the console shows what runs.
    Returns each stage's wall time (None: up to date, skipped). On a failure, the stages still running
    are stopped and `StageFailed` is raised after the failed stage's last lines are shown.

    With several lanes each stage gets its share of the cores as its CPU thread limit (OMP_NUM_THREADS,
    unless set already): two 2-thread torch processes on 2 cores ran 5 times slower than with one thread each."""
    names = [s.name for s in stages]
    unknown = {d for s in stages for d in s.after} - set(names)
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"stages wait for unknown stages {sorted(unknown)} or repeat a name")
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    waiting, running, timings = list(stages), [], {}
    work: dict[str, float] = {}  # each stage's work, asked once, when it becomes ready
    at_once = min(lanes, len(stages))
    threads = max(1, (os.cpu_count() or 1) // at_once) if at_once > 1 else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        try:
            while waiting or running:
                ready = [s for s in waiting if set(s.after) <= timings.keys()]
                work.update({s.name: s.work() for s in ready if s.name not in work})
                for stage in sorted(ready, key=lambda s: -work[s.name]):
                    if stage.up_to_date(state_dir):
                        waiting.remove(stage)
                        timings[stage.name] = None
                        bar.console.print(f"[dim]✓ {stage.name}: up to date, skipped[/]")
                    elif len(running) < lanes:
                        waiting.remove(stage)
                        running.append(_start(stage, state_dir, bar, threads))
                for job in [j for j in running if j.process.poll() is not None]:
                    running.remove(job)
                    timings[job.stage.name] = _finish(job, state_dir, bar)
                if waiting and not running and not any(set(s.after) <= timings.keys() for s in waiting):
                    raise ValueError(f"stages {[s.name for s in waiting]} wait for each other")
                time.sleep(POLL_S)
        except BaseException:
            for job in running:
                _stop(job)
            raise
    return timings


def recorded_seconds(stages: Sequence[Stage], state_dir: Path) -> dict[str, float | None]:
    """How long each stage took when it last ran, whichever invocation ran it (None: not recorded)."""
    stamps = {s.name: s.stamp(state_dir) for s in stages}
    return {name: json.loads(p.read_text()).get("seconds") if p.is_file() else None for name, p in stamps.items()}


def _start(stage: Stage, state_dir: Path, bar: Progress, threads: int | None) -> _Running:
    log = log_path(state_dir, stage.name).open("w", encoding="utf-8")
    log.write(f"$ federimed {' '.join(stage.arguments())}\n")
    log.flush()
    env = (with_allocator(os.environ) if stage.trains else dict(os.environ)) | {"PYTHONUNBUFFERED": "1"}
    if threads and "OMP_NUM_THREADS" not in env:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(  # its own session: Ctrl+C reaches it through `_stop`, once
        stage.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    bar.console.print(f"[bold]▶ {stage.name}[/]  [dim]federimed {' '.join(stage.arguments())}[/]",
                      soft_wrap=True)
    return _Running(stage, process, time.perf_counter(), log, bar.add_task(stage.name))


def _finish(job: _Running, state_dir: Path, bar: Progress) -> float:
    seconds = time.perf_counter() - job.started
    job.log.close()
    bar.remove_task(job.task)
    log = log_path(state_dir, job.stage.name)
    if job.process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        bar.console.print(f"[red]✗ {job.stage.name} failed (exit {job.process.returncode}) after {seconds:.0f} s; last lines of {log}:[/]")
        bar.console.print("\n".join(tail), markup=False, highlight=False)
        raise StageFailed(job.stage.name, job.process.returncode, log)
    stamp = {"fingerprint": job.stage.fingerprint(), "finished": time.time(), "seconds": round(seconds, 1)}
    job.stage.stamp(state_dir).write_text(json.dumps(stamp))
    bar.console.print(f"[green]✓ {job.stage.name}[/] {seconds:.0f} s  [dim]{log}[/]", soft_wrap=True)
    return seconds


def _stop(job: _Running) -> None:
    """Interrupt a stage (its whole process group), as Ctrl+C would, then kill it if it lingers."""
    try:
        os.killpg(job.process.pid, signal.SIGINT)
        job.process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()
    except ProcessLookupError:
        pass
    job.log.close()
