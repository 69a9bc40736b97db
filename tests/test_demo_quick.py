"""The `--quick` demo end to end: synthesise, ingest, audit, index, train (baselines + federated),
evaluate and report — then check the report's structure and that every number in it is finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.demo, pytest.mark.timeout(3600)]


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_demo_pipeline_writes_a_finite_report(tmp_path: Path) -> None:
    env = {**os.environ, "FEDERIMED_CACHE": os.environ.get("FEDERIMED_CACHE", str(Path.home() / ".cache/federimed"))}
    result = subprocess.run(
        [sys.executable, "-m", "federimed.cli", "demo", "--quick", "--no-chat", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=3000,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Demo login: user demo" in result.stdout

    runs_dir = tmp_path / "runs" / "quick"  # the smoke run keeps its own runs
    runs = [json.loads(p.read_text()) for p in runs_dir.glob("*/run.json")]
    assert sorted(r["mode"] for r in runs) == ["centralized", "federated", "local-only", "local-only", "local-only"]
    federated = next(p.parent for p in runs_dir.glob("*/run.json") if json.loads(p.read_text())["mode"] == "federated")
    assert (runs_dir / "latest").resolve().parent == federated.resolve()  # the chat serves the federated model

    report = json.loads((federated / "eval" / "report.json").read_text())
    labels = {(m["model"], m["retrieval"]) for m in report["models"]}
    expected = {"base", "federated", "centralized"} | {f"local:{h}" for h in report["hospitals"]}
    assert labels == {(name, rag) for name in expected for rag in (False, True)}
    assert report["cases"] > 0 and not report["missing"]
    assert [r["round"] for r in report["f1_per_round"]] == [0, 1]  # the base model, then the one round
    assert len(report["examples"]) >= 1
    pooled_n = {m["pooled"]["n"] for m in report["models"]}
    assert pooled_n == {report["cases"]}
    numbers = list(_numbers(report))  # undefined values (a CI over one case) are null, never NaN
    assert numbers and all(math.isfinite(n) for n in numbers)
    assert all(m["pooled"]["drug_f1"]["low"] is not None for m in report["models"])
    for name in ("report.md", "comparison.png", "f1_per_round.png"):
        assert (federated / "eval" / name).stat().st_size > 0
    # Up-to-date stages are skipped on a second run.
    again = subprocess.run(
        [sys.executable, "-m", "federimed.cli", "demo", "--quick", "--no-chat", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") >= 6
