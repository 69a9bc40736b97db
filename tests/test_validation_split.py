"""The validation federation comes from training patients only, the same on every call."""

from __future__ import annotations

import json

import pytest
from dialogue_samples import dialogues, write_jsonl
from typer.testing import CliRunner

from federimed.cli import app
from ingest.validation_split import carve_validation, validation_patients


def _hospital(root, name: str, patients: int) -> None:
    train = [d | {"patient": f"{name}-p{i % patients}"} for i, d in enumerate(dialogues(3 * patients, ["hyperlipidemia"]))]
    write_jsonl(root / name / "train.jsonl", train)
    write_jsonl(root / name / "targets.train.jsonl", [{"id": d["id"], "patient": d["patient"]} for d in train])
    write_jsonl(root / name / "heldout.jsonl", [d | {"patient": "held-out-patient"} for d in dialogues(2, ["hyperlipidemia"], start=90)])
    (root / name / "manifest.json").write_text(json.dumps({"hospital": name}))


def _patients(path) -> set[str]:
    return {json.loads(line)["patient"] for line in path.read_text().splitlines()}


def test_validation_patients_are_training_patients_split_the_same_way_each_time(tmp_path) -> None:
    data = tmp_path / "hospitals"
    _hospital(data, "north", 10)
    _hospital(data, "south", 2)
    first = carve_validation(data, tmp_path / "a", share=0.2, seed=1)
    carve_validation(data, tmp_path / "b", share=0.2, seed=1)
    assert first == {"north": {"train": 24, "validation": 6}, "south": {"train": 3, "validation": 3}}
    for name in ("north", "south"):
        out = tmp_path / "a" / name
        train, held = _patients(out / "train.jsonl"), _patients(out / "heldout.jsonl")
        assert train and held and not train & held and "held-out-patient" not in train | held
        assert _patients(out / "targets.heldout.jsonl") == held and _patients(out / "targets.train.jsonl") == train
        assert (out / "heldout.jsonl").read_text() == (tmp_path / "b" / name / "heldout.jsonl").read_text()
        assert json.loads((out / "manifest.json").read_text())["validation"]["seed"] == 1
    assert validation_patients({f"p{i}" for i in range(10)}, 0.2, 2) != validation_patients({f"p{i}" for i in range(10)}, 0.2, 1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        validation_patients({"p"}, 1.0, 0)


def test_the_command_names_a_folder_without_hospitals(tmp_path) -> None:
    result = CliRunner().invoke(app, ["validation-split", str(tmp_path), "--out", str(tmp_path / "v")])
    assert result.exit_code == 2 and "no ingested hospital" in result.output
