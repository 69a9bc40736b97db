"""Federated cohort statistics: counts per diagnosis stratum at each hospital, summed through Flower,
small cells suppressed before anything is stored; the artefact holds no patient identifier."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from federimed.cohort import (
    CohortCounts,
    age_band,
    describe,
    latest_artefact,
    lookup,
    release,
    stratum_key,
    write_artefact,
)

HTN, DM, RARE = "59621000", "44054006", "254637007"
NAMES = {HTN: "Essential hypertension (disorder)", DM: "Diabetes mellitus type 2 (disorder)",
         RARE: "Non-small cell lung cancer (disorder)"}  # fmt: skip

# hospital → (patient, age, sex, diagnosis, drugs) per training decision
HOSPITALS = {
    "north": [("n1", 58, "male", HTN, ["lisinopril"]), ("n2", 54, "male", HTN, ["lisinopril"]),
              ("n3", 61, "female", HTN, ["amlodipine"]), ("n1", 59, "male", DM, ["metformin"])],
    "south": [("s1", 55, "male", HTN, ["lisinopril", "hydrochlorothiazide"]), ("s2", 52, "male", HTN, []),
              ("s3", 47, "female", DM, ["metformin"]), ("s4", 49, "female", DM, ["metformin"])],
    "east": [("e1", 93, "female", HTN, ["hydrochlorothiazide"]), ("e2", 70, "male", RARE, ["cisplatin"])],
}  # fmt: skip
ENDED = {("north", "n3", HTN): 20, ("south", "s2", HTN): 200, ("south", "s3", DM): 30, ("south", "s4", DM): 45}
"""(hospital, patient, diagnosis) → days from onset to the condition's end; the others last."""


