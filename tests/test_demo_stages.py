"""The demo's stage runner: order by dependencies, stages at once up to the lanes, skipping stages whose
inputs are unchanged, and stopping everything, with the failed stage's output shown, when one fails."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from federimed.commands.stages import CONTINUE, Stage, StageFailed, log_path, recorded_seconds, run_stages

# A stage that records when it ran: argv = [journal, name, seconds, exit code]
SCRIPT = """
import json, sys, time
journal, name, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
start = time.time()
print(f"{name} working")
time.sleep(seconds)
with open(journal, "a") as out:
    out.write(json.dumps({"name": name, "start": start, "end": time.time()}) + "\\n")
print(f"{name} says goodbye")
sys.exit(code)
"""


def stage(tmp_path: Path, name: str, seconds: float = 0.5, code: int = 0, **kwargs) -> Stage:
    return Stage(name, [str(tmp_path / "journal.jsonl"), name, str(seconds), str(code)],
                 program=(sys.executable, "-c", SCRIPT), **kwargs)  # fmt: skip


def journal(tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "journal.jsonl"
    return {e["name"]: e for e in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}


def console() -> Console:
    return Console(record=True, width=200, force_terminal=False)


def test_stages_run_side_by_side_up_to_the_lanes_and_after_what_they_wait_for(tmp_path: Path) -> None:
    stages = [
        stage(tmp_path, "a", 1.5),
        stage(tmp_path, "b", 1.5),
        stage(tmp_path, "c", 0.2),  # a third lane would be needed to start c at once
        stage(tmp_path, "d", 0.2, after=["a", "b"]),
    ]
    timings = run_stages(stages, tmp_path / "state", lanes=2, console=console())
    ran = journal(tmp_path)
    assert set(timings) == {"a", "b", "c", "d"} and all(t is not None and t > 0 for t in timings.values())
    assert ran["a"]["start"] < ran["b"]["end"] and ran["b"]["start"] < ran["a"]["end"]  # side by side
    assert ran["c"]["start"] >= min(ran["a"]["end"], ran["b"]["end"]) - 0.1  # waited for a free lane
    assert ran["d"]["start"] >= max(ran["a"]["end"], ran["b"]["end"])
    assert "a says goodbye" in log_path(tmp_path / "state", "a").read_text()


def test_of_the_stages_ready_at_once_the_longest_starts_first(tmp_path: Path) -> None:
    stages = [
        stage(tmp_path, "first", 0.1),
        stage(tmp_path, "small", 0.1, after=["first"], work=lambda: 10),
        stage(tmp_path, "big", 0.1, after=["first"], work=lambda: 200),
        stage(tmp_path, "tie", 0.1, after=["first"], work=lambda: 10),
    ]
    run_stages(stages, tmp_path / "state", lanes=1, console=console())
    ran = journal(tmp_path)
    assert sorted(ran, key=lambda name: ran[name]["start"]) == ["first", "big", "small", "tie"]


def test_unchanged_stages_are_skipped_and_changed_inputs_rerun(tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_text("one")
    stages = [stage(tmp_path, "build", inputs=[source]), stage(tmp_path, "check", after=["build"], always=True)]
    run_stages(stages, tmp_path / "state", lanes=2, console=console())
    first = recorded_seconds(stages, tmp_path / "state")
    again = run_stages(stages, tmp_path / "state", lanes=2, console=console())
    assert again["build"] is None and again["check"] is not None
    # a skipped stage keeps the time it took when it ran (an experiment resumed later still reports it)
    assert recorded_seconds(stages, tmp_path / "state")["build"] == first["build"] >= 0.5
    assert recorded_seconds([stage(tmp_path, "never")], tmp_path / "state") == {"never": None}
    time.sleep(0.01)
    source.write_text("two, longer")
    assert run_stages(stages, tmp_path / "state", lanes=2, console=console())["build"] is not None
    missing_output = [stage(tmp_path, "build", inputs=[source], produced=lambda: False)]
    assert run_stages(missing_output, tmp_path / "state", lanes=1, console=console())["build"] is not None


def test_a_failed_stage_stops_the_others_and_shows_its_output(tmp_path: Path) -> None:
    out = console()
    stages = [stage(tmp_path, "slow", 30), stage(tmp_path, "broken", 0.3, code=3), stage(tmp_path, "later", after=["broken"])]
    started = time.perf_counter()
    with pytest.raises(StageFailed) as failure:
        run_stages(stages, tmp_path / "state", lanes=2, console=out)
    assert failure.value.code == 3 and "broken" in str(failure.value)
    assert time.perf_counter() - started < 20, "the slow stage was stopped, not waited for"
    assert set(journal(tmp_path)) == {"broken"}  # slow never finished, later never started
    shown = out.export_text()
    assert "broken failed (exit 3)" in shown and "broken working" in shown
    assert not (tmp_path / "state" / "broken.json").exists(), "a failed stage leaves no stamp"


def test_unknown_dependencies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        run_stages([stage(tmp_path, "a", after=["nope"])], tmp_path / "state", lanes=1, console=console())


def test_a_training_stage_continues_an_unfinished_run_without_changing_its_fingerprint(tmp_path: Path) -> None:
    training = Stage("federated", ["train", "--data", "d", "--rounds", "8"])
    other = Stage("evaluation", ["evaluate", "--run", "r"])
    assert training.command()[-1] == "--continue-unfinished" and "--continue-unfinished" not in other.command()
    line = training.command()[len(training.program):]
    assert training.fingerprint() == Stage("federated", [a for a in line if a not in CONTINUE]).fingerprint()
    assert training.fingerprint() != Stage("federated", ["train", "--data", "d", "--rounds", "4"]).fingerprint()
    state = tmp_path / ".stages"
    run_stages([Stage("t", ["train", "--rounds", "8"], program=(sys.executable, "-c", "pass"))], state, lanes=1,
               console=console())
    assert log_path(state, "t").read_text().splitlines()[0] == "$ federimed train --rounds 8 --continue-unfinished"
