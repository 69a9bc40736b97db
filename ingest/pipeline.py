"""Ingest one hospital: read sources → de-identify → cases → dialogues and targets, split by patient.

Writes ``DATA/<hospital>/{train,heldout}.jsonl``, ``targets.{train,heldout}.jsonl`` and
``manifest.json``; the salt in ``DATA/<hospital>/.salt`` is created on first use and kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ingest.cases import Case, build_cases, current_snapshot
from ingest.deidentify import REDACTED, Pseudonymizer, Scrubber, identity_values, load_or_create_salt
from ingest.dialogues import dialogue, snapshot_text
from ingest.errors import IngestError
from ingest.jsonl import write_jsonl
from ingest.readers import read_source
from ingest.timeline import PatientTimeline, ReadResult, Skipped

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _check_source(path: Path) -> None:
    if not path.exists():
        raise IngestError(f"{path}: source does not exist")
    if path.is_dir() and not any(path.iterdir()):
        raise IngestError(f"{path}: source folder is empty")
    if path.is_file() and path.stat().st_size == 0:
        raise IngestError(f"{path}: source file is empty")


def split_patients(patients: Sequence[str], heldout_share: float, seed: int) -> set[str]:
    """The held-out subset of ``patients``: deterministic for a seed.

    Patients are ordered by a hash of seed and id; the first ``round(n * share)`` are held out, at least
    one and never all of them when there are two or more and the share is positive. `ingest` passes the
    source records' ids (kept in memory, never written), so that the split follows the recorded seed
    alone: every ingest of the same records scores the same patients, whatever the hospital's salt.
    """
    if not 0 <= heldout_share < 1:
        raise ValueError(f"heldout share must be in [0, 1), got {heldout_share}")
    order = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = round(len(order) * heldout_share)
    if heldout_share > 0 and len(order) >= 2:
        n = min(max(n, 1), len(order) - 1)
    return set(order[:n])


# Synthea names its bundles after the patient, numbered ("Jane123_Doe456_<uuid>.json"). A bundle that
# could not be read has no patient whose names the scrubber knows, so its numbered names go by pattern.
_SYNTHEA_NAME_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z][A-Za-z'\-]*[a-z]\d{1,4}(?![0-9])")


def _scrub_file_names(path: str) -> str:
    """`path` with Synthea-style numbered patient names in its file name replaced."""
    folder, _, name = path.rpartition("/")
    return (folder + "/" if folder else "") + _SYNTHEA_NAME_RE.sub(REDACTED, name)


def ingest(
    sources: Sequence[Path],
    hospital: str,
    out: Path,
    heldout_share: float = 0.2,
    seed: int = 13,
    progress: Progress | None = None,
) -> dict:
    """Ingest ``sources`` for ``hospital`` into ``out/hospital``; returns the manifest written there."""
    if not hospital or Path(hospital).name != hospital or hospital.startswith("."):
        raise IngestError(f"{hospital!r}: a hospital name must be a plain folder name")
    if not sources:
        raise IngestError("no source given")
    sources = [Path(s) for s in sources]
    for src in sources:
        _check_source(src)
    hospital_dir = Path(out) / hospital
    pseudonym = Pseudonymizer(load_or_create_salt(hospital_dir))
    report = progress or (lambda stage, done, total: None)

    results: list[tuple[Path, ReadResult]] = []
    for i, src in enumerate(sources):
        report("read", i, len(sources))
        results.append((src, read_source(src)))
    report("read", len(sources), len(sources))

    skipped: list[Skipped] = [s for _, result in results for s in result.skipped]
    timelines: list[PatientTimeline] = []
    seen: set[str] = set()
    for src, result in results:
        for timeline in result.timelines:
            if timeline.patient.id in seen:
                where = f"patient {pseudonym.patient(timeline.patient)}"
                skipped.append(Skipped(str(src), where, "duplicate patient: already read from an earlier source"))
                continue
            seen.add(timeline.patient.id)
            timelines.append(timeline)

    cases: list[Case] = []
    for i, timeline in enumerate(timelines):
        report("cases", i, len(timelines))
        try:
            cases.extend(build_cases(timeline, pseudonym))
        except (ValueError, TypeError, AttributeError) as exc:  # one bad record must not stop the hospital
            where = f"patient {pseudonym.patient(timeline.patient)}"
            skipped.append(Skipped("(case building)", where, f"no cases built: {type(exc).__name__}: {exc}"))
    report("cases", len(timelines), len(timelines))

    patients = [c.patient for c in cases]
    source_id = {pseudonym.patient(t.patient): t.patient.id for t in timelines}
    heldout_ids = split_patients([source_id[p] for p in patients], heldout_share, seed)
    heldout = {p for p in patients if source_id[p] in heldout_ids}
    parts = {
        "train": [c for c in cases if c.patient not in heldout],
        "heldout": [c for c in cases if c.patient in heldout],
    }
    for name, part in parts.items():
        write_jsonl(hospital_dir / f"{name}.jsonl", [dialogue(c) for c in part])
        write_jsonl(hospital_dir / f"targets.{name}.jsonl", [c.target() for c in part])

    scrub = Scrubber([v for t in timelines for v in identity_values(t.patient)], pseudonym)
    manifest = {
        "hospital": hospital,
        "sources": [  # the last two parts of each path: the host's folder layout stays out of the outputs
            {"path": scrub(str(Path(*src.parts[-2:]))), "format": result.source_format, "version": result.source_version}
            for src, result in results
        ],
        "counts": {
            "patients": len(timelines),
            "patients_with_cases": len(set(patients)),
            "cases": len(cases),
            "train_cases": len(parts["train"]),
            "heldout_cases": len(parts["heldout"]),
            "drug_cases": sum(1 for c in cases if c.drugs),
            "skipped": len(skipped),
        },
        "split": {
            "seed": seed,
            "heldout_share": heldout_share,
            "train_patients": len(set(patients) - heldout),
            "heldout_patients": len(heldout),
        },
        "skipped": [
            {"source": _scrub_file_names(scrub(s.source)), "location": scrub(s.location), "reason": scrub(s.reason)}
            for s in skipped
        ],
    }
    (hospital_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def summarize_bundle(bundle: Path | str | bytes) -> str:
    """The de-identified snapshot text (question included) of one uploaded FHIR bundle's latest encounter.

    A throw-away salt is used: nothing here is linked to any hospital's pseudonyms.
    """
    from ingest.synthea_fhir import read_fhir

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(bundle, bytes):
            path = Path(tmp) / "upload.json"
            path.write_bytes(bundle)
        else:
            path = Path(bundle)
            _check_source(path)
        result = read_fhir([path])
    if len(result.timelines) != 1:
        reasons = "; ".join(f"{s.location}: {s.reason}" for s in result.skipped[:3])
        detail = f" ({reasons})" if reasons else ""
        raise IngestError(f"uploaded bundle: expected one patient, found {len(result.timelines)}{detail}")
    timeline = result.timelines[0]
    try:
        snapshot = current_snapshot(timeline, Pseudonymizer(secrets.token_bytes(32)))
    except ValueError as exc:
        raise IngestError(f"uploaded bundle: {exc}") from None
    return Scrubber(identity_values(timeline.patient))(snapshot_text(snapshot))
