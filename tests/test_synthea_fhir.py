"""The FHIR reader on real Java Synthea bundles (ma-2025) and on broken input."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from ingest.synthea_fhir import read_fhir
from ingest.timeline import ReadResult

EDUARDO = "c78ccdf8-7a42-b07f-a97d-433171de3b1e"  # Eduardo902 Granados71
CHANG = "7b6c7c54-db0d-5853-e8da-e8227b84b82a"  # Chang901 Turner526


@pytest.fixture(scope="module")
def ma(ma_fhir: Path) -> ReadResult:
    return read_fhir([ma_fhir])


def _timeline(result: ReadResult, patient_id: str):
    return next(t for t in result.timelines if t.patient.id == patient_id)


def test_reads_every_patient_and_the_information_bundles(ma: ReadResult, ma_fhir: Path) -> None:
    patient_files = [p for p in ma_fhir.glob("*.json") if not p.name.startswith(("hospital", "practitioner"))]
    assert len(ma.timelines) == len(patient_files) == 12
    assert ma.skipped == []
    assert ma.source_format == "fhir-r4"
    assert {t.patient.id for t in ma.timelines} == {p.stem.rsplit("_", 1)[1] for p in patient_files}
    assert len(ma.organizations) == 266 and len(ma.practitioners) == 266
    clinic = ma.organizations["74ab949d-17ac-3309-83a0-13b4405c66aa"]
    assert clinic["name"] == "Fitchburg Outpatient Clinic"
    assert (clinic["address"], clinic["city"], clinic["zip"]) == ("881 Main Street", "Fitchburg", "01420")
    doctor = ma.practitioners["b0a835d4-1dca-3ad5-b325-687477ae492d"]
    assert doctor["name"] == "Dr. Ted955 Reilly981"
    assert doctor["npi"] == "9999984591"
    assert doctor["organization_id"] == "74ab949d-17ac-3309-83a0-13b4405c66aa"


def test_patient_demographics_and_identity(ma: ReadResult) -> None:
    patient = _timeline(ma, EDUARDO).patient
    assert (patient.birth_date, patient.gender, patient.death_date) == (date(1991, 10, 27), "male", None)
    assert (patient.race, patient.ethnicity, patient.state) == ("White", "Hispanic or Latino", "Massachusetts")
    identity = patient.identity
    assert {"Eduardo902", "Gerardo48", "Granados71", "Amalia471 Córdova800"} <= set(identity.names)
    assert (identity.ssn, identity.drivers, identity.passport) == ("999-46-1553", "S99958948", "X349214X")
    assert identity.phones == ["555-176-7005"]
    assert identity.address_lines == ["785 Leannon Lock"]
    assert (identity.city, identity.zip) == ("North Attleborough", "00000")
    assert identity.birthplace == "Caguas, Puerto Rico, PR"
    assert identity.lat_lon is not None and identity.lat_lon[0].startswith("41.9886")
    assert EDUARDO in identity.other_ids  # the MRN is the Synthea UUID


def test_medications_carry_rxnorm_and_the_condition_they_treat(ma: ReadResult) -> None:
    timeline = _timeline(ma, EDUARDO)
    drugs = {m.code: m for m in timeline.medications}
    assert set(drugs) == {"313782", "1535362"}
    acetaminophen = drugs["313782"]  # medicationCodeableConcept, reasonReference -> acute bronchitis
    assert acetaminophen.description == "Acetaminophen 325 MG Oral Tablet"
    assert acetaminophen.reason_code == "10509002"
    assert acetaminophen.start == datetime(2016, 3, 20, 6, 17, 20, tzinfo=UTC)
    fluoride = drugs["1535362"]  # medicationReference to a Medication resource, for gingivitis
    assert fluoride.description == "sodium fluoride 0.0272 MG/MG Oral Gel"
    assert fluoride.reason_code == "66383009"
    conditions = {c.code for c in timeline.conditions}
    assert {"10509002", "66383009"} <= conditions
    encounter_ids = {e.id for e in timeline.encounters}
    assert {m.encounter_id for m in timeline.medications} <= encounter_ids


def test_conditions_procedures_and_careplans(ma: ReadResult) -> None:
    timeline = _timeline(ma, EDUARDO)
    bronchitis = next(c for c in timeline.conditions if c.code == "10509002")
    assert (bronchitis.start, bronchitis.stop) == (date(2016, 3, 20), date(2016, 4, 5))
    assert bronchitis.description == "Acute bronchitis (disorder)"
    assert any(p.code == "23426006" and p.reason_code == "10509002" for p in timeline.procedures)
    rehab = next(c for c in timeline.careplans if c.code == "47387005")  # SNOMED code from category[1]
    assert rehab.reason_code == "62564004"
    assert ("183051005", "Recommendation to rest (procedure)") in rehab.activities

    chang = _timeline(ma, CHANG)
    plan = next(c for c in chang.careplans if c.code == "735985000")
    assert plan.stop is None
    assert plan.reason_code in {c.code for c in chang.conditions}
    assert {code for code, _ in plan.activities} == {"160670007", "229065009"}


def test_encounters_link_to_organizations_and_practitioners(ma: ReadResult) -> None:
    encounters = [e for t in ma.timelines for e in t.encounters]
    assert len(encounters) == 132
    assert all(e.organization_id in ma.organizations for e in encounters)
    assert all(e.provider_id in ma.practitioners for e in encounters)  # NPI resolved to the id
    assert {e.encounter_class for e in encounters} == {"ambulatory", "emergency"}
    for timeline in ma.timelines:
        ids = {e.id for e in timeline.encounters}
        assert {c.encounter_id for c in timeline.conditions} <= ids
        assert {o.encounter_id for o in timeline.observations} <= ids


def test_observation_components_become_observations(ma: ReadResult) -> None:
    observations = [o for t in ma.timelines for o in t.observations]
    codes = {o.code for o in observations}
    assert {"8480-6", "8462-4"} <= codes  # systolic / diastolic
    assert "85354-9" not in codes  # the blood-pressure panel itself has no value
    systolic = [o for o in observations if o.code == "8480-6"]
    assert all(isinstance(o.value, float) and o.units == "mm[Hg]" for o in systolic)
    assert {o.category for o in observations} >= {"vital-signs", "laboratory", "survey"}
    assert any(isinstance(o.value, str) for o in observations)  # valueCodeableConcept answers


def test_files_and_directories_are_both_accepted(ma_fhir: Path) -> None:
    one = ma_fhir / f"Eduardo902_Granados71_{EDUARDO}.json"
    result = read_fhir([one, ma_fhir])
    assert len(result.timelines) == 12  # the file is not read twice
    alone = read_fhir([one])
    assert [t.patient.id for t in alone.timelines] == [EDUARDO]
    assert alone.organizations == {}
    assert alone.timelines[0].encounters[0].provider_id.isdigit()  # an NPI, no practitioner file given


# -- bad input ---------------------------------------------------------------------------------


def _bundle(*resources: dict) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


def _patient(pid: str = "p1") -> dict:
    return {"resourceType": "Patient", "id": pid, "birthDate": "1970-01-02", "gender": "female"}


def _encounter(eid: str = "e1", pid: str = "p1") -> dict:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "class": {"code": "AMB"},
        "subject": {"reference": f"urn:uuid:{pid}"},
        "period": {"start": "2020-01-01T10:00:00+01:00", "end": "2020-01-01T10:30:00+01:00"},
    }


def _condition(cid: str, onset: str = "2020-01-01T10:00:00+01:00", pid: str = "p1", eid: str = "e1") -> dict:
    return {
        "resourceType": "Condition",
        "id": cid,
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "encounter": {"reference": f"Encounter/{eid}"},
        "onsetDateTime": onset,
    }


def _write(path: Path, content: object) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_files_are_reported_and_the_rest_is_read(tmp_path: Path) -> None:
    _write(tmp_path / "broken.json", '{"resourceType": "Bundle", "entry": [')
    _write(tmp_path / "patient.json", _patient())
    _write(tmp_path / "good.json", _bundle(_patient(), _encounter(), _condition("c1")))
    result = read_fhir([tmp_path, tmp_path / "missing.json"])
    reasons = {Path(s.source).name: (s.location, s.reason) for s in result.skipped}
    assert reasons["broken.json"][1].startswith("malformed JSON")
    assert reasons["broken.json"][0].startswith("line 1 column")
    assert reasons["patient.json"] == ("file", "not a FHIR Bundle (resourceType 'Patient')")
    assert reasons["missing.json"] == ("file", "no such file or directory")
    assert len(result.skipped) == 3
    [timeline] = result.timelines
    assert [c.code for c in timeline.conditions] == ["44054006"]
    assert timeline.conditions[0].encounter_id == "e1"  # a "Type/id" reference resolves too


def test_bad_resources_are_skipped_with_their_entry_and_reason(tmp_path: Path) -> None:
    unknown = {"resourceType": "NutritionOrder", "id": "n1", "patient": {"reference": "urn:uuid:p1"}}
    ignored = {"resourceType": "Claim", "id": "claim1"}
    bundle = _bundle(
        _patient(),
        _encounter(),
        _condition("good"),
        _condition("bad-date", onset="2020-13-45T10:00:00Z"),
        _condition("orphan", pid="nobody"),
        _condition("no-encounter", eid="e-missing"),
        _encounter("e2", pid="nobody"),
        unknown,
        ignored,
    )
    bundle["entry"].append({"fullUrl": "urn:uuid:empty"})
    path = _write(tmp_path / "bundle.json", bundle)
    result = read_fhir([path])
    skipped = {s.location: s.reason for s in result.skipped}
    assert set(skipped) == {
        "entry[3] Condition/bad-date",
        "entry[4] Condition/orphan",
        "entry[5] Condition/no-encounter",
        "entry[6] Encounter/e2",
        "entry[7] NutritionOrder/n1",
        "entry[9]",
    }
    assert skipped["entry[3] Condition/bad-date"].startswith("bad value")
    assert "Patient/nobody" in skipped["entry[4] Condition/orphan"]
    assert "Encounter/e-missing" in skipped["entry[5] Condition/no-encounter"]
    assert skipped["entry[7] NutritionOrder/n1"] == "resource type NutritionOrder is not read"
    assert skipped["entry[9]"] == "entry has no resource with a resourceType"
    assert all(s.source == str(path) for s in result.skipped)
    [timeline] = result.timelines
    assert [c.code for c in timeline.conditions] == ["44054006"]
    assert [e.id for e in timeline.encounters] == ["e1"]


def test_a_broken_patient_skips_its_resources_with_a_reason(tmp_path: Path) -> None:
    patient = _patient()
    del patient["birthDate"]
    path = _write(tmp_path / "bundle.json", _bundle(patient, _encounter(), _condition("c1")))
    result = read_fhir([path])
    assert result.timelines == []
    assert [(s.location, s.reason) for s in result.skipped] == [
        ("entry[0] Patient/p1", "missing field 'birthDate'"),
        ("entry[1] Encounter/e1", "references patient 'urn:uuid:p1', not in this bundle"),
        ("entry[2] Condition/c1", "references patient 'Patient/p1', not in this bundle"),
    ]


def test_practitioners_are_keyed_by_id_whatever_the_entry_order(tmp_path: Path) -> None:
    npi = {"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999912345"}
    role = {
        "resourceType": "PractitionerRole",
        "id": "role1",
        "practitioner": {"identifier": npi},
        "organization": {"identifier": {"value": "org1"}},
        "specialty": [{"text": "Cardiology"}],
    }
    doctor = {"resourceType": "Practitioner", "id": "doc1", "identifier": [npi], "name": [{"family": "Who"}]}
    encounter = _encounter()
    encounter["participant"] = [{"individual": {"reference": "Practitioner?identifier=us-npi|9999912345"}}]
    path = _write(tmp_path / "bundle.json", _bundle(role, doctor, _patient(), encounter))
    result = read_fhir([path])
    assert result.skipped == []
    assert result.practitioners == {
        "doc1": {
            "name": "Who",
            "gender": None,
            "npi": "9999912345",
            "address": None,
            "city": None,
            "state": None,
            "zip": None,
            "phone": None,
            "email": None,
            "organization_id": "org1",
            "specialty": "Cardiology",
        }
    }
    assert result.timelines[0].encounters[0].provider_id == "doc1"
