"""Differential privacy for cohort statistics: per-patient contribution bounds at each hospital, Gaussian
noise on the federation's summed counts, and a release threshold that keeps what one patient alone
could make appear (a stratum, a drug) hidden.

Unit of privacy: one patient (neighbouring federations differ by one patient's records), where training's
ε (`federimed.fl.dp`) covers one hospital's whole dataset. A hospital keeps, per patient, the first
`diagnoses` diagnosis codes, per patient and diagnosis the first `decisions` decisions and the first `drugs`
ingredients started (`CohortCounts.of_hospital`). A patient then adds to at most 2·diagnoses strata (the
diagnosis alone, and diagnosis × age band × sex): in each, +1 patient, +1 hospital at most, ≤ decisions
decisions, ≤ decisions ended conditions and +1 for each of ≤ drugs drugs, which bounds the L2 sensitivity
of the whole count vector (`ContributionBounds.l2_sensitivity`). The server adds N(0, σ²) to every summed
count and rounds; ε at δ/2 is the Rényi-DP accounting of that one Gaussian release (as for training). Which
strata and drugs exist is itself data: a count is released only when its noisy value reaches a threshold
high enough that something only one patient has appears with probability ≤ δ/2 over all they touch
(Gaussian partition selection), and never below `min_cell`. The whole release is (ε, δ)-DP at the patient
level; what the server sees before the noise (the exact sums) is not covered.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from federimed.cohort import CohortCounts


@dataclass(frozen=True)
class ContributionBounds:
    """What one patient may add to the counts of one hospital."""

    diagnoses: int = 4  # distinct diagnosis codes per patient (demo data: median 4)
    decisions: int = 2  # decisions per patient and diagnosis (median 1, 90th percentile 2)
    drugs: int = 3  # ingredients started per patient and diagnosis (90th percentile 3)

    @property
    def strata(self) -> int:
        """Strata one patient adds to: each diagnosis alone and in one age band × sex."""
        return 2 * self.diagnoses

    @property
    def l2_sensitivity(self) -> float:
        """L2 norm of the most one patient changes the vector of all counts."""
        per_stratum = 1 + 1 + 2 * self.decisions**2 + self.drugs  # patients, hospitals, decisions, ended, drugs
        return math.sqrt(self.strata * per_stratum)

    @property
    def released_items(self) -> int:
        """Strata and drug counts that one patient alone could make appear."""
        return self.strata * (1 + self.drugs)


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """ε at `delta` of one Gaussian release with noise std `noise_multiplier` × L2 sensitivity."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier whose single Gaussian release is (epsilon, delta)-DP."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    return float(dp_accounting.calibrate_dp_mechanism(
        RdpAccountant, dp_accounting.GaussianDpEvent, epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4,
    ))  # fmt: skip


@dataclass(frozen=True)
class CountNoise:
    """The Gaussian noise of one cohort release and the threshold that goes with it."""

    epsilon: float
    delta: float
    sigma: float  # std of the noise on every count
    threshold: int  # smallest noisy count released
    bounds: ContributionBounds

    @classmethod
    def calibrate(cls, epsilon: float, delta: float, min_cell: int, bounds: ContributionBounds) -> CountNoise:
        """Noise for (epsilon, delta) at the patient level: δ/2 for the Gaussian counts, δ/2 for the selection."""
        if epsilon <= 0 or not 0 < delta < 1:
            raise ValueError(f"cohort DP needs ε > 0 and 0 < δ < 1, not ε={epsilon}, δ={delta}")
        sigma = calibrate_noise_multiplier(epsilon, delta / 2) * bounds.l2_sensitivity
        return cls(epsilon, delta, sigma, max(min_cell, selection_threshold(sigma, delta / 2, bounds)), bounds)

    def applied(self, counts: CohortCounts, hospitals: int, rng: np.random.Generator) -> CohortCounts:
        """`counts` with noise on every count, rounded to whole numbers and made consistent (no negative
        count, no more drug starts or ended conditions than patients or decisions, no more hospitals than
        answered): post-processing, free of privacy cost."""
        from federimed.cohort import CohortCounts

        def noisy(value: int, high: int | None = None) -> int:
            value = max(0, round(value + rng.normal(0.0, self.sigma)))
            return value if high is None else min(value, high)

        out = CohortCounts(diagnoses=dict(counts.diagnoses))
        for key, cell in counts.cells.items():
            mine = out.cells[key]
            mine.patients, mine.decisions = noisy(cell.patients), noisy(cell.decisions)
            mine.hospitals, mine.ended = noisy(cell.hospitals, hospitals), noisy(cell.ended, mine.decisions)
            for drug, n in cell.drugs.items():
                mine.drugs[drug] = noisy(n, mine.patients)
        return out

    def describe(self) -> dict[str, Any]:
        """What the artefact records about the noise."""
        return {"epsilon": self.epsilon, "delta": self.delta, "sigma": self.sigma, "threshold": self.threshold,
                "unit": "patient", "bounds": asdict(self.bounds)}


def selection_threshold(sigma: float, delta: float, bounds: ContributionBounds) -> int:
    """The smallest released noisy count such that any of the `released_items` a single patient touches,
    counted 1 before noise and rounded after, reaches it with total probability ≤ `delta`."""
    quantile = NormalDist().inv_cdf(1 - delta / bounds.released_items)
    return math.ceil(1.5 + sigma * quantile)
