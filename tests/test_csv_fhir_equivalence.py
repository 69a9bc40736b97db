"""The ma-2025 sample holds 12 patients both as FHIR bundles and in the CSV export: both readers
must lead to the same decisions (same encounters), diagnoses and started treatments.

The CSV export has no observations and no care-plan activities, so vitals, labs and activities are
not compared.
"""

from __future__ import annotations

import pytest

from ingest.cases import Case, build_cases
from ingest.deidentify import Pseudonymizer
from ingest.synthea_csv import read_csv_export
from ingest.synthea_fhir import read_fhir

PSEUDO = Pseudonymizer(b"e" * 32)


def _decisions(cases: list[Case]) -> list[tuple]:
    return [
        (
            c.id,  # salted hash of patient and encounter id: the same decision point
            c.snapshot.age,
            c.diagnosis.code,
            tuple(c.snapshot.new_diagnoses),
            tuple((d.code, tuple(d.ingredients)) for d in c.drugs),
            tuple(p.code for p in c.procedures),
            tuple(p.code for p in c.careplans),
        )
        for c in cases
    ]


@pytest.fixture(scope="module")
def both(ma_csv, ma_fhir) -> list[tuple]:
    fhir = read_fhir([ma_fhir])
    csv = {t.patient.id: t for t in read_csv_export(ma_csv).timelines}
    return [(t, csv.get(t.patient.id)) for t in fhir.timelines]


def test_all_fhir_patients_are_in_the_csv(both) -> None:
    assert len(both) == 12
    assert all(c is not None for _, c in both)


def test_same_decisions_diagnoses_and_started_treatments(both) -> None:
    total = 0
    for fhir, csv in both:
        from_fhir, from_csv = build_cases(fhir, PSEUDO), build_cases(csv, PSEUDO)
        assert _decisions(from_fhir) == _decisions(from_csv), fhir.patient.gender
        total += len(from_fhir)
    assert total >= 10  # the comparison covers real decisions, not empty lists


def test_same_state_at_the_decision_apart_from_vitals(both) -> None:
    for fhir, csv in both:
        for a, b in zip(build_cases(fhir, PSEUDO), build_cases(csv, PSEUDO), strict=True):
            assert (a.snapshot.sex, a.snapshot.age_band) == (b.snapshot.sex, b.snapshot.age_band)
            assert a.snapshot.active_conditions == b.snapshot.active_conditions
            assert a.snapshot.allergies == b.snapshot.allergies
