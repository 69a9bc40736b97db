"""Flower plumbing without processes: what a hospital's reply carries, FedAvg weighting, drop-outs, config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from federimed.fl.hospitals import DATA_DIR_ENV, HOSPITALS_ENV, HospitalDataError, check_hospital, node_hospital
from federimed.fl.settings import ServerOptions, run_settings, to_run_config
from federimed.fl.strategy import HOSPITAL_RECORD, AdapterFedAvg
from federimed.fl.transport import unpack_content
from fl_support import make_hospital, tiny_settings

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


class Grid:
    """The part of a Flower Grid the strategy's sampling uses."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _reply(instruction: Message, name: str, arrays: dict[str, np.ndarray], examples: int) -> Message:
    metrics = {"train_loss": 1.0, "num-examples": examples, "steps": 1, "tokens": 10, "seconds": 1.0, "bytes": 0, "peak-rss-mb": 1.0}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
            HOSPITAL_RECORD: ConfigRecord({"name": name}),
        }
    )
    return Message(content, reply_to=instruction)


def _send(messages) -> list[Message]:
    """Give the instructions their ids, as the Grid does when it pushes them."""
    messages = list(messages)
    for message in messages:
        message.metadata.__dict__["_message_id"] = message.object_id
    return messages


def _lost_node_reply(instruction: Message) -> Message:
    """The error reply the SuperLink makes for a node that stopped heartbeating: sent by the SuperLink (id 1)."""
    reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = 1
    return reply


def test_fedavg_is_the_num_examples_weighted_mean_and_drops_are_recorded() -> None:
    rng = np.random.default_rng(0)
    strategy = AdapterFedAvg(hospitals=3, first_round=1)
    global_arrays = ArrayRecord({"layer.lora_A.weight": Array(np.zeros((2, 3), np.float32))})
    sent = _send(strategy.configure_train(1, global_arrays, ConfigRecord(), Grid([11, 22, 33])))
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 22, 33]
    by_node = {m.metadata.dst_node_id: m for m in sent}
    local = {node: {"layer.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32)} for node in (11, 22)}
    replies = [
        _reply(by_node[11], "alpha", local[11], examples=3),
        _reply(by_node[22], "beta", local[22], examples=9),
        _lost_node_reply(by_node[33]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = (3 * local[11]["layer.lora_A.weight"] + 9 * local[22]["layer.lora_A.weight"]) / 12
    np.testing.assert_allclose(arrays["layer.lora_A.weight"].numpy(), expected, rtol=1e-6)
    entry = strategy.rounds[1]
    assert set(entry.hospitals) == {"alpha", "beta"}
    assert list(entry.dropped) == ["node 33"] and "Node Unavailable" in entry.dropped["node 33"]
    assert entry.hospitals["beta"].bytes_sent == sent[0].content["arrays"].count_bytes()
    assert entry.hospitals["beta"].bytes_received == replies[1].content["arrays"].count_bytes()

    # Round 2 needs only min_hospitals: it does not wait for the lost node; a known hospital that is lost
    # or answers nothing before the timeout is recorded by name.
    sent = _send(strategy.configure_train(2, arrays, ConfigRecord(), Grid([11, 22])))
    by_node = {m.metadata.dst_node_id: m for m in sent}
    strategy.aggregate_train(2, [_lost_node_reply(by_node[11])])
    assert set(strategy.rounds[2].dropped) == {"alpha", "beta"}
    assert "Node Unavailable" in strategy.rounds[2].dropped["alpha"]
    assert strategy.rounds[2].dropped["beta"] == "no reply before the round timeout"


def test_first_round_waits_for_every_hospital_and_resumed_rounds_keep_their_numbers() -> None:
    strategy = AdapterFedAvg(hospitals=3, min_hospitals=1, first_round=4)
    arrays = ArrayRecord({"x.lora_B.weight": Array(np.ones(2, np.float32))})
    assert strategy.min_available_nodes == 3
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid([1, 2, 3])))
    assert {m.content["config"]["server-round"] for m in messages} == {4}
    assert strategy.min_available_nodes == 1 and 4 in strategy.rounds
    late = list(strategy.configure_train(2, arrays, ConfigRecord(), Grid([1, 2, 3, 4])))
    assert sorted(m.metadata.dst_node_id for m in late) == [1, 2, 3, 4]  # a late joiner is sampled


@pytest.mark.slow
def test_a_hospital_replies_with_adapter_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from federimed import training
    from federimed.fl import client_app
    from federimed.fl.server_app import initial_adapter
    from federimed.model import load_base

    settings = tiny_settings(rounds=2, steps=1)
    start = initial_adapter(settings)
    hospital = make_hospital(tmp_path, "alpha", 6)
    config = ConfigRecord(
        {"settings": settings.model_dump_json(), "server-round": 1, "total-rounds": 2, "proximal-mu": 0.25}
    )
    calls, train_local = [], training.train_local
    monkeypatch.setattr(training, "train_local", lambda *a, **kw: calls.append(kw) or train_local(*a, **kw))
    message = Message(RecordDict({"arrays": ArrayRecord(start), "config": config}), dst_node_id=5, message_type="train")
    context = Context(run_id=1, node_id=5, node_config={"data-path": str(hospital)}, state=RecordDict(), run_config={})
    reply = client_app.app(message, context)

    assert list(reply.content["arrays"].keys()) == ["packed"]  # on the wire: one array of the adapter's bytes
    arrays = unpack_content(reply.content)["arrays"]  # what the server's PackedGrid hands the strategy
    assert set(arrays) == set(start) and all("lora_" in key for key in arrays)
    base_keys = set(load_base(settings.model)[0].state_dict())
    assert not base_keys & {k.replace(".lora_A", "").replace(".lora_B", "") for k in arrays}
    adapter_bytes = sum(t.numel() * t.element_size() for t in start.values())
    assert adapter_bytes <= arrays.count_bytes() <= 1.05 * adapter_bytes
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 6 and metrics["bytes"] == arrays.count_bytes() and metrics["tokens"] > 0
    assert reply.content[HOSPITAL_RECORD]["name"] == "alpha"
    assert any(not np.array_equal(arrays[k].numpy(), start[k].numpy()) for k in start), "training changed nothing"
    assert [call["proximal_mu"] for call in calls] == [0.25]  # FedProx's μ, as the server sent it


def test_run_config_in_pyproject_covers_every_option_with_its_default() -> None:
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(ServerOptions().to_run_config())
    assert ServerOptions.from_run_config(app_config) == ServerOptions()


def test_run_config_round_trip_and_overrides() -> None:
    settings = tiny_settings().model_copy(update={"rounds": 5})
    settings.lora.target_modules = ["q_proj", "v_proj"]
    assert run_settings(to_run_config(settings)) == settings
    options = ServerOptions.from_run_config({"local-steps": 2, "hospitals": 4, "resume-run": "r1", "lora-r": 4})
    assert (options.settings.train.local_steps, options.hospitals, options.resume_run) == (2, 4, "r1")
    assert options.settings.lora.r == 4 and options.settings.train.batch_size == 4 and options.settings.train.epochs == 0


def test_node_hospital_from_node_config_or_simulation_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    beta, alpha = make_hospital(data, "beta", 3), make_hospital(data, "alpha", 3)
    assert node_hospital({"data-path": str(beta)}, environ={}) == beta.resolve()
    environ = {DATA_DIR_ENV: str(data)}
    assert node_hospital({"partition-id": 0}, environ) == alpha.resolve()  # sorted by name
    assert node_hospital({"partition-id": 0}, environ | {HOSPITALS_ENV: "beta"}) == beta.resolve()
    with pytest.raises(HospitalDataError, match="partition 2 has no hospital"):
        node_hospital({"partition-id": 2}, environ)
    with pytest.raises(HospitalDataError, match="data-path"):
        node_hospital({"partition-id": 0}, environ={})


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is empty"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "manifest.json, train.jsonl missing"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text("{}"), (p / "train.jsonl").touch()), "no training"),
    ],
)
def test_check_hospital_names_what_is_wrong(tmp_path: Path, setup, message: str) -> None:
    path = tmp_path / "hospital"
    setup(path)
    with pytest.raises(HospitalDataError, match=message):
        check_hospital(path)


