"""Differential privacy: RDP accounting, client-side clipping, server-side noise, ε in checkpoints and the footer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from federimed.assistant import ModelVersion, available_versions
from federimed.checkpoints import list_versions, new_run, save_round
from federimed.fl.dp import (
    HospitalAccountant,
    HospitalLevelDp,
    clip_when_asked,
    earlier_noise,
    hospital_epsilon,
    private_strategy,
)
from federimed.fl.settings import ServerOptions
from federimed.fl.strategy import HOSPITAL_RECORD, AdapterFedAvg
from fl_support import make_hospital, tiny_settings

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


# ---------------------------------------------------------------- accounting


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """The tight ε of `rounds` Gaussian mechanisms (sensitivity 1, std σ), i.e. of one with μ = √rounds/σ
    (analytic Gaussian mechanism, Balle & Wang 2018)."""
    mu = math.sqrt(rounds) / sigma

    def delta_at(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def _classic_rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Mironov's RDP → (ε, δ) conversion of rounds · α/(2σ²), minimised over a fine grid of orders."""
    orders = np.linspace(1.01, 200, 20000)
    return float(np.min(rounds * orders / (2 * sigma**2) + math.log(1 / delta) / (orders - 1)))


@pytest.mark.parametrize(("sigma", "rounds"), [(0.5, 3), (1.0, 1), (1.0, 3), (2.0, 3), (1.0, 20)])
def test_epsilon_lies_between_the_exact_gaussian_value_and_the_classic_rdp_bound(sigma: float, rounds: int) -> None:
    epsilon = hospital_epsilon(sigma, rounds, delta=DELTA, hospitals=3)
    assert _exact_gaussian_epsilon(sigma, rounds, DELTA) <= epsilon <= _classic_rdp_epsilon(sigma, rounds, DELTA)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    by_rounds = [hospital_epsilon(1.0, r, delta=DELTA, hospitals=3) for r in (1, 2, 3, 10)]
    by_noise = [hospital_epsilon(s, 3, delta=DELTA, hospitals=3) for s in (0.5, 1.0, 2.0, 4.0)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    sampled = hospital_epsilon(1.0, 3, delta=DELTA, hospitals=10, sampled=2)
    assert sampled < hospital_epsilon(1.0, 3, delta=DELTA, hospitals=10)
    looser = hospital_epsilon(1.0, 3, delta=1e-3, hospitals=3)
    assert looser < by_rounds[2]


def test_the_accountant_composes_round_by_round() -> None:
    accountant = HospitalAccountant(hospitals=3, delta=DELTA)
    assert accountant.epsilon == 0.0
    steps = [accountant.release(1.0) for _ in range(3)]
    assert steps == pytest.approx([hospital_epsilon(1.0, r, delta=DELTA, hospitals=3) for r in (1, 2, 3)])
    assert accountant.releases == 3


# ---------------------------------------------------------------- client-side clipping


def _instruction(global_state: dict[str, np.ndarray], clip: float | None) -> Message:
    config = ConfigRecord({"server-round": 1} | ({KEY_CLIPPING_NORM: clip} if clip is not None else {}))
    arrays = ArrayRecord({k: Array(v) for k, v in global_state.items()})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type="train")


def _trainer(update: dict[str, np.ndarray], global_state: dict[str, np.ndarray]):
    """A train handler that replies global + `update`, as a hospital's does (metrics and name included)."""

    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({k: Array((global_state[k] + update[k]).astype(np.float32)) for k in global_state})
        metrics = MetricRecord({"num-examples": 4})
        content = RecordDict({"arrays": arrays, "metrics": metrics, HOSPITAL_RECORD: ConfigRecord({"name": "a"})})
        return Message(content, reply_to=msg)

    return train


def _sent_update(reply: Message, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: reply.content["arrays"][k].numpy() - global_state[k] for k in global_state}


def _norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in update.values()))


