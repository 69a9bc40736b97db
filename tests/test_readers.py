"""Format detection of read_source: CSV export folders, FHIR bundles, Synthea output folders, and the rest."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest

from ingest.errors import IngestError
from ingest.readers import read_source, source_format
from ingest.timeline import ReadResult


def _stub_fhir(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """Replace ingest.synthea_fhir.read_fhir with a recorder; returns the recorded calls."""
    calls: list[list[Path]] = []

    def read_fhir(paths: Sequence[Path]) -> ReadResult:
        calls.append(list(paths))
        return ReadResult([], [], "fhir-r4", "fhir-r4")

    module = types.ModuleType("ingest.synthea_fhir")
    module.read_fhir = read_fhir  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ingest.synthea_fhir", module)
    return calls


def test_csv_export_folder(ma_csv: Path) -> None:
    result = read_source(ma_csv)
    assert (result.source_format, result.source_version, len(result.timelines)) == ("csv", "synthea-csv-3.3", 112)


def test_output_folder_with_only_csv(ne_csv: Path, tmp_path: Path) -> None:
    (tmp_path / "csv").symlink_to(ne_csv, target_is_directory=True)
    assert source_format(tmp_path) == ("csv", tmp_path / "csv")
    assert read_source(tmp_path).source_version == "synthea-csv-3.2"


def test_output_folder_with_fhir_and_csv_prefers_fhir(ma_fhir: Path) -> None:
    assert source_format(ma_fhir.parent) == ("fhir-r4", ma_fhir)


def test_fhir_file_and_folder_dispatch(ma_fhir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stub_fhir(monkeypatch)
    bundle = next(ma_fhir.glob("Jason347_*.json"))
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "one.json").write_text("{}", encoding="utf-8")
    for path in (bundle, ma_fhir, tmp_path / "bundles", ma_fhir.parent):
        assert read_source(path).source_format == "fhir-r4"
    assert calls == [[bundle], [ma_fhir], [tmp_path / "bundles"], [ma_fhir]]


@pytest.mark.skipif(importlib.util.find_spec("ingest.synthea_fhir") is None,
                    reason="ingest.synthea_fhir (the FHIR reader) is not written yet")
def test_fhir_bundle_read_by_the_fhir_reader(ma_fhir: Path) -> None:
    bundle = next(ma_fhir.glob("Jason347_*.json"))
    result = read_source(bundle)
    assert result.source_format == "fhir-r4"
    assert [t.patient.id for t in result.timelines] == ["27e4ad3f-fa03-7761-6e3f-650723ef8658"]


@pytest.mark.parametrize("make", ["missing", "empty", "text-file", "other-files"])
def test_anything_else_is_an_error(make: str, tmp_path: Path) -> None:
    path = tmp_path / "source"
    if make == "empty":
        path.mkdir()
    elif make == "text-file":
        path.write_text("patients", encoding="utf-8")
    elif make == "other-files":
        path.mkdir()
        (path / "notes.txt").write_text("x", encoding="utf-8")
        (path / "encounters.csv").write_text("Id\n", encoding="utf-8")
    with pytest.raises(IngestError) as error:
        read_source(path)
    message = str(error.value)
    assert str(path) in message
    assert "patients.csv" in message and "fhir/" in message
