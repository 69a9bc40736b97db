"""Screen each hospital's training reply before aggregation, and choose the aggregation rule.

A reply is aggregated only if it is well-formed and plausible: exactly one ArrayRecord and one
MetricRecord (what Flower's aggregation expects; anything else would stop the whole run), the expected
metrics as finite numbers with a positive `num-examples`, the same array keys, shapes and dtypes as the
global adapter the server sent, only finite values, and an update norm ‖reply − global‖₂ within
`max_update_norm` (0: no bound). A rejected reply is logged with its hospital and reason and left out;
the round goes on with the others.

Aggregation: `make_aggregator` returns Flower's FedAvg (weighted mean), FedNova (the weighted mean of
step-normalised updates, `federimed.fl.fednova`), FedAvgM (the weighted mean taken as a pseudo-gradient
by a server SGD step with momentum), FedTrimmedAvg (coordinate-wise trimmed mean) or
FedMedian (coordinate-wise median); the last two ignore `num-examples` weights, so no hospital can buy
influence by claiming many examples, and one outlier cannot drag the result far.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg

from federimed.fl.fednova import FedNova

log = logging.getLogger("flwr").getChild("federimed")

AGGREGATORS = ("fedavg", "fednova", "fedavgm", "trimmed-mean", "median")
WEIGHT_KEY = "num-examples"


class ReplyRejected(ValueError):
    """A hospital's reply is not fit for aggregation."""


@dataclass
class Screened:
    """The outcome of screening one round's replies (replies carrying errors are not screened)."""

    accepted: list[Message] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    """Hospital → why its reply was left out."""
    norms: dict[str, float] = field(default_factory=dict)
    """Hospital → ‖reply − global‖₂ for every reply whose arrays could be compared."""


