"""Decision points → case snapshots and targets, on small hand-made timelines."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from ingest.cases import build_cases, current_snapshot, is_diagnosis, parse_ingredients
from ingest.deidentify import Pseudonymizer
from ingest.dialogues import answer_text, case_prompt, dialogue, snapshot_text
from ingest.timeline import (
    Allergy,
    CarePlan,
    Condition,
    Encounter,
    Identity,
    Medication,
    Observation,
    Patient,
    PatientTimeline,
    Procedure,
)

T0 = datetime(2020, 3, 1, 9, 0, tzinfo=UTC)
PSEUDO = Pseudonymizer(b"k" * 32)
HTN = ("59621000", "Essential hypertension (disorder)")
LISINOPRIL = ("314076", "lisinopril 10 MG Oral Tablet")
METFORMIN = ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet")


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


def enc(eid: str, days: float, cls: str = "ambulatory") -> Encounter:
    return Encounter(eid, at(days), at(days) + timedelta(minutes=30), cls, None, None)


def cond(code_desc: tuple[str, str], days: float, eid: str | None, stop: float | None = None) -> Condition:
    return Condition(at(days).date(), at(stop).date() if stop is not None else None, *code_desc, encounter_id=eid)


def med(code_desc: tuple[str, str], days: float, eid: str, reason: str | None = None) -> Medication:
    return Medication(at(days), None, *code_desc, encounter_id=eid, reason_code=reason)


def timeline(birth: date = date(1962, 5, 4), **events) -> PatientTimeline:
    patient = Patient("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", birth, "female",
                      identity=Identity(names=["Ann123", "Smith456"], ssn="999-12-3456"))
    return PatientTimeline(patient, **events)


@pytest.mark.parametrize(
    ("description", "ingredients"),
    [
        ("24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet", ["metformin"]),
        ("Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet", ["amoxicillin", "clavulanate"]),
        ("60 ACTUAT Fluticasone propionate 0.25 MG/ACTUAT / salmeterol 0.05 MG/ACTUAT Dry Powder Inhaler",
         ["fluticasone", "salmeterol"]),
        ("Acetaminophen 325 MG Oral Tablet [Tylenol]", ["acetaminophen"]),
        ("NDA020983 200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler [Ventolin]", ["albuterol"]),
        ("insulin isophane  human 70 UNT/ML / insulin  regular  human 30 UNT/ML Injectable Suspension [Humulin]",
         ["insulin"]),
        ("Penicillin V Potassium 250 MG Oral Tablet", ["penicillin v"]),
        ("1 ML medroxyPROGESTERone acetate 150 MG/ML Injection", ["medroxyprogesterone"]),
        ("Acetaminophen 300 MG / HYDROcodone Bitartrate 5 MG Oral Tablet", ["acetaminophen", "hydrocodone"]),
        ("amLODIPine 2.5 MG Oral Tablet", ["amlodipine"]),
        ("ferrous sulfate 325 MG Oral Tablet", ["ferrous sulfate"]),
        ("sodium fluoride 0.0272 MG/MG Oral Gel", ["sodium fluoride"]),
        ("Acetaminophen/Hydrocodone", ["acetaminophen", "hydrocodone"]),
        ("Azithromycin 250mg", ["azithromycin"]),
        ("Camila 28 Day Pack", ["camila"]),
    ],
)
def test_parse_ingredients(description: str, ingredients: list[str]) -> None:
    assert parse_ingredients(description) == ingredients


@pytest.mark.parametrize(
    ("code", "description", "expected"),
    [
        ("59621000", "Essential hypertension (disorder)", True),
        ("55822004", "Hyperlipidemia", True),  # Synthea < 3 writes no semantic tag
        ("714628002", "Prediabetes (finding)", True),  # a treated clinical finding
        ("160903007", "Full-time employment (finding)", False),
        ("73595000", "Stress (finding)", False),
        ("314529007", "Medication review due (situation)", False),
        ("446654005", "Refugee (person)", False),
        ("706893006", "Victim of intimate partner abuse (finding)", False),
        ("73438004", "Unemployed", False),  # untagged social finding: caught by its words
        ("840544004", "Suspected COVID-19", False),
        ("5251000175109", "Received certificate of high school equivalency (finding)", False),
        ("47505003", "Posttraumatic stress disorder (disorder)", True),  # "stress", but a disorder
        ("7200002", "Alcoholism (disorder)", True),
    ],
)
def test_is_diagnosis(code: str, description: str, expected: bool) -> None:
    assert is_diagnosis(Condition(date(2020, 1, 1), None, code, description)) is expected


def test_renewals_collapse_to_one_new_drug() -> None:
    t = timeline(
        encounters=[enc("e1", 0), enc("e2", 371), enc("e3", 742)],
        conditions=[cond(HTN, 0, "e1"), cond(("43878008", "Streptococcal sore throat (disorder)"), 742, "e3")],
        medications=[
            med(LISINOPRIL, 0, "e1", HTN[0]),
            med(LISINOPRIL, 0.01, "e1", HTN[0]),  # a second row of the same order
            med(LISINOPRIL, 371, "e2", HTN[0]),
            med(LISINOPRIL, 742, "e3", HTN[0]),  # renewed at an encounter with another new diagnosis
            med(("834061", "Penicillin V Potassium 250 MG Oral Tablet"), 742, "e3", "43878008"),
        ],
    )
    cases = build_cases(t, PSEUDO)
    assert [c.diagnosis.code for c in cases] == [HTN[0], "43878008"]
    assert [d.code for d in cases[0].drugs] == [LISINOPRIL[0]]
    assert cases[0].drugs[0].ingredients == ["lisinopril"]
    assert [d.ingredients for d in cases[1].drugs] == [["penicillin v"]]
    assert "lisinopril" in cases[1].snapshot.current_medications


def test_social_findings_never_become_diagnoses() -> None:
    stress = ("73595000", "Stress (finding)")
    employment = ("160903007", "Full-time employment (finding)")
    t = timeline(
        encounters=[enc("e1", 0, "wellness"), enc("e2", 30)],
        conditions=[cond(stress, 0, "e1"), cond(employment, 0, "e1"), cond(stress, 30, "e2"), cond(HTN, 30, "e2")],
        medications=[med(("313782", "Acetaminophen 325 MG Oral Tablet"), 0, "e1")],
        careplans=[CarePlan(at(30).date(), None, "443402002", "Lifestyle education regarding hypertension (procedure)",
                            "e2", HTN[0], [("386463000", "Prescribed activity/exercise education")])],
    )
    cases = build_cases(t, PSEUDO)
    assert len(cases) == 1  # e1 started a drug but diagnosed nothing but social findings
    case = cases[0]
    assert case.diagnosis.code == HTN[0]
    text = snapshot_text(case.snapshot)
    assert "Stress" not in text and "employment" not in text
    assert case.careplan_activities[0].code == "386463000"


def test_drug_linked_by_reason_within_the_window_belongs_to_the_diagnosis() -> None:
    diabetes = ("44054006", "Diabetes mellitus type 2 (disorder)")
    t = timeline(
        encounters=[enc("e1", 0), enc("e2", 5), enc("e3", 400)],
        conditions=[cond(diabetes, 0, "e1")],
        procedures=[Procedure(at(0), None, "710824005", "Assessment of health (procedure)", encounter_id="e1")],
        medications=[
            med(METFORMIN, 5, "e2", diabetes[0]),
            med(("897122", "3 ML liraglutide 6 MG/ML Pen Injector"), 400, "e3", diabetes[0]),  # too late: no link
        ],
    )
    cases = build_cases(t, PSEUDO)
    assert len(cases) == 1
    assert [d.ingredients for d in cases[0].drugs] == [["metformin"]]
    assert cases[0].procedures == []  # a procedure not done for the diagnosis is not its treatment


def test_drug_for_another_known_condition_is_not_this_treatment() -> None:
    sinusitis = ("444814009", "Viral sinusitis (disorder)")
    t = timeline(
        encounters=[enc("e1", 0), enc("e2", 900)],
        conditions=[cond(HTN, 0, "e1"), cond(sinusitis, 900, "e2", stop=910)],
        medications=[
            med(LISINOPRIL, 0, "e1", HTN[0]),
            med(("197361", "amLODIPine 2.5 MG Oral Tablet"), 900, "e2", HTN[0]),  # escalation for hypertension
        ],
    )
    cases = build_cases(t, PSEUDO)
    assert [c.diagnosis.code for c in cases] == [HTN[0]]  # sinusitis: nothing started for it


def test_procedure_only_and_careplan_only_cases_are_kept_routine_visits_skipped() -> None:
    caries = ("80967001", "Primary dental caries (disorder)")
    sprain = ("44465007", "Sprain of ankle (disorder)")
    t = timeline(
        encounters=[enc("e1", 0), enc("e2", 50), enc("e3", 100, "wellness")],
        conditions=[cond(caries, 0, "e1"), cond(sprain, 50, "e2", stop=80), cond(HTN, 100, "e3")],
        procedures=[Procedure(at(0), None, "68566005", "Restoration of tooth (procedure)", encounter_id="e1",
                              reason_code=caries[0])],
        careplans=[CarePlan(at(50).date(), at(80).date(), "91251008", "Physiotherapy care plan (record artifact)",
                            "e2", sprain[0], [("229586001", "Rest, ice, compression and elevation treatment")])],
    )
    cases = build_cases(t, PSEUDO)
    assert [c.diagnosis.code for c in cases] == [caries[0], sprain[0]]  # e3: hypertension, nothing started
    assert [p.display for p in cases[0].procedures] == ["Restoration of tooth (procedure)"]
    assert cases[0].drugs == [] and cases[1].drugs == []
    assert answer_text(cases[1]).startswith("Start medications: none.\nProcedures: none.\nCare plan: Physiotherapy")


def test_snapshot_is_deidentified_and_reports_state_at_the_decision() -> None:
    t = timeline(
        birth=date(1925, 1, 1),
        encounters=[enc("e0", -1000), enc("e1", 0)],
        conditions=[
            cond(("44054006", "Diabetes mellitus type 2 (disorder)"), -1000, "e0"),
            cond(("444814009", "Viral sinusitis (disorder)"), -1000, "e0", stop=-990),  # resolved: not active
            cond(HTN, 0, "e1"),
        ],
        medications=[
            med(METFORMIN, -1000, "e0"), med(METFORMIN, -630, "e0"), med(METFORMIN, -260, "e0"),
            med(("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet"), -1000, "e0"),  # long over
            med(LISINOPRIL, 0, "e1", HTN[0]),
        ],
        allergies=[Allergy(date(1990, 1, 1), None, "300916003", "Latex (substance)")],
        observations=[
            Observation(at(0), "8480-6", "Systolic Blood Pressure", 152.0, "mm[Hg]"),
            Observation(at(0), "8462-4", "Diastolic Blood Pressure", 94.0, "mm[Hg]"),
            Observation(at(-12), "39156-5", "BMI", 31.24, "kg/m2"),
            Observation(at(-400), "39156-5", "BMI", 29.0, "kg/m2"),
            Observation(at(3), "4548-4", "HbA1c", 7.9, "%"),  # after the decision: not shown
        ],
    )
    cases = build_cases(t, PSEUDO)
    assert len(cases) == 2
    case = cases[-1]
    s = case.snapshot
    assert (s.age, s.age_band, s.sex) == ("90+", "90+", "female")
    assert s.active_conditions == ["Diabetes mellitus type 2 (since 2 years)"]
    assert s.current_medications == ["metformin"]
    assert s.allergies == ["Latex"]
    assert s.findings == ["BP 152/94 mmHg", "BMI 31.2 (12 days ago)"]
    text = "\n".join(m["content"] for m in dialogue(case)["messages"])
    for secret in ("Ann123", "Smith456", "999-12-3456", "1925", t.patient.id, "e1"):
        assert secret not in text
    assert case.id == PSEUDO.case(t.patient, "e1") and case.patient == PSEUDO.patient(t.patient)


def test_dialogue_format_and_prompt_for_inference() -> None:
    t = timeline(encounters=[enc("e1", 0)], conditions=[cond(HTN, 0, "e1")],
                 medications=[med(LISINOPRIL, 0, "e1", HTN[0])])
    (case,) = build_cases(t, PSEUDO)
    d = dialogue(case)
    assert [m["role"] for m in d["messages"]] == ["system", "user", "assistant"]
    assert d["messages"][:2] == case_prompt(case.snapshot)
    user = d["messages"][1]["content"]
    assert user.splitlines()[0] == "Patient: 57-year-old female"
    assert "New diagnosis: Essential hypertension" in user
    assert user.endswith("Question: What treatment should be started?")
    assert d["messages"][2]["content"] == "Start medications: lisinopril.\nProcedures: none.\nCare plan: none."
    assert case.target()["drugs"] == [{"code": LISINOPRIL[0], "display": LISINOPRIL[1], "ingredients": ["lisinopril"]}]


def test_current_snapshot_describes_the_latest_encounter() -> None:
    t = timeline(encounters=[enc("e1", 0), enc("e2", 800)], conditions=[cond(HTN, 0, "e1")],
                 medications=[med(LISINOPRIL, 0, "e1", HTN[0]), med(LISINOPRIL, 400, "e1", HTN[0])])
    s = current_snapshot(t, PSEUDO)
    assert s.new_diagnoses == []
    assert s.active_conditions == ["Essential hypertension (since 2 years)"]
    assert s.current_medications == ["lisinopril"]
    with pytest.raises(ValueError, match="no encounters"):
        current_snapshot(timeline(), PSEUDO)


def test_a_recurring_acute_illness_is_treated_again() -> None:
    sinusitis = ("444814009", "Viral sinusitis (disorder)")
    augmentin = ("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet")
    t = timeline(
        encounters=[enc("e1", 0), enc("e2", 200)],
        conditions=[cond(sinusitis, 0, "e1", stop=10), cond(sinusitis, 200, "e2", stop=210)],
        medications=[med(augmentin, 0, "e1", sinusitis[0]), med(augmentin, 200, "e2", sinusitis[0])],
    )
    cases = build_cases(t, PSEUDO)
    assert [[d.code for d in c.drugs] for c in cases] == [[augmentin[0]], [augmentin[0]]]
