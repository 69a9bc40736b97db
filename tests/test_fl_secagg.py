"""Secure aggregation (SecAgg+): the aggregate equals FedAvg within the quantisation tolerance, and the server
never holds a single hospital's update.

In process: a Grid that hands every message to a toy ClientApp (with the real `secagg_mod`) per node runs
the real SecAggGrid + AdapterFedAvg, records every byte the server receives, and lets one hospital fail.
On loopback (slow): a SuperLink, three SuperNodes and `flwr run` with `secagg=true`; the checkpoints are
compared with what each hospital saved in its outbox, and the server's logs and files are scanned for the
hospitals' adapters and updates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from fl_support import LocalGrid, leftovers, make_hospital, tiny_settings
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import safe_open
from safetensors.torch import load_file

from federimed.checkpoints import ADAPTER_WEIGHTS, METRICS
from federimed.fl import deployment, dp
from federimed.fl.dp import clip_when_asked
from federimed.fl.secagg import SecAggGrid, aggregation_tolerance, secagg_mod, secure_grid
from federimed.fl.settings import ServerOptions
from federimed.fl.strategy import HOSPITAL_RECORD, AdapterFedAvg

EXAMPLES = {"alpha": 4, "beta": 6, "gamma": 8}
NODE_CONFIGS = {11: {"name": "alpha"}, 22: {"name": "beta"}, 33: {"name": "gamma"}}
QUANTISATION = {"max_weight": 16.0, "clipping_range": 0.5, "quantization_range": 2**22}


pytestmark = pytest.mark.usefixtures("task_identity")


def _update(name: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The (deterministic) change hospital `name` makes to array `key`: ~1e-3, like a few LoRA steps."""
    seed = sum(map(ord, name + key))
    return (np.random.default_rng(seed).normal(0, 1e-3, shape)).astype(np.float32)


def _toy_app(poisoned: str | None = None, scale: float = 1.0) -> ClientApp:
    """A ClientApp whose train handler adds `_update` × `scale` (NaN for `poisoned`), behind the real mods."""
    app = ClientApp()

    @app.train(mods=[secagg_mod, clip_when_asked])
    def train(msg: Message, context: Context) -> Message:
        name = str(context.node_config["name"])
        arrays = {k: a.numpy() + scale * _update(name, k, a.numpy().shape) for k, a in msg.content["arrays"].items()}
        if name == poisoned:
            next(iter(arrays.values()))[0] = np.nan
        metrics = {"train_loss": 1.0, "num-examples": EXAMPLES[name], "steps": 1, "tokens": 10, "seconds": 1.0, "bytes": 0, "peak-rss-mb": 1.0}
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
            HOSPITAL_RECORD: ConfigRecord({"name": name}),
        })
        return Message(content, reply_to=msg)

    return app


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"layer.lora_A.weight": rng.normal(0, 0.04, (4, 16)).astype(np.float32),
            "layer.lora_B.weight": np.zeros((16, 4), np.float32)}


def _federate(grid: LocalGrid, **secagg) -> tuple[dict[str, np.ndarray], AdapterFedAvg]:
    strategy = AdapterFedAvg(hospitals=3, fraction_evaluate=0.0, secure=True)
    result = strategy.start(
        grid=SecAggGrid(grid, **(QUANTISATION | secagg)),
        initial_arrays=ArrayRecord({k: Array(v) for k, v in _initial().items()}),
        num_rounds=1, train_config=ConfigRecord({"total-rounds": 1}),
    )
    return {k: a.numpy() for k, a in result.arrays.items()}, strategy


def _fedavg(names: Iterable[str], weights: dict[str, float]) -> dict[str, np.ndarray]:
    names = list(names)
    total = sum(weights[n] for n in names)
    return {k: v.astype(np.float64) + sum(weights[n] / total * _update(n, k, v.shape).astype(np.float64)
                                          for n in names)
            for k, v in _initial().items()}


