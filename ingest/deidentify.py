"""HIPAA Safe Harbor de-identification: salted pseudonyms, ages, relative times, scrubbing.

Every value that leaves ingest goes through here: source ids become salted HMACs (the salt
stays in ``DATA/<hospital>/.salt`` and never travels), dates become ages and relative times,
geography is kept at state level only, and free text is scrubbed of the patient's identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from pathlib import Path

from ingest.timeline import Identity, Patient

SALT_FILE = ".salt"
REDACTED = "[REDACTED]"
MIN_SCRUB_LEN = 3  # shorter values (initials, "MA") would blank ordinary words
UUID_RE = re.compile(
    r"(?<![0-9a-f])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?![0-9a-f])", re.IGNORECASE
)


def load_or_create_salt(hospital_dir: Path) -> bytes:
    """Return the hospital's salt, creating it once (32 random bytes, owner-only file)."""
    path = hospital_dir / SALT_FILE
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    hospital_dir.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex())
    return salt


class Pseudonymizer:
    """Salted-hash pseudonyms: stable for one salt, unlinkable without it."""

    def __init__(self, salt: bytes) -> None:
        self._salt = salt

    def __call__(self, *parts: str) -> str:
        """A 16-hex-digit pseudonym of the joined parts."""
        msg = "\x1f".join(parts).encode()
        return hmac.new(self._salt, msg, hashlib.sha256).hexdigest()[:16]

    def patient(self, patient: Patient) -> str:
        return self("patient", patient.id)

    def case(self, patient: Patient, encounter_id: str) -> str:
        return self("case", patient.id, encounter_id)


def age_years(birth: date, at: date) -> int:
    """Completed years between birth and ``at``."""
    return at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))


def age_text(years: int) -> str:
    """An age as Safe Harbor allows it: exact up to 89, "90+" above."""
    return "90+" if years > 89 else str(years)


def age_band(years: int) -> str:
    """A ten-year band ("50-59"); everyone over 89 shares "90+"."""
    if years > 89:
        return "90+"
    low = years // 10 * 10
    return f"{low}-{low + 9}"


def _unit(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def span_text(days: int) -> str:
    """A duration in the coarsest sensible unit: "5 days", "3 months", "2 years"."""
    days = max(days, 0)
    if days < 60:
        return _unit(days, "day")
    if days < 730:
        return _unit(days // 30, "month")
    return _unit(days // 365, "year")


def ago(days: int) -> str:
    """A past point in time relative to the decision: "today", "12 days ago", "3 years ago"."""
    return "today" if days <= 0 else f"{span_text(days)} ago"


def since(days: int) -> str:
    """How long something has been going on: "since 4 months"."""
    return "since today" if days <= 0 else f"since {span_text(days)}"


def identity_values(patient: Patient) -> list[str]:
    """Every identifying string of one patient (source id, names, numbers, address below state)."""
    ident: Identity = patient.identity
    values = [patient.id, *ident.names, *ident.phones, *ident.emails, *ident.address_lines, *ident.other_ids]
    values += [v for v in (ident.ssn, ident.drivers, ident.passport, ident.city, ident.county, ident.zip) if v]
    if ident.birthplace:
        values.append(ident.birthplace)
    if ident.lat_lon:
        values.extend(ident.lat_lon)
    for d in (patient.birth_date, patient.death_date):
        if d:
            values.append(d.isoformat())
    return [v.strip() for v in values if v and len(v.strip()) >= MIN_SCRUB_LEN]


_WORD_RE = re.compile(r"[^\W_]+")  # letters and digits: "_" and punctuation separate words


class ValueFinder:
    """Finds whole-word occurrences of many known values in text, longest first, without overlaps.

    Values are indexed by their first word, so a line costs one dictionary look-up per word
    however many values there are (a regular expression of thousands of alternatives takes
    seconds to compile). A value matches case-insensitively unless it is marked case-sensitive.
    """

    def __init__(self, entries: Iterable[tuple[str, bool, str]]) -> None:
        """``entries``: (value, case_sensitive, label); one value may carry several labels."""
        labels: dict[tuple[str, bool], set[str]] = defaultdict(set)
        for value, sensitive, label in entries:
            value = value.strip()
            if _WORD_RE.search(value):
                labels[(value if sensitive else value.lower(), sensitive)].add(label)
        self._index: dict[str, list[tuple[str, bool, int, list[str]]]] = defaultdict(list)
        for (value, sensitive), kinds in labels.items():
            first = _WORD_RE.search(value)
            self._index[first.group(0).lower()].append((value, sensitive, first.start(), sorted(kinds)))
        for candidates in self._index.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    def spans(self, text: str) -> list[tuple[int, int, list[str]]]:
        """(start, end, labels) of every match in ``text``."""
        found: list[tuple[int, int, list[str]]] = []
        covered = 0
        for word in _WORD_RE.finditer(text):
            if word.start() < covered:
                continue
            for value, sensitive, offset, kinds in self._index.get(word.group(0).lower(), ()):
                start = word.start() - offset
                end = start + len(value)
                if start < covered or end > len(text):
                    continue
                piece = text[start:end] if sensitive else text[start:end].lower()
                if piece == value and not (start and text[start - 1].isalnum()) and not text[end:end + 1].isalnum():
                    found.append((start, end, kinds))
                    covered = end
                    break
        return found


class Scrubber:
    """Removes known identifier values (whole words, case-insensitive; "_" separates words, as in
    Synthea's bundle file names) and any UUID from text."""

    def __init__(self, values: Iterable[str], pseudonym: Pseudonymizer | None = None) -> None:
        self._finder = ValueFinder((v, False, "") for v in values if len(v.strip()) >= MIN_SCRUB_LEN)
        self._pseudonym = pseudonym

    def __call__(self, text: str) -> str:
        for start, end, _ in reversed(self._finder.spans(text)):
            text = text[:start] + REDACTED + text[end:]
        if self._pseudonym is not None:
            text = UUID_RE.sub(lambda m: "id:" + self._pseudonym("id", m.group(0).lower())[:8], text)
        else:
            text = UUID_RE.sub(REDACTED, text)
        return text
