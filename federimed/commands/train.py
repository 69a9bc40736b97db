"""Training commands: `train` (federated simulation or a baseline), `server` and `hospital join` (deployment)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from federimed.commands import fail
from federimed.config import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_ROUNDS, HELDOUT_MAX_DIALOGUES
from federimed.progress import ProgressLines

console = Console()
hospital_app = typer.Typer(help="Hospital side of a Flower deployment.", no_args_is_help=True)

Rounds = Annotated[int, typer.Option(min=1, help="Federated rounds (baselines save as many checkpoints).")]
Epochs = Annotated[float, typer.Option(
    min=0.0, help="Passes over each hospital's training data in the whole run, spread over the rounds (baselines: "
    "the same gradient work). See README 'How long to train'.")]
LocalSteps = Annotated[int | None, typer.Option(
    min=1, help="A fixed number of optimizer steps per hospital per round, instead of --epochs.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Dialogues per optimizer step.")]
SeqLen = Annotated[int, typer.Option(min=32, help="Longest tokenised dialogue.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate.")]
Seed = Annotated[int, typer.Option(help="Seed for adapter initialisation and sampling.")]
HeldoutMax = Annotated[int, typer.Option(
    min=0, help="Held-out dialogues per hospital that each checkpoint is scored on (0: all).")]
BaseModel = Annotated[str, typer.Option(help="Base model: alias, local path or cached Hugging Face id.")]
RunsDir = Annotated[Path, typer.Option(help="Where runs (checkpoints, metrics, loss.png) are written.", resolve_path=True)]
MaxUpdateNorm = Annotated[float, typer.Option(
    min=0, help="Reject a hospital's update whose L2 distance to the global adapter exceeds this (0: no bound).")]
Aggregator = Annotated[str | None, typer.Option(
    click_type=click.Choice(["fedavg", "fednova", "fedavgm", "trimmed-mean", "median"]),
    help="How updates are combined [default: fednova; fedavg with --dp or --secagg]: fedavg (weighted mean), fednova (the weighted mean of updates divided by "
    "each hospital's local steps: hospitals that run more steps do not outweigh the others), fedavgm (the mean taken as a server SGD step with "
    "momentum), or trimmed-mean / median (coordinate-wise, unweighted, robust to outliers).")]
ServerLr = Annotated[float, typer.Option(min=1e-6, help="With --aggregator fedavgm or fednova: the server's learning rate (fednova: multiplies the τ_eff steps the server takes along the step-normalised mean).")]
ServerMomentum = Annotated[float, typer.Option(
    min=0.0, max=0.999, help="With --aggregator fedavgm: the server's momentum.")]
ProximalMu = Annotated[float, typer.Option(
    min=0.0, help="FedProx: each hospital adds μ/2 ‖w − global‖² to its training loss, keeping its adapter near the "
    "global one on non-IID data (0: none). Combines with any --aggregator.")]
TrimFraction = Annotated[float, typer.Option(
    min=0.01, max=0.49, help="For trimmed-mean: share of hospitals trimmed at each end of every coordinate.")]
Dp = Annotated[bool, typer.Option(
    "--dp/--no-dp", help="Hospital-level differential privacy: each hospital clips its update to --clip, the server "
    "adds Gaussian noise to the mean and reports ε at --delta after every round (docs/privacy-and-security.md).")]
NoiseMultiplier = Annotated[float, typer.Option(
    help="With --dp: noise std on the sum of the updates in units of --clip (σ); more noise, smaller ε, worse model.")]
Clip = Annotated[float, typer.Option(help="With --dp: L2 bound on each hospital's adapter update per round.")]
Delta = Annotated[float, typer.Option(help="With --dp: δ at which ε is reported (keep it well below 1/hospitals).")]
SecAgg = Annotated[bool, typer.Option(
    "--secagg/--no-secagg", help="Secure aggregation (Flower's SecAgg+): hospitals upload masked, quantised updates "
    "and the server learns only their weighted sum; needs 2+ hospitals and fedavg (docs/privacy-and-security.md).")]
SecAggShares = Annotated[float, typer.Option(
    min=0.01, max=1.0, help="With --secagg: share of a round's hospitals each hospital's secrets are split among.")]
SecAggThreshold = Annotated[float, typer.Option(
    min=0.01, max=1.0, help="With --secagg: share of those shares needed to rebuild a secret (at least 2 shares): "
    "higher resists more colluding hospitals, lower tolerates more drop-outs.")]
SecAggMaxWeight = Annotated[float, typer.Option(
    min=1e-9, help="With --secagg: training dialogues that weigh 1 in the quantised sum (set near the largest "
    "hospital's count).")]
SecAggClip = Annotated[float, typer.Option(
    min=1e-9, help="With --secagg: each value of (dialogues / max-weight) × update is clipped to ± this.")]
Precision = Annotated[str, typer.Option(
    help="Matrix products on a CPU: auto (bf16 where the CPU has AMX or AVX512-BF16, else fp32), fp32 or bf16.")]
Checkpointing = Annotated[bool, typer.Option(
    "--checkpointing/--no-checkpointing", help="Low-memory mode: recompute activations in the backward pass. "
    "With --dtype bfloat16 and tcmalloc a hospital peaked at 1.3 GB over a pass at batch 4 instead of 2.9, "
    "training at about 0.7 of the speed (README 'Memory per hospital').")]
MicroBatch = Annotated[int, typer.Option(
    min=0, help="Dialogues per forward and backward pass: each step accumulates its batch in passes of this many, "
    "the same gradient with a fraction of the activation memory (0: the whole batch at once; README 'Memory "
    "per hospital').")]
Dtype = Annotated[str, typer.Option(
    help="Dtype the frozen base weights are held in: auto (bfloat16 on CUDA, else float32), float32 or bfloat16 "
    "(half the weight memory; the adapter stays float32).")]
SecAggLevels = Annotated[int, typer.Option(
    min=2, help="With --secagg: quantisation levels over the clipping range (times hospitals must stay < 2^32).")]


def _settings(
    rounds: int, epochs: float, local_steps: int | None, batch_size: int, seq_len: int, lr: float, seed: int,
    base_model: str, heldout_max: int = HELDOUT_MAX_DIALOGUES, precision: str = "auto", checkpointing: bool = False,
    dtype: str = "auto", micro_batch_size: int = 0,
):
    from pydantic import ValidationError

    from federimed.config import ModelSettings, RunSettings, TrainSettings

    try:
        return RunSettings(
            rounds=rounds,
            model=ModelSettings(base=base_model, dtype=dtype),
            train=TrainSettings(epochs=0 if local_steps else epochs, local_steps=local_steps or 1,
                                batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, precision=precision,
                                checkpointing=checkpointing, micro_batch_size=micro_batch_size),
            heldout_max_dialogues=heldout_max,
        )
    except ValidationError as err:
        console.print(f"[red]error:[/] invalid training settings: {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _resume_target(runs_dir: Path, run_id: str | None) -> str:
    """The run to continue: `run_id`, else the run runs/latest points into."""
    from federimed.checkpoints import CheckpointError, resolve_checkpoint

    if run_id:
        if not (runs_dir / run_id / "run.json").is_file():
            raise fail(f"cannot resume run {run_id!r}: {runs_dir / run_id / 'run.json'} not found")
        return run_id
    try:
        return resolve_checkpoint("latest", runs_dir).parent.name
    except CheckpointError as err:
        raise fail(f"nothing to resume: {err}") from None


def _round_table(metrics: dict) -> Table:
    """A rich table of one round's metrics.json (per hospital; drop-outs and rejected updates in red)."""
    title = f"round {metrics['round']}: train loss {_f(metrics['train_loss'])}, held-out {_f(metrics['heldout_loss'])}"
    if "epsilon" in metrics:
        title += f", DP ε {metrics['epsilon']:.2f} at δ {metrics['delta']:g}"
    table = Table(title=title)
    for column in ("hospital", "train loss", "held-out loss", "examples", "steps", "sent MB", "received MB", "train s",
                   "peak MB"):
        table.add_column(column, justify="left" if column == "hospital" else "right")
    for name, row in sorted(metrics["hospitals"].items()):
        table.add_row(
            name, _f(row["train_loss"]), _f(row["heldout_loss"]), str(row["num_examples"]), str(row["steps"]),
            f"{row['bytes_sent'] / 1e6:.2f}", f"{row['bytes_received'] / 1e6:.2f}", f"{row['seconds']:.0f}",
            f"{row['peak_rss_mb']:.0f}",
        )
    for name, reason in metrics["dropped"].items():
        table.add_row(f"[red]{name}[/]", f"[red]dropped: {reason}[/]", *[""] * 7)
    for name, reason in metrics.get("rejected", {}).items():
        table.add_row(f"[red]{name}[/]", f"[red]update rejected: {reason}[/]", *[""] * 7)
    return table


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _server_options(aggregator: str | None, **fields):
    """ServerOptions (the aggregator's default where `aggregator` is None), or a clear error when the options
    contradict each other (e.g. --dp with a median) or the recipe of the run they resume."""
    from pydantic import ValidationError

    from federimed.checkpoints import RunDir
    from federimed.fl.settings import ServerOptions

    try:
        options = ServerOptions(**fields, **({"aggregator": aggregator} if aggregator else {}))
    except ValidationError as err:
        problems = [(f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"] for e in err.errors()]
        raise fail("invalid federation options: " + "; ".join(problems)) from None
    if options.resume_run:
        recorded = RunDir(options.runs_dir / options.resume_run).info().get("recipe")
        if changed := options.resume_mismatch(recorded):
            raise fail(f"run {options.resume_run} was trained with another recipe ({changed}): resume it with the "
                       "options it started with")
    return options


def federate_with_progress(hospitals: list[Path], options) -> Path:
    """Run the federation on loopback (SuperLink + one SuperNode per hospital), one table per round, and the
    time left: on the bar in a terminal (from the second round on), as a line after each round in a log file
    (the first estimate counts the federation's start-up too)."""
    from federimed.checkpoints import latest_round
    from federimed.fl.deployment import FlowerProcessError, federate_on_loopback

    resumed = options.resume_run and latest_round(Path(options.runs_dir) / options.resume_run)
    done = resumed[0] if resumed else 0
    lines = None if console.is_terminal else ProgressLines("federated round", start=done, every=0)
    with Progress(
        TextColumn("[bold]federated[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        speed_estimate_period=24 * 3600,  # rounds take minutes: keep every round in the estimate
    ) as progress:
        task = progress.add_task(f"{len(hospitals)} hospitals", total=options.settings.rounds, completed=done)

        def show(metrics: dict) -> None:
            progress.console.print(_round_table(metrics))
            progress.update(task, completed=metrics["round"], description=f"round {metrics['round']} saved")
            if lines is not None:
                lines(metrics["round"], options.settings.rounds)

        signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops the SuperLink and SuperNodes too
        try:
            return federate_on_loopback(hospitals, options, _app_dir(), show)
        except FlowerProcessError as err:
            raise fail(str(err)) from None


def train(
    data: Annotated[Path, typer.Option(help="Ingested data directory (one sub-directory per hospital).", resolve_path=True)] = Path(
        "data/hospitals"
    ),
    runs_dir: RunsDir = Path("runs"),
    hospitals: Annotated[
        str | None, typer.Option(help="Comma-separated hospitals (default: all under --data).")
    ] = None,
    mode: Annotated[str, typer.Option(help="federated | centralized (pooled data) | local (one hospital alone).")] = (
        "federated"
    ),
    hospital: Annotated[str | None, typer.Option(help="The hospital for --mode local.")] = None,
    rounds: Rounds = DEFAULT_ROUNDS,
    epochs: Epochs = DEFAULT_EPOCHS,
    local_steps: LocalSteps = None,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    seq_len: SeqLen = 256,
    lr: Lr = 1e-3,
    seed: Seed = 0,
    base_model: BaseModel = "smollm2-135m-instruct",
    heldout_max: HeldoutMax = HELDOUT_MAX_DIALOGUES,
    precision: Precision = "auto",
    checkpointing: Checkpointing = False,
    micro_batch_size: MicroBatch = 0,
    dtype: Dtype = "auto",
    run_id: Annotated[str | None, typer.Option(help="With --resume: the run to continue (default: latest).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a federated run from its last checkpoint.")] = False,
    continue_unfinished: Annotated[bool, typer.Option(
        help="If the newest run under --runs-dir of this mode and these hospitals stopped part-way, with the same "
        "settings and recipe, on data not written since, continue it from its last saved round; else start a new run. "
        "For scripts that may be interrupted: the rounds left run with the seeds and schedule of an uninterrupted run "
        "(a baseline ends with the same adapter; fedavgm, whose momentum is not saved, starts anew)."
    )] = False,
    max_update_norm: MaxUpdateNorm = 0.0,
    aggregator: Aggregator = None,
    trim_fraction: TrimFraction = 0.34,
    proximal_mu: ProximalMu = 0.0,
    server_lr: ServerLr = 1.0,
    server_momentum: ServerMomentum = 0.9,
    dp: Dp = False,
    noise_multiplier: NoiseMultiplier = 1.0,
    clip: Clip = 1.0,
    delta: Delta = 1e-5,
    secagg: SecAgg = False,
    secagg_num_shares: SecAggShares = 1.0,
    secagg_reconstruction_threshold: SecAggThreshold = 0.67,
    secagg_max_weight: SecAggMaxWeight = 1000.0,
    secagg_clipping_range: SecAggClip = 1.0,
    secagg_quantization_range: SecAggLevels = 2**22,
) -> None:
    """Fine-tune the LoRA adapter: federated (Flower, one SuperNode per hospital on loopback) or a baseline.

    Federated starts a local SuperLink and one SuperNode per hospital, each training on its own directory;
    only adapter weights travel. Every round is checkpointed into RUNS_DIR/<run>/round-N, plotted into loss.png.
    """
    from federimed.fl.hospitals import HospitalDataError, ingested_hospitals

    if mode not in ("federated", "centralized", "local"):
        raise fail(f"--mode must be federated, centralized or local, not {mode!r}")
    if run_id and not resume:
        raise fail("--run-id names the run to continue with --resume; new runs are named by their start time")
    if dp and mode != "federated":
        raise fail("--dp applies to federated training (--mode federated)")
    if secagg and mode != "federated":
        raise fail("--secagg applies to federated training (--mode federated)")
    names = [n.strip() for n in hospitals.split(",") if n.strip()] if hospitals else None
    try:
        found = ingested_hospitals(data, names)
    except HospitalDataError as err:
        raise fail(str(err)) from None
    settings = _settings(rounds, epochs, local_steps, batch_size, seq_len, lr, seed, base_model, heldout_max, precision,
                         checkpointing, dtype, micro_batch_size)
    if resume and continue_unfinished:
        raise fail("--resume continues a named or the latest run; --continue-unfinished finds one itself: use one")
    if mode != "federated":
        unfinished = _unfinished(runs_dir, found, mode, hospital, settings) if continue_unfinished else None
        run_path = _baseline(data, found, mode, hospital, settings, runs_dir, resume, unfinished)
    else:
        options = _server_options(
            aggregator, settings=settings, hospitals=len(found), min_hospitals=1, runs_dir=runs_dir.resolve(),
            resume_run=_resume_target(runs_dir, run_id) if resume else "",
            max_update_norm=max_update_norm, trim_fraction=trim_fraction,
            proximal_mu=proximal_mu, server_lr=server_lr, server_momentum=server_momentum,
            dp=dp, dp_noise_multiplier=noise_multiplier, dp_clip=clip, dp_delta=delta,
            secagg=secagg, secagg_num_shares=secagg_num_shares,
            secagg_reconstruction_threshold=secagg_reconstruction_threshold,
            secagg_max_weight=secagg_max_weight, secagg_clipping_range=secagg_clipping_range,
            secagg_quantization_range=secagg_quantization_range,
        )
        if continue_unfinished and options.aggregator != "fedavgm" and (
                run := _unfinished(runs_dir, found, mode, None, settings, options.recipe())):
            options = options.model_copy(update={"resume_run": run.id})
        run_path = federate_with_progress(found, options)
    console.print(f"[green]done:[/] {run_path} (loss plot: {run_path / 'loss.png'})")


def _unfinished(runs_dir: Path, found: list[Path], mode: str, hospital: str | None, settings, recipe=None):
    """The run that an interrupted `train` of this mode, these hospitals and settings left part-way (None:
    there is none, start a new one), announced. Its data must not have changed since it started: the
    training sets it trains on and the held-out sets it is scored on."""
    from federimed.checkpoints import latest_round, unfinished_run

    trained_on = [h for h in found if mode != "local" or h.name == hospital]
    data = [h / "train.jsonl" for h in trained_on] + [h / "heldout.jsonl" for h in found]
    run = unfinished_run(runs_dir, "local-only" if mode == "local" else mode, [h.name for h in trained_on], settings,
                         data, recipe)
    if run is not None:
        console.print(f"continuing the unfinished run {run.id} after round {latest_round(run.path)[0]} of "
                      f"{settings.rounds}")
    return run


def _baseline(
    data: Path, found: list[Path], mode: str, hospital: str | None, settings, runs_dir: Path, resume: bool,
    unfinished,
):
    from federimed.baselines import train_centralized, train_local_only
    from federimed.checkpoints import plot_losses

    if resume:
        raise fail("--resume continues federated runs only (baselines: --continue-unfinished)")
    names = [h.name for h in found]
    if mode == "local":
        if hospital is None or hospital not in names:
            raise fail(f"--mode local needs --hospital, one of: {', '.join(names)}")
        run = train_local_only(data, hospital, settings, runs_dir, eval_hospitals=names, progress=True,
                               resume=unfinished)
    else:
        run = train_centralized(data, names, settings, runs_dir, progress=True, resume=unfinished)
    plot_losses(run.path)
    return run.path


def _app_dir() -> Path:
    """The project directory holding the Flower app's pyproject.toml (what `flwr run` packages)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise fail(f"the Flower app needs FederiMed's source tree; no pyproject.toml in {root}")
    return root


def server(
    hospitals: Annotated[int, typer.Option(min=1, help="Hospitals that must join before round 1 starts.")] = 3,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink port (Fleet, Control and Runtime APIs).")] = 9091,
    runs_dir: RunsDir = Path("runs"),
    rounds: Rounds = DEFAULT_ROUNDS,
    epochs: Epochs = DEFAULT_EPOCHS,
    local_steps: LocalSteps = None,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    seq_len: SeqLen = 256,
    lr: Lr = 1e-3,
    seed: Seed = 0,
    base_model: BaseModel = "smollm2-135m-instruct",
    min_hospitals: Annotated[int, typer.Option(min=1, help="Fewest hospitals a round needs after round 1.")] = 1,
    resume: Annotated[str | None, typer.Option(help="Run id to continue from its last checkpoint.")] = None,
    tls: Annotated[Path | None, typer.Option(
        help="Serve over TLS with ca.crt, server.crt and server.key from this directory (`federimed certs`).", resolve_path=True)] = None,
    auth: Annotated[Path | None, typer.Option(
        help="Admit only hospitals whose public key (*.pub in this directory, from `federimed hospital keygen`) "
        "is registered; needs --tls.", resolve_path=True)] = None,
    max_update_norm: MaxUpdateNorm = 0.0,
    aggregator: Aggregator = None,
    trim_fraction: TrimFraction = 0.34,
    proximal_mu: ProximalMu = 0.0,
    server_lr: ServerLr = 1.0,
    server_momentum: ServerMomentum = 0.9,
    dp: Dp = False,
    noise_multiplier: NoiseMultiplier = 1.0,
    clip: Clip = 1.0,
    delta: Delta = 1e-5,
    secagg: SecAgg = False,
    secagg_num_shares: SecAggShares = 1.0,
    secagg_reconstruction_threshold: SecAggThreshold = 0.67,
    secagg_max_weight: SecAggMaxWeight = 1000.0,
    secagg_clipping_range: SecAggClip = 1.0,
    secagg_quantization_range: SecAggLevels = 2**22,
    cohort: Annotated[bool, typer.Option("--cohort", help="Gather cohort statistics (counts only) instead of "
                                         "training: writes RUNS_DIR/cohort-<stamp>/cohort.json.")] = False,
    min_cell: Annotated[int, typer.Option(min=1, help="--cohort: suppress counts under this many patients.")] = 11,
    cohort_epsilon: Annotated[float, typer.Option(min=0, help="--cohort: patient-level DP ε (0: none).")] = 0.0,
) -> None:
    """Start a Flower SuperLink and run the federation on it; hospitals join with `federimed hospital join`.

    The server never sees hospital data: it sends the global adapter and training settings, and averages
    the adapters that come back (with --cohort it asks for cohort counts instead, summed under SecAgg+
    with --secagg). Stops the SuperLink (and its children) when the run ends. With --tls and --auth,
    hospitals connect over TLS and only registered hospital keys are admitted.
    """
    from federimed.fl import deployment
    from federimed.security.certs import KeyFileError, server_tls

    settings = _settings(rounds, epochs, local_steps, batch_size, seq_len, lr, seed, base_model)
    if resume and not (runs_dir / resume / "run.json").is_file():
        raise fail(f"cannot resume run {resume!r}: {runs_dir / resume / 'run.json'} not found")
    if min_hospitals > hospitals:
        raise fail(f"--min-hospitals ({min_hospitals}) cannot exceed --hospitals ({hospitals})")
    if auth is not None and tls is None:
        raise fail("--auth needs --tls: Flower authenticates SuperNodes only over TLS")
    try:
        tls_files = server_tls(tls) if tls is not None else None
    except KeyFileError as err:
        raise fail(str(err)) from None
    site_keys = sorted(auth.glob("*.pub")) if auth is not None else []
    if auth is not None and not site_keys:
        raise fail(f"--auth {auth}: no hospital public key (*.pub) found there")
    options = _server_options(
        aggregator, settings=settings, hospitals=hospitals, min_hospitals=min_hospitals, runs_dir=runs_dir.resolve(),
        resume_run=resume or "", max_update_norm=max_update_norm, trim_fraction=trim_fraction,
        proximal_mu=proximal_mu, server_lr=server_lr, server_momentum=server_momentum,
        dp=dp, dp_noise_multiplier=noise_multiplier, dp_clip=clip, dp_delta=delta,
        secagg=secagg, secagg_num_shares=secagg_num_shares,
        secagg_reconstruction_threshold=secagg_reconstruction_threshold,
        secagg_max_weight=secagg_max_weight, secagg_clipping_range=secagg_clipping_range,
        secagg_quantization_range=secagg_quantization_range,
        task="cohort" if cohort else "train", min_cell=min_cell, cohort_epsilon=cohort_epsilon,
    )
    flwr_home = runs_dir.resolve() / ".flower"
    run_config = deployment.write_run_config(flwr_home / "run-config.toml", options.to_run_config())
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops the SuperLink and the run too
    superlink = deployment.start_superlink(
        port=port, host=host, flwr_home=flwr_home, log=flwr_home / "superlink.log", tls=tls_files, auth=bool(site_keys)
    )
    run = None
    try:
        address = f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        deployment.add_connection(
            flwr_home, "federimed", address, root_certificates=tls_files.ca_cert if tls_files else None
        )
        for key in site_keys:
            try:
                node_id = deployment.register_supernode(flwr_home, "federimed", key.resolve(), name=key.stem)
            except deployment.FlowerProcessError as err:
                raise fail(str(err)) from None
            console.print(f"registered hospital key {key} (SuperNode {node_id})")
        secure = (" --ca ca.crt" if tls_files else "") + (" --key keys/<name>" if site_keys else "")
        console.print(f"SuperLink on {host}:{port}{' (TLS)' if tls_files else ''}; waiting for {hospitals} "
                      f"hospital(s) to join, e.g.\n"
                      f"  federimed hospital join --superlink {address} --data data/hospitals/<name>{secure}",
                      soft_wrap=True)
        run = deployment.submit_run(
            app_dir=_app_dir(), connection="federimed", run_config=run_config, flwr_home=flwr_home, log=None
        )
        code = run.wait()
        if code:
            raise fail(f"`flwr run` exited with {code}; SuperLink log: {superlink.log}")
    finally:
        if run is not None:
            run.stop()
        superlink.stop()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the `finally` blocks then stop the Flower processes the command started."""
    raise KeyboardInterrupt


def join(
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    data: Annotated[Path, typer.Option(help="This hospital's ingested directory (data/hospitals/<name>).", resolve_path=True)],
    port: Annotated[int, typer.Option(help="Port for this SuperNode's ClientApp API (0: pick a free one).")] = 0,
    outbox: Annotated[
        Path | None, typer.Option(help="Keep a copy of every adapter this hospital sends (round-N.safetensors).", resolve_path=True)
    ] = None,
    ca: Annotated[Path | None, typer.Option(
        help="The federation's CA certificate (ca.crt): connect over TLS and verify the SuperLink with it.", resolve_path=True)] = None,
    key: Annotated[Path | None, typer.Option(
        help="This hospital's private key (`federimed hospital keygen`) for SuperNode authentication; needs --ca.", resolve_path=True)
    ] = None,
) -> None:
    """Join a federation as a hospital: start a Flower SuperNode that trains on DATA (it never leaves)."""
    from federimed.fl import deployment
    from federimed.fl.hospitals import HospitalDataError, check_hospital
    from federimed.model import cache_root
    from federimed.security.certs import KeyFileError, check_certificate, check_site_key

    try:
        path = check_hospital(data)
    except HospitalDataError as err:
        raise fail(str(err)) from None
    if ":" not in superlink:
        raise fail(f"--superlink must be HOST:PORT, not {superlink!r}")
    if key is not None and ca is None:
        raise fail("--key needs --ca: Flower authenticates SuperNodes only over TLS")
    try:
        root_certificates = check_certificate(ca).resolve() if ca is not None else None
        auth_key = check_site_key(key).resolve() if key is not None else None
    except KeyFileError as err:
        raise fail(str(err)) from None
    flwr_home = cache_root() / "flower" / path.name
    node = deployment.start_supernode(
        name=f"supernode {path.name}", superlink=superlink, data_path=path,
        port=port or deployment.free_port(), flwr_home=flwr_home, log=None, outbox=outbox.resolve() if outbox else None,
        root_certificates=root_certificates, auth_key=auth_key,
    )
    console.print(f"hospital {path.name} joined {superlink}; Ctrl-C to leave")
    try:
        signal.signal(signal.SIGTERM, _interrupt)
        if code := node.wait():
            hint = "; is this hospital's public key registered with the SuperLink?" if auth_key else ""
            raise fail(f"the SuperNode stopped with exit code {code} (see its log above{hint})")
    except KeyboardInterrupt:
        console.print(f"hospital {path.name} leaving")
    finally:
        node.stop()


def register(app: typer.Typer) -> None:
    """Add `train`, `server` and `hospital join` to the root app."""
    app.command()(train)
    app.command()(server)
    hospital_app.command()(join)
    app.add_typer(hospital_app, name="hospital")