def _raw_bytes(message: Message) -> bytes:
    """Everything a reply carries: its arrays' bytes and its config and metric records."""
    if message.has_error():
        return message.error.reason.encode()
    parts = [array.data for record in message.content.array_records.values() for array in record.values()]
    for record in [*message.content.config_records.values(), *message.content.metric_records.values()]:
        for value in record.values():
            parts.extend(value if isinstance(value, list) else [value])
    return b"".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)


def test_secagg_aggregate_is_fedavg_within_the_quantisation_tolerance() -> None:
    aggregate, strategy = _federate(LocalGrid(NODE_CONFIGS, _toy_app()))
    exact = _fedavg(EXAMPLES, EXAMPLES)
    unweighted = _fedavg(EXAMPLES, dict.fromkeys(EXAMPLES, 1.0))
    tolerance = aggregation_tolerance(list(EXAMPLES.values()), **QUANTISATION) + 1e-7  # + float32 rounding
    assert aggregate.keys() == exact.keys()
    for key, value in aggregate.items():
        assert value.dtype == np.float32
        assert np.abs(value - exact[key]).max() <= tolerance
    spread = max(np.abs(exact[k] - unweighted[k]).max() for k in exact)
    assert spread > 10 * tolerance  # the test tells a num-examples-weighted mean from a plain one
    entry = strategy.rounds[1]
    assert entry.secure_aggregation and set(entry.hospitals) == set(EXAMPLES) and not entry.dropped
    assert all(row.update_norm is None and row.num_examples == EXAMPLES[n] for n, row in entry.hospitals.items())
    assert all(row.bytes_received >= 8 * sum(v.size for v in _initial().values()) for row in entry.hospitals.values())


def test_with_equal_weights_the_aggregate_is_the_plain_mean() -> None:
    """What a DP run asks for: every hospital weighs 1 (and then max_weight is 1)."""
    aggregate, strategy = _federate(LocalGrid(NODE_CONFIGS, _toy_app()), equal_weights=True, max_weight=1.0)
    plain = _fedavg(EXAMPLES, dict.fromkeys(EXAMPLES, 1.0))
    tolerance = aggregation_tolerance([1, 1, 1], **(QUANTISATION | {"max_weight": 1.0})) + 1e-7
    assert aggregate.keys() == plain.keys()
    assert all(np.abs(v - plain[k]).max() <= tolerance for k, v in aggregate.items())
    assert {n: row.num_examples for n, row in strategy.rounds[1].hospitals.items()} == EXAMPLES  # ledger: true counts


def test_with_dp_hospitals_clip_before_masking_and_the_server_noises_the_secure_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    noise: list[float] = []
    monkeypatch.setattr(dp, "add_gaussian_noise_inplace", lambda arrays, std: noise.append(std))  # see the mean
    options = ServerOptions(hospitals=3, fraction_evaluate=0.0, secagg=True, dp=True, dp_clip=0.01,
                            dp_noise_multiplier=2.0)
    grid = secure_grid(LocalGrid(NODE_CONFIGS, _toy_app(scale=10.0)), options)
    strategy = AdapterFedAvg(hospitals=3, fraction_evaluate=0.0, secure=True)
    private = dp.private_strategy(strategy, options)
    result = private.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in _initial().items()}),
                           num_rounds=1, train_config=ConfigRecord({"total-rounds": 1}))
    updates = {n: {k: 10.0 * _update(n, k, v.shape).astype(np.float64) for k, v in _initial().items()}
               for n in EXAMPLES}
    norms = {n: np.sqrt(sum(np.square(u).sum() for u in ups.values())) for n, ups in updates.items()}
    assert min(norms.values()) > 0.01  # every update is clipped
    clipped_mean = {k: v + sum(updates[n][k] * 0.01 / norms[n] for n in EXAMPLES) / 3 for k, v in _initial().items()}
    tolerance = aggregation_tolerance([1, 1, 1], clipping_range=0.01, quantization_range=2**22, max_weight=1.0) + 1e-7
    assert all(np.abs(a.numpy() - clipped_mean[k]).max() <= tolerance for k, a in result.arrays.items())
    assert noise == [pytest.approx(2.0 * 0.01 / 3)]  # σ·C/m on the securely summed, equal-weight mean
    assert private.released[1].epsilon > 0 and strategy.rounds[1].secure_aggregation


