"""Run directories and round checkpoints: `runs/<run-id>/round-<N>/` PEFT adapters + metrics, `runs/latest`.

A checkpoint holds only the adapter weights, aggregate metrics, hospital names and example counts:
never patient data or identifiers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from federimed.config import RunSettings

MODES = ("federated", "centralized", "local-only")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS = "metrics.json"
RUN_FILE = "run.json"
LATEST = "latest"
CARE_MODES = frozenset({"federated"})
"""Run modes whose models doctors are served by default; the rest (local-only, centralized) are
evaluation baselines."""
PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "clip")
"""What a differentially private round's metrics.json records of the privacy spent, copied into run.json."""
_ROUND = re.compile(r"^round-(\d+)$")


class CheckpointError(ValueError):
    """A run or checkpoint could not be found or read."""


@dataclass(frozen=True)
class RunDir:
    """One training run on disk."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def runs_dir(self) -> Path:
        return self.path.parent

    def info(self) -> dict[str, Any]:
        """The contents of run.json."""
        return _read_json(self.path / RUN_FILE)

    def settings(self) -> RunSettings:
        return RunSettings.model_validate(self.info()["settings"])


@dataclass(frozen=True)
class Version:
    """One saved round, as the chat's model-version selector lists it."""

    run_id: str
    round: int
    mode: str
    hospitals: dict[str, int]
    """Hospital name → training examples it holds."""
    examples: int
    path: Path
    created: str
    metrics: dict[str, Any]
    epsilon: float | None = None
    """Hospital-level DP ε spent up to this round (None: trained without differential privacy)."""
    delta: float | None = None

    @property
    def label(self) -> str:
        return f"{self.run_id}/round-{self.round} ({self.mode}; {', '.join(self.hospitals)}; {self.examples} examples)"


def new_run(
    runs_dir: Path, settings: RunSettings, mode: str, hospitals: Mapping[str, int],
    recipe: Mapping[str, Any] | None = None,
) -> RunDir:
    """Create `runs_dir/<timestamp>-<mode>/` with run.json (settings, base model, mode, hospitals → example counts,
    and a federation's recipe: `ServerOptions.recipe`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if not hospitals or any(not isinstance(n, int) or n < 0 for n in hospitals.values()):
        raise ValueError("hospitals must map each hospital name to its number of training examples")
    runs_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    stem, suffix = f"{now:%Y%m%d-%H%M%S}-{mode}", 1
    while True:
        path = runs_dir / (stem if suffix == 1 else f"{stem}-{suffix}")
        try:
            path.mkdir()
            break
        except FileExistsError:
            suffix += 1
    info = {
        "id": path.name,
        "created": now.isoformat(timespec="seconds"),
        "mode": mode,
        "base_model": settings.model.base,
        "hospitals": dict(hospitals),
        "examples": sum(hospitals.values()),
        "rounds_planned": settings.rounds,
        "rounds_completed": 0,
        "settings": settings.model_dump(mode="json"),
    } | ({"recipe": dict(recipe)} if recipe else {})
    _write_json(path / RUN_FILE, info)
    return RunDir(path)


def save_round(
    run: RunDir, round_num: int, model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], metrics: Mapping[str, Any]
) -> Path:
    """Write round-N/ (PEFT adapter + metrics.json) atomically, update run.json and, for a model meant for
    care (`CARE_MODES`: the federated model, not an evaluation baseline), point `latest` at it.

    A differentially private round's `PRIVACY_KEYS` (ε spent so far, δ, σ, clip) also go into run.json."""
    from federimed.model import adapter_state, lora_config  # torch/peft stay out of plain run listing

    if round_num < 1:
        raise ValueError(f"round numbers start at 1, not {round_num}")
    _check_metrics(metrics)
    state = adapter_state(model_or_state) if isinstance(model_or_state, torch.nn.Module) else model_or_state
    info = run.info()
    settings = RunSettings.model_validate(info["settings"])
    final = run.path / f"round-{round_num}"
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{round_num}-", dir=run.path))
    try:
        lora_config(settings.lora, settings.model.base).save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / ADAPTER_WEIGHTS, {"format": "pt"})
        _write_json(tmp / METRICS, {"round": round_num, **metrics})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if round_num >= info["rounds_completed"]:  # run.json keeps the privacy spent up to the latest round
        info.update({key: metrics[key] for key in PRIVACY_KEYS if key in metrics})
    info["rounds_completed"] = max(info["rounds_completed"], round_num)
    _write_json(run.path / RUN_FILE, info)
    if info["mode"] in CARE_MODES:
        point_latest(run.runs_dir, final)
    return final


