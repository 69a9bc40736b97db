"""Safety checks on answers: allergy conflicts by drug class (and cross-reactivity), repeated and same-class
medications; sentences that avoid a drug are not flagged."""

from __future__ import annotations

import pytest

from federimed.safety import case_lists, check, proposed_drugs, warning_text


def case(allergies: str = "none", medications: str = "none") -> str:
    return (f"Patient: 34-year-old female\nNew diagnosis: Streptococcal sore throat\nActive conditions: none\n"
            f"Current medications: {medications}\nAllergies: {allergies}\nRecent findings: none")


def kinds(flags) -> list[tuple[str, str]]:
    return [(f.drug, f.kind) for f in flags]


def test_the_case_lists_are_read_from_the_rendered_lines() -> None:
    text = case("Penicillin V; Mold; Sulfamethoxazole / Trimethoprim", "lisinopril, acetaminophen")
    assert case_lists(text) == (["Penicillin V", "Mold", "Sulfamethoxazole / Trimethoprim"], ["lisinopril", "acetaminophen"])
    assert case_lists(case()) == ([], [])


@pytest.mark.parametrize(("allergies", "answer", "expected"), [
    ("Penicillin V", "Start medications: amoxicillin, acetaminophen.", [("amoxicillin", "allergy")]),
    ("Allergy to penicillin", "Start medications: cephalexin.", [("cephalexin", "cross-reactivity")]),
    ("Aspirin", "Start medications: ibuprofen.", [("ibuprofen", "allergy")]),
    ("Sulfamethoxazole / Trimethoprim", "Start medications: sulfamethoxazole, trimethoprim.",
     [("sulfamethoxazole", "allergy"), ("trimethoprim", "allergy")]),
    ("sulfa drugs", "Start medications: sulfamethoxazole.", [("sulfamethoxazole", "allergy")]),
    ("Lisinopril", "Start enalapril 5 mg daily.", [("enalapril", "allergy")]),
    ("Penicillin V", "Start Augmentin 875 mg twice daily.", [("amoxicillin", "allergy")]),
    ("Mold; Grass pollen", "Start medications: amoxicillin.", []),
    ("none", "Start medications: amoxicillin.", []),
    ("Penicillin V", "Avoid amoxicillin (penicillin allergy). Start medications: azithromycin.", []),
    ("Aspirin", "Start medications: acetaminophen. Do not use ibuprofen or naproxen.", []),
])  # fmt: skip
def test_allergy_conflicts_are_flagged_by_drug_class(allergies: str, answer: str, expected: list) -> None:
    assert kinds(check(case(allergies), answer)) == expected


def test_repeated_and_same_class_medications_are_flagged() -> None:
    flags = check(case(medications="lisinopril, naproxen"), "Start medications: lisinopril, ibuprofen, losartan.")
    assert kinds(flags) == [("lisinopril", "duplicate"), ("ibuprofen", "same class")]  # losartan: another class
    assert str(flags[1]) == "ibuprofen: the patient already takes naproxen (nsaids)"
    assert check(case(medications="amlodipine"), "Start medications: hydrochlorothiazide.") == []


def test_the_warning_names_each_drug_and_why() -> None:
    flags = check(case("Penicillin V"), "Start medications: amoxicillin.")
    assert warning_text(flags) == ("⚠️ **Check before prescribing:**\n- **amoxicillin** — the patient is allergic to "
                                   "Penicillin V (penicillins)")
    assert warning_text([]) == ""


def test_proposed_drugs_keep_the_answers_order() -> None:
    assert proposed_drugs("Start medications: naproxen, amoxicillin.\nProcedures: none.") == ["naproxen", "amoxicillin"]


def test_ask_prints_what_it_understood_and_the_warning_after_the_answer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`federimed ask` parses free text and checks the answer it printed (the model is replaced by a fixed
    answer here: the wiring is under test, not the model)."""
    from typer.testing import CliRunner

    from federimed.assistant import Assistant
    from federimed.cli import app

    monkeypatch.setattr(Assistant, "model", lambda self: None)
    monkeypatch.setattr(Assistant, "generate", lambda self, prepared, **_: iter(["Start medications: ", "amoxicillin."]))
    options = ["--model", "base", "--no-retrieval", "--runs-dir", str(tmp_path)]
    result = CliRunner().invoke(app, ["ask", "34 yo woman, strep throat, allergic to penicillin V", *options],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    understood, answer, warning = (result.output.index(s) for s in ("What I understood", "amoxicillin.", "Safety check"))
    assert understood < answer < warning
    assert "New diagnosis: Streptococcal sore throat" in result.output
    assert "amoxicillin — the patient is allergic to Penicillin V (penicillins)" in result.output
    clean = CliRunner().invoke(app, ["ask", case(), *options], env={"COLUMNS": "200"})
    assert clean.exit_code == 0 and "Safety check" not in clean.output and "What I understood" not in clean.output
