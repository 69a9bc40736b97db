"""Cohort statistics: what patients like this one received, counted at each hospital and summed across
the federation. Only counts travel; small cells are suppressed before anything is stored or shown.

A hospital counts, over its training decisions (`targets.train.jsonl`, with age band and sex from the
matching dialogue's "Patient:" line, taken at the patient's first decision for the diagnosis), for each new
diagnosis (SNOMED code) and each stratum (diagnosis alone; diagnosis × age band × sex): distinct patients,
decisions, hospitals, decisions whose condition ended within `ENDED_WITHIN_DAYS` of its onset, and for each
drug ingredient the distinct patients who were started on it. The server sums the hospitals' counts
(`CohortCounts.add`; under SecAgg+ it sees only the sum, `federimed.fl.server_app`), optionally adds DP
noise (`federimed.cohort_privacy`), and `release` suppresses every count below `min_cell` patients (default
11, the CMS rule for published tables) before the artefact is written, with complementary suppression so
that no suppressed count can be worked out by subtracting released ones: a diagnosis's age-and-sex cells
are released only when every one of them passes, and a drug's count in them only when it passes in every
one. `lookup` backs off to the diagnosis alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.cases import clean_display

if TYPE_CHECKING:
    from federimed.cohort_privacy import ContributionBounds, CountNoise

CMS_MIN_CELL = 11
"""CMS cell-size suppression: no published cell may count fewer than 11 beneficiaries."""
ANY = "*"
_PATIENT_LINE = re.compile(r"(?m)^Patient: (\d+\+?)-year-old (\S+)")
ARTEFACT = "cohort.json"
FORMAT = 2
ENDED_WITHIN_DAYS = 90
"""The stated window of "the condition ended": its end at most this many days after its onset."""
KINDS = ("patients", "decisions", "hospitals", "ended")
"""The counts of a cell besides its drugs, as `to_metrics` names them."""


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
    hospitals: int = 0
    ended: int = 0  # decisions whose condition ended within ENDED_WITHIN_DAYS
    drugs: Counter[str] = field(default_factory=Counter)  # ingredient → patients started on it


@dataclass
class CohortCounts:
    """Counts per stratum key, and the display name of each diagnosis code."""

    cells: dict[str, Cell] = field(default_factory=lambda: defaultdict(Cell))
    diagnoses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_hospital(cls, folder: Path, bounds: ContributionBounds | None = None) -> CohortCounts:
        """One hospital's counts over its training decisions; with `bounds` (a DP release), only what each
        patient may contribute: the first diagnoses, decisions and drugs in file order."""
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
        counts = cls()
        strata: dict[tuple[str, str], tuple[str, str]] = {}  # (patient, diagnosis) → its two stratum keys
        decisions: Counter[tuple[str, str]] = Counter()
        diagnosed: Counter[str] = Counter()  # patient → diagnoses counted
        started: dict[tuple[str, str], list[str]] = defaultdict(list)
        for line_no, target in _jsonl(targets):
            if target["id"] not in who:  # the error may reach the server: it names a line, never an id
                raise ValueError(f"{targets.name}, line {line_no}: the decision has no dialogue in {dialogues.name}")
            if "ended_days" not in target:
                raise ValueError(f"{targets.name}, line {line_no}: no 'ended_days' (ingested by an older "
                                 "FederiMed): run `federimed ingest` for this hospital again")
            patient, code = target["patient"], target["diagnosis"]["code"]
            pair = (patient, code)
            if pair not in strata:
                if bounds and diagnosed[patient] >= bounds.diagnoses:
                    continue
                diagnosed[patient] += 1
                strata[pair] = (stratum_key(code), stratum_key(code, *who[target["id"]]))
            if bounds and decisions[pair] >= bounds.decisions:
                continue
            decisions[pair] += 1
            counts.diagnoses[code] = clean_display(target["diagnosis"]["display"])
            ended = target["ended_days"] is not None and target["ended_days"] <= ENDED_WITHIN_DAYS
            for key in strata[pair]:
                counts.cells[key].decisions += 1
                counts.cells[key].ended += ended
            for ingredient in (i for d in target["drugs"] for i in d["ingredients"]):
                if ingredient not in started[pair] and not (bounds and len(started[pair]) >= bounds.drugs):
                    started[pair].append(ingredient)
        for pair, keys in strata.items():
            for key in keys:
                cell = counts.cells[key]
                cell.patients += 1
                cell.hospitals = 1
                cell.drugs.update(started[pair])
        return counts

    def add(self, other: CohortCounts) -> None:
        """Sum `other` into these counts (patients of different hospitals are different patients)."""
        self.diagnoses.update(other.diagnoses)
        for key, cell in other.cells.items():
            mine = self.cells[key]
            for kind in KINDS:
                setattr(mine, kind, getattr(mine, kind) + getattr(cell, kind))
            mine.drugs.update(cell.drugs)

    def to_metrics(self) -> dict[str, int]:
        """Flat integer counts named kind/stratum (drug/stratum/ingredient), as a Flower MetricRecord carries
        them; counts of several hospitals add up name by name."""
        flat = {}
        for key, cell in self.cells.items():
            flat |= {f"{kind}/{key}": getattr(cell, kind) for kind in KINDS}
            flat |= {f"drug/{key}/{drug}": n for drug, n in cell.drugs.items()}
        return flat

    @classmethod
    def from_metrics(cls, flat: Mapping[str, int], diagnoses: Mapping[str, str]) -> CohortCounts:
        """The inverse of `to_metrics`."""
        counts = cls(diagnoses=dict(diagnoses))
        for name, value in flat.items():
            kind, _, rest = name.partition("/")
            if kind == "drug":
                key, _, drug = rest.rpartition("/")
                counts.cells[key].drugs[drug] = int(value)
            elif kind in KINDS:
                setattr(counts.cells[rest], kind, int(value))
            else:
                raise ValueError(f"unknown cohort count {name!r}")
        return counts


def release(
    counts: CohortCounts, min_cell: int, hospitals: list[str], noise: CountNoise | None = None
) -> dict[str, Any]:
    """The artefact: counts of at least `min_cell` patients only, suppressed so that no hidden count can be
    derived from the released ones (module docstring). What was suppressed is counted, never shown; under
    DP (`noise`, already applied to `counts`) the threshold is the larger of `min_cell` and the noise's, and
    how much was suppressed is not said (it depends on which strata exist)."""
    threshold = max(min_cell, noise.threshold) if noise else min_cell
    by_diagnosis: dict[str, list[str]] = defaultdict(list)
    for key in counts.cells:
        if not key.endswith(f"|{ANY}|{ANY}"):
            by_diagnosis[key.split("|")[0]].append(key)
    strata, suppressed = {}, 0
    for code in sorted(counts.diagnoses):
        whole = counts.cells.get(stratum_key(code))
        narrow = sorted(by_diagnosis[code])
        if whole is None or whole.patients < threshold:
            suppressed += 1 + len(narrow)
            continue
        drugs = {drug for drug, n in whole.drugs.items() if n >= threshold}
        strata[stratum_key(code)] = _released(whole, drugs, threshold, noise is None)
        if all(counts.cells[key].patients >= threshold for key in narrow):
            shared = {d for d in drugs if all(not 0 < counts.cells[key].drugs[d] < threshold for key in narrow)}
            strata |= {key: _released(counts.cells[key], shared, threshold, noise is None) for key in narrow}
        else:
            suppressed += len(narrow)
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hospitals": sorted(hospitals),
        "min_cell": threshold,
        "ended_within_days": ENDED_WITHIN_DAYS,
        "dp": noise.describe() if noise else None,
        "diagnoses": {code: counts.diagnoses[code] for code in sorted({k.split("|")[0] for k in strata})},
        "strata": strata,
        "suppressed_strata": None if noise else suppressed,
    }


def _released(cell: Cell, drugs: set[str], threshold: int, say_suppressed: bool) -> dict[str, Any]:
    shown = {drug: n for drug, n in cell.drugs.most_common() if drug in drugs and n}
    hidden = sum(1 for drug, n in cell.drugs.items() if n and drug not in shown)
    small = any(0 < n < threshold for n in (cell.ended, cell.decisions - cell.ended))
    return {
        "patients": cell.patients,
        "decisions": cell.decisions,
        "hospitals": cell.hospitals,
        "ended": None if small else cell.ended,
        "drugs": shown,
        "suppressed_drugs": hidden if say_suppressed else None,
    }


def write_artefact(runs_dir: Path, artefact: Mapping[str, Any]) -> Path:
    """RUNS_DIR/cohort-<stamp>[-N]/cohort.json, beside the training runs; returns the file."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder, n = Path(runs_dir) / f"cohort-{stamp}", 1
    while folder.exists():  # two artefacts in one second: the later sorts last
        n += 1
        folder = Path(runs_dir) / f"cohort-{stamp}-{n}"
    folder.mkdir(parents=True)
    path = folder / ARTEFACT
    path.write_text(json.dumps(artefact, indent=2, sort_keys=True) + "\n")
    return path


