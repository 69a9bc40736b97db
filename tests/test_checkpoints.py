"""Round checkpoints: PEFT round-trip, run.json, runs/latest, resume, resolving specs, versions and plots."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dialogue_samples import dialogues
from safetensors.torch import load_file

from federimed.checkpoints import (
    CheckpointError,
    latest_round,
    list_versions,
    new_run,
    plot_losses,
    resolve_checkpoint,
    resume_state,
    save_round,
    unfinished_run,
)
from federimed.config import LoraSettings, RunSettings, TrainSettings
from federimed.model import adapter_state, add_lora, load_base, load_for_inference
from federimed.training import encode_dialogues, train_local

torch.set_num_threads(min(2, torch.get_num_threads()))
SETTINGS = RunSettings(rounds=2, lora=LoraSettings(r=4), train=TrainSettings(batch_size=2, seq_len=128, seed=5))


@pytest.fixture(scope="module")
def trained():
    """A LoRA model trained two steps on dialogues whose patient ids must never reach a checkpoint."""
    model, tokenizer = load_base(SETTINGS.model)
    peft = add_lora(model, SETTINGS.lora, seed=SETTINGS.train.seed)
    rows = dialogues(4)
    for row in rows:
        row["patient"] = row["id"] = "SECRET-PATIENT-ID-4711"
    examples = encode_dialogues(tokenizer, rows, SETTINGS.train.seq_len)
    train_local(peft, tokenizer, examples, SETTINGS.train, steps=2)
    return peft.eval(), tokenizer, examples


def test_saved_round_reloads_with_peft_to_identical_outputs(tmp_path, trained):
    peft, _, examples = trained
    run = new_run(tmp_path, SETTINGS, "federated", {"north": 4, "south": 7})
    path = save_round(run, 1, peft, {"train_loss": 1.5, "hospitals": {"north": {"heldout_loss": 2.0}}})
    assert path == run.path / "round-1"
    assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "metrics.json"}
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 16, "LORA")

    reloaded, _ = load_for_inference(SETTINGS.model, path)
    assert not reloaded.training
    ids = examples[0].input_ids[None]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, peft(input_ids=ids).logits)
        base, _ = load_for_inference(SETTINGS.model, None)
        assert not torch.equal(base(input_ids=ids).logits, peft(input_ids=ids).logits)


def test_run_metadata_latest_and_resume(tmp_path, trained):
    peft = trained[0]
    run = new_run(tmp_path, SETTINGS, "federated", {"north": 4, "south": 7})
    assert resume_state(run.path) is None and latest_round(run.path) is None
    state = adapter_state(peft)
    save_round(run, 1, state, {"train_loss": 2.0})
    moved = {k: v + 1 for k, v in state.items()}
    save_round(run, 2, moved, {"train_loss": 1.0})  # a server saves the aggregated state dict

    info = json.loads((run.path / "run.json").read_text())
    assert info["mode"] == "federated" and info["rounds_completed"] == 2 and info["rounds_planned"] == 2
    assert info["hospitals"] == {"north": 4, "south": 7} and info["examples"] == 11
    assert info["settings"] == SETTINGS.model_dump(mode="json") and info["base_model"] == "smollm2-135m-instruct"
    assert run.settings() == SETTINGS

    latest = tmp_path / "latest"
    assert latest.is_symlink() and latest.resolve() == (run.path / "round-2").resolve()
    round_num, resumed = resume_state(run.path)
    assert round_num == 2 and resumed.keys() == state.keys()
    assert all(torch.equal(resumed[k], moved[k]) for k in state)
    assert json.loads((run.path / "round-2" / "metrics.json").read_text()) == {"round": 2, "train_loss": 1.0}
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_checkpoint_holds_no_patient_data(tmp_path, trained):
    run = new_run(tmp_path, SETTINGS, "centralized", {"north": 4})
    save_round(run, 1, trained[0], {"train_loss": 1.0})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"SECRET-PATIENT-ID" not in path.read_bytes(), path
    weights = load_file(run.path / "round-1" / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    with pytest.raises(TypeError, match=r"metrics\.ids: list"):
        save_round(run, 2, trained[0], {"ids": ["SECRET-PATIENT-ID-4711"]})


def test_resolve_checkpoint_specs_and_errors(tmp_path, trained):
    state = adapter_state(trained[0])
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        resolve_checkpoint("latest", tmp_path)
    first = new_run(tmp_path, SETTINGS, "federated", {"north": 4})
    with pytest.raises(CheckpointError, match="no completed round"):
        resolve_checkpoint(first.id, tmp_path)
    save_round(first, 1, state, {})
    save_round(first, 2, state, {})
    second = new_run(tmp_path, SETTINGS, "local-only", {"south": 3})
    save_round(second, 1, state, {})

    assert resolve_checkpoint("latest", tmp_path) == (first.path / "round-2").resolve()  # a baseline never moves it
    assert resolve_checkpoint(first.id, tmp_path) == (first.path / "round-2").resolve()
    assert resolve_checkpoint(f"{first.id}/round-1", tmp_path) == (first.path / "round-1").resolve()
    assert resolve_checkpoint(str(first.path / "round-2"), tmp_path / "elsewhere") == (first.path / "round-2").resolve()
    with pytest.raises(CheckpointError, match=rf"'nope' not found.*{first.id}, {second.id}"):
        resolve_checkpoint("nope", tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(f"{first.id}/round-9", tmp_path)

    versions = list_versions(tmp_path)
    assert [(v.run_id, v.round) for v in versions] == [(second.id, 1), (first.id, 2), (first.id, 1)]
    assert (versions[0].mode, versions[0].hospitals, versions[0].examples) == ("local-only", {"south": 3}, 3)
    assert versions[1].metrics == {"round": 2}


def test_new_run_rejects_unknown_mode_and_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="mode 'solo'"):
        new_run(tmp_path, SETTINGS, "solo", {"north": 1})
    with pytest.raises(ValueError, match="number of training examples"):
        new_run(tmp_path, SETTINGS, "federated", {"north": -1})


def test_plot_losses_draws_overall_and_per_hospital_curves(tmp_path, trained):
    run = new_run(tmp_path, SETTINGS, "federated", {"north": 4, "south": 7})
    for round_num, loss in ((1, 2.0), (2, 1.2)):
        hospitals = {h: {"train_loss": loss + d, "heldout_loss": loss + d + 0.3} for h, d in (("north", 0), ("south", 0.2))}
        save_round(run, round_num, adapter_state(trained[0]), {"train_loss": loss, "heldout_loss": loss + 0.2, "hospitals": hospitals})
    out = plot_losses(run.path)
    assert out == run.path / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    empty = new_run(tmp_path, SETTINGS, "federated", {"north": 4})
    with pytest.raises(CheckpointError, match="no round metrics"):
        plot_losses(empty.path)


def test_unfinished_run_is_the_newest_run_of_its_kind_when_it_stopped_part_way(tmp_path, trained):
    peft, _, _ = trained
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    os.utime(data, (1_700_000_000, 1_700_000_000))  # written long before any run below
    runs = tmp_path / "runs"
    recipe = {"aggregator": "fednova", "proximal_mu": 0.0}

    def run_with(rounds=1, settings=SETTINGS, mode="federated", hospitals=("north", "south"), recipe=recipe):
        run = new_run(runs, settings, mode, dict.fromkeys(hospitals, 4), recipe)
        for n in range(1, rounds + 1):
            save_round(run, n, peft, {"train_loss": 1.0})
        return run

    def unfinished(mode="federated", hospitals=("south", "north"), settings=SETTINGS, recipe=recipe):
        return unfinished_run(runs, mode, hospitals, settings, [data, tmp_path / "no-heldout.jsonl"], recipe)

    assert unfinished() is None  # no runs dir yet
    run_with(rounds=0)
    assert unfinished() is None  # nothing saved: nothing to continue
    stopped = run_with()
    run_with(mode="centralized", recipe=None)  # other kinds of run do not hide it
    run_with(hospitals=("north",))
    (runs / "broken").mkdir()
    (runs / "broken" / "run.json").write_text("{not json")
    assert unfinished() == stopped
    assert unfinished(recipe={**recipe, "dp_delta": 1e-5}) == stopped  # a field the run did not record yet
    assert unfinished(recipe={**recipe, "aggregator": "median"}) is None
    assert unfinished(recipe=None) is None
    assert unfinished(settings=SETTINGS.model_copy(update={"rounds": 5})) is None
    assert unfinished(mode="centralized", hospitals=("north", "south"), recipe=None).info()["mode"] == "centralized"
    assert unfinished(mode="local-only", hospitals=("north",), recipe=None) is None
    run_with(rounds=2)  # a newer run of the same kind finished: the stopped one is history
    assert unfinished() is None
    newest = run_with()
    assert unfinished() == newest
    data.touch()  # the data changed after the run started: it trained on other data
    assert unfinished() is None
