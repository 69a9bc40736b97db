"""The `--quick` demo end to end, run as the README's `make demo` runs it: from the repository root with
the default relative work folder. Synthesise, ingest, audit, index, train (baselines + federated),
evaluate and report — then check the report's structure and that every number in it is finite.

It starts from nothing: the quick demo's own folders (data/quick, runs/quick) are removed first."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from federimed.commands.demo import PROFILES

pytestmark = [pytest.mark.slow, pytest.mark.demo, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "-m", "federimed.cli", "demo", "--quick", "--no-chat"]


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_demo_from_the_repository_root_writes_a_finite_report() -> None:
    for folder in (REPO / "data" / "quick", REPO / "runs" / "quick"):
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "FEDERIMED_CACHE": os.environ.get("FEDERIMED_CACHE", str(Path.home() / ".cache/federimed"))}
    result = subprocess.run(DEMO, cwd=REPO, capture_output=True, text=True, env=env, timeout=3000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Demo login: user demo" in result.stdout

    runs_dir = REPO / "runs" / "quick"  # the smoke run keeps its own runs
    runs = [json.loads(p.read_text()) for p in runs_dir.glob("*/run.json")]
    assert sorted(r["mode"] for r in runs) == ["centralized", "federated", "local-only", "local-only", "local-only"]
    federated = next(p.parent for p in runs_dir.glob("*/run.json") if json.loads(p.read_text())["mode"] == "federated")
    assert (runs_dir / "latest").resolve().parent == federated.resolve()  # the chat serves the federated model

    report = json.loads((federated / "eval" / "report.json").read_text())
    labels = {(m["model"], m["retrieval"]) for m in report["models"]}
    expected = {"base", "federated", "centralized"} | {f"local:{h}" for h in report["hospitals"]}
    assert labels == {(name, rag) for name in expected for rag in (False, True)} | {("federated+counts", False)}
    assert report["cases"] > 0 and not report["missing"]
    assert [r["round"] for r in report["f1_per_round"]] == [0, 1]  # the base model, then the one round
    assert len(report["examples"]) >= 1
    counts = {c["model"] for c in report["counts"]}  # the counting baselines, on the same cases
    k = PROFILES["quick"].min_cell  # the quick demo's suppression threshold
    assert {"counts:pooled", f"counts:pooled (k={k})"} | {f"counts:local:{h}" for h in report["hospitals"]} <= counts
    assert {r["comparison"] for r in report["paired"]} >= {
        "federated − base", "federated − pooled counts", "federated with cohort counts − federated"}
    assert "the best hospital alone" in (federated / "eval" / "report.md").read_text()
    pooled_n = {m["pooled"]["n"] for m in [*report["models"], *report["counts"]]}
    assert pooled_n == {report["cases"]}
    numbers = list(_numbers(report))  # undefined values (a CI over one case) are null, never NaN
    assert numbers and all(math.isfinite(n) for n in numbers)
    assert all(m["pooled"]["drug_f1"]["low"] is not None for m in report["models"])
    for name in ("report.md", "comparison.png", "f1_per_round.png"):
        assert (federated / "eval" / name).stat().st_size > 0
    # Up-to-date stages are skipped on a second run.
    again = subprocess.run(DEMO, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") >= 6