def stale_for(artefact: Mapping[str, Any], data_dir: Path, hospitals: list[str]) -> str | None:
    """Why `artefact` does not describe the training data of `hospitals` under `data_dir` (other hospitals,
    or counted before their last ingest, whose split may differ), or None when it does."""
    if artefact.get("format") != FORMAT:
        return f"it was written by another FederiMed version (format {artefact.get('format')}, not {FORMAT})"
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
    suppressed_drugs: int | None  # None: not said (a DP release)
    min_cell: int
    ended_share: float | None = None  # share of decisions whose condition ended within the window
    ended_within_days: int = ENDED_WITHIN_DAYS
    epsilon: float | None = None  # the release's patient-level DP ε, if any
    delta: float | None = None


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
            ended_share=None if cell["ended"] is None or not cell["decisions"] else cell["ended"] / cell["decisions"],
            ended_within_days=artefact["ended_within_days"],
            epsilon=(artefact["dp"] or {}).get("epsilon"),
            delta=(artefact["dp"] or {}).get("delta"),
        )
    return None


_NEW_DIAGNOSIS_LINE = re.compile(r"(?im)^New diagnosis:\s*(.+)$")


def for_case(artefact: Mapping[str, Any], case_text: str) -> str | None:
    """Markdown for the doctor about the patient of a de-identified case: the released counts for its first
    new diagnosis (by name, as ingest renders it), age band and sex; None when the case names no diagnosis."""
    if artefact.get("format") != FORMAT:
        return "The cohort statistics were made by another FederiMed version: run `federimed cohort` again."
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
    if cohort.ended_share is not None:
        lines.append(f"The condition had ended within {cohort.ended_within_days} days of its onset in "
                     f"{cohort.ended_share:.0%} of the decisions.")
    if cohort.suppressed_drugs:
        lines.append(f"{cohort.suppressed_drugs} other drug{'' if cohort.suppressed_drugs == 1 else 's'} not shown "
                     f"(fewer than {cohort.min_cell} patients, or hidden so that none can be worked out).")
    if cohort.epsilon is not None:
        lines.append(f"Counts carry differential-privacy noise (ε {cohort.epsilon:g} at δ {cohort.delta:g} per "
                     f"patient); counts under {cohort.min_cell} are not shown.")
    return "\n\n".join(lines)


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, json.loads(line)