def latest_round(run_dir: Path) -> tuple[int, Path] | None:
    """The highest complete round of a run, or None before its first."""
    rounds = [
        (int(m.group(1)), p)
        for p in Path(run_dir).iterdir()
        if (m := _ROUND.match(p.name)) and (p / ADAPTER_WEIGHTS).is_file()
    ]
    return max(rounds) if rounds else None


def resume_state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The last saved round of a run and its adapter weights (for a restarted server), or None."""
    found = latest_round(run_dir)
    if found is None:
        return None
    round_num, path = found
    return round_num, load_file(path / ADAPTER_WEIGHTS)


def resolve_checkpoint(spec: str, runs_dir: Path) -> Path:
    """Turn "latest", "RUN", "RUN/round-N" or a path into a round directory holding a PEFT adapter."""
    runs_dir = Path(runs_dir)
    if spec == LATEST:
        path = _read_latest(runs_dir)
        if path is None:
            raise CheckpointError(f"no checkpoint yet in {runs_dir} (nothing saved as {LATEST!r})")
    elif (runs_dir / spec / RUN_FILE).is_file():
        found = latest_round(runs_dir / spec)
        if found is None:
            raise CheckpointError(f"run {spec!r} in {runs_dir} has no completed round yet")
        path = found[1]
    elif (runs_dir / spec / ADAPTER_CONFIG).is_file():
        path = runs_dir / spec
    elif (Path(spec).expanduser() / ADAPTER_CONFIG).is_file():
        path = Path(spec).expanduser()
    else:
        runs = ", ".join(run.id for run in _runs(runs_dir)) or "none"
        raise CheckpointError(
            f"checkpoint {spec!r} not found: use 'latest', RUN, RUN/round-N (runs in {runs_dir}: {runs}) "
            "or a directory with adapter_config.json"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint {path} has no {ADAPTER_WEIGHTS}")
    return path.resolve()


def list_versions(runs_dir: Path) -> list[Version]:
    """Every saved round of every run in `runs_dir`, newest run first, highest round first."""
    versions = []
    for run in _runs(Path(runs_dir)):
        info = run.info()
        for p in run.path.iterdir():
            if (m := _ROUND.match(p.name)) and (p / ADAPTER_WEIGHTS).is_file():
                metrics = _read_json(p / METRICS) if (p / METRICS).is_file() else {}
                versions.append(
                    Version(
                        run.id, int(m.group(1)), info["mode"], info["hospitals"], info["examples"], p,
                        info["created"], metrics, metrics.get("epsilon"), metrics.get("delta"),
                    )
                )
    return sorted(versions, key=lambda v: (v.created, v.run_id, v.round), reverse=True)


def round_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.json of every round of a run, in round order."""
    rounds = sorted((int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := _ROUND.match(p.name)))
    return [_read_json(p / METRICS) for _, p in rounds if (p / METRICS).is_file()]


