"""Differential privacy of the federation at hospital level: clipped updates, Gaussian noise, RDP accounting.

Each hospital clips its update (reply − global adapter) to L2 norm `clip` with Flower's `fixedclipping_mod`
(`clip_when_asked`: only when the server's train config carries the bound, so runs without DP are untouched).
The server wraps `AdapterFedAvg` in Flower's `DifferentialPrivacyClientSideFixedClipping` (`HospitalLevelDp`),
averages the accepted updates with equal weights and adds Gaussian noise of std σ·clip/m to the mean of the m
averaged updates: the sum of the updates gets noise σ·clip, its sensitivity to one hospital's whole dataset.
A Rényi-DP accountant (Flower's `RdpAccountant` over Google's dp-accounting) composes one sampled Gaussian
mechanism per round and reports ε at δ. Every connected hospital is asked every round (no random
subsampling), so the sampling rate is 1 and no amplification is claimed.

What ε covers: the adapter weights the server publishes (checkpoints, the chat model). Not covered: the
training metrics (losses, example counts) and what the server itself sees, every hospital's clipped update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace, compute_stdv

from federimed.fl.settings import ServerOptions
from federimed.fl.strategy import AdapterFedAvg
from federimed.fl.validation import WEIGHT_KEY

log = logging.getLogger("flwr").getChild("federimed")


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` when the server sent a clipping bound (a DP run); otherwise a no-op."""
    if any(KEY_CLIPPING_NORM in record for record in msg.content.config_records.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class HospitalAccountant:
    """Cumulative hospital-level (ε, δ): RDP accounting of one sampled Gaussian mechanism per round.

    Neighbouring federations differ by one hospital's entire dataset (add or remove one hospital);
    the sampling rate of a round is `sampled / hospitals`.
    """

    def __init__(self, hospitals: int, delta: float) -> None:
        from flwr.serverapp import RdpAccountant  # imports dp-accounting (a few seconds)

        self.hospitals = hospitals
        self.delta = delta
        self._rdp = RdpAccountant(
            PrivacyConfig(
                target_delta=delta,
                population_size=hospitals,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.POISSON,
            )
        )

    def release(self, noise_multiplier: float, sampled: int | None = None, rounds: int = 1) -> float:
        """Compose `rounds` rounds that each noise a sum of `sampled` (default: all) clipped updates; return ε."""
        event = GaussianPrivacyEvent(noise_multiplier, sampled or self.hospitals, self.hospitals)
        self._rdp.compose(event, rounds)
        return self.epsilon

    @property
    def releases(self) -> int:
        """Rounds composed so far."""
        return self._rdp.num_releases

    @property
    def epsilon(self) -> float:
        """ε at `delta` of everything released so far (0 before the first release)."""
        return self._rdp.get_epsilon(self.delta) if self.releases else 0.0


def hospital_epsilon(
    noise_multiplier: float, rounds: int, *, delta: float, hospitals: int, sampled: int | None = None
) -> float:
    """ε at `delta` after `rounds` rounds with noise multiplier σ, sampling `sampled` of `hospitals` each round."""
    return HospitalAccountant(hospitals, delta).release(noise_multiplier, sampled, rounds)


def noise_for_epsilon(
    epsilon: float, rounds: int, *, delta: float, hospitals: int, tolerance: float = 1e-3
) -> float:
    """The smallest noise multiplier σ (within `tolerance`) whose `rounds` rounds over all `hospitals` spend
    at most `epsilon` at `delta` (bisection on `hospital_epsilon`, which falls as σ grows)."""
    if epsilon <= 0 or rounds < 1:
        raise ValueError(f"need ε > 0 and at least one round, got ε={epsilon}, rounds={rounds}")
    low, high = 0.0, 1.0
    while hospital_epsilon(high, rounds, delta=delta, hospitals=hospitals) > epsilon:
        low, high = high, high * 2
    while high - low > tolerance:
        middle = (low + high) / 2
        if hospital_epsilon(middle, rounds, delta=delta, hospitals=hospitals) > epsilon:
            low = middle
        else:
            high = middle
    return high


@dataclass(frozen=True)
class RoundPrivacy:
    """The privacy spent up to one round (stored in its metrics.json)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip: float
    sampling_rate: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


class EqualWeightFedAvg(FedAvg):
    """FedAvg whose adapter is the plain mean of the replies (each hospital weighs the same, as the DP noise
    assumes); the training metrics stay weighted by num-examples. `averaged`: replies in the last mean."""

    def __init__(self) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY)
        self.averaged = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        self.averaged = len(valid)
        if not valid:
            return None, None
        records = [next(iter(reply.content.array_records.values())) for reply in valid]
        mean = {key: np.mean([record[key].numpy() for record in records], axis=0) for key in records[0]}
        metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        return ArrayRecord({key: Array(np.asarray(value)) for key, value in mean.items()}), metrics


class HospitalLevelDp(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper around `AdapterFedAvg`, noised and accounted per round.

    Flower's wrapper sends `clip` to the hospitals with every training instruction and delegates evaluation.
    Its training aggregation is replaced so that the wrapped strategy still screens every reply and records
    drop-outs and rejections (Flower's skips the whole round when one reply is an error), the adapter is the
    equal-weight mean of the m accepted, clipped updates, and the noise std is σ·clip/m for the m actually
    averaged (Flower's assumes every sampled hospital). `released`: run round → privacy spent up to it.
    `earlier`: noise multipliers of a resumed run's saved rounds, which count towards ε.
    """

    def __init__(
        self,
        strategy: AdapterFedAvg,
        *,
        noise_multiplier: float,
        clip: float,
        delta: float,
        hospitals: int,
        earlier: Sequence[float] = (),
    ) -> None:
        if noise_multiplier <= 0:
            raise ValueError(f"differential privacy needs a positive noise multiplier, got {noise_multiplier}")
        super().__init__(strategy, noise_multiplier, clip, num_sampled_clients=hospitals)
        self.mean = EqualWeightFedAvg()
        strategy.aggregator = self.mean
        self.privacy = HospitalAccountant(hospitals, delta)
        for sigma in earlier:
            self.privacy.release(sigma)
        self.released: dict[int, RoundPrivacy] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, record and average the clipped updates (wrapped strategy), then noise and account the mean."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or not self.mean.averaged:
            return arrays, metrics
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.mean.averaged)
        noisy = arrays.to_numpy_ndarrays()
        add_gaussian_noise_inplace(noisy, std)
        arrays = ArrayRecord({key: Array(value) for key, value in zip(arrays.keys(), noisy, strict=True)})
        epsilon = self.privacy.release(self.noise_multiplier)
        number = self.strategy.run_round(server_round)
        self.released[number] = RoundPrivacy(  # every connected hospital is asked: sampling rate 1
            epsilon, self.privacy.delta, self.noise_multiplier, self.clipping_norm, sampling_rate=1.0
        )
        log.info(
            "round %d: DP noise std %.4g on the mean of %d clipped update(s) (clip %g, σ %g); "
            "hospital-level ε = %.3f at δ = %g after %d noised round(s)",
            number, std, self.mean.averaged, self.clipping_norm, self.noise_multiplier, epsilon,
            self.privacy.delta, self.privacy.releases,
        )
        return arrays, metrics


def earlier_noise(saved_rounds: Sequence[Mapping], dp: bool, run_id: str) -> list[float]:
    """Noise multipliers of a resumed run's saved rounds (metrics.json); refuse to mix DP and non-DP rounds."""
    private = [float(m["noise_multiplier"]) for m in saved_rounds if "noise_multiplier" in m]
    if private and not dp:
        raise ValueError(f"run {run_id} was trained with differential privacy: resume it with DP on")
    if dp and len(private) < len(saved_rounds):
        raise ValueError(f"run {run_id} has rounds trained without differential privacy: its ε is unbounded; "
                         "resume it without DP or start a new run")
    return private


def private_strategy(
    strategy: AdapterFedAvg, options: ServerOptions, saved_rounds: Sequence[Mapping] = (), run_id: str = ""
) -> HospitalLevelDp | None:
    """`strategy` wrapped for DP as `options` ask (None without DP), continuing a resumed run's account."""
    earlier = earlier_noise(saved_rounds, options.dp, run_id)
    if not options.dp:
        return None
    return HospitalLevelDp(
        strategy, noise_multiplier=options.dp_noise_multiplier, clip=options.dp_clip, delta=options.dp_delta,
        hospitals=options.hospitals, earlier=earlier,
    )
