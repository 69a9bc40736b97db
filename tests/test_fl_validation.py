"""Screening hospital replies before aggregation, and robust aggregation: poisoned updates do no harm."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federimed.fl.validation import ReplyScreen, make_aggregator

KEYS = {"a.lora_A.weight": (4, 6), "a.lora_B.weight": (6, 4)}
METRICS = ("train_loss", "num-examples", "tokens")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their run and node ids from the process's task identity, set by Flower's runtimes."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in KEYS.items()}


def _honest(global_state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: value + 0.01 * rng.normal(size=value.shape).astype(np.float32) for key, value in global_state.items()}


def _reply(node: int, arrays: dict[str, np.ndarray], examples: float = 5, **metrics: object) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    values = {"train_loss": 1.0, "num-examples": examples, "tokens": 10} | metrics
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(values)}
    )
    return Message(content, reply_to=instruction)


def _name(reply: Message) -> str:
    return f"h{reply.metadata.src_node_id}"


def _screen(global_state: dict[str, np.ndarray], **kwargs) -> ReplyScreen:
    screen = ReplyScreen(metric_keys=METRICS, **kwargs)
    screen.set_global(ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    return screen


def _aggregate(name: str, replies: list[Message], **kwargs) -> dict[str, np.ndarray]:
    arrays, _ = make_aggregator(name, **kwargs).aggregate_train(1, replies)
    return {key: arrays[key].numpy() for key in KEYS}


def test_poisoned_and_malformed_replies_are_rejected_and_fedavg_of_the_rest_is_unharmed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = _global()
    honest = {1: _honest(g, 1), 2: _honest(g, 2), 3: _honest(g, 3)}
    nan = _honest(g, 4)
    nan["a.lora_B.weight"][0, 0] = np.nan
    poisoned = {
        10: _reply(10, {k: v + 1e4 for k, v in g.items()}),  # huge update, finite
        11: _reply(11, nan),
        12: _reply(12, {**_honest(g, 5), "a.lora_B.weight": np.zeros((4, 6), np.float32)}),  # transposed
        13: _reply(13, {"a.lora_A.weight": g["a.lora_A.weight"]}),  # a key missing
        14: _reply(14, _honest(g, 6) | {"evil.weight": np.ones(3, np.float32)}),
        15: _reply(15, _honest(g, 7), examples=0),
        16: _reply(16, _honest(g, 8), train_loss=float("inf")),
        17: _reply(17, _honest(g, 9), extra=1.0),  # would make Flower's own consistency check end the run
        18: _reply(18, {k: v.astype(np.float64) for k, v in _honest(g, 10).items()}),
    }
    replies = [_reply(1, honest[1], 2), poisoned[10], _reply(2, honest[2], 3), *list(poisoned.values())[1:],
               _reply(3, honest[3], 5)]
    with caplog.at_level("WARNING", logger="flwr.federimed"):
        screened = _screen(g, max_update_norm=1.0).screen(replies, _name, server_round=4)

    assert [_name(r) for r in screened.accepted] == ["h1", "h2", "h3"]
    reasons = screened.rejected
    assert set(reasons) == {f"h{n}" for n in poisoned}
    assert "exceeds the bound" in reasons["h10"] and "NaN/Inf" in reasons["h11"]
    assert "shape (4, 6), expected (6, 4)" in reasons["h12"] and "1 missing" in reasons["h13"]
    assert "1 unexpected [evil.weight]" in reasons["h14"] and "not positive" in reasons["h15"]
    assert "'train_loss' is inf" in reasons["h16"] and "differ from the expected" in reasons["h17"]
    assert "dtype float64" in reasons["h18"]
    assert "round 4: rejected the update of hospital h10 (node 10): update norm" in caplog.text

    fed = _aggregate("fedavg", screened.accepted)
    for key in KEYS:  # exactly the num-examples-weighted mean of the three honest hospitals
        expected = (2 * honest[1][key] + 3 * honest[2][key] + 5 * honest[3][key]) / 10
        np.testing.assert_allclose(fed[key], expected, rtol=1e-5)
    assert screened.norms["h10"] == pytest.approx(1e4 * np.sqrt(sum(np.prod(s) for s in KEYS.values())), rel=1e-6)
    assert 0 < screened.norms["h1"] < 1.0


def test_norm_is_the_l2_distance_to_the_global_adapter_and_zero_means_no_bound() -> None:
    g = _global()
    far = {k: v + 3.0 for k, v in g.items()}
    screened = _screen(g).screen([_reply(1, far)], _name, server_round=1)
    assert [_name(r) for r in screened.accepted] == ["h1"] and not screened.rejected
    distance = np.sqrt(sum(np.sum((far[k].astype(np.float64) - g[k]) ** 2) for k in KEYS))
    assert screened.norms["h1"] == pytest.approx(distance, rel=1e-9)
    assert _screen(g, max_update_norm=distance * 0.99).screen([_reply(1, far)], _name, 1).rejected
    assert not _screen(g, max_update_norm=distance * 1.01).screen([_reply(1, far)], _name, 1).rejected


def test_replies_with_errors_pass_through_for_the_drop_out_ledger() -> None:
    instruction = Message(RecordDict(), dst_node_id=7, message_type="train")
    failed = Message(Error(code=0, reason="node unavailable"), reply_to=instruction)
    screened = _screen(_global()).screen([failed], _name, server_round=1)
    assert screened.accepted == [failed] and not screened.rejected and not screened.norms


@pytest.mark.parametrize(("name", "kwargs"), [("median", {}), ("trimmed-mean", {"trim_fraction": 0.34})])
def test_robust_aggregators_resist_an_outlier_that_passes_every_check(name: str, kwargs: dict) -> None:
    g = _global()
    honest = [_honest(g, seed) for seed in range(1, 5)]
    outlier = {k: v + 50.0 for k, v in g.items()}  # finite, right shapes, no norm bound configured
    replies = [_reply(n, arrays, examples=1) for n, arrays in enumerate(honest, start=1)]
    replies.append(_reply(9, outlier, examples=1000))  # it also claims most of the examples
    accepted = _screen(g).screen(replies, _name, server_round=1).accepted
    assert len(accepted) == 5

    robust = _aggregate(name, accepted, **kwargs)
    stacked = {key: np.stack([h[key] for h in honest]) for key in KEYS}
    for key in KEYS:  # every coordinate stays within what honest hospitals sent
        assert np.all(robust[key] >= stacked[key].min(axis=0) - 1e-6)
        assert np.all(robust[key] <= stacked[key].max(axis=0) + 1e-6)
    if name == "trimmed-mean":  # 5 replies, int(0.34 * 5) = 1 trimmed at each end: mean of the middle three
        for key in KEYS:
            middle = np.sort(np.concatenate([stacked[key], outlier[key][None]]), axis=0)[1:4]
            np.testing.assert_allclose(robust[key], middle.mean(axis=0), rtol=1e-5)

    # The weighted mean, by contrast, is dragged almost all the way to the outlier.
    replies = [*(_reply(n, arrays, examples=1) for n, arrays in enumerate(honest, start=1)), _reply(9, outlier, 1000)]
    plain = _aggregate("fedavg", _screen(g).screen(replies, _name, 1).accepted)
    assert all(np.abs(plain[key] - g[key]).mean() > 40 for key in KEYS)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="aggregator must be one of fedavg, fednova, fedavgm, trimmed-mean, median"):
        make_aggregator("krum")
    with pytest.raises(ValueError, match="trim_fraction"):
        make_aggregator("trimmed-mean", trim_fraction=0.5)
    with pytest.raises(ValueError, match="max_update_norm"):
        ReplyScreen(max_update_norm=-1)
    with pytest.raises(RuntimeError, match="set_global"):
        ReplyScreen().check(RecordDict())


class _Grid:
    """The part of a Flower Grid the strategy's sampling uses."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_the_strategy_screens_replies_records_rejections_and_aggregates_the_rest() -> None:
    from flwr.app import ConfigRecord

    from federimed.fl.strategy import HOSPITAL_RECORD, TRAIN_METRICS, AdapterFedAvg

    g = _global()
    strategy = AdapterFedAvg(hospitals=4, max_update_norm=1.0)
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), _Grid([1, 2, 3, 4]))}

    def reply(node: int, name: str, arrays: dict[str, np.ndarray], examples: int, **extra: float) -> Message:
        metrics = {key: 1.0 for key in TRAIN_METRICS} | {"num-examples": examples} | extra
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics),
            HOSPITAL_RECORD: ConfigRecord({"name": name}),
        })
        return Message(content, reply_to=sent[node])

    honest = {1: _honest(g, 1), 2: _honest(g, 2)}
    replies = [
        reply(1, "alpha", honest[1], 4, train_loss=2.0),
        reply(2, "beta", honest[2], 6, train_loss=4.0),
        reply(3, "gamma", {k: v * 1e3 for k, v in g.items()}, 1000, train_loss=0.0),  # poisoned, claims most examples
        reply(4, "delta", honest[1], 4, extra=1.0),  # an unexpected metric
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    for key in KEYS:
        np.testing.assert_allclose(arrays[key].numpy(), (4 * honest[1][key] + 6 * honest[2][key]) / 10, rtol=1e-5)
    entry = strategy.rounds[1]
    assert set(entry.hospitals) == {"alpha", "beta"} and entry.dropped == {}
    assert set(entry.rejected) == {"gamma", "delta"} and "exceeds the bound 1" in entry.rejected["gamma"]
    assert 0 < entry.hospitals["alpha"].update_norm < 1.0
    assert entry.to_json()["rejected"] == entry.rejected
    assert metrics["train_loss"] == pytest.approx((4 * 2.0 + 6 * 4.0) / 10)  # only accepted replies count


def test_the_strategy_can_aggregate_with_the_median() -> None:
    from flwr.app import ConfigRecord

    from federimed.fl.strategy import HOSPITAL_RECORD, TRAIN_METRICS, AdapterFedAvg

    g = _global()
    strategy = AdapterFedAvg(hospitals=3, aggregator="median")
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), _Grid([1, 2, 3]))}
    states = [_honest(g, seed) for seed in (1, 2)] + [{k: v + 7.0 for k, v in g.items()}]
    replies = [
        Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
            "metrics": MetricRecord({key: 1.0 for key in TRAIN_METRICS} | {"num-examples": 1 + 100 * (node == 3)}),
            HOSPITAL_RECORD: ConfigRecord({"name": f"h{node}"}),
        }), reply_to=sent[node])
        for node, state in zip((1, 2, 3), states, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    for key in KEYS:
        np.testing.assert_allclose(arrays[key].numpy(), np.median(np.stack([s[key] for s in states]), axis=0))
    assert set(strategy.rounds[1].hospitals) == {"h1", "h2", "h3"} and not strategy.rounds[1].rejected


def _round(strategy, round_number: int, global_state: dict, states: dict, metrics: dict) -> dict[str, np.ndarray]:
    """One round of `strategy` from `global_state`: node → state and extra metrics in, the new global out."""
    from flwr.app import ConfigRecord

    from federimed.fl.strategy import HOSPITAL_RECORD, TRAIN_METRICS

    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        round_number, ArrayRecord({k: Array(v) for k, v in global_state.items()}), ConfigRecord(), _Grid(list(states)))}
    replies = [Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
        "metrics": MetricRecord({key: 1.0 for key in TRAIN_METRICS} | metrics[node]),
        HOSPITAL_RECORD: ConfigRecord({"name": f"h{node}"}),
    }), reply_to=sent[node]) for node, state in states.items()]
    arrays, _ = strategy.aggregate_train(round_number, replies)
    return {key: arrays[key].numpy() for key in KEYS}


