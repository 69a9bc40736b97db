"""`federimed train`, `server` and `hospital join`: clear errors for bad input, and a tiny federated simulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from federimed.cli import app
from fl_support import leftovers, make_hospital

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is empty"),
        (lambda p: (p.mkdir(), (p / "patients.csv").write_text("Id\n")), "not an ingested hospital directory"),
    ],
)
def test_hospital_join_refuses_a_directory_that_is_not_ingested(tmp_path: Path, setup, message: str) -> None:
    data = tmp_path / "hospital-a"
    setup(data)
    result = _invoke("hospital", "join", "--superlink", "127.0.0.1:9092", "--data", str(data))
    assert result.exit_code == 2
    assert message in result.output and "hospital-a" in result.output


def test_hospital_join_wants_host_and_port(tmp_path: Path) -> None:
    data = make_hospital(tmp_path, "alpha", 2)
    result = _invoke("hospital", "join", "--superlink", "localhost", "--data", str(data))
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_train_reports_bad_requests(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_hospital(data, "alpha", 2)
    cases = [
        (["--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--data", str(data), "--hospitals", "alpha,omega"], "omega"),
        (["--data", str(data), "--mode", "local"], "--mode local needs --hospital, one of: alpha"),
        (["--data", str(data), "--mode", "swarm"], "--mode must be"),
        (["--data", str(data), "--run-id", "r1"], "--resume"),
        (["--data", str(data), "--resume", "--runs-dir", str(tmp_path / "runs")], "nothing to resume"),
    ]
    for args, message in cases:
        result = _invoke("train", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes when alone; far more on a busy box
def test_train_federated_one_tiny_round_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the hospitals' ClientApps share this small machine
    for forced_terminal in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(forced_terminal, raising=False)
    data, runs = tmp_path / "data", tmp_path / "runs"
    make_hospital(data, "alpha", 3)
    make_hospital(data, "beta", 5)
    make_hospital(data, "gamma", 4)
    result = _invoke(
        "train", "--data", str(data), "--runs-dir", str(runs), "--hospitals", "alpha,beta",
        "--rounds", "1", "--local-steps", "1", "--batch-size", "2", "--seq-len", "128", "--heldout-max", "1",
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["mode"] == "federated" and info["hospitals"] == {"alpha": 3, "beta": 5}
    assert info["settings"]["heldout_max_dialogues"] == 1
    assert info["recipe"]["aggregator"] == "fednova" and info["recipe"]["proximal_mu"] == 0.0
    metrics = json.loads((run_dir / "round-1" / "metrics.json").read_text())
    assert set(metrics["hospitals"]) == {"alpha", "beta"} and metrics["train_loss"] > 0
    assert (run_dir / "round-1" / "adapter_model.safetensors").is_file() and (run_dir / "loss.png").is_file()
    assert "round 1" in result.output and "alpha" in result.output  # the per-round table
    assert "federated round 1/1 · " in result.output and " left" in result.output  # not a terminal: a line per round
    assert leftovers((runs / ".flower" / "local").resolve()) == []


def test_a_run_resumes_only_with_the_recipe_it_was_trained_with(tmp_path: Path) -> None:
    from federimed.checkpoints import new_run
    from federimed.config import RunSettings
    from federimed.fl.settings import ServerOptions

    data, runs = tmp_path / "data", tmp_path / "runs"
    make_hospital(data, "alpha", 2)
    recipe = ServerOptions(aggregator="fedavg", proximal_mu=0.1).recipe()
    run = new_run(runs, RunSettings(), "federated", {"alpha": 2}, recipe)
    assert run.info()["recipe"] == recipe
    result = _invoke("train", "--data", str(data), "--runs-dir", str(runs), "--resume", "--run-id", run.id,
                     "--proximal-mu", "0.1")
    assert result.exit_code == 2
    assert f"run {run.id} was trained with another recipe (aggregator 'fedavg' → 'fednova')" in result.output
    result = _invoke("server", "--resume", run.id, "--runs-dir", str(runs), "--aggregator", "fedavg")
    assert result.exit_code == 2 and "proximal_mu 0.1 → 0.0" in result.output
    assert not (runs / ".flower").exists()
    assert ServerOptions(aggregator="fedavg", proximal_mu=0.1).resume_mismatch(recipe) is None
    assert ServerOptions().resume_mismatch(None) is None  # a run from before recipes were recorded


def test_continue_unfinished_picks_up_the_run_an_interruption_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from federimed.checkpoints import new_run, save_round
    from federimed.commands import train as train_command
    from federimed.fl.settings import ServerOptions

    data, runs = tmp_path / "data", tmp_path / "runs"
    make_hospital(data, "alpha", 2)
    make_hospital(data, "beta", 3)
    for written in data.glob("*/*.jsonl"):
        os.utime(written, (1_700_000_000, 1_700_000_000))
    settings = train_command._settings(rounds=3, epochs=1, local_steps=1, batch_size=2, seq_len=64, lr=1e-3, seed=0,
                                       base_model="smollm2-135m-instruct")  # what the options below ask for
    run = new_run(runs, settings, "federated", {"alpha": 2, "beta": 3}, ServerOptions(settings=settings).recipe())
    save_round(run, 1, {"w": torch.zeros(2)}, {"train_loss": 1.0})
    started = []
    monkeypatch.setattr(train_command, "federate_with_progress", lambda found, options: started.append(options) or run.path)
    args = ["train", "--data", str(data), "--runs-dir", str(runs), "--rounds", "3", "--local-steps", "1",
            "--batch-size", "2", "--seq-len", "64"]

    result = _invoke(*args, "--continue-unfinished")
    assert result.exit_code == 0, result.output
    assert started[-1].resume_run == run.id and f"continuing the unfinished run {run.id} after round 1 of 3" in result.output
    for other in (["--seed", "1"], ["--proximal-mu", "0.1"], ["--hospitals", "alpha"]):  # another training: a new run
        assert _invoke(*args, *other, "--continue-unfinished").exit_code == 0 and started[-1].resume_run == ""
    assert _invoke(*args).exit_code == 0 and started[-1].resume_run == ""  # without the flag: a new run
    result = _invoke(*args, "--continue-unfinished", "--resume")
    assert result.exit_code == 2 and "use one" in result.output
    fedavgm = new_run(runs, settings, "federated", {"alpha": 2, "beta": 3},
                      ServerOptions(settings=settings, aggregator="fedavgm").recipe())
    save_round(fedavgm, 1, {"w": torch.zeros(2)}, {"train_loss": 1.0})
    assert _invoke(*args, "--aggregator", "fedavgm", "--continue-unfinished").exit_code == 0
    assert started[-1].resume_run == ""  # its server momentum was not saved: it cannot go on as it would have

    # the baselines: each mode finds its own kind of run, and only on unchanged data
    from federimed import baselines

    trained = []
    for name in ("train_centralized", "train_local_only"):
        monkeypatch.setattr(baselines, name, lambda *a, resume=None, **k: trained.append(resume) or resume or run)
    local = new_run(runs, settings, "local-only", {"beta": 3})
    save_round(local, 1, {"w": torch.zeros(2)}, {"train_loss": 1.0})
    result = _invoke(*args, "--mode", "local", "--hospital", "beta", "--continue-unfinished")
    assert result.exit_code == 0, result.output
    assert trained[-1] == local and f"continuing the unfinished run {local.id}" in result.output
    assert _invoke(*args, "--mode", "local", "--hospital", "alpha", "--continue-unfinished").exit_code == 0
    assert trained[-1] is None
    assert _invoke(*args, "--mode", "centralized", "--continue-unfinished").exit_code == 0 and trained[-1] is None
    os.utime(data / "alpha" / "heldout.jsonl")  # a held-out set it is scored on changed since it started
    assert _invoke(*args, "--mode", "local", "--hospital", "beta", "--continue-unfinished").exit_code == 0
    assert trained[-1] is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sigterm_to_federated_training_stops_every_flower_process(tmp_path: Path) -> None:
    """A job manager stopping `federimed train` must not leave SuperNodes and ClientApps training on."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    make_hospital(data, "alpha", 3)
    make_hospital(data, "beta", 3)
    cli = subprocess.Popen(
        [sys.executable, "-m", "federimed.cli", "train", "--data", str(data), "--runs-dir", str(runs), "--rounds", "3",
         "--local-steps", "50", "--batch-size", "2", "--seq-len", "128", "--heldout-max", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    home = (runs / ".flower" / "local").resolve()
    deadline = time.monotonic() + 600
    while not any("flwr-clientapp" in p for p in leftovers(home)):  # the hospitals have started training
        assert cli.poll() is None and time.monotonic() < deadline, "training never reached the ClientApps"
        time.sleep(1)
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=120) != 0
    deadline = time.monotonic() + 60
    while leftovers(home) and time.monotonic() < deadline:
        time.sleep(1)
    assert leftovers(home) == []


def test_server_refuses_inconsistent_options_before_starting_anything(tmp_path: Path) -> None:
    result = _invoke("server", "--hospitals", "2", "--min-hospitals", "3", "--runs-dir", str(tmp_path))
    assert result.exit_code == 2 and "--min-hospitals (3) cannot exceed --hospitals (2)" in result.output
    result = _invoke("server", "--resume", "20260101-000000-federated", "--runs-dir", str(tmp_path))
    assert result.exit_code == 2 and "cannot resume run '20260101-000000-federated'" in result.output
    assert not (tmp_path / ".flower").exists()


def test_server_cohort_submits_a_cohort_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`federimed server --cohort` asks the same deployment for cohort counts: the run config it submits."""
    import tomllib

    from federimed.fl import deployment

    def stop(**_):
        raise SystemExit(7)  # after the run config is written, before any process starts

    monkeypatch.setattr(deployment, "start_superlink", stop)
    result = _invoke("server", "--cohort", "--min-cell", "5", "--cohort-epsilon", "4", "--secagg",
                     "--runs-dir", str(tmp_path))
    assert result.exit_code == 7
    config = tomllib.loads((tmp_path / ".flower" / "run-config.toml").read_text())
    assert (config["task"], config["min-cell"], config["cohort-epsilon"], config["secagg"]) == ("cohort", 5, 4.0, True)


def test_server_submits_the_federated_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FedProx's μ and FedNova's server learning rate reach the run config, and from it each round's train config."""
    import tomllib

    from federimed.fl import deployment
    from federimed.fl.server_app import round_config
    from federimed.fl.settings import ServerOptions

    def stop(**_):
        raise SystemExit(7)

    monkeypatch.setattr(deployment, "start_superlink", stop)
    result = _invoke("server", "--proximal-mu", "0.05", "--aggregator", "fednova", "--server-lr", "1.5",
                     "--runs-dir", str(tmp_path))
    assert result.exit_code == 7
    config = tomllib.loads((tmp_path / ".flower" / "run-config.toml").read_text())
    assert (config["proximal-mu"], config["aggregator"], config["server-lr"]) == (0.05, "fednova", 1.5)
    options = ServerOptions.from_run_config(config)
    sent = round_config(options)
    assert sent["proximal-mu"] == 0.05 and sent["total-rounds"] == options.settings.rounds
