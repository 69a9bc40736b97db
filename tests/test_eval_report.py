"""Scoring answers against held-out targets, and the report built from the scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from federimed.checkpoints import RunDir
from federimed.evaluation import compare
from federimed.evaluation.compare import f1_per_round, spaced_rounds
from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.report import build_report, write_report
from federimed.evaluation.runner import HeldoutCase, ModelScores, load_heldout, score_answer

SYSTEM = {"role": "system", "content": "You are a clinical decision-support assistant."}


def _case(case_id: str, hospital: str, drugs: set[str], reference: str) -> HeldoutCase:
    user = {"role": "user", "content": f"Patient: 50-year-old male\nNew diagnosis: case {case_id}"}
    return HeldoutCase(case_id, hospital, [SYSTEM, user], reference, frozenset(drugs), ("spirometry",), ())


@pytest.fixture
def vocab() -> DrugVocabulary:
    vocab = DrugVocabulary.with_common_brands()
    vocab.add_description("lisinopril 10 MG Oral Tablet")
    vocab.add_description("Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet")
    return vocab


def test_score_answer_counts_drugs_procedures_and_rouge(vocab: DrugVocabulary) -> None:
    case = _case("c1", "general", {"lisinopril"}, "Start medications: lisinopril.\nProcedures: spirometry.")
    right = score_answer(case, "Start medications: Zestril 10 mg.\nProcedures: Spirometry.", vocab)
    assert right.predicted_drugs == ["lisinopril"] and right.drug_f1 == 1.0 and right.procedure_recall == 1.0
    wrong = score_answer(case, "Start medications: Augmentin.\nProcedures: none.", vocab)
    assert wrong.drug_f1 == 0.0 and wrong.drug_precision == 0.0 and wrong.procedure_recall == 0.0
    assert right.rouge_l > wrong.rouge_l
    assert right.careplan_recall is None  # nothing to recall: left out of the means, not scored as 0 or 1


def test_load_heldout_joins_dialogues_and_targets(tmp_path: Path) -> None:
    folder = tmp_path / "general"
    folder.mkdir()
    answer = {"role": "assistant", "content": "Start medications: lisinopril."}
    user = {"role": "user", "content": "Patient: 61-year-old female"}
    (folder / "heldout.jsonl").write_text(json.dumps({"id": "a", "patient": "p", "messages": [SYSTEM, user, answer]}) + "\n")
    target = {"id": "a", "diagnosis": {"code": "59621000", "display": "Essential hypertension (disorder)"}, "drugs": [{"code": "314076", "display": "lisinopril 10 MG Oral Tablet", "ingredients": ["lisinopril"]}],
              "procedures": [{"code": "1", "display": "Spirometry (procedure)"}], "careplans": []}
    (folder / "targets.heldout.jsonl").write_text(json.dumps(target) + "\n")
    [case] = load_heldout(tmp_path, ["general"])
    assert case.drugs == {"lisinopril"} and case.procedures == ("spirometry",) and case.diagnosis == "59621000"
    assert case.reference == answer["content"] and all(m["role"] != "assistant" for m in case.messages)
    (folder / "targets.heldout.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no target"):
        load_heldout(tmp_path, ["general"])


def test_report_tables_plots_and_finite_numbers(tmp_path: Path, vocab: DrugVocabulary) -> None:
    cases = [_case(f"c{i}", h, {"lisinopril"}, "Start medications: lisinopril.") for i, h in
             enumerate(["childrens", "general", "general", "geriatric"])]
    good = ModelScores("federated", False, [score_answer(c, "lisinopril", vocab) for c in cases], heldout_loss=0.8)
    bad = ModelScores("base", False, [score_answer(c, "rest", vocab) for c in cases], heldout_loss=2.5)
    report = build_report("run-1", [bad, good], cases, rounds=[{"round": 1, "drug_f1": 0.5}, {"round": 2, "drug_f1": 1.0}])
    path = write_report(report, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    pooled = {m["model"]: m["pooled"]["drug_f1"]["mean"] for m in saved["models"]}
    assert pooled == {"base": 0.0, "federated": 1.0}
    assert set(saved["models"][0]["per_hospital"]) == {"childrens", "general", "geriatric"}
    for m in saved["models"]:  # every interval over more than one case is finite; one case has no interval
        for summary in [m["pooled"], m["per_hospital"]["general"]]:
            assert all(math.isfinite(v) for k in ("drug_f1", "rouge_l") for v in summary[k].values())
        assert m["per_hospital"]["childrens"]["drug_f1"]["low"] is None
    text = path.read_text()
    assert "| federated | 4 | 1.00" in text and "Federated drug F1 per round" in text
    assert (tmp_path / "eval" / "comparison.png").stat().st_size > 0
    assert (tmp_path / "eval" / "f1_per_round.png").stat().st_size > 0
    assert len(saved["examples"]) == 3 and set(saved["examples"][0]["answers"]) == {"base", "federated"}


@pytest.mark.parametrize(("rounds", "points", "scored"), [
    (range(1, 9), 4, [2, 4, 6, 8]),
    (range(1, 5), 4, [1, 2, 3, 4]),
    (range(1, 3), 4, [1, 2]),
    (range(1, 11), 4, [3, 5, 8, 10]),
    ([5, 1, 3], 1, [5]),
])
def test_per_round_scoring_keeps_evenly_spaced_rounds_ending_with_the_last(rounds, points: int, scored: list[int]) -> None:
    assert spaced_rounds(list(rounds), points) == scored


def test_rounds_are_scored_at_the_spaced_points_with_progress(tmp_path: Path, vocab: DrugVocabulary,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(1, 9):
        (tmp_path / f"round-{n}").mkdir()
        (tmp_path / f"round-{n}" / "metrics.json").write_text(json.dumps({"round": n}))
    cases = [_case(f"c{i}", "general", {"lisinopril"}, "") for i in range(3)]
    loaded: list[str] = []
    monkeypatch.setattr("federimed.serving.select.load_engine", lambda settings, adapter, purpose: loaded.append(adapter.name))

    def answer(label, engine, cases, vocab, *, on_batch, **kwargs):  # every answer right: F1 1.0
        on_batch(len(cases))
        return ModelScores(label, False, [score_answer(c, "Start medications: lisinopril.", vocab) for c in cases])

    monkeypatch.setattr(compare, "score_model", answer)
    seen: list[tuple[str, int, int]] = []
    rows = f1_per_round(RunDir(tmp_path), cases, vocab, settings=None, known={0: 0.0, 8: 0.9}, points=4,
                        progress=lambda label, done, total: seen.append((label, done, total)))
    assert [r["round"] for r in rows] == [0, 2, 4, 6, 8] and loaded == ["round-2", "round-4", "round-6"]
    assert seen == [("round 2", 3, 9), ("round 4", 6, 9), ("round 6", 9, 9)]  # round 8 was known: not answered again
    assert [r["drug_f1"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 0.9]
