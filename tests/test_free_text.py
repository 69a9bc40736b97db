"""Free-text cases → the trained snapshot format: field-level accuracy on labelled doctor-style cases, one
renderer with ingest, diagnosis matching and the warnings shown to the doctor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federimed.free_text import match_condition, summary, understand
from ingest.dialogues import snapshot_text

CASES = Path(__file__).parent / "data"
FIELDS = ("age", "sex", "diagnosis", "conditions", "medications", "allergies", "findings")


def labelled(name: str) -> list[dict]:
    return [json.loads(line) for line in (CASES / name).read_text().splitlines() if line.strip()]


def parsed_fields(text: str) -> dict[str, object]:
    s = understand(text).snapshot
    if s is None:
        return dict.fromkeys(FIELDS)
    return {"age": s.age, "sex": s.sex, "diagnosis": s.new_diagnoses[0].lower(),
            "conditions": sorted(c.lower() for c in s.active_conditions), "medications": sorted(s.current_medications),
            "allergies": sorted(a.lower() for a in s.allergies), "findings": sorted(s.findings)}  # fmt: skip


def expected_fields(case: dict) -> dict[str, object]:
    return {"age": case["age"], "sex": case["sex"], "diagnosis": case["diagnosis"].lower(),
            "conditions": sorted(c.lower() for c in case["conditions"]), "medications": sorted(case["medications"]),
            "allergies": sorted(a.lower() for a in case["allergies"]), "findings": sorted(case["findings"])}  # fmt: skip


def accuracy(cases: list[dict]) -> float:
    hits = [parsed_fields(c["text"])[f] == expected_fields(c)[f] for c in cases for f in FIELDS]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("name", ["doctor_cases.jsonl", "doctor_cases_2.jsonl", "doctor_cases_blind.jsonl"])
def test_field_level_parse_accuracy_on_labelled_doctor_cases(name: str) -> None:
    """Three sets of 30-40 doctor-style cases: the first written beside the parser, the second written
    blind by someone who never saw the parser (0.79 at first; the parser was then improved on it), the third
    written blind afterwards and never used to change the parser."""
    cases = labelled(name)
    assert len(cases) >= 30 and accuracy(cases) >= 0.9


def test_free_text_is_rendered_by_ingests_renderer() -> None:
    understood = understand("56-year-old man, BP 152/96 on two visits, no medication, new essential hypertension.")
    assert understood.parsed and understood.text == snapshot_text(understood.snapshot)
    assert understood.text.splitlines()[:2] == ["Patient: 56-year-old male", "New diagnosis: Essential hypertension"]
    assert "Recent findings: BP 152/96 mmHg" in understood.text
    old = understand("95 year old woman with new pneumonia")
    assert old.snapshot.age == "90+" and old.snapshot.age_band == "90+"  # Safe Harbor, as ingest does


def test_a_case_in_the_trained_format_or_without_a_diagnosis_is_kept_as_typed() -> None:
    rendered = "Patient: 56-year-old male\nNew diagnosis: Essential hypertension\nAllergies: none"
    assert understand(rendered).text == rendered and not understand(rendered).parsed
    vague = "Hi, what would you give for a cough?"
    assert understand(vague).text == vague and summary(understand(vague)) == ""


@pytest.mark.parametrize(("typed", "name", "how"), [
    ("essential hypertension", "Essential hypertension", "exact"),
    ("HTN", "Essential hypertension", "abbreviation"),
    ("strep throat", "Streptococcal sore throat", "abbreviation"),
    ("acute bronchitis with wheeze", "Acute bronchitis", "exact"),
    ("otitis medai", "Otitis media", "fuzzy"),
    ("xyzzy syndrome", None, "no match"),
])  # fmt: skip
def test_diagnoses_match_the_trained_names(typed: str, name: str | None, how: str) -> None:
    match = match_condition(typed)
    assert match.name == name and match.how.startswith(how)


def test_the_doctor_is_told_what_was_understood_and_when_the_model_never_saw_the_diagnosis() -> None:
    text = "71M, PMH: atrial fibrillation, on apixaban. New HTN, BP 164/92. Allergic to penicillin."
    seen = understand(text, seen_diagnoses=["Essential hypertension", "Otitis media"])
    shown = summary(seen)
    assert "| New diagnosis | Essential hypertension (from “HTN”, abbreviation) |" in shown
    assert "| Current medications | apixaban |" in shown and "| Allergies | Penicillin |" in shown
    assert "not among the diagnoses" not in shown
    unseen = summary(understand(text, seen_diagnoses=["Otitis media"]))
    assert "Essential hypertension is not among the diagnoses the federation's counts show" in unseen
    unknown = summary(understand("40 year old man, new xyzzy syndrome"))
    assert "“xyzzy syndrome” matches no condition name the model was trained on" in unknown


def test_the_assistant_prepares_free_text_in_the_trained_format(tmp_path: Path) -> None:
    from federimed.assistant import Assistant

    assistant = Assistant(adapter="base", runs_dir=tmp_path, retrieval=False)
    prepared = assistant.prepare("34F with strep throat, allergic to penicillin. On sertraline.")
    assert prepared.case_text.startswith("Patient: 34-year-old female\nNew diagnosis: Streptococcal sore throat\n")
    assert "Allergies: Penicillin" in prepared.case_text and "Current medications: sertraline" in prepared.case_text
    assert prepared.messages[-1]["content"].endswith(prepared.case_text)