def test_the_loopback_federation_finds_its_own_run_beside_baselines_training_into_the_same_folder(tmp_path: Path) -> None:
    from federimed.checkpoints import new_run
    from federimed.config import RunSettings
    from federimed.fl.deployment import new_federated_run

    new_run(tmp_path, RunSettings(), "federated", {"a": 1})
    before = {p.name for p in tmp_path.iterdir()}
    assert new_federated_run(tmp_path, before) is None
    new_run(tmp_path, RunSettings(), "centralized", {"a": 1, "b": 1})  # a baseline started first
    assert new_federated_run(tmp_path, before) is None
    ours = new_run(tmp_path, RunSettings(), "federated", {"a": 1, "b": 1})
    assert new_federated_run(tmp_path, before) == ours.path


def test_fednova_is_the_default_and_private_runs_default_to_the_mean() -> None:
    assert ServerOptions().aggregator == "fednova"
    assert ServerOptions(dp=True).aggregator == "fedavg"
    assert ServerOptions(secagg=True).aggregator == "fedavg"
    with pytest.raises(ValueError, match="dp needs aggregator 'fedavg'"):
        ServerOptions(dp=True, aggregator="fednova")


def test_the_server_app_will_not_resume_a_run_under_another_recipe(tmp_path: Path) -> None:
    """A SuperLink started by hand (run config, no CLI) meets the same check before any round."""
    from federimed.checkpoints import new_run
    from federimed.config import RunSettings
    from federimed.fl.server_app import federate

    run = new_run(tmp_path, RunSettings(), "federated", {"a": 1}, ServerOptions().recipe())
    options = ServerOptions(runs_dir=tmp_path, resume_run=run.id, aggregator="median")
    with pytest.raises(ValueError, match=rf"cannot resume run {run.id} with another recipe \(aggregator 'fednova' → 'median'\)"):
        federate(None, options)
