"""The likelihood score: candidate medication lines from training dialogues, ranked by the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from federimed.evaluation import likelihood
from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.likelihood import Candidates, candidate_logprobs, medication_line, score_case
from federimed.evaluation.runner import HeldoutCase
from federimed.serving.backend import prompt_ids

SYSTEM = {"role": "system", "content": "You are a clinical decision-support assistant."}
USER = {"role": "user", "content": "Patient: 58-year-old male\nNew diagnosis: Essential hypertension"}
HYPERTENSION, BRONCHITIS = "59621000", "10509002"


def _write_hospital(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    """rows: (case id, diagnosis code, medication line)."""
    folder.mkdir(parents=True)
    dialogues, targets = [], []
    for case_id, code, line in rows:
        answer = {"role": "assistant", "content": f"Start medications: {line}.\nProcedures: none.\nCare plan: none."}
        dialogues.append({"id": case_id, "patient": "p", "messages": [SYSTEM, USER, answer]})
        targets.append({"id": case_id, "diagnosis": {"code": code, "display": "x"}, "drugs": []})
    (folder / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    (folder / "targets.train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in targets))


def test_candidates_are_each_diagnosis_lines_by_frequency_across_hospitals(tmp_path: Path) -> None:
    _write_hospital(tmp_path / "a", [("1", HYPERTENSION, "lisinopril"), ("2", HYPERTENSION, "hydrochlorothiazide"),
                                     ("3", BRONCHITIS, "acetaminophen")])
    _write_hospital(tmp_path / "b", [("4", HYPERTENSION, "hydrochlorothiazide"), ("5", BRONCHITIS, "none")])
    candidates = Candidates.from_training([tmp_path / "a", tmp_path / "b"])
    assert candidates.for_diagnosis(HYPERTENSION) == ("hydrochlorothiazide", "lisinopril", "none")
    assert candidates.for_diagnosis(BRONCHITIS) == ("acetaminophen", "none")  # "none" is not added twice
    assert candidates.for_diagnosis("unseen") == ("hydrochlorothiazide", "lisinopril", "acetaminophen", "none")


def test_a_training_answer_without_a_medication_line_is_named(tmp_path: Path) -> None:
    _write_hospital(tmp_path / "a", [("1", HYPERTENSION, "lisinopril")])
    dialogue = json.loads((tmp_path / "a" / "train.jsonl").read_text())
    dialogue["messages"][-1]["content"] = "Rest."
    (tmp_path / "a" / "train.jsonl").write_text(json.dumps(dialogue) + "\n")
    with pytest.raises(ValueError, match=r"a/train.jsonl: case 1 has no medication line"):
        Candidates.from_training([tmp_path / "a"])


def test_medication_line() -> None:
    assert medication_line("Start medications: amoxicillin, clavulanate.\nProcedures: none.") == "amoxicillin, clavulanate"
    assert medication_line("Procedures: none.") is None


def test_score_case_takes_the_most_likely_line_and_ranks_the_true_one(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = DrugVocabulary.with_common_brands()
    vocab.add_description("lisinopril 10 MG Oral Tablet")
    vocab.add_description("Hydrochlorothiazide 25 MG Oral Tablet")
    candidates = Candidates({HYPERTENSION: ("hydrochlorothiazide", "lisinopril")}, ("lisinopril",))
    case = HeldoutCase("c", "general", [SYSTEM, USER], "Start medications: lisinopril.\nProcedures: none.",
                       frozenset({"lisinopril"}), (), (), HYPERTENSION)
    scores = {"hydrochlorothiazide": -1.0, "lisinopril": -3.0, "none": -2.0}
    monkeypatch.setattr(likelihood, "candidate_logprobs", lambda m, t, msgs, lines: [scores[x] for x in lines])
    wrong = score_case(None, None, case, candidates, vocab)
    assert (wrong.predicted_drugs, wrong.drug_f1, wrong.true_rank, wrong.candidates) == (["hydrochlorothiazide"], 0.0, 3, 3)
    scores["lisinopril"] = -0.5
    right = score_case(None, None, case, candidates, vocab)
    assert (right.predicted_drugs, right.drug_f1, right.true_rank) == (["lisinopril"], 1.0, 1)


def test_candidate_logprobs_equal_full_sequence_logprobs(base) -> None:
    """Reading the shared tokens once and the candidates together on copies of the cache gives each
    candidate the same log-probability, up to one shared term, as reading its whole sequence alone."""
    model, tokenizer = base
    lines = ["lisinopril", "amoxicillin, clavulanate", "none", "hydrochlorothiazide, lisinopril, amlodipine"]
    fast = candidate_logprobs(model, tokenizer, [SYSTEM, USER], lines)
    prompt = prompt_ids(tokenizer, [SYSTEM, USER])
    slow = []
    with torch.no_grad():
        for line in lines:
            own = tokenizer.encode(f"Start medications: {line}.\n", add_special_tokens=False)
            logprobs = model(torch.tensor([prompt + own])).logits[0].float().log_softmax(-1)
            slow.append(sum(float(logprobs[len(prompt) + i - 1, t]) for i, t in enumerate(own)))
    offsets = [f - s for f, s in zip(fast, slow)]
    assert max(offsets) - min(offsets) < 1e-3
    assert sorted(range(4), key=lambda i: fast[i]) == sorted(range(4), key=lambda i: slow[i])