def plot_losses(run_dir: Path) -> Path:
    """Draw train and held-out loss per round (overall, and per hospital where recorded) into loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = round_metrics(run_dir)
    if not rounds:
        raise CheckpointError(f"{run_dir} has no round metrics to plot")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, style in (("train_loss", "-o"), ("heldout_loss", "-s")):
        points = [(m["round"], m[key]) for m in rounds if m.get(key) is not None]
        if points:
            axes.plot(*zip(*points), style, linewidth=2, label=key.replace("_", " "))
    hospitals = sorted({h for m in rounds for h in m.get("hospitals", {})})
    for hospital in hospitals:
        for key, style in (("train_loss", ":"), ("heldout_loss", "--")):
            points = [
                (m["round"], m["hospitals"][hospital][key])
                for m in rounds
                if m.get("hospitals", {}).get(hospital, {}).get(key) is not None
            ]
            if points:
                axes.plot(*zip(*points), style, alpha=0.7, label=f"{hospital} {key.replace('_', ' ')}")
    info = RunDir(Path(run_dir)).info() if (Path(run_dir) / RUN_FILE).is_file() else {}
    axes.set(xlabel="round", ylabel="loss per answer token", title=f"{Path(run_dir).name} ({info.get('mode', '?')})")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    out = Path(run_dir) / "loss.png"
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def finished_runs(runs_dir: Path, mode: str, hospitals: set[str] | None = None) -> list[Path]:
    """Folders of the runs under `runs_dir` of `mode` with at least one saved round (trained on exactly
    `hospitals`, when given), oldest first."""
    found = []
    for path in runs_dir.glob("*/run.json"):
        info = json.loads(path.read_text())
        if info["mode"] == mode and info.get("rounds_completed") and (hospitals is None or set(info["hospitals"]) == hospitals):
            found.append((info["created"], path.parent))
    return [p for _, p in sorted(found)]


def unfinished_run(
    runs_dir: Path, mode: str, hospitals: Collection[str], settings: RunSettings, data: Collection[Path],
    recipe: Mapping[str, Any] | None = None,
) -> RunDir | None:
    """The run an interrupted `train` left part-way, to continue rather than redo, or None: the newest run
    under `runs_dir` of `mode` on exactly `hospitals`, if it has the same `settings` (and federation
    `recipe`, on the fields the run recorded), started after the files of `data` that exist were last
    written, and has at least one round saved and fewer than planned. Unreadable runs are passed over."""
    newest = None
    for run in _runs(Path(runs_dir)):  # oldest first: run ids begin with their start time
        try:
            info = run.info()
        except CheckpointError:
            continue
        if info.get("mode") == mode and set(info.get("hospitals", ())) == set(hospitals):
            newest = run, info
    if newest is None:
        return None
    run, info = newest
    recorded, saved = info.get("recipe"), latest_round(run.path)
    if info.get("settings") != settings.model_dump(mode="json") or (recorded is None) != (recipe is None):
        return None
    if recipe is not None and any(recorded[key] != value for key, value in recipe.items() if key in recorded):
        return None
    if saved is None or saved[0] >= info["rounds_planned"]:
        return None
    written = max((int(p.stat().st_mtime) for p in data if p.exists()), default=0)  # whole seconds, as in run.json
    # (a run started in the second the data was written may have read the older data: it is not continued)
    return run if datetime.fromisoformat(info["created"]).timestamp() > written else None


def _runs(runs_dir: Path) -> list[RunDir]:
    if not runs_dir.is_dir():
        return []
    return sorted((RunDir(p) for p in runs_dir.iterdir() if (p / RUN_FILE).is_file()), key=lambda r: r.id)


def point_latest(runs_dir: Path, round_dir: Path) -> None:
    """Atomically point runs/latest at `round_dir` (a relative symlink, or a text file where links fail)."""
    link, target = runs_dir / LATEST, round_dir.relative_to(runs_dir).as_posix()
    tmp = runs_dir / f".{LATEST}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(target, target_is_directory=True)
    except OSError:
        tmp.write_text(target + "\n")
    os.replace(tmp, link)


def _read_latest(runs_dir: Path) -> Path | None:
    link = runs_dir / LATEST
    if link.is_symlink():
        return link.resolve() if link.exists() else None
    if link.is_file():
        return runs_dir / link.read_text().strip()
    return None


def _check_metrics(metrics: Mapping[str, Any], where: str = "metrics") -> None:
    """Metrics are aggregate numbers (and names) in nested mappings: no lists that could carry per-patient data."""
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: key {key!r} is not a string")
        if isinstance(value, Mapping):
            _check_metrics(value, f"{where}.{key}")
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise TypeError(f"{where}.{key}: {type(value).__name__} is not an aggregate number or name")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
