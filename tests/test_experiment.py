"""`federimed experiment`: seeds pooled case by case into paired differences (hand-made reports), the DP
noise for a target ε, and the quick experiment end to end."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from federimed.commands.experiment import SIZES, ExperimentPaths, hospital_names, training_stages
from federimed.evaluation.experiment import ExperimentError, loss_per_round, pool_seeds
from federimed.fl.dp import hospital_epsilon, noise_for_epsilon

CASES = ["c1", "c2", "c3", "c4"]


def _entry(model: str, f1: list[float], retrieval: bool = False) -> dict:
    return {"model": model, "retrieval": retrieval, "pooled": {"drug_f1": {"mean": statistics.fmean(f1)}},
            "case_drug_f1": dict(zip(CASES, f1))}


def _report(seed: int, federated: list[float], local_a: list[float], local_b: list[float]) -> dict:
    return {
        "run": f"run-{seed}",
        "hospitals": ["a", "b"],
        "case_hospitals": {"c1": "a", "c2": "a", "c3": "b", "c4": "b"},
        "models": [_entry("base", [0.0, 0.0, 0.5, 0.0]), _entry("federated", federated),
                   _entry("centralized", [1.0, 1.0, 1.0, 0.5]), _entry("local:a", local_a), _entry("local:b", local_b),
                   _entry("federated", [0.0] * 4, retrieval=True)],  # with retrieval: not pooled
        "counts": [_entry("counts:pooled", [1.0, 0.5, 0.5, 0.5])],
        "external": [_entry("federated", [1.0, 0.0, 1.0, 1.0]), _entry("local:a", [0.0, 0.0, 0.0, 1.0]),
                     _entry("local:b", [1.0, 1.0, 1.0, 1.0])],
        "f1_per_round": [{"round": 0, "drug_f1": 0.1}, {"round": 1, "drug_f1": 0.5 + seed / 10}],
    }


REPORTS = {  # local:a is the best hospital alone for seed 0 (mean 0.5), local:b for seed 1 (mean 0.75)
    0: _report(0, [1.0, 1.0, 0.5, 0.5], local_a=[1.0, 0.0, 0.5, 0.5], local_b=[0.0, 0.0, 0.5, 0.5]),
    1: _report(1, [1.0, 0.5, 1.0, 0.5], local_a=[0.0, 0.0, 0.0, 0.5], local_b=[1.0, 0.5, 0.5, 1.0]),
}


def _paired(summary: dict, label: str) -> dict:
    return next(p for p in summary["paired"] if p["comparison"] == label)


def test_seeds_are_averaged_case_by_case_against_each_seeds_best_local_model() -> None:
    summary = pool_seeds(REPORTS)
    assert summary["best_local_per_seed"] == {"0": "local:a", "1": "local:b"}
    federated = [(1.0 + 1.0) / 2, (1.0 + 0.5) / 2, (0.5 + 1.0) / 2, (0.5 + 0.5) / 2]
    best_local = [(1.0 + 1.0) / 2, (0.0 + 0.5) / 2, (0.5 + 0.5) / 2, (0.5 + 1.0) / 2]
    beats = _paired(summary, "federated − best local-only")
    assert beats["mean"] == pytest.approx(statistics.fmean(f - b for f, b in zip(federated, best_local)))
    assert beats["n"] == 4 and beats["low"] <= beats["mean"] <= beats["high"]
    centralized = _paired(summary, "federated − 0.9 × centralized")
    assert centralized["mean"] == pytest.approx(statistics.fmean(federated) - 0.9 * statistics.fmean([1.0, 1.0, 1.0, 0.5]))
    assert _paired(summary, "federated − pooled counts")["mean"] == pytest.approx(statistics.fmean(federated) - 0.625)
    assert summary["models"]["federated"]["per_seed"] == [0.75, 0.75]
    assert summary["models"]["local:b"]["mean"] == pytest.approx((0.25 + 0.75) / 2)
    assert summary["f1_per_round"] == [{"round": 0, "drug_f1": 0.1, "seeds": 2},
                                       {"round": 1, "drug_f1": pytest.approx(0.55), "seeds": 2}]
    goals = summary["goals"]  # per-case differences 0, +0.5, +0.25, −0.25: a mean above 0, an interval that is not
    assert goals["federated beats the best local-only (95 % interval above 0)"] is False
    assert goals["base lowest"] is True
    assert goals["federated ≥ 0.9 × centralized"] is False  # 0.75 against 0.9 × 0.875
    # external: each seed's best local model is the one chosen on the training hospitals' cases
    external = summary["external"]["paired"][0]
    assert external["mean"] == pytest.approx(statistics.fmean([1.0, 0.0, 1.0, 1.0]) - statistics.fmean([0.5, 0.5, 0.5, 1.0]))


def test_each_hospital_is_compared_with_itself_alone_on_its_own_cases() -> None:
    rows = {r["comparison"]: r for r in pool_seeds(REPORTS)["per_hospital"]}
    # hospital a's cases c1, c2: federated (1.0, 0.75), a alone (0.5, 0.0); b's cases c3, c4: (0.75, 0.5) and (0.5, 0.75)
    own_a, own_b = rows["federated − a alone, on its own cases"], rows["federated − b alone, on its own cases"]
    assert own_a["n"] == 2 and own_a["mean"] == pytest.approx(((1.0 - 0.5) + (0.75 - 0.0)) / 2)
    assert own_b["n"] == 2 and own_b["mean"] == pytest.approx(((0.75 - 0.5) + (0.5 - 0.75)) / 2)
    assert pool_seeds(REPORTS)["goals"]["every hospital: federated above that hospital alone on its own cases"] is False
    older = {seed: {k: v for k, v in report.items() if k != "case_hospitals"} for seed, report in REPORTS.items()}
    assert "per_hospital" not in pool_seeds(older)  # reports written before cases named their hospital


def test_the_base_model_may_be_scored_by_one_seed_only() -> None:
    later = {**REPORTS[1], "models": [m for m in REPORTS[1]["models"] if m["model"] != "base"],
             "external": [m for m in REPORTS[1]["external"] if m["model"] != "base"], "f1_per_round": []}
    summary = pool_seeds({0: REPORTS[0], 1: later})
    assert summary["models"]["base"]["per_seed"] == [0.125] and summary["models"]["federated"]["per_seed"] == [0.75, 0.75]
    federated = [(1.0 + 1.0) / 2, (1.0 + 0.5) / 2, (0.5 + 1.0) / 2, (0.5 + 0.5) / 2]
    assert _paired(summary, "federated − base")["mean"] == pytest.approx(statistics.fmean(federated) - 0.125)
    assert summary["f1_per_round"][1] == {"round": 1, "drug_f1": pytest.approx(0.5), "seeds": 1}
    with pytest.raises(ExperimentError, match="base"):  # but by one seed at least
        pool_seeds({1: later})


def test_the_cost_of_dp_is_paired_with_the_federated_model_of_the_same_cases() -> None:
    dp = {seed: {**REPORTS[seed], "models": [_entry("federated", [0.5, 0.5, 0.5, 0.5])]} for seed in REPORTS}
    summary = pool_seeds(REPORTS, dp, dp_epsilon=10.0)
    cost = summary["dp"]["paired"][0]
    assert cost["mean"] == pytest.approx(0.5 - 0.75)
    assert summary["dp"]["epsilon"] == 10.0 and summary["goals"]["DP cost in drug-F1"] == pytest.approx(-0.25)


def test_seeds_that_scored_other_cases_are_refused() -> None:
    moved = json.loads(json.dumps(REPORTS[1]))
    for model in moved["models"]:
        model["case_drug_f1"] = {f"other-{k}": v for k, v in model["case_drug_f1"].items()}
    with pytest.raises(ExperimentError, match="different cases"):
        pool_seeds({0: REPORTS[0], 1: moved})
    with pytest.raises(ExperimentError, match="centralized"):
        pool_seeds({0: {**REPORTS[0], "models": [m for m in REPORTS[0]["models"] if m["model"] != "centralized"]}})


def test_loss_per_round_averages_the_seeds_that_recorded_each_round() -> None:
    curves = {"federated": [[0.9, 0.5, 0.3], [0.7, 0.3, 0.1]], "local:a": [[1.0, None], [0.8]]}
    pooled = loss_per_round(curves)
    assert [r["round"] for r in pooled["federated"]] == [1, 2, 3]
    assert [r["mean"] for r in pooled["federated"]] == pytest.approx([0.8, 0.4, 0.2])
    assert [r["seeds"] for r in pooled["federated"]] == [2, 2, 2]
    assert pooled["local:a"] == [{"round": 1, "mean": pytest.approx(0.9), "seeds": 2}]  # round 2: no seed recorded it


def test_training_stages_start_the_largest_work_first(tmp_path: Path) -> None:
    size = SIZES["default"]
    paths = ExperimentPaths(tmp_path)
    training, _ = hospital_names(size, data_seed=7)
    for dialogues, name in zip((5, 30, 2), training):
        (paths.hospitals / name).mkdir(parents=True)
        (paths.hospitals / name / "train.jsonl").write_text('{"id": "x"}\n' * dialogues)
    work = {s.name: s.work() for s in training_stages(paths, size, data_seed=7, split_seed=13, noise=1.0)}
    assert work["federated seed 0"] == work["centralized seed 0"] == work["federated DP seed 0"] == 37
    assert [work[f"local {name} seed 0"] for name in training] == [5, 30, 2]
    assert work["synthesise"] == 0


@pytest.mark.parametrize(("epsilon", "rounds"), [(10.0, 4), (4.0, 2), (1.0, 1)])
def test_noise_for_a_target_epsilon_is_the_smallest_that_keeps_it(epsilon, rounds) -> None:
    sigma = noise_for_epsilon(epsilon, rounds, delta=1e-5, hospitals=3)
    assert hospital_epsilon(sigma, rounds, delta=1e-5, hospitals=3) <= epsilon
    assert hospital_epsilon(sigma - 0.01, rounds, delta=1e-5, hospitals=3) > epsilon


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_quick_experiment_writes_paired_differences_over_its_seeds(tmp_path: Path) -> None:
    env = {**os.environ, "FEDERIMED_CACHE": os.environ.get("FEDERIMED_CACHE", str(Path.home() / ".cache/federimed"))}
    result = subprocess.run([sys.executable, "-m", "federimed.cli", "experiment", "--quick", "--workdir", "exp"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=3000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "exp" / "report" / "experiment.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["cases"] > 0 and summary["external"]["cases"] > 0
    assert {"base", "federated", "centralized"} <= set(summary["models"])
    assert len([m for m in summary["models"] if m.startswith("local:")]) == 3
    assert 0 < summary["dp"]["epsilon"] <= 10.0 and summary["dp_noise_multiplier"] > 0
    assert [p["comparison"] for p in summary["paired"]][:3] == [
        "federated − best local-only", "federated − 0.9 × centralized", "federated − base"]
    assert set(summary["heldout_loss_per_round"]) == set(summary["models"]) - {"base"} | {"federated-dp"}
    assert all(rows and all(r["mean"] > 0 for r in rows) for rows in summary["heldout_loss_per_round"].values())
    assert all(seconds and seconds > 0 for seconds in summary["stage_seconds"].values())
    assert (tmp_path / "exp" / "report" / "experiment.png").stat().st_size > 10_000
    for seed in (0, 1):  # the DP model trained with the noise the target ε needs, in its own runs folder
        dp_round = next((tmp_path / "exp" / "runs" / f"seed-{seed}-dp").glob("*/round-1/metrics.json"))
        assert 0 < json.loads(dp_round.read_text())["epsilon"] <= 10.0
