"""Centralized (pooled data) and local-only baselines, trained with the federated clients' own loop.

Same budget: in a federated run of R rounds hospital h runs L_h optimizer steps of `batch_size` dialogues
per round (`RunSettings.steps_per_round`: `epochs` passes over its own data, or a fixed `local_steps`), so
R·Σ L_h steps in all.
- centralized gets the same compute: R·Σ L_h steps on the pooled training sets, checkpointed every Σ L_h;
- local-only gets what the hospital spends inside the federation: R·L_h steps on its own data,
  checkpointed every L_h steps.
Either way there are R checkpoints, and checkpoint N has seen as many dialogues as federated round N (per
hospital for local-only), with the cosine schedule spanning the whole run. As in a federated round, each
checkpoint's chunk starts a fresh optimizer. Every checkpoint records held-out loss on each hospital's
held-out sample (`RunSettings.heldout_sample`, the dialogues the federated hospitals score each round),
so that convergence can be read off the run (`loss.png`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from federimed.checkpoints import RunDir, new_run, resume_state, save_round
from federimed.config import RunSettings
from federimed.memory import peak_rss_mb
from federimed.model import add_lora, load_adapter_state, load_base
from federimed.training import Example, encode_dialogues, evaluate_loss, load_dialogues, train_local

log = logging.getLogger(__name__)


def budget_steps(settings: RunSettings, train_sizes: Mapping[str, int], mode: str) -> int:
    """Total optimizer steps a baseline trained on the hospitals of `train_sizes` (name → training
    dialogues) gets to match what they spend in a federated run: their steps summed for centralized,
    the one hospital's for local-only."""
    if mode not in ("centralized", "local-only"):
        raise ValueError(f"no step budget for mode {mode!r}")
    if mode == "local-only" and len(train_sizes) != 1:
        raise ValueError(f"a local-only run trains on one hospital, not {len(train_sizes)}")
    return settings.rounds * sum(settings.steps_per_round(n) for n in train_sizes.values())


def hospital_names(data_dir: Path) -> list[str]:
    """Hospitals under `data_dir`: sub-directories holding a train.jsonl."""
    names = sorted(p.name for p in Path(data_dir).iterdir() if (p / "train.jsonl").is_file())
    if not names:
        raise FileNotFoundError(f"no hospital with a train.jsonl under {data_dir}")
    return names


def load_split(data_dir: Path, hospital: str, split: str) -> list[dict]:
    """The dialogues of `DATA/<hospital>/<split>.jsonl` (split: train or heldout)."""
    path = Path(data_dir) / hospital / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"hospital {hospital!r} has no {split} set: {path} is missing")
    return load_dialogues(path)


def train_centralized(
    data_dir: Path,
    hospitals: Sequence[str] | None,
    settings: RunSettings,
    runs_dir: Path,
    total_steps: int | None = None,
    *,
    progress: bool = False,
    resume: RunDir | None = None,
) -> RunDir:
    """Train one adapter on the pooled training sets of `hospitals` (default: all under `data_dir`), or
    continue the interrupted run `resume` (`_run`)."""
    hospitals = list(hospitals or hospital_names(data_dir))
    return _run(data_dir, hospitals, hospitals, "centralized", settings, runs_dir, total_steps, progress, resume)


def train_local_only(
    data_dir: Path,
    hospital: str,
    settings: RunSettings,
    runs_dir: Path,
    total_steps: int | None = None,
    *,
    eval_hospitals: Sequence[str] | None = None,
    progress: bool = False,
    resume: RunDir | None = None,
) -> RunDir:
    """Train an adapter on one hospital's data alone; score it on every hospital's held-out set by default.
    `resume`: an interrupted run of the same training to continue (`_run`)."""
    evaluated = list(eval_hospitals or hospital_names(data_dir))
    return _run(data_dir, [hospital], evaluated, "local-only", settings, runs_dir, total_steps, progress, resume)


def _run(
    data_dir: Path,
    train_on: list[str],
    evaluate_on: list[str],
    mode: str,
    settings: RunSettings,
    runs_dir: Path,
    total_steps: int | None,
    progress: bool,
    resume: RunDir | None,
) -> RunDir:
    """Train and checkpoint each round. `resume`, an interrupted run of the same training
    (`federimed.checkpoints.unfinished_run`), continues from its last saved round: sampling is seeded by
    step and every round starts a fresh optimizer, so it ends as the run that was not interrupted."""
    train_dialogues = {h: load_split(data_dir, h, "train") for h in train_on}
    heldout_dialogues = {h: load_split(data_dir, h, "heldout") for h in evaluate_on}
    model, tokenizer = load_base(settings.model)
    model = add_lora(model, settings.lora, seed=settings.train.seed)
    seq_len = settings.train.seq_len
    train = {h: encode_dialogues(tokenizer, d, seq_len) for h, d in train_dialogues.items()}
    for hospital, examples in train.items():
        if not examples:
            raise ValueError(f"hospital {hospital!r} has no usable training dialogues in {Path(data_dir) / hospital}")
    heldout = {h: settings.heldout_sample(encode_dialogues(tokenizer, d, seq_len)) for h, d in heldout_dialogues.items()}
    pooled = [e for examples in train.values() for e in examples]
    sizes = {h: len(e) for h, e in train.items()}
    total_steps = total_steps or budget_steps(settings, sizes, mode)
    if total_steps % settings.rounds:
        raise ValueError(f"total_steps={total_steps} must split evenly into rounds={settings.rounds} checkpoints")
    chunk = total_steps // settings.rounds
    run, done = resume, 0
    if run is not None:
        done, state = resume_state(run.path)
        load_adapter_state(model, state)
        log.info("%s run %s: continuing after round %d of %d", mode, run.id, done, settings.rounds)
    else:
        run = new_run(runs_dir, settings, mode, sizes)
        log.info("%s run %s: %d steps over %d dialogues, %d checkpoints", mode, run.id, total_steps, len(pooled), settings.rounds)
    for round_num in range(done + 1, settings.rounds + 1):
        result = train_local(
            model, tokenizer, pooled, settings.train,
            steps=chunk, start_step=(round_num - 1) * chunk, total_steps=total_steps, progress=progress,
        )
        metrics = {
            "steps": round_num * chunk,
            "train_loss": result.loss,
            "examples_seen": result.examples_seen,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
            "peak_rss_mb": peak_rss_mb(),
        } | _heldout_metrics(model, heldout, settings)
        save_round(run, round_num, model, metrics)
        log.info("%s round %d: train loss %.3f, held-out %s", mode, round_num, result.loss, metrics.get("heldout_loss"))
    return run


def _heldout_metrics(model, heldout: Mapping[str, list[Example]], settings: RunSettings) -> dict:
    """Held-out loss per hospital and pooled over all their answer tokens (None where a set is empty)."""
    hospitals, total, tokens = {}, 0.0, 0
    for hospital, examples in heldout.items():
        if not examples:
            log.warning("hospital %r has an empty held-out set; no held-out loss for it", hospital)
            hospitals[hospital] = {"heldout_loss": None, "heldout_tokens": 0}
            continue
        loss, n = evaluate_loss(
            model, examples, settings.eval_batch_size, settings.train.precision, settings.train.padding
        )
        hospitals[hospital] = {"heldout_loss": loss, "heldout_tokens": n}
        total, tokens = total + loss * n, tokens + n
    return {"heldout_loss": total / tokens if tokens else None, "heldout_tokens": tokens, "hospitals": hospitals}
