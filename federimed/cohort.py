"""Cohort statistics: what patients like this one received, counted at each hospital and summed across
the federation. Only counts travel; small cells are suppressed before anything is stored or shown.

A hospital counts, over its training decisions (`targets.train.jsonl`, with age band and sex from the
matching dialogue's "Patient:" line), for each new diagnosis (SNOMED code) and each stratum (diagnosis
alone; diagnosis × age band × sex): distinct patients, decisions, and for each drug ingredient the
decisions in which it was started. The server sums the hospitals' counts (`CohortCounts.add`) and
`release` suppresses every cell below `min_cell` patients or decisions (default 11, the CMS rule for
published tables) before the artefact is written. `lookup` backs off from the narrowest stratum to the
diagnosis alone when the narrow one was suppressed.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CMS_MIN_CELL = 11
"""CMS cell-size suppression: no published cell may count fewer than 11 beneficiaries."""
ANY = "*"
_PATIENT_LINE = re.compile(r"(?m)^Patient: (\d+\+?)-year-old (\S+)")
ARTEFACT = "cohort.json"
FORMAT = 1


def age_band(age: str) -> str:
    """"58" → "50-59"; "90+" stays "90+"."""
    if age.endswith("+"):
        return age
    decade = int(age) // 10 * 10
    return f"{decade}-{decade + 9}"


def stratum_key(diagnosis: str, band: str = ANY, sex: str = ANY) -> str:
    return f"{diagnosis}|{band}|{sex}"


@dataclass
class Cell:
    """Counts of one stratum."""

    patients: int = 0
    decisions: int = 0
    drugs: Counter[str] = field(default_factory=Counter)
    hospitals: int = 0


@dataclass
class CohortCounts:
    """Counts per stratum key, and the display name of each diagnosis code."""

    cells: dict[str, Cell] = field(default_factory=lambda: defaultdict(Cell))
    diagnoses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_hospital(cls, folder: Path) -> CohortCounts:
        """One hospital's counts over its training decisions."""
        targets, dialogues = folder / "targets.train.jsonl", folder / "train.jsonl"
        for path in (targets, dialogues):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run `federimed ingest` for this hospital first")
        who = {}
        for line_no, row in _jsonl(dialogues):
            user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
            match = _PATIENT_LINE.search(user)
            if match is None:
                raise ValueError(f"{dialogues}, line {line_no}: no 'Patient: N-year-old SEX' line in the case")
            who[row["id"]] = (age_band(match.group(1)), match.group(2))
        patients: dict[str, set[str]] = defaultdict(set)
        counts = cls()
        for line_no, target in _jsonl(targets):
            if target["id"] not in who:
                raise ValueError(f"{targets}, line {line_no}: decision {target['id']} has no dialogue in {dialogues}")
            code = target["diagnosis"]["code"]
            counts.diagnoses[code] = _clean(target["diagnosis"]["display"])
            drugs = {i for d in target["drugs"] for i in d["ingredients"]}
            for key in (stratum_key(code), stratum_key(code, *who[target["id"]])):
                cell = counts.cells[key]
                patients[key].add(target["patient"])
                cell.decisions += 1
                cell.drugs.update(drugs)
        for key, seen in patients.items():
            counts.cells[key].patients = len(seen)
            counts.cells[key].hospitals = 1
        return counts

    def add(self, other: CohortCounts) -> None:
        """Sum `other` into these counts (patients of different hospitals are different patients)."""
        self.diagnoses.update(other.diagnoses)
        for key, cell in other.cells.items():
            mine = self.cells[key]
            mine.patients += cell.patients
            mine.decisions += cell.decisions
            mine.drugs.update(cell.drugs)
            mine.hospitals += cell.hospitals

    def to_metrics(self) -> dict[str, int]:
        """Flat integer counts, as a Flower MetricRecord carries them."""
        flat = {}
        for key, cell in self.cells.items():
            flat[f"patients/{key}"] = cell.patients
            flat[f"decisions/{key}"] = cell.decisions
            flat |= {f"drug/{key}/{drug}": n for drug, n in cell.drugs.items()}
        return flat

    @classmethod
    def from_metrics(cls, flat: Mapping[str, int], diagnoses: Mapping[str, str]) -> CohortCounts:
        """The inverse of `to_metrics` for one hospital's reply."""
        counts = cls(diagnoses=dict(diagnoses))
        for name, value in flat.items():
            kind, _, rest = name.partition("/")
            if kind == "drug":
                key, _, drug = rest.rpartition("/")
                counts.cells[key].drugs[drug] = int(value)
            elif kind in ("patients", "decisions"):
                setattr(counts.cells[rest], kind, int(value))
                counts.cells[rest].hospitals = 1
            else:
                raise ValueError(f"unknown cohort count {name!r}")
        return counts