def _leaks(received: bytes) -> list[str]:
    """The hospitals' adapters or updates (32 bytes of float32 each: no accidental match) found in `received`."""
    found = []
    for name in EXAMPLES:
        for key, value in _initial().items():
            update = _update(name, key, value.shape)
            for what, leaked in (("update", update), ("adapter", value + update)):
                if leaked.reshape(-1)[:8].tobytes() in received:
                    found.append(f"{name}'s {what} {key}")
    return found


def test_the_server_receives_no_single_hospitals_adapter_or_update() -> None:
    grid = LocalGrid(NODE_CONFIGS, _toy_app())
    _federate(grid)
    received = b"".join(_raw_bytes(m) for m in grid.received)
    assert len(received) > 3 * 8 * sum(v.size for v in _initial().values())  # the masked vectors are in there
    assert _leaks(received) == []

    plain = LocalGrid(NODE_CONFIGS, _toy_app())  # the same scan finds every adapter when the replies travel in the clear
    AdapterFedAvg(hospitals=3, fraction_evaluate=0.0).start(
        grid=plain, initial_arrays=ArrayRecord({k: Array(v) for k, v in _initial().items()}), num_rounds=1,
        train_config=ConfigRecord({"total-rounds": 1}),
    )
    found = _leaks(b"".join(_raw_bytes(m) for m in plain.received))
    assert {f"{name}'s adapter {key}" for name in EXAMPLES for key in _initial()} <= set(found)


