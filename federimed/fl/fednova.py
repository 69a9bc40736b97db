"""FedNova: federated averaging for sites that run different numbers of local steps (Wang et al., 2020,
"Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization").

With `epochs`, a hospital runs as many local steps as its data needs (`RunSettings.steps_per_round`), so
a hospital with 5× the dialogues moves its adapter about 5× further in a round. Plain FedAvg then weighs
it by its dialogues *and* by its steps: in effect by the square of its size, and the small hospitals'
patients almost vanish from the global model (on the demo's federation: 92 / 5 / 3 % of the update for
189 / 46 / 34 dialogues, against 70 / 17 / 13 % in centralized training). FedNova divides each update by
its steps before the weighted mean, then takes η · τ_eff steps along it (τ_eff = Σ pᵢ τᵢ):

    x ← x + η · τ_eff · Σᵢ pᵢ (xᵢ − x) / τᵢ,   pᵢ = nᵢ / Σ n,   τ_eff = Σᵢ pᵢ τᵢ

With η = 1 (the server learning rate) and equal steps everywhere this is FedAvg. Centralized training
takes Σ τᵢ steps for the same gradient work, so η = Σ τᵢ / τ_eff moves the global adapter as many steps
along the averaged per-step update as centralized takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

STEPS_KEY = "steps"


class FedNova(FedAvg):
    """FedAvg with step-normalised updates; `current_arrays` must hold the global adapter sent this round."""

    def __init__(self, *, weighted_by_key: str, steps_key: str = STEPS_KEY, server_lr: float = 1.0) -> None:
        super().__init__(weighted_by_key=weighted_by_key)
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.steps_key = steps_key
        self.server_lr = server_lr
        self.current_arrays: ArrayRecord | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)  # checks the replies, averages the metrics
        if mean is None:
            return None, metrics
        if self.current_arrays is None:
            raise RuntimeError("FedNova needs the global adapter of the round (current_arrays) before aggregating")
        valid = [r for r in replies if not r.has_error()]
        weights = np.array([float(r.content["metrics"][self.weighted_by_key]) for r in valid])
        steps = np.array([float(r.content["metrics"][self.steps_key]) for r in valid])
        share = weights / weights.sum()
        scale = self.server_lr * float(share @ steps)  # η · τ_eff
        start = self.current_arrays
        updated = {}
        for key in start:
            origin = start[key].numpy()
            direction = sum(p / t * (r.content["arrays"][key].numpy() - origin) for p, t, r in zip(share, steps, valid))
            updated[key] = Array(np.asarray(origin + scale * direction, dtype=origin.dtype))
        self.current_arrays = ArrayRecord(updated)
        return self.current_arrays, metrics
