"""Relative folders, as a new user types them: `federimed synth --out data/synthea` and the demo's
stages with a relative work folder, run from another current folder than the repository's. Child
processes that start in another folder (synthea, Flower) must still find what they are handed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from federimed.commands.demo import PROFILES, DemoPaths, pipeline_stages
from federimed.commands.stages import run_stages
from federimed.fl.settings import ServerOptions

pytestmark = pytest.mark.slow


def test_synth_writes_under_a_relative_out_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "federimed.cli", "synth", "--out", "data/synthea", "--hospitals", "1",
         "--patients", "1", "--seed", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bundles = list((tmp_path / "data" / "synthea" / "childrens" / "fhir").glob("*.json"))
    assert bundles, "no FHIR bundle written under the relative --out"
    assert json.loads((tmp_path / "data" / "synthea" / "synth.json").read_text())["hospitals"][0]["patients"] == 1


def test_demo_stages_run_with_a_relative_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthesis, ingest and the audits of the demo, from a relative work folder (the demo's default '.')."""
    monkeypatch.chdir(tmp_path)
    paths = DemoPaths.under(Path("."), quick=True)
    assert not paths.data.is_absolute()
    stages = {s.name: s for s in pipeline_stages(paths, PROFILES["quick"], seed=7)}
    wanted = ["synthesise", "ingest", *(name for name in stages if name.startswith("audit "))]
    timings = run_stages([stages[n] for n in wanted], paths.state, lanes=2, console=Console(quiet=True))
    assert set(timings) == set(wanted)
    dialogues = {}
    for hospital in ("childrens", "general", "geriatric-cardiac"):
        folder = tmp_path / "data" / "quick" / "hospitals" / hospital
        assert (folder / "manifest.json").is_file()
        dialogues[hospital] = len((folder / "train.jsonl").read_text().splitlines())
        assert stages[f"local-only baseline {hospital}"].work() == dialogues[hospital] > 0  # biggest starts first
    assert stages["federated training"].work() == stages["centralized baseline"].work() == sum(dialogues.values())


def test_server_options_hand_the_server_app_an_absolute_runs_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = ServerOptions(runs_dir=Path("runs")).to_run_config()
    assert config["runs-dir"] == str(tmp_path.resolve() / "runs")
