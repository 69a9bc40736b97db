"""One normalised patient-timeline model that every reader (FHIR, CSV) produces.

Plain slotted dataclasses: ingest is throughput-bound, and these are built millions of times.
Identifying fields (names, SSN, addresses, exact dates, source ids) are kept here so that
de-identification and the audit can see them; nothing downstream of ``ingest.deidentify``
may read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
CVX = "http://hl7.org/fhir/sid/cvx"


@dataclass(slots=True)
class Identity:
    """Direct identifiers of one patient, as found in the source (HIPAA Safe Harbor kinds)."""

    names: list[str] = field(default_factory=list)  # given, family, maiden, full name strings
    ssn: str | None = None
    drivers: str | None = None
    passport: str | None = None
    phones: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    address_lines: list[str] = field(default_factory=list)
    city: str | None = None
    county: str | None = None
    zip: str | None = None
    birthplace: str | None = None
    lat_lon: tuple[str, str] | None = None
    other_ids: list[str] = field(default_factory=list)  # MRNs, record numbers, URLs, ...


@dataclass(slots=True)
class Patient:
    id: str  # source identifier (a Synthea UUID): never leaves ingest un-hashed
    birth_date: date
    gender: str  # "female" | "male" | "other" | "unknown"
    death_date: date | None = None
    race: str | None = None
    ethnicity: str | None = None
    state: str | None = None  # geography at state level survives de-identification
    identity: Identity = field(default_factory=Identity)


@dataclass(slots=True)
class Encounter:
    id: str
    start: datetime
    stop: datetime | None
    encounter_class: str  # ambulatory, wellness, emergency, inpatient, urgentcare, outpatient, ...
    code: str | None
    description: str | None
    organization_id: str | None = None
    provider_id: str | None = None
    reason_code: str | None = None
    reason_description: str | None = None


@dataclass(slots=True)
class Condition:
    start: date
    stop: date | None
    code: str
    description: str
    system: str = SNOMED
    encounter_id: str | None = None


@dataclass(slots=True)
class Medication:
    start: datetime
    stop: datetime | None
    code: str  # RxNorm
    description: str
    encounter_id: str | None = None
    reason_code: str | None = None  # SNOMED code of the condition it treats


@dataclass(slots=True)
class Procedure:
    start: datetime
    stop: datetime | None
    code: str
    description: str
    system: str = SNOMED
    encounter_id: str | None = None
    reason_code: str | None = None


@dataclass(slots=True)
class CarePlan:
    start: date
    stop: date | None
    code: str  # SNOMED code of the care plan
    description: str
    encounter_id: str | None = None
    reason_code: str | None = None
    activities: list[tuple[str, str]] = field(default_factory=list)  # (SNOMED code, description)


@dataclass(slots=True)
class Observation:
    date: datetime
    code: str  # LOINC
    description: str
    value: float | str | None
    units: str | None = None
    category: str | None = None  # vital-signs, laboratory, survey, ...
    encounter_id: str | None = None


@dataclass(slots=True)
class Allergy:
    start: date
    stop: date | None
    code: str
    description: str
    category: str | None = None  # medication, food, environment
    encounter_id: str | None = None


@dataclass(slots=True)
class Immunization:
    date: datetime
    code: str  # CVX
    description: str
    encounter_id: str | None = None


@dataclass(slots=True)
class PatientTimeline:
    patient: Patient
    encounters: list[Encounter] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    medications: list[Medication] = field(default_factory=list)
    procedures: list[Procedure] = field(default_factory=list)
    careplans: list[CarePlan] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    allergies: list[Allergy] = field(default_factory=list)
    immunizations: list[Immunization] = field(default_factory=list)


@dataclass(slots=True)
class Skipped:
    """A record a reader could not use: where it was, and why. Goes into the manifest."""

    source: str  # file path
    location: str  # "row 17", "entry[3] Condition/abc", "line 2"
    reason: str


@dataclass(slots=True)
class ReadResult:
    timelines: list[PatientTimeline]
    skipped: list[Skipped]
    source_format: str  # "fhir-r4" | "csv"
    source_version: str  # e.g. "synthea-csv-3.3", "synthea-csv-2.x", "fhir-r4"
    organizations: dict[str, dict] = field(default_factory=dict)  # id -> {name, address, city, phone...}
    practitioners: dict[str, dict] = field(default_factory=dict)  # id -> {name, ...}