class ReplyScreen:
    """Checks training replies against the global adapter of the round in flight (`set_global`)."""

    def __init__(
        self,
        *,
        max_update_norm: float = 0.0,
        metric_keys: Collection[str] = (),
        arrays_key: str = "arrays",
    ) -> None:
        if max_update_norm < 0 or math.isnan(max_update_norm):
            raise ValueError(f"max_update_norm must be >= 0 (0: no bound), got {max_update_norm}")
        self.max_update_norm = max_update_norm
        self.metric_keys = frozenset(metric_keys) | {WEIGHT_KEY} if metric_keys else frozenset()
        self.arrays_key = arrays_key
        self._global: dict[str, np.ndarray] = {}

    def set_global(self, arrays: ArrayRecord) -> None:
        """Remember the adapter the server sent this round (what replies are compared with)."""
        self._global = {key: array.numpy() for key, array in arrays.items()}

    def check(self, content: RecordDict) -> float:
        """The update norm of a well-formed, plausible reply; raise ReplyRejected saying why otherwise."""
        norm = self.update_norm(content)
        self._check_bound(norm)
        return norm

    def _check_bound(self, norm: float) -> None:
        if self.max_update_norm and not norm <= self.max_update_norm:
            raise ReplyRejected(f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}")

    def update_norm(self, content: RecordDict) -> float:
        """‖reply − global‖₂ of a well-formed reply with finite values; raise ReplyRejected otherwise."""
        if not self._global:
            raise RuntimeError("ReplyScreen.set_global must be called before replies are checked")
        self._check_metrics(content)
        if list(content.array_records) != [self.arrays_key]:
            raise ReplyRejected(
                f"expected one ArrayRecord {self.arrays_key!r}, got {sorted(content.array_records) or 'none'}"
            )
        arrays = content.array_records[self.arrays_key]
        missing, extra = self._global.keys() - arrays.keys(), arrays.keys() - self._global.keys()
        if missing or extra:
            raise ReplyRejected(
                "adapter keys differ from the global adapter's: "
                f"{len(missing)} missing {_few(missing)}, {len(extra)} unexpected {_few(extra)}"
            )
        squares = 0.0
        for key, expected in self._global.items():
            try:
                value = arrays[key].numpy()
            except Exception as err:  # noqa: BLE001 - any undecodable array is a rejection, not a crash
                raise ReplyRejected(f"array {key!r} cannot be read: {err}") from None
            if value.shape != expected.shape:
                raise ReplyRejected(f"array {key!r} has shape {value.shape}, expected {expected.shape}")
            if value.dtype != expected.dtype:
                raise ReplyRejected(f"array {key!r} has dtype {value.dtype}, expected {expected.dtype}")
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                raise ReplyRejected(f"array {key!r} holds {bad} NaN/Inf value(s)")
            squares += float(np.square(value.astype(np.float64) - expected.astype(np.float64)).sum())
        return math.sqrt(squares)

    def _check_metrics(self, content: RecordDict) -> None:
        if len(content.metric_records) != 1:
            raise ReplyRejected(f"expected one MetricRecord, got {len(content.metric_records)}")
        metrics = next(iter(content.metric_records.values()))
        if self.metric_keys and set(metrics.keys()) != self.metric_keys:
            got = set(metrics.keys())
            raise ReplyRejected(
                f"metrics {sorted(got)} differ from the expected {sorted(self.metric_keys)}"
            )
        if WEIGHT_KEY not in metrics:
            raise ReplyRejected(f"metric {WEIGHT_KEY!r} missing")
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ReplyRejected(f"metric {key!r} is {value!r}, not a finite number")
        if metrics[WEIGHT_KEY] <= 0:
            raise ReplyRejected(f"metric {WEIGHT_KEY!r} is {metrics[WEIGHT_KEY]!r}, not positive")

    def screen(self, replies: Iterable[Message], name: Callable[[Message], str], server_round: int) -> Screened:
        """Split replies into those fit for aggregation and rejections (logged with hospital and reason).

        Replies that carry an error are passed through untouched: the strategy records them as drop-outs.
        """
        result = Screened()
        for reply in replies:
            if reply.has_error():
                result.accepted.append(reply)
                continue
            hospital = name(reply)
            try:
                result.norms[hospital] = self.update_norm(reply.content)
                self._check_bound(result.norms[hospital])
            except ReplyRejected as err:
                result.rejected[hospital] = str(err)
                log.warning(
                    "round %d: rejected the update of hospital %s (node %d): %s",
                    server_round, hospital, reply.metadata.src_node_id, err,
                )
                continue
            result.accepted.append(reply)
        return result


def _few(keys: Collection[str], limit: int = 3) -> str:
    shown = sorted(keys)[:limit]
    return "[" + ", ".join(shown) + (", ..." if len(keys) > limit else "") + "]"


def make_aggregator(
    name: str, *, trim_fraction: float = 0.34, server_lr: float = 1.0, server_momentum: float = 0.9
) -> FedAvg:
    """Flower's strategy whose `aggregate_train` implements `name` (one of AGGREGATORS).

    `fednova` and `fedavgm` need the round's global adapter in `current_arrays` before aggregating.
    `fednova`: takes server_lr · τ_eff steps along the step-normalised mean (`federimed.fl.fednova`).
    `fedavgm`: global ← global − server_lr · m, m ← server_momentum · m + (global − weighted mean).
    `trimmed-mean` drops int(trim_fraction × n) values at each end of every coordinate (n replies):
    0.34 trims one of three hospitals each side; with fewer than 1/trim_fraction replies it trims none.
    """
    if name == "fedavg":
        return FedAvg(weighted_by_key=WEIGHT_KEY)
    if name == "fednova":
        return FedNova(weighted_by_key=WEIGHT_KEY, server_lr=server_lr)
    if name == "fedavgm":
        return FedAvgM(weighted_by_key=WEIGHT_KEY, server_learning_rate=server_lr, server_momentum=server_momentum)
    if name == "trimmed-mean":
        if not 0 < trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in (0, 0.5), got {trim_fraction}")
        return FedTrimmedAvg(weighted_by_key=WEIGHT_KEY, beta=trim_fraction)
    if name == "median":
        return FedMedian(weighted_by_key=WEIGHT_KEY)
    raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, not {name!r}")