def test_the_server_momentum_step_equals_a_hand_computation() -> None:
    """FedAvgM over two rounds: m₁ = g₀ − mean₁, g₁ = g₀ − lr·m₁; m₂ = β·m₁ + (g₁ − mean₂), g₂ = g₁ − lr·m₂."""
    from federimed.fl.strategy import AdapterFedAvg

    lr, beta = 0.5, 0.9
    strategy = AdapterFedAvg(hospitals=2, aggregator="fedavgm", server_lr=lr, server_momentum=beta)
    global_state, momentum = _global(), None
    for round_number in (1, 2):
        states = {1: _honest(global_state, 10 * round_number + 1), 2: _honest(global_state, 10 * round_number + 2)}
        new = _round(strategy, round_number, global_state, states, {1: {"num-examples": 1}, 2: {"num-examples": 3}})
        step = {k: global_state[k] - (states[1][k] * 1 + states[2][k] * 3) / 4 for k in KEYS}  # global − mean
        momentum = step if momentum is None else {k: beta * momentum[k] + step[k] for k in KEYS}
        for key in KEYS:
            expected = global_state[key] - lr * momentum[key]
            np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)
            assert not np.allclose(expected, global_state[key] - step[key])  # not the plain weighted mean
        global_state = new


def test_fednova_normalises_each_update_by_its_local_steps() -> None:
    """x ← x + τ_eff Σ pᵢ (xᵢ − x) / τᵢ with pᵢ = nᵢ / Σ n and τ_eff = Σ pᵢ τᵢ; equal steps give FedAvg."""
    from federimed.fl.strategy import AdapterFedAvg

    g = _global()
    states = {1: _honest(g, 1), 2: _honest(g, 2), 3: _honest(g, 3)}
    sizes, steps = {1: 189, 2: 46, 3: 34}, {1: 48, 2: 12, 3: 9}
    metrics = {n: {"num-examples": sizes[n], "steps": steps[n]} for n in states}
    new = _round(AdapterFedAvg(hospitals=3, aggregator="fednova"), 1, g, states, metrics)
    share = {n: sizes[n] / sum(sizes.values()) for n in states}
    tau_eff = sum(share[n] * steps[n] for n in states)
    for key in KEYS:
        expected = g[key] + tau_eff * sum(share[n] * (states[n][key] - g[key]) / steps[n] for n in states)
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)
        fedavg = sum(share[n] * states[n][key] for n in states)
        assert not np.allclose(new[key], fedavg, rtol=1e-4, atol=1e-6)
    same_steps = {n: {"num-examples": sizes[n], "steps": 10} for n in states}
    new = _round(AdapterFedAvg(hospitals=3, aggregator="fednova"), 1, g, states, same_steps)
    for key in KEYS:
        np.testing.assert_allclose(new[key], sum(share[n] * states[n][key] for n in states), rtol=1e-5, atol=1e-6)