def write_hospital(folder: Path, rows: list[tuple]) -> None:
    folder.mkdir(parents=True)
    dialogues, targets = [], []
    for i, (patient, age, sex, dx, drugs) in enumerate(rows):
        case_id = f"{folder.name}-{i}"
        shown_age = "90+" if age >= 90 else str(age)
        user = f"Patient: {shown_age}-year-old {sex}\nNew diagnosis: {NAMES[dx].split(' (')[0]}\nQuestion: What?"
        dialogues.append({"id": case_id, "patient": patient, "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": user},
            {"role": "assistant", "content": f"Start medications: {', '.join(drugs) or 'none'}."}]})  # fmt: skip
        targets.append({"id": case_id, "patient": patient, "diagnosis": {"code": dx, "display": NAMES[dx]},
                        "drugs": [{"code": "1", "display": d, "ingredients": [d]} for d in drugs],
                        "procedures": [], "careplans": [], "careplan_activities": [],
                        "ended_days": ENDED.get((folder.name, patient, dx))})  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps({"hospital": folder.name}))
    (folder / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    (folder / "targets.train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in targets))


@pytest.fixture
def federation(tmp_path: Path) -> Path:
    for name, rows in HOSPITALS.items():
        write_hospital(tmp_path / "hospitals" / name, rows)
    return tmp_path / "hospitals"


def pooled_by_hand() -> dict[str, dict]:
    """The expected counts, straight from the pooled rows (patients are distinct across hospitals)."""
    patients, decisions, ended = defaultdict(set), Counter(), Counter()
    drugs = defaultdict(lambda: defaultdict(set))
    for hospital, rows in HOSPITALS.items():
        for patient, age, sex, dx, started in rows:
            band = "90+" if age >= 90 else f"{age // 10 * 10}-{age // 10 * 10 + 9}"
            for key in (f"{dx}|*|*", f"{dx}|{band}|{sex}"):
                patients[key].add((hospital, patient))
                decisions[key] += 1
                ended[key] += ENDED.get((hospital, patient, dx), 999) <= 90
                for drug in started:
                    drugs[key][drug].add((hospital, patient))
    return {k: {"patients": len(p), "decisions": decisions[k], "ended": ended[k],
                "drugs": {d: len(w) for d, w in drugs[k].items()}} for k, p in patients.items()}


def as_plain(artefact: dict) -> dict[str, dict]:
    return {k: {"patients": c["patients"], "decisions": c["decisions"], "ended": c["ended"], "drugs": c["drugs"]}
            for k, c in artefact["strata"].items()}


def summed(federation: Path) -> CohortCounts:
    """The hospitals' counts added up, as the server does."""
    total = CohortCounts()
    for name in HOSPITALS:
        total.add(CohortCounts.of_hospital(federation / name))
    return total


def test_age_bands_and_strata() -> None:
    assert [age_band(a) for a in ("0", "9", "58", "89", "90+")] == ["0-9", "0-9", "50-59", "80-89", "90+"]
    assert stratum_key(HTN) == f"{HTN}|*|*" and stratum_key(HTN, "50-59", "male") == f"{HTN}|50-59|male"


def test_summed_hospital_counts_equal_the_pooled_counts(federation: Path) -> None:
    total = CohortCounts()
    for name in HOSPITALS:
        one = CohortCounts.of_hospital(federation / name)
        total.add(CohortCounts.from_metrics(one.to_metrics(), one.diagnoses))  # as it travels
    artefact = release(total, min_cell=1, hospitals=list(HOSPITALS))
    assert as_plain(artefact) == pooled_by_hand()
    assert artefact["strata"][f"{HTN}|*|*"]["hospitals"] == 3 and artefact["diagnoses"][HTN] == "Essential hypertension"


def test_small_cells_are_suppressed_before_release(federation: Path) -> None:
    total = summed(federation)
    artefact = release(total, min_cell=3, hospitals=list(HOSPITALS))
    text = json.dumps(artefact)
    assert RARE not in text and "cisplatin" not in text and "lung cancer" not in text.lower()
    assert all(c["patients"] >= 3 and c["decisions"] >= 3 for c in artefact["strata"].values())
    assert all(n >= 3 for c in artefact["strata"].values() for n in c["drugs"].values())
    hypertension = artefact["strata"][f"{HTN}|*|*"]  # 6 patients: lisinopril 3, amlodipine 1, HCTZ 2
    assert hypertension["drugs"] == {"lisinopril": 3} and hypertension["suppressed_drugs"] == 2
    assert hypertension["ended"] is None  # 1 of 6 ended within 90 days: one patient's course
    assert artefact["suppressed_strata"] > 0


def test_no_suppressed_count_can_be_worked_out_by_subtraction(federation: Path) -> None:
    """For each diagnosis, what the diagnosis cell shows minus what its age-and-sex cells show is 0 or
    at least min_cell, for patients and for every drug."""
    total = summed(federation)
    for min_cell in (1, 2, 3, 4):
        strata = release(total, min_cell=min_cell, hospitals=list(HOSPITALS))["strata"]
        for key, whole in strata.items():
            code, band, _ = key.split("|")
            if band != "*":
                continue
            narrow = [c for k, c in strata.items() if k.startswith(f"{code}|") and k != key]
            if narrow:
                left = whole["patients"] - sum(c["patients"] for c in narrow)
                assert left == 0 or left >= min_cell, (min_cell, key, left)
            for drug, n in whole["drugs"].items():
                shown = [c["drugs"][drug] for c in narrow if drug in c["drugs"]]
                if shown:
                    assert n - sum(shown) == 0 or n - sum(shown) >= min_cell, (min_cell, key, drug)


def test_lookup_backs_off_to_the_diagnosis_when_the_stratum_is_small(federation: Path, tmp_path: Path) -> None:
    total = summed(federation)
    everything = release(total, min_cell=1, hospitals=list(HOSPITALS))
    narrow = lookup(everything, HTN, "50-59", "male")  # n1, n2, s1, s2: 4 patients
    assert narrow.stratum == "Essential hypertension, 50-59, male" and narrow.patients == 4
    assert narrow.drugs == [("lisinopril", 0.75), ("hydrochlorothiazide", 0.25)] and narrow.hospitals == 2
    diabetes = lookup(everything, DM, None, None)  # s3 and s4 ended in 30 and 45 days, n1's lasts
    assert diabetes.ended_share == pytest.approx(2 / 3)
    assert "The condition had ended within 90 days of its onset in 67% of the decisions." in describe(diabetes)
    write_artefact(tmp_path / "runs", release(total, min_cell=3, hospitals=list(HOSPITALS)))
    artefact = latest_artefact(tmp_path / "runs")
    wide = lookup(artefact, HTN, "50-59", "male")  # the 60-69 and 90+ women are 1 each: every narrow cell hidden
    assert wide.stratum == "Essential hypertension (all ages and sexes)" and wide.patients == 6
    assert wide.drugs == [("lisinopril", 0.5)] and wide.suppressed_drugs == 2
    assert lookup(artefact, RARE, "70-79", "male") is None
    assert latest_artefact(tmp_path / "nothing") is None


def test_bad_lines_are_named_by_line_never_by_case_id(tmp_path: Path) -> None:
    write_hospital(tmp_path / "h", [("p", 50, "male", HTN, [])])
    (tmp_path / "h" / "train.jsonl").write_text(json.dumps(
        {"id": "h-0", "patient": "p", "messages": [{"role": "user", "content": "no header"}]}) + "\n")
    with pytest.raises(ValueError, match=r"^train\.jsonl, line 1: no 'Patient: N-year-old SEX' line"):
        CohortCounts.of_hospital(tmp_path / "h")
    (tmp_path / "h" / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"^targets\.train\.jsonl, line 1: the decision has no dialogue") as error:
        CohortCounts.of_hospital(tmp_path / "h")
    assert "h-0" not in str(error.value)  # errors may reach the server: no salted case id


@pytest.mark.slow
def test_counts_through_flower_equal_the_pooled_counts_and_hide_small_cells_with_and_without_secagg(federation: Path, tmp_path: Path) -> None:
    from federimed.commands.train import _app_dir
    from federimed.fl.deployment import cohort_on_loopback
    from federimed.fl.settings import ServerOptions

    runs = tmp_path / "runs"
    hospitals = sorted(federation.iterdir())
    path = cohort_on_loopback(hospitals, ServerOptions(hospitals=3, runs_dir=runs, min_cell=1), _app_dir())
    assert as_plain(json.loads(path.read_text())) == pooled_by_hand()

    suppressed = cohort_on_loopback(hospitals, ServerOptions(hospitals=3, runs_dir=runs, min_cell=3), _app_dir())
    artefact = json.loads(suppressed.read_text())
    assert artefact["hospitals"] == ["east", "north", "south"] and artefact["min_cell"] == 3
    assert RARE not in suppressed.read_text() and "cisplatin" not in suppressed.read_text()
    secure = cohort_on_loopback(hospitals, ServerOptions(hospitals=3, runs_dir=runs, min_cell=1, secagg=True),
                                _app_dir())
    assert as_plain(json.loads(secure.read_text())) == pooled_by_hand()
    logs = "".join(p.read_text(errors="replace") for p in (runs / ".flower").rglob("*.log"))
    assert "cohort statistics of 3 hospitals" in logs and "summed by SecAgg+" in logs
    assert RARE not in logs and "cisplatin" not in logs


def test_the_artefact_of_real_records_passes_the_identifier_audit(ma_csv: Path, tmp_path: Path) -> None:
    from ingest.audit import collect_identifiers, scan
    from ingest.pipeline import ingest
    from ingest.readers import read_source

    ingest([ma_csv], "ma", tmp_path / "hospitals")
    counts = CohortCounts.of_hospital(tmp_path / "hospitals" / "ma")
    path = write_artefact(tmp_path / "runs", release(counts, min_cell=1, hospitals=["ma"]))
    assert json.loads(path.read_text())["strata"], "real records give cohort counts"
    hits, files = scan(path.parent, collect_identifiers([read_source(ma_csv)]))
    assert files == 1 and hits == []


def test_a_case_gets_the_counts_of_patients_like_it(federation: Path, tmp_path: Path) -> None:
    from federimed.assistant import Assistant
    from federimed.cohort import for_case

    total = summed(federation)
    artefact = release(total, min_cell=3, hospitals=list(HOSPITALS))
    case = "Patient: 57-year-old male\nNew diagnosis: Essential hypertension\nAllergies: none"
    text = for_case(artefact, case)
    assert text == ("**6 patients** (6 treatment decisions) at 3 hospitals — Essential hypertension (all ages and "
                    "sexes).\n\nStarted on: lisinopril 50% of them.\n\n2 other drugs not shown (fewer than 3 "
                    "patients, or hidden so that none can be worked out).")
    rare = for_case(artefact, "Patient: 70-year-old male\nNew diagnosis: Non-small cell lung cancer")
    assert rare == "No released counts for Non-small cell lung cancer: fewer than 3 patients across the federation had it, or none."
    assert for_case(artefact, "56-year-old man, new essential hypertension") is None  # no diagnosis line: no panel

    runs = tmp_path / "runs"
    assistant = Assistant(adapter="base", runs_dir=runs, retrieval=False)
    assert assistant.cohort(case) is None  # no artefact yet: nothing to show
    write_artefact(runs, artefact)
    assert assistant.cohort(case) == text
    rare = assistant.cohort("Patient: 70-year-old male\nNew diagnosis: Non-small cell lung cancer")
    assert "cisplatin" not in rare and rare.startswith("No released counts")


def test_cohort_counts_can_be_given_to_the_model_as_context(federation: Path) -> None:
    from federimed.evaluation.compare import cohort_prompts
    from federimed.evaluation.runner import HeldoutCase

    total = summed(federation)
    artefact = release(total, min_cell=3, hospitals=list(HOSPITALS))
    case = HeldoutCase("c", "north", [{"role": "user", "content": "Patient: 57-year-old male\nNew diagnosis: "
                                       "Essential hypertension"}], "", frozenset(), (), ())
    [[system, user]] = cohort_prompts([case], artefact)
    assert system["content"].endswith("What patients like this received across the federation: 6 patients (6 "
                                      "treatment decisions) at 3 hospitals — Essential hypertension (all ages and "
                                      "sexes).\n\nStarted on: lisinopril 50% of them.\n\n2 other drugs not shown "
                                      "(fewer than 3 patients, or hidden so that none can be worked out).")
    assert user["content"].startswith("Patient: 57-year-old male") and "Question:" in user["content"]


def test_an_artefact_of_other_hospitals_or_an_older_ingest_is_stale(federation: Path) -> None:
    import os

    from federimed.cohort import stale_for

    total = summed(federation)
    artefact = release(total, min_cell=1, hospitals=list(HOSPITALS))
    assert stale_for(artefact, federation, list(HOSPITALS)) is None
    assert "not east, north" in stale_for(artefact, federation, ["east", "north"])
    manifest = federation / "north" / "manifest.json"
    later = manifest.stat().st_mtime + 3600
    os.utime(manifest, (later, later))  # re-ingested after the counts were made
    assert "before the hospitals' last ingest" in stale_for(artefact, federation, list(HOSPITALS))


@pytest.mark.slow
def test_cohort_command_with_relative_folders_from_another_folder(federation: Path, tmp_path: Path) -> None:
    """`flwr run` starts in the project folder: the relative --data and --runs-dir must still be found."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "federimed.cli", "cohort", "--data", "hospitals", "--runs-dir", "runs", "--min-cell", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [artefact] = (tmp_path / "runs").glob("cohort-*/cohort.json")
    assert as_plain(json.loads(artefact.read_text())) == pooled_by_hand()
