"""Audit ingest outputs: scan every file for the identifiers found in the raw sources.

Collected per patient: source id, names, SSN, licence and passport numbers, phones, e-mails, address
lines, city, county, ZIP, birthplace, geolocation, other record ids, birth and death dates (ISO and
common US/European spellings); per source: encounter ids, organization and practitioner ids and names.

Matching rules (to catch leaks without drowning in false positives):
- whole words only (no letter or digit directly before or after the value);
- case-insensitive, except place names (city, county, birthplace), which are matched as written
  because towns such as "Reading" or "Orange" are also ordinary words;
- values shorter than 3 characters are ignored, and so are numbers with fewer than 5 digits
  (ages, vital signs and dose strengths would match them) and all-zero placeholders such as "00000".

Values are indexed by their first word, so scanning costs one look-up per word of output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ingest.deidentify import ValueFinder
from ingest.timeline import Patient, ReadResult

MIN_LEN = 3
MIN_DIGITS = 5
CASE_SENSITIVE_KINDS = {"city", "county", "birthplace"}


@dataclass(frozen=True, slots=True)
class Identifier:
    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Hit:
    path: Path
    line: int
    kind: str
    masked: str


def date_forms(d: date) -> list[str]:
    """The spellings of a date that a leak could take: ISO, US, European, compact and written out."""
    month, short = d.strftime("%B"), d.strftime("%b")
    return [
        d.isoformat(),
        f"{d.year}/{d.month:02d}/{d.day:02d}",
        f"{d.year}{d.month:02d}{d.day:02d}",
        f"{d.month:02d}/{d.day:02d}/{d.year}",
        f"{d.month}/{d.day}/{d.year}",
        f"{d.day:02d}.{d.month:02d}.{d.year}",
        f"{d.day:02d}/{d.month:02d}/{d.year}",
        f"{month} {d.day}, {d.year}",
        f"{short} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{d.day} {short} {d.year}",
    ]


def _patient_identifiers(patient: Patient) -> Iterable[Identifier]:
    ident = patient.identity
    yield Identifier("patient id", patient.id)
    for kind, values in (
        ("name", ident.names),
        ("phone", ident.phones),
        ("email", ident.emails),
        ("address", ident.address_lines),
        ("record id", ident.other_ids),
        ("geolocation", ident.lat_lon or ()),
    ):
        yield from (Identifier(kind, v) for v in values)
    for kind, value in (
        ("ssn", ident.ssn),
        ("drivers licence", ident.drivers),
        ("passport", ident.passport),
        ("city", ident.city),
        ("county", ident.county),
        ("zip", ident.zip),
        ("birthplace", ident.birthplace),
    ):
        if value:
            yield Identifier(kind, value)
    for number in (ident.ssn, *ident.phones):  # the same numbers without separators
        if number:
            yield Identifier("ssn" if number == ident.ssn else "phone", re.sub(r"\D", "", number))
    for kind, d in (("birth date", patient.birth_date), ("death date", patient.death_date)):
        if d:
            yield from (Identifier(kind, form) for form in date_forms(d))


def collect_identifiers(results: Iterable[ReadResult]) -> list[Identifier]:
    """Every identifier value of every patient, encounter, organization and practitioner in ``results``."""
    found: list[Identifier] = []
    for result in results:
        for timeline in result.timelines:
            found.extend(_patient_identifiers(timeline.patient))
            found.extend(Identifier("encounter id", e.id) for e in timeline.encounters)
        for kind, directory in (("organization", result.organizations), ("practitioner", result.practitioners)):
            for key, info in directory.items():
                found.append(Identifier(f"{kind} id", key))
                for field_name in ("name", "address", "phone"):
                    if info.get(field_name):
                        found.append(Identifier(f"{kind} {field_name}", str(info[field_name])))
    return [i for i in found if _worth_matching(i.value.strip())]


def _worth_matching(value: str) -> bool:
    if len(value) < MIN_LEN:
        return False
    digits = re.sub(r"\D", "", value)
    if digits and not re.search(r"[^\W\d_]", value):  # a number: long enough and not a placeholder
        return len(digits) >= MIN_DIGITS and digits.strip("0") != ""
    return True


class Matcher:
    """Finds identifier values in lines of text (whole words; see the module docstring)."""

    def __init__(self, identifiers: Sequence[Identifier]) -> None:
        self._finder = ValueFinder((i.value, i.kind in CASE_SENSITIVE_KINDS, i.kind) for i in identifiers)

    def find(self, line: str) -> list[tuple[str, str]]:
        """(kind, matched value) for every identifier occurrence in ``line``."""
        return [(kind, line[start:end]) for start, end, kinds in self._finder.spans(line) for kind in kinds]


def mask(value: str) -> str:
    """Shows only the first two characters and the shape of a value: "Th**495" style."""
    return value[:2] + re.sub(r"[^\W_]", "*", value[2:])


def scan(directory: Path, identifiers: Sequence[Identifier]) -> tuple[list[Hit], int]:
    """All identifier hits in the files under ``directory``, and how many files were scanned."""
    matcher = Matcher(identifiers)
    hits: list[Hit] = []
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                hits.extend(Hit(path, n, kind, mask(value)) for kind, value in matcher.find(line))
    return hits, len(files)
