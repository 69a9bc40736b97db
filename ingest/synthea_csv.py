"""Read a Java Synthea CSV export folder (Synthea 2.5 to 3.3) into patient timelines.

Only ``patients.csv`` is mandatory. Every other file may be missing; a file whose header is not a
Synthea header, and every row that cannot be used, is reported as a ``Skipped`` (file, row, reason)
while the rest is read. Reasons never quote cell values: they may be identifiers.

Datetimes are returned timezone-aware in UTC (Synthea writes them as ``...Z``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from ingest.errors import IngestError
from ingest.timeline import (
    LOINC,
    RXNORM,
    SNOMED,
    Allergy,
    CarePlan,
    Condition,
    Encounter,
    Identity,
    Immunization,
    Medication,
    Observation,
    Patient,
    PatientTimeline,
    Procedure,
    ReadResult,
    Skipped,
)

PATIENTS = "patients.csv"
_SYSTEMS = {"SNOMED-CT": SNOMED, "SNOMED": SNOMED, "RXNORM": RXNORM, "LOINC": LOINC}
_GENDERS = {"M": "male", "F": "female", "MALE": "male", "FEMALE": "female"}


class _BadValue(ValueError):
    """A cell that cannot be parsed; the message names the column, never the value."""


def _date(text: str, column: str) -> date:
    if not text:
        raise _BadValue(f"empty {column}")
    try:
        return date.fromisoformat(text) if len(text) == 10 else _datetime(text, column).date()
    except ValueError:
        raise _BadValue(f"unparseable date in {column}") from None


def _optional_date(text: str, column: str) -> date | None:
    return _date(text, column) if text else None


def _datetime(text: str, column: str) -> datetime:
    """An ISO date or datetime ('2019-02-17', '2019-02-17T05:07:38Z', '...+01:00') as UTC."""
    if not text:
        raise _BadValue(f"empty {column}")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _BadValue(f"unparseable datetime in {column}") from None
    if value.tzinfo is UTC:  # Synthea's '...Z': the common case, and the fast one
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _optional_datetime(text: str, column: str) -> datetime | None:
    return _datetime(text, column) if text else None


def _code(text: str, column: str = "CODE") -> str:
    if not text:
        raise _BadValue(f"empty {column}")
    return text


def _system(text: str) -> str:
    return _SYSTEMS.get(text.upper(), text) if text else SNOMED


@dataclass(slots=True, frozen=True)
class _Header:
    """Column positions of one CSV file. Every row gets one empty field appended at ``blank``,
    where absent optional columns point."""

    path: Path
    index: dict[str, int]
    width: int

    @property
    def blank(self) -> int:
        return self.width

    def has(self, column: str) -> bool:
        return self.index.get(column, self.blank) != self.blank

    def __getitem__(self, column: str) -> int:
        return self.index.get(column, self.blank)

    def positions(self, *columns: str) -> tuple[int, ...]:
        return tuple(self[column] for column in columns)


@dataclass(frozen=True)
class _Spec:
    """How to read one clinical CSV file into one PatientTimeline list."""

    name: str
    required: tuple[str, ...]
    attribute: str
    builder: Callable[[_Header], Callable[[list[str]], object]]
    aliases: tuple[tuple[str, str], ...] = ()  # (column, older name used when the column is absent)


def _encounter(h: _Header) -> Callable[[list[str]], Encounter]:
    i_id, start, stop, cls = h.positions("ID", "START", "STOP", "ENCOUNTERCLASS")
    code, desc, reason, reason_desc = h.positions("CODE", "DESCRIPTION", "REASONCODE", "REASONDESCRIPTION")
    # Synthea <= 2.5 had no ORGANIZATION column: PROVIDER held the organization id.
    org, prov = (h["ORGANIZATION"], h["PROVIDER"]) if h.has("ORGANIZATION") else (h["PROVIDER"], h.blank)

    def build(row: list[str]) -> Encounter:
        return Encounter(
            _code(row[i_id], "Id"), _datetime(row[start], "START"), _optional_datetime(row[stop], "STOP"),
            row[cls], row[code] or None, row[desc] or None, row[org] or None, row[prov] or None,
            row[reason] or None, row[reason_desc] or None,
        )

    return build


def _condition(h: _Header) -> Callable[[list[str]], Condition]:
    start, stop, code, desc = h.positions("START", "STOP", "CODE", "DESCRIPTION")
    system, enc = h.positions("SYSTEM", "ENCOUNTER")

    def build(row: list[str]) -> Condition:
        return Condition(
            _date(row[start], "START"), _optional_date(row[stop], "STOP"), _code(row[code]), row[desc],
            _system(row[system]), row[enc] or None,
        )

    return build


def _medication(h: _Header) -> Callable[[list[str]], Medication]:
    start, stop, code, desc = h.positions("START", "STOP", "CODE", "DESCRIPTION")
    enc, reason = h.positions("ENCOUNTER", "REASONCODE")

    def build(row: list[str]) -> Medication:
        return Medication(
            _datetime(row[start], "START"), _optional_datetime(row[stop], "STOP"), _code(row[code]), row[desc],
            row[enc] or None, row[reason] or None,
        )

    return build


def _procedure(h: _Header) -> Callable[[list[str]], Procedure]:
    start, stop, code, desc = h.positions("START", "STOP", "CODE", "DESCRIPTION")
    system, enc, reason = h.positions("SYSTEM", "ENCOUNTER", "REASONCODE")
    start_name = "DATE" if h.index["START"] == h.index.get("DATE") else "START"

    def build(row: list[str]) -> Procedure:
        return Procedure(
            _datetime(row[start], start_name), _optional_datetime(row[stop], "STOP"), _code(row[code]), row[desc],
            _system(row[system]), row[enc] or None, row[reason] or None,
        )

    return build


def _careplan(h: _Header) -> Callable[[list[str]], CarePlan]:
    start, stop, code, desc = h.positions("START", "STOP", "CODE", "DESCRIPTION")
    enc, reason = h.positions("ENCOUNTER", "REASONCODE")

    def build(row: list[str]) -> CarePlan:
        # The CSV export has no care-plan activities; only FHIR carries them.
        return CarePlan(
            _date(row[start], "START"), _optional_date(row[stop], "STOP"), _code(row[code]), row[desc],
            row[enc] or None, row[reason] or None,
        )

    return build


def _observation(h: _Header) -> Callable[[list[str]], Observation]:
    when, code, desc, value, units = h.positions("DATE", "CODE", "DESCRIPTION", "VALUE", "UNITS")
    kind, category, enc = h.positions("TYPE", "CATEGORY", "ENCOUNTER")

    def build(row: list[str]) -> Observation:
        raw = row[value]
        parsed: float | str | None = raw or None
        if raw and row[kind] == "numeric":
            try:
                parsed = float(raw)
            except ValueError:
                raise _BadValue("VALUE is not a number although TYPE is numeric") from None
        return Observation(
            _datetime(row[when], "DATE"), _code(row[code]), row[desc], parsed, row[units] or None,
            row[category] or None, row[enc] or None,
        )

    return build


def _allergy(h: _Header) -> Callable[[list[str]], Allergy]:
    start, stop, code, desc = h.positions("START", "STOP", "CODE", "DESCRIPTION")
    category, enc = h.positions("CATEGORY", "ENCOUNTER")

    def build(row: list[str]) -> Allergy:
        return Allergy(
            _date(row[start], "START"), _optional_date(row[stop], "STOP"), _code(row[code]), row[desc],
            row[category] or None, row[enc] or None,
        )

    return build


def _immunization(h: _Header) -> Callable[[list[str]], Immunization]:
    when, code, desc, enc = h.positions("DATE", "CODE", "DESCRIPTION", "ENCOUNTER")

    def build(row: list[str]) -> Immunization:
        return Immunization(_datetime(row[when], "DATE"), _code(row[code]), row[desc], row[enc] or None)

    return build


_EVENT_COLUMNS = ("START", "STOP", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION")
# Required columns are those every Synthea version from 2.5 to 3.3 writes and this reader uses.
_SPECS = (
    _Spec("encounters.csv", ("ID", "START", "STOP", "PATIENT", "ENCOUNTERCLASS", "CODE", "DESCRIPTION"),
          "encounters", _encounter),
    _Spec("conditions.csv", _EVENT_COLUMNS, "conditions", _condition),
    _Spec("medications.csv", _EVENT_COLUMNS, "medications", _medication),
    # Synthea < 3.0 wrote a single DATE column instead of START/STOP.
    _Spec("procedures.csv", ("START", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"), "procedures", _procedure,
          aliases=(("START", "DATE"),)),
    _Spec("careplans.csv", _EVENT_COLUMNS, "careplans", _careplan),
    _Spec("observations.csv", ("DATE", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION", "VALUE", "UNITS"),
          "observations", _observation),
    _Spec("allergies.csv", _EVENT_COLUMNS, "allergies", _allergy),
    _Spec("immunizations.csv", ("DATE", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"), "immunizations",
          _immunization),
)


def detect_version(headers: dict[str, set[str]]) -> str:
    """The Synthea version range whose CSV headers match ``headers`` (file name → column names).

    The newest marker present wins: MIDDLE (patients) or SYSTEM (conditions/procedures) → 3.3;
    FIPS → 3.2; INCOME or procedures START → 3.0-3.1; encounters ORGANIZATION → 2.6-2.7;
    encounters without ORGANIZATION → 2.5 (or older); nothing to tell by → 2.x.
    """

    def has(name: str, column: str) -> bool:
        return column in headers.get(name, ())

    if has(PATIENTS, "MIDDLE") or has("conditions.csv", "SYSTEM") or has("procedures.csv", "SYSTEM"):
        return "synthea-csv-3.3"
    if has(PATIENTS, "FIPS"):
        return "synthea-csv-3.2"
    if has(PATIENTS, "INCOME") or has("procedures.csv", "START"):
        return "synthea-csv-3.0-3.1"
    if has("encounters.csv", "ORGANIZATION"):
        return "synthea-csv-2.6-2.7"
    if "encounters.csv" in headers:
        return "synthea-csv-2.5"
    return "synthea-csv-2.x"


class _ExportReader:
    """Reads one export folder; collects timelines, directories and skipped records."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.skipped: list[Skipped] = []
        self.headers: dict[str, set[str]] = {}
        self.timelines: dict[str, PatientTimeline] = {}
        self.rejected: set[str] = set()  # patient ids whose patients.csv row was skipped

    def skip(self, path: Path, location: str, reason: str) -> None:
        self.skipped.append(Skipped(str(path), location, reason))

    def header(
        self, name: str, required: tuple[str, ...], aliases: tuple[tuple[str, str], ...] = ()
    ) -> _Header | None:
        """The header of ``name``, or None when the file is absent or (recorded as skipped) unusable."""
        path = self.folder / name
        if not path.is_file():
            if name == PATIENTS:
                raise IngestError(f"{self.folder}: no {PATIENTS}; a Synthea CSV export needs one")
            return None
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                names = next(csv.reader(handle), [])
        except (csv.Error, UnicodeDecodeError) as exc:
            names, problem = [], f"unreadable header ({type(exc).__name__})"
        else:
            problem = "empty file"
        index: dict[str, int] = {}
        for position, column in enumerate(names):
            index.setdefault(column.strip().upper(), position)
        for column, older in aliases:
            if column not in index and older in index:
                index[column] = index[older]
        missing = [column for column in required if column not in index]
        if names and missing:
            older_names = dict(aliases)
            shown = [f"{c} (or {older_names[c]})" if c in older_names else c for c in missing]
            problem = f"not a Synthea {name} header: missing column(s) {', '.join(shown)}"
        if not names or missing:
            if name == PATIENTS:
                raise IngestError(f"{path}: {problem}")
            self.skip(path, "header", problem)
            return None
        self.headers[name] = {column.strip().upper() for column in names}
        return _Header(path, index, len(names))

    def rows(self, header: _Header) -> Iterator[tuple[int, list[str]]]:
        """(1-based data row number, fields + one blank) for every row of the right width."""
        n = 0
        try:
            with header.path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                for n, row in enumerate(reader, 1):
                    if len(row) == header.width:
                        row.append("")
                        yield n, row
                    elif row:  # a blank line holds no record
                        self.skip(header.path, f"row {n}", f"{len(row)} fields, header has {header.width}")
        except (csv.Error, UnicodeDecodeError) as exc:
            self.skip(header.path, f"row {n + 1}", f"malformed CSV ({type(exc).__name__}); rest of file not read")

    def read_patients(self) -> None:
        h = self.header(PATIENTS, ("ID", "BIRTHDATE", "DEATHDATE", "FIRST", "LAST", "GENDER"))
        assert h is not None  # header() raises for patients.csv
        for n, row in self.rows(h):
            patient_id = row[h["ID"]]
            try:
                if not patient_id:
                    raise _BadValue("empty Id")
                if patient_id in self.timelines:
                    raise _BadValue("duplicate patient Id")
                patient = _patient(h, row)
            except _BadValue as exc:
                if patient_id:
                    self.rejected.add(patient_id)
                self.skip(h.path, f"row {n}", str(exc))
                continue
            self.timelines[patient_id] = PatientTimeline(patient)
        if not self.timelines:
            raise IngestError(f"{h.path}: no usable patient rows")

    def read_events(self, spec: _Spec) -> None:
        h = self.header(spec.name, spec.required, spec.aliases)
        if h is None:
            return
        build, patient, attribute = spec.builder(h), h["PATIENT"], spec.attribute
        timelines, rejected, path = self.timelines, self.rejected, h.path
        for n, row in self.rows(h):
            timeline = timelines.get(row[patient])
            if timeline is None:
                why = "was skipped in" if row[patient] in rejected else "not in"
                self.skip(path, f"row {n}", f"PATIENT {why} patients.csv")
                continue
            try:
                getattr(timeline, attribute).append(build(row))
            except _BadValue as exc:
                self.skip(path, f"row {n}", str(exc))

    def read_directory(self, name: str, fields: dict[str, str]) -> dict[str, dict]:
        """organizations.csv / providers.csv: Id → {field: value or None} for ``fields`` (key → column)."""
        h = self.header(name, ("ID", "NAME"))
        if h is None:
            return {}
        directory: dict[str, dict] = {}
        positions = {key: h[column] for key, column in fields.items()}
        for n, row in self.rows(h):
            if not row[h["ID"]]:
                self.skip(h.path, f"row {n}", "empty Id")
                continue
            directory[row[h["ID"]]] = {key: row[i] or None for key, i in positions.items()}
        return directory


