"""Pick the right Synthea reader for a path: a CSV export folder or FHIR R4 bundles."""

from __future__ import annotations

from pathlib import Path

from ingest.errors import IngestError
from ingest.synthea_csv import PATIENTS, read_csv_export
from ingest.timeline import ReadResult

EXPECTED = (
    "a Synthea CSV export folder (with patients.csv), a FHIR bundle .json file or a folder of them, "
    "or a Synthea output folder with a fhir/ or csv/ subfolder"
)


def source_format(path: Path) -> tuple[str, Path]:
    """("csv" | "fhir-r4", the file or folder to read) for ``path``; IngestError if it is neither.

    A Synthea output folder holding both fhir/ and csv/ is read from fhir/: the bundles carry more
    (care-plan activities, the condition each drug treats).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return "fhir-r4", path
        raise IngestError(f"{path}: not a .json file; expected {EXPECTED}")
    if not path.is_dir():
        raise IngestError(f"{path}: does not exist; expected {EXPECTED}")
    if (path / PATIENTS).is_file():
        return "csv", path
    for sub in ("fhir", "csv"):  # before *.json: an output folder may hold a run's metadata.json
        if (path / sub).is_dir():
            return source_format(path / sub)
    if any(child.suffix == ".json" and child.is_file() for child in path.iterdir()):
        return "fhir-r4", path
    raise IngestError(f"{path}: no patients.csv, no .json files, no fhir/ or csv/ subfolder; expected {EXPECTED}")


def read_source(path: Path) -> ReadResult:
    """Read one Synthea source, whichever format it is in."""
    kind, target = source_format(path)
    if kind == "csv":
        return read_csv_export(target)
    from ingest.synthea_fhir import read_fhir  # written alongside; imported only when FHIR is read

    return read_fhir([target])
