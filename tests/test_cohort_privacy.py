"""Cohort statistics under SecAgg+ and differential privacy: the secure sum equals the pooled counts and the
server never holds one hospital's counts; with DP, one patient moves the counts by at most the stated
sensitivity, the noise has the scale its ε says, and what one patient alone could reveal stays hidden."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from fl_support import LocalGrid
from test_cohort import DM, HOSPITALS, HTN, as_plain, pooled_by_hand, summed, write_hospital

from federimed.cohort import CohortCounts, describe, lookup, release
from federimed.cohort_privacy import ContributionBounds, CountNoise, gaussian_epsilon, selection_threshold
from federimed.fl.settings import ServerOptions

DELTA = 1e-6


@pytest.fixture
def federation(tmp_path: Path) -> Path:
    for name, rows in HOSPITALS.items():
        write_hospital(tmp_path / "hospitals" / name, rows)
    return tmp_path / "hospitals"


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 10.0])
def test_the_noise_scale_matches_the_reported_epsilon(epsilon: float) -> None:
    bounds = ContributionBounds()
    noise = CountNoise.calibrate(epsilon, DELTA, min_cell=11, bounds=bounds)
    assert gaussian_epsilon(noise.sigma / bounds.l2_sensitivity, DELTA / 2) == pytest.approx(epsilon, rel=0.01)
    if epsilon < 1:  # where the textbook Gaussian mechanism's bound holds, accounting is tighter
        assert noise.sigma < bounds.l2_sensitivity * math.sqrt(2 * math.log(1.25 / (DELTA / 2))) / epsilon
    counts = CohortCounts(diagnoses={HTN: "Essential hypertension"})
    for i in range(4000):
        cell = counts.cells[f"{HTN}|{i}|*"]
        cell.patients, cell.decisions, cell.hospitals = 10_000, 10_000, 3
    noisy = noise.applied(counts, hospitals=3, rng=np.random.default_rng(0))
    errors = [noisy.cells[k].patients - c.patients for k, c in counts.cells.items()]
    errors += [noisy.cells[k].decisions - c.decisions for k, c in counts.cells.items()]
    assert np.std(errors) == pytest.approx(noise.sigma, rel=0.03) and abs(np.mean(errors)) < noise.sigma / 20
    assert all(0 <= noisy.cells[k].hospitals <= 3 for k in counts.cells)  # clamped to who answered


def test_more_epsilon_means_less_noise_and_a_lower_threshold() -> None:
    noises = [CountNoise.calibrate(e, DELTA, 11, ContributionBounds()) for e in (1.0, 4.0, 16.0)]
    assert noises[0].sigma > noises[1].sigma > noises[2].sigma
    assert noises[0].threshold >= noises[1].threshold >= noises[2].threshold >= 11


def test_the_release_threshold_is_the_smallest_that_keeps_a_lone_patient_hidden() -> None:
    bounds = ContributionBounds()
    for sigma in (0.5, 3.0, 20.0):
        tau = selection_threshold(sigma, DELTA, bounds)

        def reach(t: int) -> float:  # P(round(1 + N(0, σ²)) ≥ t), over every item one patient touches
            return bounds.released_items * (1 - NormalDist(1, sigma).cdf(t - 0.5))

        assert reach(tau) <= DELTA < reach(tau - 1)


def heavy_hospital(folder: Path) -> None:
    """One patient with 6 diagnoses, 3 decisions each and 5 drugs per diagnosis, beside ordinary ones."""
    codes = [HTN, DM, "1", "2", "3", "4"]
    rows = [("heavy", 60, "male", code, [f"drug{i}" for i in range(5)]) for code in codes for _ in range(3)]
    rows += [(f"p{i}", 40 + i, "female", HTN, ["lisinopril"]) for i in range(5)]
    write_hospital(folder, rows)


def without(folder: Path, patient: str, into: Path) -> Path:
    """A copy of the hospital without `patient`'s records (a neighbouring dataset)."""
    into.mkdir(parents=True)
    for name in ("train.jsonl", "targets.train.jsonl", "manifest.json"):
        lines = (folder / name).read_text().splitlines(keepends=True)
        kept = [line for line in lines if name == "manifest.json" or json.loads(line)["patient"] != patient]
        (into / name).write_text("".join(kept))
    return into


def l2_change(a: CohortCounts, b: CohortCounts) -> float:
    fa, fb = a.to_metrics(), b.to_metrics()
    return math.sqrt(sum((fa.get(k, 0) - fb.get(k, 0)) ** 2 for k in fa.keys() | fb.keys()))


