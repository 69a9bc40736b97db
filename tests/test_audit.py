"""The identifier audit: clean on real ingest outputs, and catches planted identifiers."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from ingest.audit import Identifier, Matcher, collect_identifiers, date_forms, mask, scan
from ingest.pipeline import ingest
from ingest.readers import read_source


@pytest.fixture(params=["ma_csv", "ne_csv", "ma_fhir"])
def ingested(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    source = request.getfixturevalue(request.param)
    ingest([source], "hospital", tmp_path / "data")
    return tmp_path / "data", source


def test_ingest_outputs_hold_no_source_identifier(ingested) -> None:
    out, source = ingested
    identifiers = collect_identifiers([read_source(source)])
    kinds = {i.kind for i in identifiers}
    assert {"patient id", "name", "ssn", "birth date", "address", "encounter id"} <= kinds
    hits, files = scan(out, identifiers)
    assert files == 6  # five outputs and the salt
    assert hits == []


def test_cli_audit_is_clean_then_catches_planted_identifiers(ingested) -> None:
    from typer.testing import CliRunner

    from federimed.cli import app

    out, source = ingested
    runner = CliRunner()
    clean = runner.invoke(app, ["audit", str(out), "--source", str(source)])
    assert clean.exit_code == 0, clean.output
    assert "audit clean" in clean.output

    patient = read_source(source).timelines[0].patient
    name = max(patient.identity.names, key=len)
    born = patient.birth_date
    planted = out / "hospital" / "train.jsonl"
    with planted.open("a") as fh:
        fh.write(f'{{"note": "seen {name.upper()}"}}\n')
        fh.write(f'{{"note": "ssn {patient.identity.ssn}"}}\n')
        fh.write(f'{{"note": "born {born.month:02d}/{born.day:02d}/{born.year}"}}\n')
    lines = len(planted.read_text().splitlines())
    dirty = runner.invoke(app, ["audit", str(out), "--source", str(source)], terminal_width=200)
    assert dirty.exit_code == 1, dirty.output
    for kind, line in (("name", lines - 2), ("ssn", lines - 1), ("birth date", lines)):
        assert any(kind in row and f" {line} " in row and "train.jsonl" in row for row in dirty.output.splitlines())
    assert name.upper() not in dirty.output and patient.identity.ssn not in dirty.output


def test_matcher_rules() -> None:
    matcher = Matcher(
        [
            Identifier("name", "Thad495"),
            Identifier("name", "Thad495 Tremblay80"),
            Identifier("city", "Reading"),
            Identifier("ssn", "999-94-6965"),
        ]
    )
    found = matcher.find("THAD495 TREMBLAY80 read in Reading; reading; 999-94-6965; x999-94-6965; Thad4950")
    assert found == [("name", "THAD495 TREMBLAY80"), ("city", "Reading"), ("ssn", "999-94-6965")]


def test_short_numbers_and_placeholders_are_not_collected(ma_fhir) -> None:
    values = {i.value for i in collect_identifiers([read_source(ma_fhir)])}
    assert "00000" not in values  # Synthea's FHIR postal code placeholder
    assert all(len(v) >= 3 for v in values)
    assert "1991-02-07" in values and "02/07/1991" in values


def test_date_forms_and_mask() -> None:
    forms = date_forms(date(1991, 2, 7))
    assert {"1991-02-07", "02/07/1991", "2/7/1991", "07.02.1991", "February 7, 1991", "19910207"} <= set(forms)
    assert mask("Thad495") == "Th*****"
    assert mask("999-94-6965") == "99*-**-****"
