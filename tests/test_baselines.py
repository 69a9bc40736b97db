"""Centralized and local-only baselines: same loop, same step budget as a federated run, round checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from dialogue_samples import dialogues, write_jsonl
from safetensors.torch import load_file

from federimed import baselines
from federimed.baselines import budget_steps, hospital_names, train_centralized, train_local_only
from federimed.checkpoints import list_versions, resume_state, unfinished_run
from federimed.config import LoraSettings, RunSettings, TrainSettings

torch.set_num_threads(min(2, torch.get_num_threads()))
SETTINGS = RunSettings(rounds=2, lora=LoraSettings(r=4), train=TrainSettings(local_steps=1, batch_size=2, seq_len=96))


@pytest.fixture
def data_dir(tmp_path):
    """Two hospitals with different case mix, plus a folder that is no hospital."""
    root = tmp_path / "hospitals"
    write_jsonl(root / "north" / "train.jsonl", dialogues(4, ["essential hypertension", "hyperlipidemia"]))
    write_jsonl(root / "north" / "heldout.jsonl", dialogues(2, ["essential hypertension"], start=50))
    write_jsonl(root / "south" / "train.jsonl", dialogues(6, ["type 2 diabetes mellitus"], start=10))
    write_jsonl(root / "south" / "heldout.jsonl", dialogues(2, ["type 2 diabetes mellitus"], start=60))
    (root / "notes").mkdir()
    return root


def test_budget_matches_a_federated_run():
    sizes = {"a": 40, "b": 8, "c": 20, "d": 4}
    settings = RunSettings(rounds=3, train=TrainSettings(local_steps=10))
    assert budget_steps(settings, sizes, "centralized") == 3 * 10 * 4
    assert budget_steps(settings, {"a": 40}, "local-only") == 3 * 10
    passes = RunSettings(rounds=2, train=TrainSettings(epochs=2, batch_size=4))  # a site's steps per round: n / 4
    assert budget_steps(passes, sizes, "centralized") == 2 * (10 + 2 + 5 + 1)
    assert budget_steps(passes, {"b": 8}, "local-only") == 2 * 2
    with pytest.raises(ValueError, match="federated"):
        budget_steps(settings, sizes, "federated")
    with pytest.raises(ValueError, match="one hospital"):
        budget_steps(settings, sizes, "local-only")


def test_hospital_names_lists_folders_with_training_data(data_dir, tmp_path):
    assert hospital_names(data_dir) == ["north", "south"]
    with pytest.raises(FileNotFoundError, match="no hospital"):
        hospital_names(tmp_path / "hospitals" / "notes")


@pytest.mark.slow
def test_centralized_pools_all_hospitals_and_checkpoints_each_round(data_dir, tmp_path):
    run = train_centralized(data_dir, None, SETTINGS, tmp_path / "runs")
    info = json.loads((run.path / "run.json").read_text())
    assert (info["mode"], info["hospitals"], info["rounds_completed"]) == ("centralized", {"north": 4, "south": 6}, 2)
    metrics = [json.loads((run.path / f"round-{n}" / "metrics.json").read_text()) for n in (1, 2)]
    assert [m["steps"] for m in metrics] == [2, 4]  # 2 hospitals × 1 local step per round
    assert [m["examples_seen"] for m in metrics] == [4, 4]
    assert all(m["heldout_loss"] > 0 and m["peak_rss_mb"] > 100 for m in metrics)  # every checkpoint is scored
    final = metrics[-1]
    assert set(final["hospitals"]) == {"north", "south"}
    tokens = [h["heldout_tokens"] for h in final["hospitals"].values()]
    pooled = sum(h["heldout_loss"] * h["heldout_tokens"] for h in final["hospitals"].values()) / sum(tokens)
    assert final["heldout_loss"] == pytest.approx(pooled) and final["heldout_tokens"] == sum(tokens)
    assert resume_state(run.path)[0] == 2


@pytest.mark.slow
def test_local_only_trains_one_hospital_and_scores_every_hospital(data_dir, tmp_path):
    run = train_local_only(data_dir, "south", SETTINGS, tmp_path / "runs")
    latest = list_versions(tmp_path / "runs")[0]
    assert (latest.mode, latest.hospitals, latest.examples, latest.round) == ("local-only", {"south": 6}, 6, 2)
    assert latest.run_id == run.id and latest.metrics["steps"] == 2 and set(latest.metrics["hospitals"]) == {"north", "south"}
    assert not (tmp_path / "runs" / "latest").exists()  # baselines are for evaluation: doctors are not served them


def test_budget_must_split_into_rounds_and_hospital_must_exist(data_dir, tmp_path):
    with pytest.raises(ValueError, match="split evenly"):
        train_local_only(data_dir, "south", SETTINGS, tmp_path / "runs", total_steps=3)
    with pytest.raises(FileNotFoundError, match="'east' has no train set"):
        train_local_only(data_dir, "east", SETTINGS, tmp_path / "runs")


@pytest.mark.slow
def test_an_interrupted_run_continued_ends_as_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    whole = train_centralized(data_dir, None, SETTINGS, tmp_path / "whole")
    real_train, calls = baselines.train_local, []

    def stopped_in_round_two(*args, **kwargs):
        calls.append(kwargs["start_step"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl+C, or the machine switched off, in the middle of round 2
        return real_train(*args, **kwargs)

    monkeypatch.setattr(baselines, "train_local", stopped_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        train_centralized(data_dir, None, SETTINGS, tmp_path / "runs")
    monkeypatch.setattr(baselines, "train_local", real_train)
    files = [data_dir / h / "train.jsonl" for h in ("north", "south")]
    stopped = unfinished_run(tmp_path / "runs", "centralized", ["north", "south"], SETTINGS, files)
    assert stopped is not None and stopped.info()["rounds_completed"] == 1

    continued = train_centralized(data_dir, None, SETTINGS, tmp_path / "runs", resume=stopped)
    assert continued == stopped and continued.info()["rounds_completed"] == 2
    assert unfinished_run(tmp_path / "runs", "centralized", ["north", "south"], SETTINGS, files) is None
    for n in (1, 2):
        finished = [json.loads((run.path / f"round-{n}" / "metrics.json").read_text()) for run in (whole, continued)]
        assert finished[0]["steps"] == finished[1]["steps"] and finished[0]["train_loss"] == finished[1]["train_loss"]
        a, b = (load_file(run.path / f"round-{n}" / "adapter_model.safetensors") for run in (whole, continued))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