def _patient(h: _Header, row: list[str]) -> Patient:
    def get(column: str) -> str:
        return row[h[column]]

    first, middle, last, maiden = get("FIRST"), get("MIDDLE"), get("LAST"), get("MAIDEN")
    full = " ".join(part for part in (get("PREFIX"), first, middle, last, get("SUFFIX")) if part)
    lat, lon = get("LAT"), get("LON")
    identity = Identity(
        names=[name for name in (full, first, middle, last, maiden) if name],
        ssn=get("SSN") or None,
        drivers=get("DRIVERS") or None,
        passport=get("PASSPORT") or None,
        address_lines=[get("ADDRESS")] if get("ADDRESS") else [],
        city=get("CITY") or None,
        county=get("COUNTY") or None,
        zip=get("ZIP") or None,
        birthplace=get("BIRTHPLACE") or None,
        lat_lon=(lat, lon) if lat and lon else None,
        other_ids=[get("FIPS")] if get("FIPS") else [],
    )
    gender = get("GENDER")
    return Patient(
        id=get("ID"),
        birth_date=_date(get("BIRTHDATE"), "BIRTHDATE"),
        gender=_GENDERS.get(gender.upper(), "other" if gender else "unknown"),
        death_date=_optional_date(get("DEATHDATE"), "DEATHDATE"),
        race=get("RACE") or None,
        ethnicity=get("ETHNICITY") or None,
        state=get("STATE") or None,
        identity=identity,
    )


def read_csv_export(folder: Path) -> ReadResult:
    """Read a Synthea CSV export folder. Raises IngestError when patients.csv is missing or unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"{folder}: not a directory; expected a Synthea CSV export folder")
    reader = _ExportReader(folder)
    reader.read_patients()
    for spec in _SPECS:
        reader.read_events(spec)
    organizations = reader.read_directory(
        "organizations.csv",
        {"name": "NAME", "address": "ADDRESS", "city": "CITY", "state": "STATE", "zip": "ZIP", "phone": "PHONE"},
    )
    practitioners = reader.read_directory(
        "providers.csv",
        {"name": "NAME", "organization_id": "ORGANIZATION", "gender": "GENDER", "speciality": "SPECIALITY",
         "address": "ADDRESS", "city": "CITY", "state": "STATE", "zip": "ZIP"},
    )
    for info in practitioners.values():  # "male" / "female", as the FHIR reader reports it
        info["gender"] = _GENDERS.get((info["gender"] or "").upper(), info["gender"])
    return ReadResult(
        timelines=list(reader.timelines.values()),
        skipped=reader.skipped,
        source_format="csv",
        source_version=detect_version(reader.headers),
        organizations=organizations,
        practitioners=practitioners,
    )
