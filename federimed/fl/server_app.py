"""The coordinating side (Flower ServerApp): FedAvg of LoRA adapters, a checkpoint per round, resume.

`app` reads its options from the Flower run config (`flwr run . --run-config ...`, keys in
`federimed.fl.settings`). Each round: every connected hospital trains from the global adapter, the replies are
averaged (weighted by num-examples), the hospitals score the new adapter on their held-out dialogues,
and `runs/<run>/round-N/` is saved (adapter + metrics.json with the per-hospital ledger and drop-outs).
Adapters travel packed into one array each way (`federimed.fl.transport`).
With `secagg`, the training replies are summed by SecAgg+ (`federimed.fl.secagg`): the server never
sees a single hospital's update, only the weighted sum. With `dp`, Flower's DP wrapper (`federimed.fl.dp`)
noises the mean of the clipped updates and each round's metrics.json records ε at δ.
With run config `task = "cohort"` it trains nothing: it gathers the hospitals' cohort counts
(`federimed.fl.cohort_stats`: summed, through SecAgg+ with `secagg`, DP-noised with `cohort-epsilon`,
small cells suppressed) into `runs/cohort-<stamp>/cohort.json`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from federimed.checkpoints import RunDir, new_run, plot_losses, resume_state, round_metrics, save_round
from federimed.config import RunSettings
from federimed.fl.client_app import PROXIMAL_MU_KEY, SETTINGS_KEY
from federimed.fl.cohort_stats import gather
from federimed.fl.dp import private_strategy
from federimed.fl.secagg import secure_grid
from federimed.fl.settings import ServerOptions
from federimed.fl.strategy import AdapterFedAvg, RoundLog
from federimed.fl.transport import PackedGrid
from federimed.model import adapter_state, add_lora, load_base

log = logging.getLogger("flwr").getChild("federimed")  # shown and streamed with Flower's own logs


def initial_adapter(settings: RunSettings) -> dict:
    """The fresh adapter every run starts from (seeded by `settings.train.seed`)."""
    base, _ = load_base(settings.model)
    return adapter_state(add_lora(base, settings.lora, seed=settings.train.seed))


def _start(options: ServerOptions) -> tuple[RunSettings, RunDir | None, int, dict]:
    """Settings, the run to continue (None for a new one), the first round and the adapter it starts from."""
    if not options.resume_run:
        return options.settings, None, 1, initial_adapter(options.settings)
    run = RunDir(options.runs_dir / options.resume_run)
    if not (run.path / "run.json").is_file():
        raise FileNotFoundError(f"cannot resume run {options.resume_run!r}: {run.path / 'run.json'} not found")
    if changed := options.resume_mismatch(run.info().get("recipe")):
        raise ValueError(f"cannot resume run {run.id} with another recipe ({changed}): resume with its own options")
    settings = run.settings().model_copy(update={"rounds": options.settings.rounds})
    saved = resume_state(run.path)
    if saved is None:
        return settings, run, 1, initial_adapter(settings)
    done, state = saved
    log.info("resuming run %s after round %d of %d", run.id, done, settings.rounds)
    return settings, run, done + 1, state


def round_config(options: ServerOptions) -> ConfigRecord:
    """What every hospital receives with each round's adapter: the run's settings, its length and FedProx's μ."""
    settings = options.settings
    return ConfigRecord({
        SETTINGS_KEY: settings.model_dump_json(), "total-rounds": settings.rounds, PROXIMAL_MU_KEY: options.proximal_mu
    })


def federate(grid: Grid, options: ServerOptions) -> Path | None:
    """Run the federation to `settings.rounds`; return the run directory (None if no round completed)."""
    settings, run, first, state = _start(options)
    remaining = settings.rounds - first + 1
    if remaining < 1:
        log.info("run %s already has all %d rounds", run.id if run else "?", settings.rounds)
        return run.path if run else None
    strategy = AdapterFedAvg(
        hospitals=options.hospitals,
        min_hospitals=max(options.min_hospitals, 2) if options.secagg else options.min_hospitals,
        fraction_evaluate=options.fraction_evaluate,
        first_round=first,
        max_update_norm=0.0 if options.secagg else options.max_update_norm,  # SecAgg+: hospitals check it
        aggregator=options.aggregator,
        trim_fraction=options.trim_fraction,
        server_lr=options.server_lr,
        server_momentum=options.server_momentum,
        secure=options.secagg,
    )
    if options.secagg:
        grid = secure_grid(grid, options)
    private = private_strategy(strategy, options, round_metrics(run.path) if run else [], run.id if run else "")
    train_config = round_config(options)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal run
        if server_round == 0:
            return None
        entry = strategy.rounds[strategy.run_round(server_round)]
        if not entry.hospitals or all(h.train_loss is None for h in entry.hospitals.values()):
            log.warning("round %d: nothing to checkpoint (no hospital trained)", entry.round)
            return None
        if run is None:
            counts = {name: h.num_examples for name, h in entry.hospitals.items() if h.train_loss is not None}
            run = new_run(options.runs_dir, settings, "federated", counts, options.recipe())
        metrics = entry.to_json() | (private.released[entry.round].to_json() if private else {})
        path = save_round(run, entry.round, arrays.to_torch_state_dict(), metrics)
        _log_round(entry, settings.rounds, path)
        return None

    (private or strategy).start(
        grid=grid,
        initial_arrays=ArrayRecord(state),
        num_rounds=remaining,
        timeout=options.round_timeout,
        train_config=train_config,
        evaluate_config=ConfigRecord({SETTINGS_KEY: settings.model_dump_json()}),
        evaluate_fn=checkpoint,
    )
    if run is None:
        return None
    plot_losses(run.path)
    return run.path


def _log_round(entry: RoundLog, total: int, path: Path) -> None:
    log.info(
        "round %d/%d: train loss %s, held-out loss %s, %.0f s → %s",
        entry.round, total, _fmt(entry.train_loss), _fmt(entry.heldout_loss), entry.seconds, path,
    )
    for name, row in sorted(entry.hospitals.items()):
        log.info(
            "  %s: train loss %s, held-out %s, %d examples, sent %.2f MB, received %.2f MB, update norm %s",
            name, _fmt(row.train_loss), _fmt(row.heldout_loss), row.num_examples,
            row.bytes_sent / 1e6, row.bytes_received / 1e6, _fmt(row.update_norm),
        )
    for name, reason in entry.dropped.items():
        log.warning("  hospital %s dropped in round %d: %s", name, entry.round, reason)
    for name, reason in entry.rejected.items():
        log.warning("  hospital %s's update rejected in round %d: %s", name, entry.round, reason)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation with the options in the run config (adapters packed for transport), or
    gather cohort statistics when the run config's task is "cohort"."""
    options = ServerOptions.from_run_config(context.run_config)
    if options.task == "cohort":
        gather(grid, options)
    else:
        federate(PackedGrid(grid), options)