@pytest.mark.parametrize(("scale", "clip"), [(5.0, 1.0), (0.5, 1.0), (5.0, None)])
def test_the_mod_clips_an_update_above_the_bound_and_nothing_else(scale: float, clip: float | None) -> None:
    rng = np.random.default_rng(1)
    global_state = {"a.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
                    "a.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32)}
    raw = {k: rng.normal(size=v.shape) for k, v in global_state.items()}
    update = {k: (v * scale / _norm(raw)).astype(np.float32) for k, v in raw.items()}
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = clip_when_asked(_instruction(global_state, clip), context, _trainer(update, global_state))

    assert not reply.has_error()
    sent = _sent_update(reply, global_state)
    if clip is not None and scale > clip:
        assert _norm(sent) == pytest.approx(clip, rel=1e-4)
        for key in update:  # the same direction, scaled down
            np.testing.assert_allclose(sent[key], update[key] * clip / scale, rtol=1e-4, atol=1e-6)
    else:  # below the bound, or a run without DP: the update leaves untouched
        for key in update:
            np.testing.assert_allclose(sent[key], update[key], rtol=1e-6, atol=1e-6)
    assert reply.content["metrics"]["num-examples"] == 4 and reply.content[HOSPITAL_RECORD]["name"] == "a"


# ---------------------------------------------------------------- server-side noise


class Grid:
    """The part of a Flower Grid the strategy's sampling uses."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _configure(dp: HospitalLevelDp, global_state: dict[str, np.ndarray], nodes: list[int]) -> dict[int, Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in global_state.items()})
    sent = list(dp.configure_train(1, arrays, ConfigRecord(), Grid(nodes)))
    for message in sent:  # the Grid sets message ids when it pushes them
        message.metadata.__dict__["_message_id"] = message.object_id
    return {m.metadata.dst_node_id: m for m in sent}


def _reply(instruction: Message, name: str, state: dict[str, np.ndarray], examples: int) -> Message:
    metrics = {"train_loss": 1.0, "num-examples": examples, "steps": 1, "tokens": 10, "seconds": 1.0, "bytes": 0, "peak-rss-mb": 1.0}
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
        "metrics": MetricRecord(metrics),
        HOSPITAL_RECORD: ConfigRecord({"name": name}),
    })
    return Message(content, reply_to=instruction)


def _lost(instruction: Message) -> Message:
    reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = 1
    return reply


def _round(shapes: dict[str, tuple[int, ...]], sigma: float, clip: float, lost: bool, seed: int):
    """One DP round over three hospitals (the third lost if `lost`): the strategy, its wrapper, the replies'
    states, the global state and the noised aggregate."""
    rng = np.random.default_rng(seed)
    global_state = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    strategy = AdapterFedAvg(hospitals=3)
    dp = HospitalLevelDp(strategy, noise_multiplier=sigma, clip=clip, delta=DELTA, hospitals=3)
    sent = _configure(dp, global_state, [11, 22, 33])
    assert all(m.content["config"][KEY_CLIPPING_NORM] == clip for m in sent.values())
    states = {}
    for node in (11, 22) if lost else (11, 22, 33):
        raw = {k: rng.normal(size=s) for k, s in shapes.items()}
        norm = _norm(raw) / (clip * rng.uniform(0.2, 1.0))  # clipped by the hospital: norm ≤ clip
        states[node] = {k: (global_state[k] + raw[k] / norm).astype(np.float32) for k in shapes}
    replies = [_reply(sent[n], f"h{n}", s, examples=n) for n, s in states.items()]  # unequal num-examples
    if lost:
        replies.append(_lost(sent[33]))
    arrays, _ = dp.aggregate_train(1, replies)
    return strategy, dp, states, arrays


def test_the_aggregate_is_the_equal_weight_mean_of_the_clipped_updates_plus_seeded_noise() -> None:
    shapes = {"x.lora_A.weight": (3, 4), "x.lora_B.weight": (4, 3)}
    np.random.seed(7)
    strategy, dp, states, arrays = _round(shapes, sigma=1.5, clip=0.5, lost=False, seed=0)
    np.random.seed(7)  # replay the noise Flower's helper drew, array by array
    std = 1.5 * 0.5 / 3
    for key, shape in shapes.items():
        mean = np.mean([s[key] for s in states.values()], axis=0)
        expected = mean + np.random.normal(0, std, shape).astype(np.float32)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    entry = strategy.rounds[1]  # the wrapped strategy's ledger still fills
    assert set(entry.hospitals) == {"h11", "h22", "h33"} and not entry.dropped
    assert all(h.update_norm is not None and h.update_norm <= 0.5 + 1e-5 for h in entry.hospitals.values())
    spent = dp.released[1]
    assert (spent.delta, spent.noise_multiplier, spent.clip) == (DELTA, 1.5, 0.5)
    assert spent.epsilon == pytest.approx(hospital_epsilon(1.5, 1, delta=DELTA, hospitals=3))


@pytest.mark.parametrize("lost", [False, True])
def test_the_noise_std_is_sigma_clip_over_the_hospitals_averaged(lost: bool) -> None:
    shapes = {"big.lora_A.weight": (200, 100)}
    strategy, dp, states, arrays = _round(shapes, sigma=2.0, clip=1.0, lost=lost, seed=3)
    averaged = 2 if lost else 3
    noise = arrays["big.lora_A.weight"].numpy() - np.mean([s["big.lora_A.weight"] for s in states.values()], axis=0)
    expected = 2.0 * 1.0 / averaged
    assert noise.std() == pytest.approx(expected, rel=0.03)  # 20,000 draws: the standard error is 0.5 %
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert ("node 33" in strategy.rounds[1].dropped) == lost  # a drop-out is recorded, the round goes on
    assert dp.released[1].epsilon > 0


def test_a_resumed_run_keeps_counting_its_earlier_rounds() -> None:
    options = ServerOptions(dp=True, dp_noise_multiplier=1.0)
    saved = [{"round": 1, "noise_multiplier": 1.0}, {"round": 2, "noise_multiplier": 1.0}]
    dp = private_strategy(AdapterFedAvg(hospitals=3, first_round=3), options, saved, "r1")
    assert dp.privacy.epsilon == pytest.approx(hospital_epsilon(1.0, 2, delta=DELTA, hospitals=3))
    assert private_strategy(AdapterFedAvg(hospitals=3), ServerOptions(), [{"round": 1}], "r0") is None
    with pytest.raises(ValueError, match="resume it with DP on"):
        earlier_noise(saved, dp=False, run_id="r1")
    with pytest.raises(ValueError, match="without differential privacy"):
        earlier_noise([{"round": 1}], dp=True, run_id="r2")


def test_dp_options_and_their_run_config_keys() -> None:
    options = ServerOptions.from_run_config({"dp": True, "dp-noise-multiplier": 2.0, "dp-clip": 0.5, "dp-delta": 1e-6})
    assert (options.dp, options.dp_noise_multiplier, options.dp_clip, options.dp_delta) == (True, 2.0, 0.5, 1e-6)
    assert ServerOptions.from_run_config(options.to_run_config()) == options
    with pytest.raises(ValueError, match="aggregator 'fedavg'"):
        ServerOptions(dp=True, aggregator="median")
    with pytest.raises(ValueError):
        ServerOptions(dp=True, dp_noise_multiplier=0)


def test_train_refuses_dp_where_it_cannot_hold(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from federimed.cli import app

    make_hospital(tmp_path / "data", "alpha", 2)
    cases = [
        (["--dp", "--aggregator", "median"], "dp needs aggregator 'fedavg'"),
        (["--dp", "--mode", "centralized"], "--dp applies to federated training"),
        (["--dp", "--noise-multiplier", "0"], "noise_multiplier"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), *args], catch_exceptions=False)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


# ---------------------------------------------------------------- checkpoints and the footer


def test_epsilon_reaches_metrics_run_json_versions_and_the_footer(tmp_path: Path) -> None:
    run = new_run(tmp_path, tiny_settings(rounds=2), "federated", {"alpha": 3, "beta": 5})
    state = {"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}
    epsilons = [hospital_epsilon(1.0, r, delta=DELTA, hospitals=2) for r in (1, 2)]
    for number, epsilon in enumerate(epsilons, start=1):
        privacy = {"epsilon": epsilon, "delta": DELTA, "noise_multiplier": 1.0, "clip": 0.5, "sampling_rate": 1.0}
        save_round(run, number, state, {"train_loss": 1.0, "hospitals": {}} | privacy)
    metrics = json.loads((run.path / "round-1" / "metrics.json").read_text())
    assert metrics["epsilon"] == epsilons[0] and (metrics["delta"], metrics["noise_multiplier"], metrics["clip"]) == (
        DELTA, 1.0, 0.5)
    info = run.info()
    assert (info["epsilon"], info["delta"], info["noise_multiplier"], info["clip"]) == (epsilons[1], DELTA, 1.0, 0.5)
    versions = {v.round: v for v in list_versions(tmp_path)}
    assert (versions[1].epsilon, versions[2].epsilon, versions[2].delta) == (epsilons[0], epsilons[1], DELTA)
    footer = next(v for v in available_versions(tmp_path) if v.rounds == 2).describe()
    assert f"DP ε {epsilons[1]:.2f} at δ 1e-05 (per hospital)" in footer and "2 rounds" in footer
    plain = ModelVersion("r/round-1", adapter_dir=tmp_path, mode="federated", rounds=1)
    assert "ε" not in plain.describe()


# ---------------------------------------------------------------- a real federation


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes when alone; far more on a busy box
def test_train_dp_on_loopback_records_epsilon_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from federimed.cli import app
    from fl_support import leftovers

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the hospitals' ClientApps share this small machine
    data, runs = tmp_path / "data", tmp_path / "runs"
    make_hospital(data, "alpha", 3)
    make_hospital(data, "beta", 4)
    result = CliRunner().invoke(app, [
        "train", "--data", str(data), "--runs-dir", str(runs), "--rounds", "2", "--local-steps", "1",
        "--batch-size", "2", "--seq-len", "128", "--dp", "--noise-multiplier", "2", "--clip", "0.05",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    rounds = [json.loads((run_dir / f"round-{n}" / "metrics.json").read_text()) for n in (1, 2)]
    expected = [hospital_epsilon(2.0, n, delta=DELTA, hospitals=2) for n in (1, 2)]
    assert [m["epsilon"] for m in rounds] == pytest.approx(expected)
    assert all((m["noise_multiplier"], m["clip"], m["delta"]) == (2.0, 0.05, DELTA) for m in rounds)
    for metrics in rounds:  # every hospital trained, and its update left clipped to the bound
        assert set(metrics["hospitals"]) == {"alpha", "beta"}
        assert all(h["update_norm"] <= 0.05 * (1 + 1e-4) for h in metrics["hospitals"].values())
    assert json.loads((run_dir / "run.json").read_text())["epsilon"] == pytest.approx(expected[1])
    assert "DP ε" in result.output  # the per-round table
    assert leftovers((runs / ".flower" / "local").resolve()) == []
