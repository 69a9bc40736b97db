"""The counting baseline (most frequent drug set per diagnosis code) and paired differences between
models scored on the same cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federimed.evaluation.counting import (
    DrugSetCounts,
    count_baselines,
    counts_answer,
    released_prediction,
    score_predictions,
)
from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.metrics import paired_difference
from federimed.evaluation.report import build_report, paired_differences, verdict
from federimed.evaluation.runner import CaseScore, HeldoutCase, ModelScores

HTN, DM, RARE = "59621000", "44054006", "999"


def target(case_id: str, patient: str, diagnosis: str, drugs: list[list[str]]) -> dict:
    return {
        "id": case_id, "patient": patient, "diagnosis": {"code": diagnosis, "display": diagnosis},
        "drugs": [{"code": str(i), "display": " / ".join(d), "ingredients": d} for i, d in enumerate(drugs)],
        "procedures": [], "careplans": [], "careplan_activities": [], "ended_days": None,
    }  # fmt: skip


def case(case_id: str, hospital: str, diagnosis: str, drugs: set[str]) -> HeldoutCase:
    return HeldoutCase(case_id, hospital, [{"role": "user", "content": "case"}], "truth", frozenset(drugs), (), (),
                       diagnosis=diagnosis)  # fmt: skip


def write_hospital(root: Path, name: str, targets: list[dict]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "targets.train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in targets))
    dialogues = [{"id": t["id"], "patient": t["patient"], "messages": [
        {"role": "user", "content": "Patient: 50-year-old female\nNew diagnosis: x"}]} for t in targets]
    (root / name / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))


@pytest.fixture
def vocab() -> DrugVocabulary:
    vocab = DrugVocabulary()
    for drug in ("lisinopril", "amlodipine", "metformin", "hydrochlorothiazide"):
        vocab.add(drug, (drug,))
    return vocab


def test_the_most_frequent_drug_set_per_diagnosis_is_predicted() -> None:
    counts = DrugSetCounts()
    for patient, drugs in [("p1", ["lisinopril"]), ("p2", ["lisinopril"]), ("p3", ["amlodipine", "lisinopril"])]:
        counts.add(HTN, patient, drugs)
    counts.add(DM, "p1", ["metformin"])
    assert counts.predict(HTN) == {"lisinopril"}
    assert counts.predict(DM) == {"metformin"}
    assert counts.predict(RARE) == frozenset()  # never seen


def test_ties_go_to_the_larger_set_then_alphabetical_order() -> None:
    counts = DrugSetCounts()
    counts.add(HTN, "p1", ["lisinopril"])
    counts.add(HTN, "p2", ["amlodipine", "hydrochlorothiazide"])
    counts.add(DM, "p1", ["metformin"])
    counts.add(DM, "p2", ["amlodipine"])
    assert counts.predict(HTN) == {"amlodipine", "hydrochlorothiazide"}
    assert counts.predict(DM) == {"amlodipine"}


def test_counts_are_scored_like_a_model_answer(vocab: DrugVocabulary) -> None:
    counts = DrugSetCounts()
    counts.add(HTN, "p1", ["lisinopril", "amlodipine"])
    cases = [case("a", "h", HTN, {"lisinopril"}), case("b", "h", DM, {"metformin"}), case("c", "h", DM, set())]
    scores = score_predictions("counts:pooled", counts.predict, cases, vocab)
    assert [c.drug_f1 for c in scores.cases] == pytest.approx([2 / 3, 0.0, 1.0])  # "no new medication" is right for c
    assert counts_answer(frozenset()) == "No new medication."
    assert vocab.extract(counts_answer(frozenset({"lisinopril", "amlodipine"}))) == {"lisinopril", "amlodipine"}


def test_pooled_counts_see_what_one_hospital_alone_never_saw(tmp_path: Path, vocab: DrugVocabulary) -> None:
    write_hospital(tmp_path, "childrens", [target("c1", "p1", DM, [["metformin"]])])
    write_hospital(tmp_path, "general", [target(f"g{i}", f"q{i}", HTN, [["lisinopril"]]) for i in range(3)])
    cases = [case("x", "childrens", HTN, {"lisinopril"}), case("y", "general", DM, {"metformin"})]
    scores = {s.model: s for s in count_baselines(tmp_path, ["childrens", "general"], cases, vocab, min_cell=2)}
    f1 = {label: [c.drug_f1 for c in s.cases] for label, s in scores.items()}
    assert f1["counts:pooled"] == [1.0, 1.0]
    assert f1["counts:local:childrens"] == [0.0, 1.0]
    assert f1["counts:local:general"] == [1.0, 0.0]
    assert f1["counts:pooled (k=2)"] == [1.0, 0.0]  # diabetes: one training patient, suppressed


def test_the_suppressed_baseline_predicts_from_released_counts_only() -> None:
    artefact = {"strata": {f"{HTN}|*|*": {"patients": 20, "drugs": {"lisinopril": 12, "amlodipine": 9}}}}
    assert released_prediction(artefact, HTN) == {"lisinopril"}  # 60 %: yes; 45 %: no
    assert released_prediction(artefact, DM) == frozenset()  # suppressed or never seen


def test_missing_training_targets_are_named(tmp_path: Path, vocab: DrugVocabulary) -> None:
    with pytest.raises(FileNotFoundError, match="ghost/targets.train.jsonl"):
        count_baselines(tmp_path, ["ghost"], [], vocab, min_cell=1)


def test_paired_difference_resamples_cases_together() -> None:
    a, b = [1.0, 1.0, 0.5, 0.0], [0.5, 1.0, 0.5, 0.0]
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(0.125) and diff.n == 4
    assert 0.0 <= diff.low <= diff.mean <= diff.high <= 0.5  # every resampled mean of {0.5, 0, 0, 0} is in [0, 0.5]
    assert paired_difference(a, b, scale=0.9).mean == pytest.approx((2.5 - 0.9 * 2.0) / 4)
    same = paired_difference([0.2, 0.9, 0.4], [0.2, 0.9, 0.4])
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)  # a model against itself: no spread at all
    with pytest.raises(ValueError, match="same cases"):
        paired_difference([1.0], [1.0, 0.0])


def scores(model: str, f1: list[float], retrieval: bool = False, hospitals: str = "") -> ModelScores:
    """Case i of `f1` comes from hospital hospitals[i] (one letter each; all from "h" without them)."""
    rows = [CaseScore(f"c{i}", hospitals[i] if hospitals else "h", "", [], v, v, v, None, None, 0.0) for i, v in enumerate(f1)]
    return ModelScores(model, retrieval, rows)


def test_paired_differences_compare_federated_with_the_best_local_and_0_9_centralized() -> None:
    models = [
        scores("base", [0.0, 0.0, 0.0, 0.0]),
        scores("local:a", [1.0, 0.0, 0.0, 0.0]),
        scores("local:b", [1.0, 1.0, 0.0, 0.0]),
        scores("federated", [1.0, 1.0, 1.0, 0.0]),
        scores("centralized", [1.0, 1.0, 1.0, 1.0]),
    ]
    rows = {r["comparison"]: r for r in paired_differences(models, [scores("counts:pooled", [1.0, 1.0, 0.0, 1.0])])}
    assert rows["federated − best local-only (local:b)"]["mean"] == pytest.approx(0.25)
    assert rows["federated − 0.9 × centralized"]["mean"] == pytest.approx(0.75 - 0.9)
    assert rows["federated − base"]["mean"] == pytest.approx(0.75)
    assert rows["federated − pooled counts"]["mean"] == pytest.approx(0.0)
    assert rows["base − pooled counts"]["mean"] == pytest.approx(-0.75)


def test_each_hospital_alone_is_compared_on_its_own_cases_only() -> None:
    models = [scores("local:a", [1.0, 0.0, 0.0, 0.0], hospitals="aabb"), scores("local:b", [0.0, 0.0, 1.0, 1.0], hospitals="aabb"),
              scores("federated", [1.0, 1.0, 1.0, 0.0], hospitals="aabb")]
    rows = {r["comparison"]: r for r in paired_differences(models)}
    assert rows["federated − a alone, on its own cases"]["n"] == 2
    assert rows["federated − a alone, on its own cases"]["mean"] == pytest.approx(0.5)  # c0: 0, c1: +1
    assert rows["federated − b alone, on its own cases"]["mean"] == pytest.approx(-0.5)  # c2: 0, c3: −1
    assert rows["federated − best local-only (local:b)"]["mean"] == pytest.approx(0.25)  # pooled: all four cases


def test_the_report_says_plainly_whether_federated_beat_the_best_hospital_alone() -> None:
    cases = [case(f"c{i}", "h", HTN, set()) for i in range(40)]
    better = [scores("local:a", [0.0] * 40), scores("federated", [1.0] * 30 + [0.0] * 10)]
    report = build_report("run", better, cases)
    assert verdict(report).startswith("Federated beat the best hospital alone (local:a): +0.75 [")
    assert "interval lies above 0" in verdict(report)
    tied = [scores("local:a", [1.0, 0.0] * 20), scores("federated", [0.0, 1.0] * 20)]
    assert "cannot tell them apart" in verdict(build_report("run", tied, cases))