def test_one_patient_moves_the_bounded_counts_by_at_most_the_sensitivity(tmp_path: Path, monkeypatch) -> None:
    import test_cohort

    monkeypatch.setitem(test_cohort.NAMES, "1", "a (disorder)")
    for code in "234":
        monkeypatch.setitem(test_cohort.NAMES, code, f"{code} (disorder)")
    heavy_hospital(tmp_path / "h")
    bounds = ContributionBounds()
    for patient in ("heavy", "p0"):
        rest = without(tmp_path / "h", patient, tmp_path / f"without-{patient}")
        change = l2_change(CohortCounts.of_hospital(tmp_path / "h", bounds), CohortCounts.of_hospital(rest, bounds))
        assert 0 < change <= bounds.l2_sensitivity
    unbounded = l2_change(CohortCounts.of_hospital(tmp_path / "h"), CohortCounts.of_hospital(tmp_path / "without-heavy"))
    assert unbounded > bounds.l2_sensitivity  # without the bounds one patient could move the counts further


def test_a_dp_release_says_epsilon_and_hides_what_few_patients_have(federation: Path) -> None:
    noise = CountNoise.calibrate(8.0, DELTA, min_cell=1, bounds=ContributionBounds())
    artefact = release(noise.applied(summed(federation), 3, np.random.default_rng(1)), 1, list(HOSPITALS), noise)
    assert artefact["dp"]["epsilon"] == 8.0 and artefact["dp"]["unit"] == "patient"
    assert artefact["min_cell"] == noise.threshold > 6  # the noise's threshold, not the 1 asked for
    assert artefact["strata"] == {}  # 6 patients at most per diagnosis: nothing passes
    assert artefact["suppressed_strata"] is None  # how many strata exist is not said under DP
    big = summed(federation)
    for cell in big.cells.values():  # the same federation, 100 times larger
        cell.patients, cell.decisions = 100 * cell.patients, 100 * cell.decisions
        cell.drugs = type(cell.drugs)({d: 100 * n for d, n in cell.drugs.items()})
    artefact = release(noise.applied(big, 3, np.random.default_rng(1)), 1, list(HOSPITALS), noise)
    cohort = lookup(artefact, HTN, None, None)
    assert cohort.patients == pytest.approx(600, abs=6 * noise.sigma) and cohort.suppressed_drugs is None
    assert "differential-privacy noise (ε 8 at δ 1e-06 per patient)" in describe(cohort)


def node_configs(federation: Path) -> dict[int, dict]:
    return {node: {"data-path": str(federation / name)} for node, name in zip((11, 22, 33), HOSPITALS, strict=True)}


@pytest.mark.usefixtures("task_identity")
def test_counts_summed_by_secagg_equal_the_pooled_counts_and_no_hospital_sends_its_own(
    federation: Path, tmp_path: Path
) -> None:
    from federimed.fl.client_app import app
    from federimed.fl.cohort_stats import COUNTS_RECORD, gather

    grid = LocalGrid(node_configs(federation), app)
    options = ServerOptions(hospitals=3, runs_dir=tmp_path / "runs", min_cell=1, secagg=True)
    artefact = json.loads(gather(grid, options).read_text())
    assert as_plain(artefact) == pooled_by_hand() and artefact["hospitals"] == sorted(HOSPITALS)
    assert artefact["strata"][f"{HTN}|*|*"]["hospitals"] == 3
    received = [reply.content for reply in grid.received if reply.has_content()]
    assert received and not any(COUNTS_RECORD in content for content in received)
    named = [key for content in received for record in content.metric_records.values() for key in record]
    assert not [key for key in named if "/" in key]  # no count travels by name; vectors travel masked

    plain = LocalGrid(node_configs(federation), app)
    text = gather(plain, options.model_copy(update={"secagg": False})).read_text()
    assert as_plain(json.loads(text)) == as_plain(artefact)
    assert any(COUNTS_RECORD in reply.content for reply in plain.received)  # in the clear, each hospital's counts


@pytest.mark.usefixtures("task_identity")
def test_dp_counts_through_flower_report_epsilon(federation: Path, tmp_path: Path) -> None:
    from federimed.fl.client_app import app
    from federimed.fl.cohort_stats import gather

    options = ServerOptions(hospitals=3, runs_dir=tmp_path / "runs", min_cell=1, cohort_epsilon=4.0)
    artefact = json.loads(gather(LocalGrid(node_configs(federation), app), options).read_text())
    assert artefact["dp"]["epsilon"] == 4.0 and artefact["dp"]["bounds"] == {"diagnoses": 4, "decisions": 2, "drugs": 3}
    assert artefact["strata"] == {} and artefact["min_cell"] > 6  # 6 patients at most: nothing passes the noise