def release(counts: CohortCounts, min_cell: int, hospitals: list[str]) -> dict[str, Any]:
    """The artefact: every stratum with at least `min_cell` patients, and within it every drug started in at
    least `min_cell` decisions; what was suppressed is counted, never shown."""
    strata, suppressed_strata = {}, 0
    for key, cell in sorted(counts.cells.items()):
        if cell.patients < min_cell or cell.decisions < min_cell:
            suppressed_strata += 1
            continue
        shown = {drug: n for drug, n in cell.drugs.most_common() if n >= min_cell}
        strata[key] = {
            "patients": cell.patients,
            "decisions": cell.decisions,
            "hospitals": cell.hospitals,
            "drugs": shown,
            "suppressed_drugs": sum(1 for n in cell.drugs.values() if n < min_cell),
        }
    codes = {key.split("|")[0] for key in strata}
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hospitals": sorted(hospitals),
        "min_cell": min_cell,
        "epsilon": None,
        "diagnoses": {code: name for code, name in sorted(counts.diagnoses.items()) if code in codes},
        "strata": strata,
        "suppressed_strata": suppressed_strata,
    }


def write_artefact(runs_dir: Path, artefact: Mapping[str, Any]) -> Path:
    """RUNS_DIR/cohort-<stamp>/cohort.json, beside the training runs; returns the file."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(runs_dir) / f"cohort-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    path = folder / ARTEFACT
    path.write_text(json.dumps(artefact, indent=2, sort_keys=True) + "\n")
    return path


def latest_artefact(runs_dir: Path) -> dict[str, Any] | None:
    """The newest cohort artefact under `runs_dir` (None when there is none)."""
    found = sorted(Path(runs_dir).glob(f"cohort-*/{ARTEFACT}"))
    return json.loads(found[-1].read_text()) if found else None


@dataclass(frozen=True)
class Cohort:
    """What the chat shows for one case: the stratum used and its released counts."""

    diagnosis: str
    stratum: str  # "diagnosis, 50-59, male" or "diagnosis (all ages and sexes)"
    patients: int
    decisions: int
    hospitals: int
    drugs: list[tuple[str, float]]  # ingredient, share of decisions
    suppressed_drugs: int
    min_cell: int


def lookup(artefact: Mapping[str, Any], diagnosis: str, band: str | None, sex: str | None) -> Cohort | None:
    """Counts for patients like this one: diagnosis × age band × sex, backing off to the diagnosis alone."""
    keys = ([stratum_key(diagnosis, band, sex)] if band and sex else []) + [stratum_key(diagnosis)]
    for key in keys:
        cell = artefact["strata"].get(key)
        if cell is None:
            continue
        name = artefact["diagnoses"].get(diagnosis, diagnosis)
        narrow = key != stratum_key(diagnosis)
        return Cohort(
            diagnosis=name,
            stratum=f"{name}, {band}, {sex}" if narrow else f"{name} (all ages and sexes)",
            patients=cell["patients"],
            decisions=cell["decisions"],
            hospitals=cell["hospitals"],
            drugs=sorted(((drug, n / cell["decisions"]) for drug, n in cell["drugs"].items()), key=lambda d: (-d[1], d[0])),
            suppressed_drugs=cell["suppressed_drugs"],
            min_cell=artefact["min_cell"],
        )
    return None


_NEW_DIAGNOSIS_LINE = re.compile(r"(?im)^New diagnosis:\s*(.+)$")


def for_case(artefact: Mapping[str, Any], case_text: str) -> Cohort | None:
    """Counts for the patient of a de-identified case: its first new diagnosis (by name, as ingest
    renders it), age band and sex; None when the case names no diagnosis the federation released."""
    diagnosis = _NEW_DIAGNOSIS_LINE.search(case_text)
    if diagnosis is None:
        return None
    wanted = diagnosis.group(1).split(";")[0].strip().lower()
    code = next((c for c, name in artefact["diagnoses"].items() if name.lower() == wanted), None)
    if code is None:
        return None
    patient = _PATIENT_LINE.search(case_text)
    band, sex = (age_band(patient.group(1)), patient.group(2)) if patient else (None, None)
    return lookup(artefact, code, band, sex)


def describe(cohort: Cohort | None, min_cell: int) -> str:
    """Markdown for the doctor: who was counted, the drugs started and their shares, what was suppressed."""
    if cohort is None:
        return (f"No counts for this diagnosis: fewer than {min_cell} patients across the federation had it, "
                "or it was never seen (small cells are not shown).")
    n = cohort.hospitals
    lines = [f"**{cohort.patients} patients** ({cohort.decisions} treatment decisions) at {n} "
             f"hospital{'' if n == 1 else 's'} — {cohort.stratum}."]
    if cohort.drugs:
        lines.append("Started: " + ", ".join(f"{drug} {share:.0%}" for drug, share in cohort.drugs) + ".")
    else:
        lines.append("No drug was started often enough to be shown.")
    if cohort.suppressed_drugs:
        lines.append(f"{cohort.suppressed_drugs} other drug{'' if cohort.suppressed_drugs == 1 else 's'} started in "
                     f"fewer than {cohort.min_cell} decisions not shown.")
    return "\n\n".join(lines)


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, json.loads(line)


def _clean(display: str) -> str:
    """"Essential hypertension (disorder)" → "Essential hypertension"."""
    return re.sub(r"\s*\([^()]*\)$", "", display).strip()