def test_a_hospital_with_a_nan_update_drops_out_and_the_others_are_still_summed() -> None:
    aggregate, strategy = _federate(LocalGrid(NODE_CONFIGS, _toy_app(poisoned="gamma")))
    entry = strategy.rounds[1]
    assert set(entry.hospitals) == {"alpha", "beta"} and list(entry.dropped) == ["node 33"]
    assert "NaN" in entry.dropped["node 33"]
    exact = _fedavg(["alpha", "beta"], EXAMPLES)
    tolerance = aggregation_tolerance([4, 6], **QUANTISATION) + 1e-7
    assert all(np.isfinite(v).all() and np.abs(v - exact[k]).max() <= tolerance for k, v in aggregate.items())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aggregator": "median"}, "aggregator must be 'fedavg'"),
        ({"hospitals": 1}, "at least 2 hospitals"),
        ({"secagg_quantization_range": 2**31}, "too large for 3 hospitals"),
    ],
)
def test_secagg_options_refuse_what_cannot_work(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptions(secagg=True, **options)


def test_secagg_options_travel_through_the_run_config() -> None:
    options = ServerOptions(secagg=True, secagg_clipping_range=0.25, secagg_quantization_range=2**20)
    assert ServerOptions.from_run_config(json.loads(json.dumps(options.to_run_config()))) == options


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes when alone; far more on a busy box
def test_secagg_on_loopback_matches_fedavg_of_what_the_hospitals_sent_and_leaks_no_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three ClientApps share this small machine
    flwr_home, port, runs = tmp_path / "flwr-home", deployment.free_port(), tmp_path / "runs"
    options = ServerOptions(
        settings=tiny_settings(rounds=2), hospitals=3, runs_dir=runs, secagg=True,
        secagg_max_weight=QUANTISATION["max_weight"], secagg_clipping_range=QUANTISATION["clipping_range"],
    )
    processes = [deployment.start_superlink(port=port, flwr_home=flwr_home, log=tmp_path / "superlink.log")]
    try:
        deployment.add_connection(flwr_home, "loopback", f"127.0.0.1:{port}")
        for name, count in EXAMPLES.items():
            processes.append(deployment.start_supernode(
                name=f"supernode {name}", superlink=f"127.0.0.1:{port}",
                data_path=make_hospital(tmp_path / "data", name, count), port=deployment.free_port(),
                flwr_home=flwr_home, log=tmp_path / f"{name}.log", outbox=tmp_path / "outbox" / name,
            ))
        config = deployment.write_run_config(tmp_path / "run-config.toml", options.to_run_config())
        run = deployment.submit_run(app_dir=Path(__file__).resolve().parents[1], connection="loopback",
                                    run_config=config, flwr_home=flwr_home, log=tmp_path / "flwr-run.log")
        processes.append(run)
        assert run.wait(2700) == 0, "\n".join(f"--- {p.name} ---\n{p.tail(40)}" for p in processes)
    finally:
        for process in reversed(processes):
            process.stop()
    assert leftovers(flwr_home) == []

    [run_dir] = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    server_log = (tmp_path / "flwr-run.log").read_text()
    assert server_log.count("Secure aggregation completed") == 2 and "clipped" not in server_log
    globals_ = {r: load_file(run_dir / f"round-{r}" / ADAPTER_WEIGHTS) for r in (1, 2)}
    probes: list[bytes] = []
    for r in (1, 2):
        sent, weights = {}, {}
        for name in EXAMPLES:
            path = tmp_path / "outbox" / name / f"round-{r:03d}.safetensors"
            sent[name] = {k: v.double().numpy() for k, v in load_file(path).items()}
            with safe_open(path, "pt") as handle:
                weights[name] = int(handle.metadata()["num-examples"])
        assert weights == EXAMPLES
        tolerance = aggregation_tolerance(list(EXAMPLES.values()), **QUANTISATION) + 1e-7  # + float32 rounding
        total = sum(EXAMPLES.values())
        spread = 0.0
        for key, value in globals_[r].items():
            fedavg = sum(sent[n][key] * EXAMPLES[n] / total for n in EXAMPLES)
            assert np.abs(value.double().numpy() - fedavg).max() <= tolerance, (r, key)
            spread = max(spread, np.abs(fedavg - sum(sent[n][key] for n in EXAMPLES) / 3).max())
        assert spread > 10 * tolerance  # a plain mean would fail the check above
        metrics = json.loads((run_dir / f"round-{r}" / METRICS).read_text())
        assert metrics["secure_aggregation"] and set(metrics["hospitals"]) == set(EXAMPLES) and not metrics["dropped"]
        for row in metrics["hospitals"].values():
            assert row["update_norm"] is None and row["heldout_loss"] > 0
            assert row["bytes_received"] >= 8 * sum(v.numel() for v in globals_[r].values())  # int64 masked values
        for name in EXAMPLES:  # 32-byte probes of each hospital's adapter and update (lora_B starts at 0)
            for key in [k for k in sorted(sent[name]) if "lora_B" in k][::40]:
                adapter = sent[name][key].astype(np.float32).reshape(-1)
                before = globals_[r - 1][key].numpy().reshape(-1) if r > 1 else np.zeros_like(adapter)
                middle = slice(adapter.size // 2, adapter.size // 2 + 8)
                probes += [adapter[middle].tobytes(), (adapter - before)[middle].tobytes()]
    outboxes = b"".join(p.read_bytes() for p in (tmp_path / "outbox").rglob("*.safetensors"))
    assert all(probe in outboxes for probe in probes[::2])  # the scan does find an adapter where it is
    server_files = [tmp_path / "superlink.log", tmp_path / "flwr-run.log", *flwr_home.rglob("*"), *run_dir.rglob("*")]
    for path in (p for p in server_files if p.is_file()):
        data = path.read_bytes()
        assert not [i for i, probe in enumerate(probes) if probe in data], f"a hospital's update is in {path}"
