"""Cohort statistics: what patients like this one received, counted at each hospital and summed across
the federation. Only counts travel; small cells are suppressed before anything is stored or shown.

A hospital counts, over its training decisions (`targets.train.jsonl`, with age band and sex from the
matching dialogue's "Patient:" line), for each new diagnosis (SNOMED code) and each stratum (diagnosis
alone; diagnosis × age band × sex): distinct patients, decisions, and for each drug ingredient the
distinct patients who were started on it. The server sums the hospitals' counts (`CohortCounts.add`);
it sees these raw sums, as it sees adapters without SecAgg+. `release` suppresses every count below
`min_cell` patients (default 11, the CMS rule for published tables) before the artefact is written,
with complementary suppression so that no suppressed count can be worked out by subtracting released
ones: a diagnosis's age-and-sex cells are released only when every one of them passes, and a drug's
count in them only when it passes in every one. `lookup` backs off to the diagnosis alone.
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

from ingest.cases import clean_display

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
    drugs: Counter[str] = field(default_factory=Counter)  # ingredient → patients started on it
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
                raise ValueError(f"{dialogues.name}, line {line_no}: no 'Patient: N-year-old SEX' line in the case")
            who[row["id"]] = (age_band(match.group(1)), match.group(2))
        patients: dict[str, set[str]] = defaultdict(set)
        started: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        counts = cls()
        for line_no, target in _jsonl(targets):
            if target["id"] not in who:  # the error may reach the server: it names a line, never an id
                raise ValueError(f"{targets.name}, line {line_no}: the decision has no dialogue in {dialogues.name}")
            code = target["diagnosis"]["code"]
            counts.diagnoses[code] = clean_display(target["diagnosis"]["display"])
            for key in (stratum_key(code), stratum_key(code, *who[target["id"]])):
                patients[key].add(target["patient"])
                counts.cells[key].decisions += 1
                for ingredient in {i for d in target["drugs"] for i in d["ingredients"]}:
                    started[key][ingredient].add(target["patient"])
        for key, seen in patients.items():
            cell = counts.cells[key]
            cell.patients, cell.hospitals = len(seen), 1
            cell.drugs = Counter({drug: len(who_got) for drug, who_got in started[key].items()})
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
    """The artefact: counts of at least `min_cell` patients only, suppressed so that no hidden count can be
    derived from the released ones (module docstring); what was suppressed is counted, never shown."""
    by_diagnosis: dict[str, list[str]] = defaultdict(list)
    for key in counts.cells:
        if not key.endswith(f"|{ANY}|{ANY}"):
            by_diagnosis[key.split("|")[0]].append(key)
    strata, suppressed = {}, 0
    for code in sorted(counts.diagnoses):
        whole = counts.cells.get(stratum_key(code))
        narrow = sorted(by_diagnosis[code])
        if whole is None or whole.patients < min_cell:
            suppressed += 1 + len(narrow)
            continue
        drugs = {drug for drug, n in whole.drugs.items() if n >= min_cell}
        strata[stratum_key(code)] = _released(whole, drugs)
        if all(counts.cells[key].patients >= min_cell for key in narrow):
            shared = {d for d in drugs if all(not 0 < counts.cells[key].drugs[d] < min_cell for key in narrow)}
            strata |= {key: _released(counts.cells[key], shared) for key in narrow}
        else:
            suppressed += len(narrow)
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hospitals": sorted(hospitals),
        "min_cell": min_cell,
        "diagnoses": {code: counts.diagnoses[code] for code in sorted({k.split("|")[0] for k in strata})},
        "strata": strata,
        "suppressed_strata": suppressed,
    }


def _released(cell: Cell, drugs: set[str]) -> dict[str, Any]:
    shown = {drug: n for drug, n in cell.drugs.most_common() if drug in drugs and n}
    return {
        "patients": cell.patients,
        "decisions": cell.decisions,
        "hospitals": cell.hospitals,
        "drugs": shown,
        "suppressed_drugs": sum(1 for drug, n in cell.drugs.items() if n and drug not in shown),
    }


def write_artefact(runs_dir: Path, artefact: Mapping[str, Any]) -> Path:
    """RUNS_DIR/cohort-<stamp>/cohort.json, beside the training runs; returns the file."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(runs_dir) / f"cohort-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    path = folder / ARTEFACT
    path.write_text(json.dumps(artefact, indent=2, sort_keys=True) + "\n")
    return path


def stale_for(artefact: Mapping[str, Any], data_dir: Path, hospitals: list[str]) -> str | None:
    """Why `artefact` does not describe the training data of `hospitals` under `data_dir` (other hospitals,
    or counted before their last ingest, whose split may differ), or None when it does."""
    if sorted(artefact["hospitals"]) != sorted(hospitals):
        return f"it counts {', '.join(artefact['hospitals'])}, not {', '.join(sorted(hospitals))}"
    counted = datetime.fromisoformat(artefact["created"]).timestamp() + 1  # "created" has whole seconds
    if any((Path(data_dir) / h / "manifest.json").stat().st_mtime > counted for h in hospitals):
        return "it was counted before the hospitals' last ingest"
    return None


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
    drugs: list[tuple[str, float]]  # ingredient, share of the patients started on it
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
            drugs=sorted(((drug, n / cell["patients"]) for drug, n in cell["drugs"].items()), key=lambda d: (-d[1], d[0])),
            suppressed_drugs=cell["suppressed_drugs"],
            min_cell=artefact["min_cell"],
        )
    return None


_NEW_DIAGNOSIS_LINE = re.compile(r"(?im)^New diagnosis:\s*(.+)$")


def for_case(artefact: Mapping[str, Any], case_text: str) -> str | None:
    """Markdown for the doctor about the patient of a de-identified case: the released counts for its first
    new diagnosis (by name, as ingest renders it), age band and sex; None when the case names no diagnosis."""
    diagnosis = _NEW_DIAGNOSIS_LINE.search(case_text)
    if diagnosis is None or diagnosis.group(1).strip().lower() == "none":
        return None
    name = diagnosis.group(1).split(";")[0].strip()
    code = next((c for c, known in artefact["diagnoses"].items() if known.lower() == name.lower()), None)
    patient = _PATIENT_LINE.search(case_text)
    band, sex = (age_band(patient.group(1)), patient.group(2)) if patient else (None, None)
    cohort = lookup(artefact, code, band, sex) if code else None
    if cohort is None:  # never seen, or seen in too few patients: the artefact cannot tell which
        return (f"No released counts for {name}: fewer than {artefact['min_cell']} patients across the "
                "federation had it, or none.")
    return describe(cohort)


def describe(cohort: Cohort) -> str:
    """Markdown: who was counted, the drugs they were started on with shares, what was suppressed."""
    n = cohort.hospitals
    lines = [f"**{cohort.patients} patients** ({cohort.decisions} treatment decisions) at {n} "
             f"hospital{'' if n == 1 else 's'} — {cohort.stratum}."]
    if cohort.drugs:
        lines.append("Started on: " + ", ".join(f"{drug} {share:.0%}" for drug, share in cohort.drugs) + " of them.")
    else:
        lines.append("No drug was started in enough patients to be shown.")
    if cohort.suppressed_drugs:
        lines.append(f"{cohort.suppressed_drugs} other drug{'' if cohort.suppressed_drugs == 1 else 's'} not shown "
                     f"(fewer than {cohort.min_cell} patients, or hidden so that none can be worked out).")
    return "\n\n".join(lines)


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, json.loads(line)

