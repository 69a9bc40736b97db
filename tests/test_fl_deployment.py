"""A real Flower deployment on loopback: one SuperLink and three SuperNodes, each its own process tree.

Each SuperNode trains on its own tiny hospital directory and keeps a copy of every adapter it sends
(node config `outbox`), so the test can check the server's FedAvg against what really travelled.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from federimed.checkpoints import ADAPTER_WEIGHTS, METRICS
from federimed.fl import deployment
from federimed.fl.settings import ServerOptions
from fl_support import leftovers, make_hospital, tiny_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # minutes when alone; far more on a busy box

APP_DIR = Path(__file__).resolve().parents[1]
HOSPITALS = {"alpha": 4, "beta": 6, "gamma": 8}


class Federation:
    """Starts Flower processes for one test and stops every one of them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.flwr_home = root / "flwr-home"
        self.port = deployment.free_port()
        self.processes: list[deployment.FlowerProcess] = []
        self.nodes: dict[str, deployment.FlowerProcess] = {}

    def start(self, hospitals: dict[str, Path]) -> None:
        self.processes.append(
            deployment.start_superlink(port=self.port, flwr_home=self.flwr_home, log=self.root / "superlink.log")
        )
        deployment.add_connection(self.flwr_home, "loopback", f"127.0.0.1:{self.port}")
        for name, path in hospitals.items():
            node = deployment.start_supernode(
                name=f"supernode {name}", superlink=f"127.0.0.1:{self.port}", data_path=path,
                port=deployment.free_port(), flwr_home=self.flwr_home, log=self.root / f"{name}.log",
                outbox=self.root / "outbox" / name,
            )
            self.nodes[name] = node
            self.processes.append(node)

    def run(self, options: ServerOptions) -> deployment.FlowerProcess:
        config = deployment.write_run_config(self.root / "run-config.toml", options.to_run_config())
        run = deployment.submit_run(
            app_dir=APP_DIR, connection="loopback", run_config=config, flwr_home=self.flwr_home,
            log=self.root / "flwr-run.log",
        )
        self.processes.append(run)
        return run

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(40)}" for p in self.processes)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three ClientApps share this small machine
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()
    assert leftovers(fed.flwr_home) == []


def _hospitals(root: Path) -> dict[str, Path]:
    return {name: make_hospital(root / "data", name, count) for name, count in HOSPITALS.items()}


def _finish(fed: Federation, run: deployment.FlowerProcess, timeout: float = 2700) -> Path:
    try:
        code = run.wait(timeout)
    except Exception:
        pytest.fail(f"the federated run did not finish in {timeout:.0f} s:\n{fed.logs()}")
    assert code == 0, fed.logs()
    runs = [p for p in (fed.root / "runs").iterdir() if (p / "run.json").is_file()]
    assert len(runs) == 1, fed.logs()
    return runs[0]


def _metrics(run_dir: Path, round_num: int) -> dict:
    return json.loads((run_dir / f"round-{round_num}" / METRICS).read_text())


def test_two_rounds_average_what_the_hospitals_sent(tmp_path: Path, federation: Federation) -> None:
    from federimed.model import load_for_inference

    settings = tiny_settings(rounds=2)
    federation.start(_hospitals(tmp_path))
    options = ServerOptions(settings=settings, hospitals=3, runs_dir=tmp_path / "runs")
    run_dir = _finish(federation, federation.run(options))
    snapshot = {name: node.processes() for name, node in federation.nodes.items()}
    assert all(len(pids) >= 2 for pids in snapshot.values()), snapshot  # each SuperNode runs a superexec child

    states = {r: load_file(run_dir / f"round-{r}" / ADAPTER_WEIGHTS) for r in (1, 2)}
    assert states[1].keys() == states[2].keys() and all("lora_" in key for key in states[1])
    assert any(not torch.equal(states[1][k], states[2][k]) for k in states[1]), "the adapter did not change"

    # Round 1's global adapter is the num-examples-weighted mean of the adapters the hospitals sent.
    sent, weights = {}, {}
    for name in HOSPITALS:
        path = tmp_path / "outbox" / name / "round-001.safetensors"
        sent[name] = load_file(path)
        with safe_open(path, "pt") as handle:
            weights[name] = int(handle.metadata()["num-examples"])
    assert weights == HOSPITALS
    total = sum(weights.values())
    for key, value in states[1].items():
        expected = sum(sent[name][key].double() * weights[name] / total for name in HOSPITALS)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)

    metrics = _metrics(run_dir, 1)
    assert set(metrics["hospitals"]) == set(HOSPITALS) and metrics["dropped"] == {}
    adapter_bytes = sum(t.numel() * t.element_size() for t in states[1].values())
    for row in metrics["hospitals"].values():
        assert adapter_bytes <= row["bytes_received"] <= 1.05 * adapter_bytes
        assert adapter_bytes <= row["bytes_sent"] <= 1.05 * adapter_bytes
        assert row["heldout_loss"] > 0
    assert (run_dir / "loss.png").stat().st_size > 0

    for r in (1, 2):  # every checkpoint loads as a PEFT adapter
        model, _ = load_for_inference(settings.model, run_dir / f"round-{r}")
        loaded = {k: v for k, v in model.state_dict().items() if "lora_A" in k or "lora_B" in k}
        assert len(loaded) == len(states[r])

    federation.close()
    assert not [pid for pids in snapshot.values() for pid in pids if deployment._running(pid)]


def test_a_hospital_that_dies_mid_run_is_dropped_and_the_run_finishes(
    tmp_path: Path, federation: Federation
) -> None:
    federation.start(_hospitals(tmp_path))
    runs = tmp_path / "runs"
    options = ServerOptions(settings=tiny_settings(rounds=3), hospitals=3, runs_dir=runs, fraction_evaluate=0.0)
    run = federation.run(options)
    deadline = time.monotonic() + 2700
    while not list(runs.glob("*/round-1")):  # round 2 starts right after round 1's checkpoint
        assert run.alive() and time.monotonic() < deadline, federation.logs()
        time.sleep(0.5)
    victim = federation.nodes["gamma"]
    for pid in victim.processes():  # a crash: no goodbye to the SuperLink
        os.kill(pid, 9)
    run_dir = _finish(federation, run)

    assert list(_metrics(run_dir, 2)["dropped"]) == ["gamma"]
    assert "Node Unavailable" in _metrics(run_dir, 2)["dropped"]["gamma"]
    assert set(_metrics(run_dir, 2)["hospitals"]) >= {"alpha", "beta"}
    assert set(_metrics(run_dir, 3)["hospitals"]) == {"alpha", "beta"}
    assert json.loads((run_dir / "run.json").read_text())["rounds_completed"] == 3
    assert "hospital gamma dropped in round 2" in (tmp_path / "flwr-run.log").read_text()