def test_the_fednova_server_learning_rate_scales_its_step() -> None:
    """η = Σ τᵢ / τ_eff: x ← x + Σ τᵢ · Σ pᵢ (xᵢ − x) / τᵢ, as many steps along the mean step as centralized takes."""
    from federimed.fl.strategy import AdapterFedAvg

    g = _global()
    states = {1: _honest(g, 4), 2: _honest(g, 5)}
    sizes, steps = {1: 150, 2: 37}, {1: 38, 2: 10}
    metrics = {n: {"num-examples": sizes[n], "steps": steps[n]} for n in states}
    share = {n: sizes[n] / sum(sizes.values()) for n in states}
    tau_eff = sum(share[n] * steps[n] for n in states)
    lr = sum(steps.values()) / tau_eff
    new = _round(AdapterFedAvg(hospitals=2, aggregator="fednova", server_lr=lr), 1, g, states, metrics)
    for key in KEYS:
        expected = g[key] + sum(steps.values()) * sum(share[n] * (states[n][key] - g[key]) / steps[n] for n in states)
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)
        plain = g[key] + tau_eff * sum(share[n] * (states[n][key] - g[key]) / steps[n] for n in states)
        assert not np.allclose(new[key], plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        AdapterFedAvg(hospitals=2, aggregator="fednova", server_lr=0.0)
