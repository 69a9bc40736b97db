"""Flower run config (flat kebab-case keys, `--run-config "local-steps=2"`) ↔ FederiMed's pydantic settings.

Keys mirror the settings' fields: `num-server-rounds` (rounds), `eval-batch-size`, `heldout-max-dialogues`, the TrainSettings
fields (`local-steps`, `batch-size`, `seq-len`, `lr`, ...), `lora-<field>` and `model-<field>`
(`lora-target-modules` is a comma-separated list or `all-linear`). Server-only options (`hospitals`,
`runs-dir`, ...) live in `ServerOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from federimed.config import LoraSettings, ModelSettings, RunSettings, TrainSettings

Scalar = bool | int | float | str

_SECTIONS: dict[str, tuple[str, type[BaseModel]]] = {
    "model": ("model-", ModelSettings),
    "lora": ("lora-", LoraSettings),
    "train": ("", TrainSettings),
}
_TOP = {"num-server-rounds": "rounds", "eval-batch-size": "eval_batch_size", "heldout-max-dialogues": "heldout_max_dialogues"}


def _key(prefix: str, field: str) -> str:
    return prefix + field.replace("_", "-")


def run_settings(run_config: Mapping[str, Scalar]) -> RunSettings:
    """RunSettings from a Flower run config; keys that are absent keep their defaults, others are ignored."""
    data: dict[str, object] = {field: run_config[key] for key, field in _TOP.items() if key in run_config}
    for section, (prefix, model) in _SECTIONS.items():
        values = {f: run_config[_key(prefix, f)] for f in model.model_fields if _key(prefix, f) in run_config}
        targets = values.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            values["target_modules"] = [t.strip() for t in targets.split(",")]
        data[section] = values
    return RunSettings.model_validate(data)


def to_run_config(settings: RunSettings) -> dict[str, Scalar]:
    """The flat run config that `run_settings` turns back into `settings`."""
    config: dict[str, Scalar] = {key: getattr(settings, field) for key, field in _TOP.items()}
    for section, (prefix, _) in _SECTIONS.items():
        for field, value in getattr(settings, section).model_dump().items():
            config[_key(prefix, field)] = ",".join(value) if isinstance(value, list) else value
    return config


RECIPE_FIELDS = frozenset({
    "aggregator", "server_lr", "server_momentum", "trim_fraction", "proximal_mu", "max_update_norm",
    "dp", "dp_noise_multiplier", "dp_clip", "dp_delta", "secagg", "secagg_max_weight", "secagg_clipping_range",
    "secagg_quantization_range",
})


class ServerOptions(BaseModel):
    """How the ServerApp runs a federation (run-config keys in brackets)."""

    model_config = ConfigDict(extra="forbid")

    settings: RunSettings = Field(default_factory=RunSettings)
    task: Literal["train", "cohort"] = Field(
        "train", description="train the adapter, or gather cohort statistics (counts only) [task]"
    )
    min_cell: int = Field(
        11, ge=1, description="cohort statistics: cells under this many patients are suppressed (CMS: 11) [min-cell]"
    )
    cohort_epsilon: float = Field(
        0.0, ge=0, description="cohort statistics: patient-level DP ε of the released counts, 0 for none [cohort-epsilon]"
    )
    cohort_delta: float = Field(1e-6, gt=0, lt=1, description="cohort statistics: DP δ [cohort-delta]")
    hospitals: int = Field(3, ge=1, description="hospitals that must join before round 1 [hospitals]")
    min_hospitals: int = Field(1, ge=1, description="fewest replies a round needs after round 1 [min-hospitals]")
    runs_dir: Path = Field(Path("runs"), validate_default=True, description="where runs are written [runs-dir]")
    resume_run: str = Field("", description="run id to continue from its last checkpoint [resume-run]")
    round_timeout: float = Field(3600, gt=0, description="seconds to wait for replies in a round [round-timeout]")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="share of hospitals scoring held-out loss")
    max_update_norm: float = Field(
        0.0, ge=0, description="reject replies with ‖reply − global‖₂ above this, 0: no bound [max-update-norm]"
    )
    aggregator: Literal["fedavg", "fednova", "fedavgm", "trimmed-mean", "median"] = Field(
        "fednova",
        description="how accepted replies are combined; left out, fednova, or fedavg under dp or secagg [aggregator]",
    )
    server_lr: float = Field(1.0, gt=0, description="fedavgm and fednova: the server's learning rate [server-lr]")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: the server's momentum [server-momentum]")
    trim_fraction: float = Field(
        0.34, gt=0, lt=0.5, description="share trimmed at each end by trimmed-mean [trim-fraction]"
    )
    proximal_mu: float = Field(
        0.0, ge=0, description="FedProx: each hospital adds μ/2 ‖w − global‖² to its loss, 0 for none [proximal-mu]"
    )
    dp: bool = Field(False, description="hospital-level differential privacy: clip, noise, account ε [dp]")
    dp_noise_multiplier: float = Field(
        1.0, gt=0, description="noise std / clip bound on the sum of updates (σ) [dp-noise-multiplier]"
    )
    dp_clip: float = Field(1.0, gt=0, description="L2 bound on each hospital's update per round [dp-clip]")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="δ at which ε is reported [dp-delta]")
    secagg: bool = Field(False, description="secure aggregation (SecAgg+): the server sees only the sum [secagg]")
    secagg_num_shares: float = Field(
        1.0, gt=0, le=1, description="share of a round's hospitals each secret is split among [secagg-num-shares]"
    )
    secagg_reconstruction_threshold: float = Field(
        0.67, gt=0, le=1,
        description="share of those shares that rebuilds a secret, at least 2 [secagg-reconstruction-threshold]",
    )
    secagg_max_weight: float = Field(
        1000.0, gt=0, description="num-examples that weighs 1 in the quantised sum [secagg-max-weight]"
    )
    secagg_clipping_range: float = Field(
        1.0, gt=0, description="clip (num-examples/max-weight)·update to ±this [secagg-clipping-range]"
    )
    secagg_quantization_range: int = Field(
        2**22, ge=2, description="levels each clipped value is rounded to [secagg-quantization-range]"
    )

    @field_validator("runs_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Absolute where the options are made (the CLI, before `flwr run`), so that the ServerApp, which runs
        in another folder, writes where the caller meant. A relative runs-dir in a run config that reaches
        the ServerApp directly is resolved against the ServerApp's folder."""
        return path.resolve()

    @model_validator(mode="before")
    @classmethod
    def _private_runs_average(cls, data: object) -> object:
        """DP and SecAgg+ need the plain weighted mean: it is their default aggregator."""
        if isinstance(data, dict) and "aggregator" not in data and (data.get("dp") or data.get("secagg")):
            return data | {"aggregator": "fedavg"}
        return data

    @model_validator(mode="after")
    def _dp_needs_a_mean(self) -> ServerOptions:
        if self.dp and self.aggregator != "fedavg":
            raise ValueError(
                f"dp needs aggregator 'fedavg' (the noise is calibrated to a mean), not {self.aggregator!r}"
            )
        return self

    @model_validator(mode="after")
    def _secagg_needs_a_sum(self) -> ServerOptions:
        if not self.secagg:
            return self
        if self.aggregator != "fedavg":
            raise ValueError(f"secagg yields only the sum of the updates: aggregator must be 'fedavg', not "
                             f"{self.aggregator!r}")
        if self.hospitals < 2:
            raise ValueError(f"secagg needs at least 2 hospitals (the sum of one update is that update), "
                             f"got hospitals={self.hospitals}")
        if self.hospitals * self.secagg_quantization_range >= 2**32:
            raise ValueError(f"secagg-quantization-range {self.secagg_quantization_range} is too large for "
                             f"{self.hospitals} hospitals: their sum must stay below 2^32")
        return self

    def recipe(self) -> dict[str, Scalar]:
        """What shapes the global adapter beyond the training settings (aggregation, FedProx, DP, SecAgg+):
        recorded in run.json, and what a resumed run must keep."""
        return self.model_dump(include=RECIPE_FIELDS)

    def resume_mismatch(self, recorded: Mapping[str, Scalar] | None) -> str | None:
        """Why continuing a run trained with the `recorded` recipe under these options would change it, or
        None (also for a run from before recipes were recorded)."""
        if not recorded:
            return None
        changed = [f"{k} {recorded[k]!r} → {v!r}" for k, v in self.recipe().items() if k in recorded and recorded[k] != v]
        return ", ".join(changed) or None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Scalar]) -> ServerOptions:
        """ServerOptions from a Flower run config (training settings via `run_settings`)."""
        data: dict[str, object] = {"settings": run_settings(run_config)}
        for field in cls.model_fields:
            if field != "settings" and (key := field.replace("_", "-")) in run_config:
                data[field] = run_config[key]
        return cls.model_validate(data)

    def to_run_config(self) -> dict[str, Scalar]:
        """The flat run config that `from_run_config` turns back into these options."""
        config = to_run_config(self.settings)
        for field, value in self.model_dump(exclude={"settings"}).items():
            config[field.replace("_", "-")] = str(value) if isinstance(value, Path) else value
        return config
