"""De-identification: salts, pseudonyms, ages, relative times and scrubbing."""

from __future__ import annotations

import stat
from datetime import date

import pytest

from ingest.deidentify import (
    REDACTED,
    Pseudonymizer,
    Scrubber,
    age_band,
    age_text,
    age_years,
    ago,
    identity_values,
    load_or_create_salt,
    since,
)
from ingest.timeline import Identity, Patient


def test_age_counts_completed_years_around_the_birthday() -> None:
    birth = date(1960, 6, 15)
    assert age_years(birth, date(2020, 6, 14)) == 59
    assert age_years(birth, date(2020, 6, 15)) == 60
    assert age_years(date(2000, 2, 29), date(2021, 2, 28)) == 20


@pytest.mark.parametrize(("years", "text", "band"), [(0, "0", "0-9"), (58, "58", "50-59"), (89, "89", "80-89"),
                                                     (90, "90+", "90+"), (104, "90+", "90+")])
def test_ages_over_89_are_aggregated(years: int, text: str, band: str) -> None:
    assert age_text(years) == text
    assert age_band(years) == band


@pytest.mark.parametrize(("days", "phrase"), [(0, "today"), (1, "1 day ago"), (12, "12 days ago"),
                                              (75, "2 months ago"), (1100, "3 years ago")])
def test_relative_days(days: int, phrase: str) -> None:
    assert ago(days) == phrase


def test_since_phrases() -> None:
    assert since(0) == "since today"
    assert since(45) == "since 45 days"
    assert since(3 * 365 + 10) == "since 3 years"


def test_salt_is_created_once_private_and_stable(tmp_path) -> None:
    first = load_or_create_salt(tmp_path / "h")
    mode = (tmp_path / "h" / ".salt").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert load_or_create_salt(tmp_path / "h") == first
    assert len(first) == 32
    assert load_or_create_salt(tmp_path / "other") != first


def test_pseudonyms_are_stable_per_salt_and_unlinkable_across_salts() -> None:
    patient = Patient("4eefab3e-334d-8a8a-2557-36db48d45fbe", date(1990, 1, 1), "male")
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert a.patient(patient) == a.patient(patient)
    assert a.patient(patient) != b.patient(patient)
    assert a.case(patient, "e1") != a.case(patient, "e2")
    assert patient.id not in a.patient(patient)
    assert len(a.patient(patient)) == 16


def test_scrubber_removes_identity_values_whole_words_and_uuids() -> None:
    patient = Patient(
        "700fcba8-ac32-d2c7-454e-ac508788e884",
        date(1991, 2, 7),
        "male",
        identity=Identity(names=["Thad495", "Tremblay80", "Jo"], ssn="999-94-6965", city="Whitman"),
    )
    scrub = Scrubber(identity_values(patient))
    text = scrub("Note for THAD495 tremblay80 (999-94-6965) of Whitman, born 1991-02-07; Jo; Whitmanville; "
                 "ref 11dd0e35-30ed-9772-6144-bd793719bd1d")
    assert "thad" not in text.lower() and "tremblay" not in text.lower()
    assert "999-94-6965" not in text and "1991-02-07" not in text
    assert "11dd0e35" not in text
    assert "Jo;" in text  # two-letter values are not scrubbed (they would blank ordinary words)
    assert "Whitmanville" in text  # whole words only
    assert text.count(REDACTED) == 6
    assert scrub("/in/Thad495_Tremblay80_700fcba8-ac32-d2c7-454e-ac508788e884.json") == (
        f"/in/{REDACTED}_{REDACTED}_{REDACTED}.json"
    )


def test_scrubber_with_pseudonyms_keeps_uuids_distinguishable() -> None:
    scrub = Scrubber([], Pseudonymizer(b"s" * 32))
    one = scrub("entry Condition/11dd0e35-30ed-9772-6144-bd793719bd1d")
    two = scrub("entry Condition/22dd0e35-30ed-9772-6144-bd793719bd1d")
    assert "11dd0e35" not in one and one.startswith("entry Condition/id:")
    assert one != two
