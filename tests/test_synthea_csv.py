"""The Synthea CSV reader on the real Java exports (3.3, 3.2), on older-version rewrites, and on bad input."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from ingest.errors import IngestError
from ingest.synthea_csv import detect_version, read_csv_export
from ingest.timeline import SNOMED, PatientTimeline, ReadResult

UTC = timezone.utc
EMILIA = "f15015b7-a177-da0a-d208-3c63f799da12"  # ma-2025: hypertension, lisinopril renewed yearly
ALMA = "20f0a07f-6b20-1ad8-dfea-aeea5d3587b4"  # ne-2023: hypertension, hyperlipidemia

Row = dict[str, str]


def _rows(path: Path) -> tuple[list[str], list[Row]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _write(path: Path, header: list[str], rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _timeline(result: ReadResult, patient_id: str) -> PatientTimeline:
    return next(t for t in result.timelines if t.patient.id == patient_id)


@pytest.fixture(scope="module")
def ma(ma_csv: Path) -> ReadResult:
    return read_csv_export(ma_csv)


@pytest.fixture(scope="module")
def ne(ne_csv: Path) -> ReadResult:
    return read_csv_export(ne_csv)


# --- the real Java exports -------------------------------------------------------------------------------


def test_versions_detected(ma: ReadResult, ne: ReadResult) -> None:
    assert (ma.source_format, ma.source_version) == ("csv", "synthea-csv-3.3")
    assert (ne.source_format, ne.source_version) == ("csv", "synthea-csv-3.2")


@pytest.mark.parametrize("name", ["ma", "ne"])
def test_every_row_read_and_nothing_skipped(name: str, request: pytest.FixtureRequest, ma_csv: Path,
                                            ne_csv: Path) -> None:
    result: ReadResult = request.getfixturevalue(name)
    folder = ma_csv if name == "ma" else ne_csv
    assert result.skipped == []
    assert [t.patient.id for t in result.timelines] == [r["Id"] for r in _rows(folder / "patients.csv")[1]]
    for attribute in ("encounters", "conditions", "medications", "procedures", "careplans", "allergies",
                      "immunizations"):
        expected = len(_rows(folder / f"{attribute}.csv")[1])
        assert sum(len(getattr(t, attribute)) for t in result.timelines) == expected, attribute
    assert all(not t.observations for t in result.timelines)  # the samples have no observations.csv


def test_patient_counts(ma: ReadResult, ne: ReadResult) -> None:
    assert len(ma.timelines) == 112
    assert len(ne.timelines) == 111


def test_known_patient_conditions_and_renewed_medications_ma(ma: ReadResult) -> None:
    emilia = _timeline(ma, EMILIA)
    conditions = {c.code: c for c in emilia.conditions}
    hypertension = conditions["59621000"]
    assert (hypertension.description, hypertension.start, hypertension.stop) == (
        "Essential hypertension (disorder)", date(1999, 12, 16), None)
    assert hypertension.system == SNOMED
    assert conditions["414545008"].start == date(2020, 11, 5)  # ischemic heart disease
    # social findings are conditions here; the case builder filters them
    assert {"160903007", "73595000", "423315002"} <= conditions.keys()

    lisinopril = [m for m in emilia.medications if m.code == "314076"]
    assert len(lisinopril) == 61  # one row per yearly renewal, all kept
    assert lisinopril[0].start == datetime(2015, 3, 12, 0, 3, 34, tzinfo=UTC)
    assert lisinopril[0].stop == datetime(2016, 3, 17, 0, 3, 34, tzinfo=UTC)
    assert lisinopril[-1].start == datetime(2025, 7, 17, 0, 3, 34, tzinfo=UTC)
    assert lisinopril[-1].stop is None  # still active
    assert {m.reason_code for m in lisinopril} == {"59621000"}
    assert all(m.description == "lisinopril 10 MG Oral Tablet" for m in lisinopril)
    assert {"308136", "904419"} <= {m.code for m in emilia.medications}  # amlodipine, alendronic acid
    encounter_ids = {e.id for e in emilia.encounters}
    assert all(m.encounter_id in encounter_ids for m in emilia.medications)


def test_known_patient_conditions_and_renewed_medications_ne(ne: ReadResult) -> None:
    alma = _timeline(ne, ALMA)
    conditions = {c.code: c for c in alma.conditions}
    assert conditions["59621000"].start == date(1998, 9, 26)
    assert conditions["55822004"].description == "Hyperlipidemia"
    assert conditions["55822004"].system == SNOMED  # 3.2 has no SYSTEM column: SNOMED is implied
    by_code: dict[str, list] = {}
    for medication in alma.medications:
        by_code.setdefault(medication.code, []).append(medication)
    assert {code: len(rows) for code, rows in by_code.items() if len(rows) > 1} == {
        "106892": 223, "308136": 238, "314076": 238, "314231": 11, "351109": 313, "630208": 313}
    assert {"309362", "312961", "866412", "705129"} <= by_code.keys()  # clopidogrel, simvastatin, metoprolol, ...
    first, last = by_code["314076"][0], by_code["314076"][-1]
    assert (first.start, first.stop) == (datetime(1998, 9, 26, 5, 16, 56, tzinfo=UTC),
                                         datetime(1999, 10, 2, 5, 16, 56, tzinfo=UTC))
    assert (last.start, last.stop) == (datetime(2023, 10, 14, 5, 16, 56, tzinfo=UTC), None)


def test_identity_fields_captured(ma: ReadResult) -> None:
    patient = _timeline(ma, EMILIA).patient
    assert (patient.birth_date, patient.death_date, patient.gender) == (date(1951, 11, 22), None, "female")
    assert (patient.race, patient.ethnicity, patient.state) == ("white", "hispanic", "Massachusetts")
    identity = patient.identity
    assert identity.names == ["Mrs. Emilia403 Rosa195 León820", "Emilia403", "Rosa195", "León820", "Bustamante966"]
    assert (identity.ssn, identity.drivers, identity.passport) == ("999-73-6806", "S99968864", "X30606601X")
    assert identity.address_lines == ["224 Pfannerstill Drive"]
    assert (identity.city, identity.county, identity.zip) == ("Townsend", "Middlesex County", "01469")
    assert identity.birthplace == "Panama City  Panama  PA"
    assert identity.lat_lon == ("42.628147397670645", "-71.65614579394965")
    assert identity.other_ids == ["25017"]  # FIPS


def test_organizations_and_providers(ma: ReadResult, ma_csv: Path) -> None:
    assert len(ma.organizations) == len(_rows(ma_csv / "organizations.csv")[1]) == 266
    assert ma.organizations["74ab949d-17ac-3309-83a0-13b4405c66aa"] == {
        "name": "Fitchburg Outpatient Clinic", "address": "881 Main Street", "city": "Fitchburg", "state": "MA",
        "zip": "01420", "phone": "978-342-9781 Or 978-342-9781"}
    provider = ma.practitioners["b0a835d4-1dca-3ad5-b325-687477ae492d"]
    assert (provider["name"], provider["gender"], provider["organization_id"]) == (
        "Ted955 Reilly981", "male", "74ab949d-17ac-3309-83a0-13b4405c66aa")
    encounters = [e for t in ma.timelines for e in t.encounters]
    assert all(e.organization_id in ma.organizations for e in encounters)
    assert all(e.provider_id in ma.practitioners for e in encounters)


# --- older Synthea versions, rewritten from the 3.3 sample -------------------------------------------------

Rewrite = Callable[[list[str], list[Row]], tuple[list[str], list[Row]]]


def _drop(*columns: str) -> Rewrite:
    return lambda header, rows: ([c for c in header if c not in columns], rows)


def _encounters_2_5(header: list[str], rows: list[Row]) -> tuple[list[str], list[Row]]:
    """2.5: no ORGANIZATION column; PROVIDER holds the organization id."""
    return [c for c in header if c != "ORGANIZATION"], [{**r, "PROVIDER": r["ORGANIZATION"]} for r in rows]


def _procedures_2_x(header: list[str], rows: list[Row]) -> tuple[list[str], list[Row]]:
    """Before 3.0: one DATE column instead of START/STOP; no SYSTEM."""
    new = ["DATE" if c == "START" else c for c in header if c not in ("STOP", "SYSTEM")]
    return new, [{**r, "DATE": r["START"]} for r in rows]


_PATIENTS_2_X = _drop("MIDDLE", "FIPS", "INCOME")
_NO_SYSTEM = _drop("SYSTEM")
VERSIONS: dict[str, dict[str, Rewrite]] = {
    "synthea-csv-2.5": {"patients.csv": _PATIENTS_2_X, "encounters.csv": _encounters_2_5,
                        "procedures.csv": _procedures_2_x, "conditions.csv": _NO_SYSTEM},
    "synthea-csv-2.6-2.7": {"patients.csv": _PATIENTS_2_X, "procedures.csv": _procedures_2_x,
                            "conditions.csv": _NO_SYSTEM},
    "synthea-csv-3.0-3.1": {"patients.csv": _drop("MIDDLE", "FIPS"), "procedures.csv": _NO_SYSTEM,
                            "conditions.csv": _NO_SYSTEM},
    "synthea-csv-3.2": {"patients.csv": _drop("MIDDLE"), "procedures.csv": _NO_SYSTEM,
                        "conditions.csv": _NO_SYSTEM},
}
FILES = ("patients.csv", "encounters.csv", "conditions.csv", "medications.csv", "procedures.csv",
         "careplans.csv", "allergies.csv", "immunizations.csv")


def _export(source: Path, target: Path, patients: set[str], rewrites: dict[str, Rewrite]) -> Path:
    """A small export of ``patients`` from ``source``, with some files rewritten to an older layout."""
    target.mkdir()
    for name in FILES:
        header, rows = _rows(source / name)
        key = "Id" if name == "patients.csv" else "PATIENT"
        rows = [r for r in rows if r[key] in patients]
        header, rows = rewrites.get(name, lambda h, r: (h, r))(header, rows)
        _write(target / name, header, rows)
    return target


@pytest.mark.parametrize("version", list(VERSIONS))
def test_older_versions_parse_to_the_same_timeline(version: str, ma: ReadResult, ma_csv: Path,
                                                   tmp_path: Path) -> None:
    old = read_csv_export(_export(ma_csv, tmp_path / "export", {EMILIA}, VERSIONS[version]))
    assert old.source_version == version
    assert old.skipped == []
    new, older = _timeline(ma, EMILIA), _timeline(old, EMILIA)
    if version == "synthea-csv-2.5":  # PROVIDER held the organization; the clinician is unknown
        expected = [dataclasses.replace(e, provider_id=None) for e in new.encounters]
        assert older.encounters == expected
        assert {e.organization_id for e in older.encounters} <= ma.organizations.keys()
    else:
        assert older.encounters == new.encounters
    if version in ("synthea-csv-2.5", "synthea-csv-2.6-2.7"):  # DATE only: no stop time
        assert older.procedures == [dataclasses.replace(p, stop=None) for p in new.procedures]
    else:
        assert older.procedures == new.procedures
    assert older.conditions == new.conditions
    assert (older.medications, older.careplans, older.allergies) == (new.medications, new.careplans,
                                                                     new.allergies)
    assert older.immunizations == new.immunizations
    identity = older.patient.identity  # no MIDDLE before 3.3, no FIPS before 3.2
    assert identity.names == ["Mrs. Emilia403 León820", "Emilia403", "León820", "Bustamante966"]
    assert identity.other_ids == (["25017"] if version == "synthea-csv-3.2" else [])


@pytest.mark.parametrize(("headers", "version"), [
    ({"patients.csv": {"ID", "FIPS", "INCOME"}, "procedures.csv": {"START", "SYSTEM"}}, "synthea-csv-3.3"),
    ({"patients.csv": {"ID", "FIPS"}}, "synthea-csv-3.2"),
    ({"patients.csv": {"ID"}, "procedures.csv": {"START", "STOP"}}, "synthea-csv-3.0-3.1"),
    ({"patients.csv": {"ID"}, "encounters.csv": {"ORGANIZATION", "PROVIDER"}}, "synthea-csv-2.6-2.7"),
    ({"patients.csv": {"ID"}, "encounters.csv": {"PROVIDER"}}, "synthea-csv-2.5"),
    ({"patients.csv": {"ID"}}, "synthea-csv-2.x"),
])
def test_detect_version_from_single_markers(headers: dict[str, set[str]], version: str) -> None:
    assert detect_version(headers) == version


def test_only_patients_csv_is_required(ma_csv: Path, tmp_path: Path) -> None:
    folder = _export(ma_csv, tmp_path / "export", {EMILIA}, {})
    for name in FILES[1:]:
        (folder / name).unlink()
    patients = folder / "patients.csv"  # as written on Windows (CRLF) and re-saved by Excel (BOM)
    patients.write_bytes(b"\xef\xbb\xbf" + patients.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    result = read_csv_export(folder)
    assert result.skipped == [] and result.source_version == "synthea-csv-3.3"
    assert [t.patient.id for t in result.timelines] == [EMILIA]  # the BOM did not hide the Id column
    assert result.timelines[0].medications == [] and result.organizations == {}


# --- observations (absent from the samples) -----------------------------------------------------------------

OBSERVATIONS_3X = """DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE
2019-02-17T05:07:38Z,{p},enc-1,vital-signs,8480-6,Systolic Blood Pressure,142.0,mm[Hg],numeric
2019-02-17T05:07:38Z,{p},enc-1,survey,72166-2,Tobacco smoking status,Never smoked tobacco (finding),,text
2019-02-17,{p},,laboratory,4548-4,Hemoglobin A1c/Hemoglobin.total in Blood,6.4,%,numeric
2019-02-17T05:07:38Z,{p},enc-1,laboratory,4548-4,Hemoglobin A1c/Hemoglobin.total in Blood,n/a,%,numeric
"""


def test_observations(ma_csv: Path, tmp_path: Path) -> None:
    folder = _export(ma_csv, tmp_path / "export", {EMILIA}, {})
    (folder / "observations.csv").write_text(OBSERVATIONS_3X.format(p=EMILIA), encoding="utf-8")
    result = read_csv_export(folder)
    pressure, smoking, a1c = _timeline(result, EMILIA).observations
    assert (pressure.value, pressure.units, pressure.category, pressure.code) == (142.0, "mm[Hg]", "vital-signs",
                                                                                  "8480-6")
    assert pressure.date == datetime(2019, 2, 17, 5, 7, 38, tzinfo=UTC) and pressure.encounter_id == "enc-1"
    assert (smoking.value, smoking.units) == ("Never smoked tobacco (finding)", None)
    assert (a1c.value, a1c.date, a1c.encounter_id) == (6.4, datetime(2019, 2, 17, tzinfo=UTC), None)
    [skip] = result.skipped
    assert (Path(skip.source).name, skip.location) == ("observations.csv", "row 4")
    assert "VALUE" in skip.reason and "numeric" in skip.reason and "n/a" not in skip.reason


def test_observations_2x_without_category(ma_csv: Path, tmp_path: Path) -> None:
    folder = _export(ma_csv, tmp_path / "export", {EMILIA}, {})
    lines = OBSERVATIONS_3X.format(p=EMILIA).splitlines()[:2]
    header, row = (line.split(",") for line in lines)
    del header[3], row[3]
    (folder / "observations.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n", encoding="utf-8")
    [observation] = _timeline(read_csv_export(folder), EMILIA).observations
    assert (observation.value, observation.category) == (142.0, None)


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.fixture
def small(ma_csv: Path, tmp_path: Path) -> Path:
    """Two real patients (Emilia and the first one) in a fresh export folder."""
    first = _rows(ma_csv / "patients.csv")[1][0]["Id"]
    return _export(ma_csv, tmp_path / "export", {EMILIA, first}, {})


def _edit(path: Path, edit: Callable[[list[list[str]]], None]) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    edit(rows)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def test_missing_or_foreign_patients_csv_is_an_error(small: Path, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="not a directory"):
        read_csv_export(tmp_path / "nowhere")
    (small / "patients.csv").rename(small / "people.csv")
    with pytest.raises(IngestError, match="no patients.csv"):
        read_csv_export(small)
    (small / "patients.csv").write_text("name,age\nAda,36\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"patients\.csv.*missing column\(s\) ID, BIRTHDATE"):
        read_csv_export(small)
    (small / "patients.csv").write_text("", encoding="utf-8")
    with pytest.raises(IngestError, match="empty file"):
        read_csv_export(small)


def test_foreign_header_skips_only_that_file(small: Path) -> None:
    _edit(small / "conditions.csv", lambda rows: rows[0].__setitem__(rows[0].index("CODE"), "SNOMED_CODE"))
    (small / "careplans.csv").write_text("", encoding="utf-8")
    (small / "allergies.csv").write_text("foo;bar\n1;2\n", encoding="utf-8")
    result = read_csv_export(small)
    assert [(Path(s.source).name, s.location) for s in result.skipped] == [
        ("conditions.csv", "header"), ("careplans.csv", "header"), ("allergies.csv", "header")]
    conditions, careplans, allergies = (s.reason for s in result.skipped)
    assert "missing column(s) CODE" in conditions
    assert careplans == "empty file"
    assert "START, STOP, PATIENT, ENCOUNTER, CODE, DESCRIPTION" in allergies
    emilia = _timeline(result, EMILIA)
    assert emilia.conditions == [] and len(emilia.medications) == 252 and emilia.encounters


def test_bad_rows_are_skipped_with_file_and_row(small: Path) -> None:
    bad_date, bad_stop = "17/02/2019", "2019-13-45T00:00:00Z"

    def conditions(rows: list[list[str]]) -> None:
        rows[1][0] = bad_date  # row 1: unparseable START
        rows[2][2] = "00000000-0000-0000-0000-000000000000"  # row 2: unknown PATIENT
        rows[3].append("extra")  # row 3: too many fields
        rows[4][rows[0].index("CODE")] = ""  # row 4: no code

    def medications(rows: list[list[str]]) -> None:
        rows[5][1] = bad_stop  # row 5: unparseable STOP datetime

    _edit(small / "conditions.csv", conditions)
    _edit(small / "medications.csv", medications)
    result = read_csv_export(small)
    skipped = [(Path(s.source).name, s.location, s.reason) for s in result.skipped]
    assert skipped == [
        ("conditions.csv", "row 1", "unparseable date in START"),
        ("conditions.csv", "row 2", "PATIENT not in patients.csv"),
        ("conditions.csv", "row 3", "8 fields, header has 7"),
        ("conditions.csv", "row 4", "empty CODE"),
        ("medications.csv", "row 5", "unparseable datetime in STOP"),
    ]
    total = sum(len(t.conditions) for t in result.timelines)
    assert total == len(_rows(small / "conditions.csv")[1]) - 4
    assert sum(len(t.medications) for t in result.timelines) == len(_rows(small / "medications.csv")[1]) - 1


def test_rows_of_a_skipped_patient_are_reported(small: Path) -> None:
    emilia_row = next(n for n, r in enumerate(_rows(small / "patients.csv")[1], 1) if r["Id"] == EMILIA)
    _edit(small / "patients.csv", lambda rows: rows[emilia_row].__setitem__(1, "not-a-date"))
    result = read_csv_export(small)
    assert EMILIA not in {t.patient.id for t in result.timelines} and len(result.timelines) == 1
    patients = [s for s in result.skipped if s.source.endswith("patients.csv")]
    assert [(s.location, s.reason) for s in patients] == [(f"row {emilia_row}", "unparseable date in BIRTHDATE")]
    medication_rows = [s for s in result.skipped if s.source.endswith("medications.csv")]
    assert len(medication_rows) == 252
    assert {s.reason for s in medication_rows} == {"PATIENT was skipped in patients.csv"}
